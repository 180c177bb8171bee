"""What the lab's two guest backends (a UML kernel, a QEMU VM) share: how the inner `lab run` is
launched in the guest, and how its result and output come back.

Both boot a kernel that has MPLS routing over the host's own filesystem and run the same
interpreter and checkout inside, as `python -m orchestrator lab run ARGS` with IN_GUEST_ENV set (so
it builds the lab directly instead of booting again). A guest does not inherit our environment and
its command line is short, so the inner command goes through a launcher script that sets it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

IN_GUEST_ENV = "MPLSORCH_LAB_IN_VM"  # set inside a guest: build the lab here, do not boot again
RESULT_ENV = "MPLSORCH_LAB_RESULT"  # where the inner run writes its result for the outer one
PASS_ENV: tuple[str, ...] = (
    "PATH",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "HOME",
    "LANG",
    "LC_ALL",
    "TERM",
    "NO_COLOR",
)


class GuestUnavailable(RuntimeError):
    """The backend cannot boot its guest; the message says what is missing."""


@dataclass(frozen=True)
class GuestResult:
    returncode: int  # the guest process's (vng's or the UML kernel's) exit status
    result: dict[str, Any] | None  # what the inner run wrote, None when it never finished


def guest_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The inner run's environment: the basics, every MPLSORCH_* variable, MPLSORCH_LAB_PASSENV."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("MPLSORCH_")})
    for extra in os.environ.get("MPLSORCH_LAB_PASSENV", "").split():
        if extra in os.environ:
            env[extra] = os.environ[extra]
    env[IN_GUEST_ENV] = "1"
    return env | (overrides or {})


def launcher(cwd: str, env: dict[str, str], inner_args: list[str]) -> str:
    """A shell script that runs the inner `lab run` in CWD with exactly ENV."""
    return (
        "#!/bin/sh\n"
        f"cd {shlex.quote(cwd)} || exit 3\n"
        f"exec env {' '.join(shlex.quote(f'{k}={v}') for k, v in sorted(env.items()))} "
        f"{shlex.quote(sys.executable)} -m orchestrator lab run " + " ".join(shlex.quote(a) for a in inner_args) + "\n"
    )


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _out(dst: TextIO, chunk: bytes) -> None:
    if hasattr(dst, "buffer"):
        dst.buffer.write(chunk)
    else:
        dst.write(chunk.decode(errors="replace"))
    dst.flush()


def relay_stream(src: IO[bytes] | None, dst: TextIO) -> None:
    """Copy a pipe to DST until it closes (bytes as they come, nothing decoded on the way)."""
    if src is None:
        return
    for chunk in iter(lambda: src.read1(65536), b""):  # type: ignore[attr-defined]
        _out(dst, chunk)


class FileRelay(threading.Thread):
    """Copy a file that a guest appends to (through hostfs, which writes through to the host at
    once) to DST while it grows; `finish()` copies what is left and stops."""

    def __init__(self, path: Path, dst: TextIO, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.path, self.dst, self.interval = path, dst, interval
        self._done = threading.Event()
        self._offset = 0

    def _pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                while chunk := f.read(65536):
                    self._offset += len(chunk)
                    _out(self.dst, chunk)
        except FileNotFoundError:
            pass

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self._pump()

    def finish(self) -> None:
        self._done.set()
        self.join(timeout=5)
        self._pump()
