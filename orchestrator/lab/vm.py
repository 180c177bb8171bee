"""Re-run `lab run` inside a virtme-ng VM booted on a kernel that has MPLS routing.

Development machines run kernels without mpls_router and cannot load modules; Debian's kernel
image has them. virtme-ng boots it with the host's filesystem (read-only, plus --rwdir and overlay
dirs), so the same interpreter and checkout run inside. The guest does not inherit our environment
and the kernel command line is short, so the inner command goes through a launcher script.
KVM is used only when a probe shows that a guest really runs under it; otherwise QEMU emulates
(TCG), about 25x slower than native for user code: the UML backend is the fast one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from orchestrator.lab.guest import (
    RESULT_ENV,
    GuestResult,
    GuestUnavailable,
    guest_env,
    launcher,
    read_result,
    relay_stream,
)

KVM_PROBE_TIMEOUT = 10.0


class VMUnavailable(GuestUnavailable):
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
        raise VMUnavailable(
            "no kernel image /boot/vmlinuz-* to boot the lab VM "
            "(apt-get install linux-image-amd64, or set MPLSORCH_LAB_KERNEL)"
        )
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
    raise VMUnavailable(
        "virtme-ng's `vng` is neither next to "
        + sys.executable
        + " nor on PATH (pip install virtme-ng, or the project's [lab] extra)"
    )


def check_qemu() -> None:
    if not shutil.which("qemu-system-x86_64"):
        raise VMUnavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")


def rw_dirs(cwd: str) -> list[str]:
    """Host dirs writable in the guest: the cwd plus MPLSORCH_LAB_RWDIRS (colon separated)."""
    dirs = [cwd] + [d for d in os.environ.get("MPLSORCH_LAB_RWDIRS", "").split(":") if d]
    out: list[str] = []
    for d in dirs:
        d = os.path.abspath(d)
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def probe_kvm(kernel: Path, timeout: float = KVM_PROBE_TIMEOUT) -> str | None:
    """None when a KVM guest really runs here, else why not. The probe boots KERNEL with no root
    under KVM and waits for its first console line: on these machines /dev/kvm opens but the
    guest hangs after the boot loader, so opening it proves nothing, and a hang must not last."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is absent or not accessible"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "kvm",
        "-m",
        "256",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 earlyprintk=ttyS0",
    ]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as e:
        return f"qemu-system-x86_64 cannot start: {e.strerror}"
    seen = threading.Event()

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Linux version" in line:
                seen.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    ok = seen.wait(timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return None if ok else f"a KVM guest printed nothing within {timeout:.0f}s (it hangs here)"


def run_in_vm(inner_args: list[str], kvm: bool) -> GuestResult:
    """Boot the VM and run `python -m orchestrator lab run <inner_args>` there, in the same cwd."""
    kernel, vng = find_kernel(), find_vng()
    check_qemu()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mplsorch-vm-") as tmp:
        result = Path(tmp, "result.json")
        script = Path(tmp, "launch.sh")
        script.write_text(launcher(cwd, guest_env({RESULT_ENV: str(result)}), inner_args))
        argv = [
            str(vng),
            "--run",
            str(kernel),
            *([] if kvm else ["--disable-kvm"]),
            "--memory",
            os.environ.get("MPLSORCH_LAB_MEMORY", "2G"),
            "--cpus",
            os.environ.get("MPLSORCH_LAB_CPUS", "2"),
            "--overlay-rwdir",
            "/etc",
            "--cwd",
            cwd,
            "--rwdir",
            tmp,
        ]
        for d in rw_dirs(cwd):
            argv += ["--rwdir", d]
        argv += ["--exec", f"sh {shlex.quote(str(script))}"]
        # qemu opens /proc/self/fd/1 and 2 with O_TRUNC: handed our files directly, it would wipe
        # what was written to them before; pipes relayed by threads keep both streams intact.
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        relays = [
            threading.Thread(target=relay_stream, args=(src, dst), daemon=True)
            for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
        ]
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
        return GuestResult(rc, read_result(result))
