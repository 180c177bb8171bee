"""What every command that asks the running daemon shares: `ask` (one request, the exit codes of
a failure), the one-line error and the table printer. Plain Python, no typer: the asking
commands run without it (`quick.py`), so that they start fast (issue 15: the command answers in
under 1 s at 500,000 sessions in the lab's guest, where typer's import alone took 0.15-0.2 s).
A failure raises SystemExit with its exit code, which typer's commands pass on unchanged."""

from __future__ import annotations

import json
import sys

from orchestrator import control_socket

TYPE_CHECKING = False  # typing's own costs an import: not on the quick path
if TYPE_CHECKING:
    from typing import Any, NoReturn


FAILED = 1  # the daemon answered an error, or did not answer in time
BAD_INPUT = 2  # an unknown name or a bad value: the daemon changed nothing
NO_DAEMON = 3  # no daemon answers on the socket, or it is not ours to use

ANSWER_TIMEOUT_S = 10.0  # control_socket.request's: a daemon busy longer than this is reported, not waited for


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, `mplsorch: MESSAGE`, and exit `code`."""
    sys.stderr.write(f"mplsorch: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def ask(
    cmd: str, socket_path: str | None, config: str | None, timeout: float = ANSWER_TIMEOUT_S, **args: Any
) -> dict[str, Any]:
    path = socket_path
    if path is None and config is not None:
        from orchestrator.config.load import ConfigError, load_config

        try:
            path = load_config(config).node.control_socket
        except ConfigError as exc:
            fail(str(exc), BAD_INPUT)
    path = path or control_socket.DEFAULT_CONTROL_SOCKET
    try:
        answer = control_socket.request(path, cmd, timeout=timeout, **args)
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"no daemon answers on {path} (is `mplsorch run` running?)", NO_DAEMON)
    except TimeoutError:
        fail(f"the daemon on {path} did not answer {cmd!r} within {timeout:.0f} s", FAILED)
    except PermissionError:
        fail(f"{path}: the control socket is for root (or node.control_group) only", NO_DAEMON)
    if "error" in answer:
        fail(str(answer["error"]), BAD_INPUT if answer.get("bad_input") else FAILED)
    return answer


def table(title: str, columns: list[str], rows: list[list[Any]]) -> str:
    """A plain table: its title, the header and one line per row, each column as wide as its
    widest cell, two spaces between columns, each line ending in a newline. Plain text, because a
    page of 1,000 sessions must print in well under a second (issue 15): rich's table took 0.76 s
    of the host's CPU for it."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
    lines = [title, _line(columns, widths), _line(["-" * w for w in widths], widths)]
    lines += [_line(row, widths) for row in cells]
    lines.append("")
    return "\n".join(lines)


def json_list(rows: list[Any]) -> str:
    """`json.dumps(rows)`, the same text, encoded a row at a time: for a page of 1,000 sessions its
    peak memory is 1.0 MB instead of 3.6 MB (json's encoder holds every small piece of the whole
    list before joining them), and in the lab's guest each page of memory touched anew costs a fault."""
    return "[" + ", ".join(map(json.dumps, rows)) + "]"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    write(table(title, columns, rows))


def write(text: str) -> None:
    """`text` on stdout in one write."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
