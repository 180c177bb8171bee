"""The client side of the daemon's control socket: where it is by default, and one request. What
every `mplsorch` command that asks the daemon imports, so it stays cheap to import (no asyncio,
no configuration models): the daemon's own side is `daemon/control.py`."""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing's own costs an import: not on the quick path
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CONTROL_SOCKET = "/run/mplsorch/mplsorch.sock"


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Ask the running daemon: one JSON request line, one JSON answer line."""
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
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    return answer
