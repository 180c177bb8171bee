"""Re-run `lab run` inside a virtme-ng VM booted on a kernel that has MPLS routing.

Development machines run kernels without mpls_router and cannot load modules; Debian's kernel
image has them. virtme-ng boots it with the host's filesystem (read-only, plus --rwdir and overlay
dirs), so the same interpreter and checkout run inside. The guest does not inherit our environment
and the kernel command line is short, so the inner command goes through a launcher script.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

IN_VM_ENV = "MPLSORCH_LAB_IN_VM"          # set inside the guest: do not recurse
RESULT_ENV = "MPLSORCH_LAB_RESULT"        # where the inner run writes its result for the outer one
PASS_ENV: tuple[str, ...] = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
                             "HOME", "LANG", "LC_ALL", "TERM", "NO_COLOR")


class VMUnavailable(RuntimeError):
    """No way to boot the lab VM; the message says what is missing."""


def _version_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_kernel() -> Path:
    """MPLSORCH_LAB_KERNEL, else the newest /boot/vmlinuz-*."""
    if os.environ.get("MPLSORCH_LAB_KERNEL"):
        k = Path(os.environ["MPLSORCH_LAB_KERNEL"])
        if not k.is_file():
            raise VMUnavailable(f"MPLSORCH_LAB_KERNEL={k} is not a file")
        return k
    images = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not images:
        raise VMUnavailable("no kernel image /boot/vmlinuz-* to boot the lab VM "
                            "(apt-get install linux-image-amd64, or set MPLSORCH_LAB_KERNEL)")
    if not os.access(images[-1], os.R_OK):
        raise VMUnavailable(f"kernel image {images[-1]} is not readable")
    return images[-1]


def find_vng() -> Path:
    """vng next to the running interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / "vng"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("vng")
    if found:
        return Path(found)
    raise VMUnavailable("virtme-ng's `vng` is neither next to " + sys.executable +
                        " nor on PATH (pip install virtme-ng, or the project's [lab] extra)")


def check_qemu() -> None:
    if not shutil.which("qemu-system-x86_64"):
        raise VMUnavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")


@dataclass(frozen=True)
class VMResult:
    returncode: int
    result: dict[str, Any] | None   # what the inner run wrote, None when it never finished


def _guest_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("MPLSORCH_")})
    for extra in os.environ.get("MPLSORCH_LAB_PASSENV", "").split():
        if extra in os.environ:
            env[extra] = os.environ[extra]
    env[IN_VM_ENV] = "1"
    return env


def rw_dirs(cwd: str) -> list[str]:
    """Host dirs writable in the guest: the cwd plus MPLSORCH_LAB_RWDIRS (colon separated)."""
    dirs = [cwd] + [d for d in os.environ.get("MPLSORCH_LAB_RWDIRS", "").split(":") if d]
    out: list[str] = []
    for d in dirs:
        d = os.path.abspath(d)
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def _relay(src: IO[bytes] | None, dst: TextIO) -> None:
    if src is None:
        return
    out = dst.buffer if hasattr(dst, "buffer") else None
    for chunk in iter(lambda: src.read1(65536), b""):
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            dst.write(chunk.decode(errors="replace"))
            dst.flush()


def run_in_vm(inner_args: list[str]) -> VMResult:
    """Boot the VM and run `python -m orchestrator lab run <inner_args>` there, in the same cwd."""
    kernel, vng = find_kernel(), find_vng()
    check_qemu()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mplsorch-vm-") as tmp:
        result = Path(tmp, "result.json")
        env = _guest_env() | {RESULT_ENV: str(result)}
        script = Path(tmp, "launch.sh")
        script.write_text("#!/bin/sh\n"
                          f"cd {shlex.quote(cwd)} || exit 3\n"
                          f"exec env {' '.join(shlex.quote(f'{k}={v}') for k, v in sorted(env.items()))} "
                          f"{shlex.quote(sys.executable)} -m orchestrator lab run "
                          + " ".join(shlex.quote(a) for a in inner_args) + "\n")
        argv = [str(vng), "--run", str(kernel), "--disable-kvm",
                "--memory", os.environ.get("MPLSORCH_LAB_MEMORY", "2G"),
                "--cpus", os.environ.get("MPLSORCH_LAB_CPUS", "2"),
                "--overlay-rwdir", "/etc", "--cwd", cwd, "--rwdir", tmp]
        for d in rw_dirs(cwd):
            argv += ["--rwdir", d]
        argv += ["--exec", f"sh {shlex.quote(str(script))}"]
        # qemu opens /proc/self/fd/1 and 2 with O_TRUNC: handed our files directly, it would wipe
        # what was written to them before; pipes relayed by threads keep both streams intact.
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        relays = [threading.Thread(target=_relay, args=(src, dst), daemon=True)
                  for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for r in relays:
            r.start()
        try:
            rc = proc.wait()
            for r in relays:
                r.join(timeout=5)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        data: dict[str, Any] | None = None
        if result.exists():
            try:
                data = json.loads(result.read_text())
            except ValueError:
                data = None
        return VMResult(rc, data)
