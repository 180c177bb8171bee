"""The control socket: a unix stream socket, root only (mode 0600 and the peer's uid checked), or
root and one configured group (`node.control_group`: mode 0660 with that group, and the peer must
be root or a member), one JSON request per line, one JSON answer per line. Two locks, not one: the
file mode stops other users at connect(), the peer check holds even if the mode were changed."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

# A request -> its answer, awaited on the loop (the workers' supervisor awaits its workers' answers).
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
log = logging.getLogger("mplsorch")
PROC = "/proc"


def peer_groups(pid: int, proc: str = PROC) -> set[int]:
    """The peer process's supplementary groups (SO_PEERCRED gives only its primary gid); empty
    when the process is gone or unreadable, which then grants nothing."""
    try:
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


class ControlServer:
    def __init__(self, path: str, handler: Handler, group: str | None = None, proc: str = PROC) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.proc = proc
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old)
        self.set_group(self.group)

    def set_group(self, group: str | None) -> None:
        """Mode 0600 root only, or 0660 owned by `group` (start, and a reload that changes it). A
        group gone since the configuration was checked, or one the daemon may not give the socket
        (not a member and no CAP_CHOWN, as under the shipped unit without `Group=`), leaves the
        socket root-only, logged: the daemon runs on either way."""
        gid = -1
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.error("control socket: no group %r; the socket stays root-only", group)
                group = None
        try:
            os.chown(self.path, -1, gid if group is not None else os.getgid())
        except PermissionError as exc:
            log.error("control socket: cannot give it group %s (%s); the socket stays root-only", group, exc.strerror)
            group = None
        self.group = group
        os.chmod(self.path, 0o660 if group is not None else 0o600)

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        """Root, or a member of the configured group (primary or supplementary)."""
        if uid == 0:
            return True
        if self.group is None:
            return False
        try:
            group_gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            return False
        return gid == group_gid or group_gid in peer_groups(pid, self.proc)

    def refusal(self) -> str:
        if self.group is None:
            return "the control socket is for root only"
        return f"the control socket is for root and group {self.group} only"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.path.exists():
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if not self.allowed(pid, uid, gid):
                answer: dict[str, Any] = {"error": self.refusal()}
            else:
                line = await reader.readline()
                try:
                    answer = await self.handler(json.loads(line or b"{}"))
                except (ValueError, KeyError, TypeError) as exc:
                    answer = {"error": f"bad request: {exc}"}
                except Exception as exc:  # a bug in one answer must not reach the operator as a traceback
                    log.error("control request failed: %s: %s", type(exc).__name__, exc)
                    answer = {"error": f"internal error: {type(exc).__name__}: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()
