"""The client side of the daemon's control socket: where it is by default, and one request. What
every `mplsorch` command that asks the daemon imports, so it stays cheap to import (no asyncio,
no configuration models): the daemon's own side is `daemon/control.py`."""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing's own costs an import: not on the quick path
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CONTROL_SOCKET = "/run/mplsorch/mplsorch.sock"


ROWS_START = b'"sessions": ['
ROWS_END = b'], "offset": '


class RowsText(str):
    """A `sessions` answer's rows as the daemon encoded them: the JSON text of their list."""

    __slots__ = ()


def request(path: str, cmd: str, timeout: float = 10.0, rows_text: bool = False, **args: Any) -> dict[str, Any]:
    """Ask the running daemon: one JSON request line, one JSON answer line. `rows_text`: a
    `sessions` answer's rows are left as the daemon encoded them (`RowsText`), the rest parsed."""
    import socket  # here: the configuration models, which the pure core loads, import this module

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        chunks: list[bytes] = []
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    text = b"".join(chunks)
    return with_rows_text(text) if rows_text else _parsed(text)


def with_rows_text(text: bytes) -> dict[str, Any]:
    """The answer `text`, its `sessions` list kept as its JSON text (`RowsText`): what `mplsorch
    sessions --json` prints, which is that text byte for byte (json.dumps's default separators,
    the same for a list as row by row; floats, strings and key order come back as they went), so
    a page's rows are never parsed and encoded again (issue 15: 0.05-0.1 s of a 1,000-row page
    in the lab's guest). Every role's daemon and the workers' supervisor answer `{"role": ...,
    "sessions": [...], "offset": ..., "total": ...}` in that order, and inside a JSON string a
    quote is escaped, so neither mark is met there; any other answer (an error) is parsed whole."""
    start, end = text.find(ROWS_START), text.rfind(ROWS_END)
    if start < 0 or end < start:
        return _parsed(text)
    answer = _parsed(text[:start] + ROWS_START + text[end:])
    answer["sessions"] = RowsText(text[start + len(ROWS_START) - 1 : end + 1].decode())
    return answer


def _parsed(text: bytes) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(text)
    return answer
