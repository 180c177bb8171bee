"""Which kernel the lab runs on, and why.

`host`: this kernel has MPLS routing, so the lab's namespaces are built right here. `uml`: a User-
Mode Linux kernel built by `mplsorch lab kernel build` (native speed, one CPU each, boots in
seconds). `vm`: Debian's kernel in QEMU through virtme-ng (KVM when a probe shows a guest really
runs, else emulated). Unless `--backend` or MPLSORCH_LAB_BACKEND names one, the first available in
that order wins.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.lab import uml, vm
from orchestrator.lab.guest import GuestUnavailable

BACKENDS: tuple[str, ...] = ("host", "uml", "vm")
BACKEND_ENV = "MPLSORCH_LAB_BACKEND"


class BackendError(RuntimeError):
    """The backend asked for cannot run, or none can: the message says what is missing."""


def kernel_has_mpls() -> bool:
    """True when this kernel can route MPLS (loading mpls_router first if we may)."""
    knob = Path("/proc/sys/net/mpls/platform_labels")
    if not knob.exists() and os.geteuid() == 0 and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "mpls_router"], capture_output=True, check=False)
    return knob.exists()


@dataclass(frozen=True)
class Availability:
    """One backend: whether it can run here, and what it would run (or what it lacks)."""

    name: str
    available: bool
    detail: str
    kvm: bool = False  # vm only: KVM works (a probe guest ran)


def host() -> Availability:
    release = platform.release()
    if kernel_has_mpls():
        return Availability("host", True, f"this kernel ({release}) has MPLS routing")
    return Availability("host", False, f"this kernel ({release}) has no MPLS routing (mpls_router)")


def uml_kernel() -> Availability:
    kernel = uml.built_kernel()
    if kernel is not None:
        return Availability("uml", True, f"UML kernel {kernel.release} at {kernel.binary}")
    try:
        uml.find_source()
        why = "no UML kernel is built for this source and config fragment: run `mplsorch lab kernel build`"
    except GuestUnavailable as e:
        why = f"no UML kernel is built, and it cannot be: {e}"
    return Availability("uml", False, why)


def qemu_vm(probe: bool = True) -> Availability:
    """PROBE: find out whether KVM works (up to vm.KVM_PROBE_TIMEOUT seconds)."""
    try:
        kernel, vng = vm.find_kernel(), vm.find_vng()
        vm.check_qemu()
    except GuestUnavailable as e:
        return Availability("vm", False, str(e))
    if not probe:
        return Availability("vm", True, f"{kernel.name} with {vng} (KVM not probed)")
    no_kvm = vm.probe_kvm(kernel)
    mode = "KVM" if no_kvm is None else f"emulated, about 25x slower: {no_kvm}"
    return Availability("vm", True, f"{kernel.name} with {vng} ({mode})", kvm=no_kvm is None)


def requested() -> str | None:
    """The backend named by MPLSORCH_LAB_BACKEND, or None (auto); a wrong name is an error."""
    name = os.environ.get(BACKEND_ENV, "").strip() or None
    if name is not None and name not in BACKENDS:
        raise BackendError(f"{BACKEND_ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def choose(name: str | None) -> Availability:
    """The backend to run: NAME if given (or BackendError saying what it lacks), else the first
    available of host, uml, vm."""
    checks = {"host": host, "uml": uml_kernel, "vm": qemu_vm}
    if name is not None:
        got = checks[name]()
        if not got.available:
            raise BackendError(f"backend {name} cannot run: {got.detail}")
        return got
    seen = []
    for check in checks.values():
        got = check()
        if got.available:
            return got
        seen.append(f"{got.name}: {got.detail}")
    raise BackendError("no lab backend can run here; " + "; ".join(seen))


def status(name: str | None) -> dict[str, Any]:
    """What `mplsorch lab status --json` prints: every backend, the one that would run and why."""
    found = {"host": host(), "uml": uml_kernel(), "vm": qemu_vm()}
    if name is not None:
        chosen = name if found[name].available else None
        why = (
            f"asked for ({BACKEND_ENV} or --backend): {found[name].detail}"
            if chosen
            else f"asked for {name}, which cannot run: {found[name].detail}"
        )
    else:
        chosen = next((b for b in BACKENDS if found[b].available), None)
        skipped = [f"{b}: {found[b].detail}" for b in BACKENDS[: BACKENDS.index(chosen)]] if chosen else []
        why = (f"first available: {found[chosen].detail}" if chosen else "none is available") + (
            "".join(f"; not {s}" for s in skipped)
        )
    kernel = uml.built_kernel()
    return {
        "backend": chosen,
        "reason": why,
        "host_kernel": platform.release(),
        "backends": {
            b: {"available": a.available, "detail": a.detail, **({"kvm": a.kvm} if b == "vm" else {})}
            for b, a in found.items()
        },
        "uml_kernel": None if kernel is None else {"path": str(kernel.binary), **kernel.info},
        "uml_fragment_sha256": uml.fragment_hash(),
        "uml_cache": str(uml.cache_dir()),
    }
