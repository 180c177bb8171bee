"""sd_notify without libsystemd: a few datagrams to $NOTIFY_SOCKET.

The protocol is one AF_UNIX datagram of newline-separated KEY=VALUE fields (sd_notify(3)); the
socket is a path, or an abstract name written with a leading "@". Writing it here costs twenty
lines, where python-systemd needs libsystemd's headers to build and sdnotify is unmaintained.
Without $NOTIFY_SOCKET (not under systemd, or Type= other than notify) every call is a no-op that
returns False, and a send that fails is logged, never raised: losing systemd's socket must not
take the balancer down with it (the watchdog will say so, if one is set).

Use: `ready()` once netlink, the queue and the first reconcile are up; `watchdog()` every
`watchdog_interval()` seconds from the loop (so a stuck loop stops pinging); `reloading()` and
`ready()` around a SIGHUP reload; `stopping()` at shutdown; `status(text)` whenever useful.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "notifier", "watchdog_timeout"]

log = logging.getLogger("mplsorch")


def _address(value: str | None) -> str | None:
    """The socket address of $NOTIFY_SOCKET, or None when absent or of a kind we do not speak
    (vsock: is for virtual machines' managers, not a service)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_timeout(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """WatchdogSec= as systemd passes it (WATCHDOG_USEC), in seconds; None when no watchdog is
    asked of this process (absent, invalid, zero, or WATCHDOG_PID names another process)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000


class Notifier:
    """The service manager's notification socket, as named by the environment at creation."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET"))
        self._timeout = watchdog_timeout(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE fields in one datagram; True if the manager got it."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", fields[0].split("=", 1)[0] if fields else "", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic time systemd wants with it; send ready() when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises;
        None when no watchdog is asked for."""
        return None if self._timeout is None or self.address is None else self._timeout / 2


def notifier() -> Notifier:
    """A Notifier for this process's environment."""
    return Notifier()
