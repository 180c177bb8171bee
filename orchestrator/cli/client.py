"""What every command that asks the running daemon shares: the options that find its control
socket, `ask` (one request, the exit codes of a failure) and the table printer. Both
`daemon.py` and `operate.py` use it, so neither imports the other."""

from __future__ import annotations

import sys
from typing import Any

import typer

from orchestrator import control_socket

SocketOption = typer.Option(None, "--socket", metavar="PATH", help="Control socket of the daemon.")
ConfigOption = typer.Option(None, "--config", metavar="FILE", help="Find the socket in this config.")
JsonOption = typer.Option(False, "--json", help="The documented JSON on stdout.")

BAD_INPUT = 2


ANSWER_TIMEOUT_S = 10.0  # control_socket.request's: a daemon busy longer than this is reported, not waited for


def ask(
    cmd: str, socket_path: str | None, config: str | None, timeout: float = ANSWER_TIMEOUT_S, **args: Any
) -> dict[str, Any]:
    path = socket_path
    if path is None and config is not None:
        from orchestrator.config.load import ConfigError, load_config

        try:
            path = load_config(config).node.control_socket
        except ConfigError as exc:
            typer.echo(f"mplsorch: {exc}", err=True)
            raise typer.Exit(2) from None
    path = path or control_socket.DEFAULT_CONTROL_SOCKET
    try:
        answer = control_socket.request(path, cmd, timeout=timeout, **args)
    except (FileNotFoundError, ConnectionRefusedError):
        typer.echo(f"mplsorch: no daemon answers on {path} (is `mplsorch run` running?)", err=True)
        raise typer.Exit(3) from None
    except TimeoutError:
        typer.echo(f"mplsorch: the daemon on {path} did not answer {cmd!r} within {timeout:.0f} s", err=True)
        raise typer.Exit(1) from None
    except PermissionError:
        typer.echo(f"mplsorch: {path}: the control socket is for root (or node.control_group) only", err=True)
        raise typer.Exit(3) from None
    if "error" in answer:
        typer.echo(f"mplsorch: {answer['error']}", err=True)
        raise typer.Exit(BAD_INPUT if answer.get("bad_input") else 1)
    return answer


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A plain table: its title, the header and one line per row, each column as wide as its
    widest cell, two spaces between columns. Plain text, because a page of 1,000 sessions must
    print in well under a second (issue 15): rich's table took 0.76 s of the host's CPU for it."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
    lines = [title, _line(columns, widths), _line(["-" * w for w in widths], widths)]
    lines += [_line(row, widths) for row in cells]
    sys.stdout.write("\n".join(lines) + "\n")


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
