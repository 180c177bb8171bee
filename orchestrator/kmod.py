"""Kernel modules: is one there (loaded, built in, or loadable)? The lab and the node checks both
ask, and a module built into the kernel (a UML kernel has everything built in) counts as there:
modprobe only knows it from modules.builtin, and /sys/module lists only built-ins with parameters."""

from __future__ import annotations

import os
from pathlib import Path

SYS_MODULE = Path("/sys/module")


def modules_dir() -> Path:
    return Path("/lib/modules") / os.uname().release


def module_name(line: str) -> str:
    """`kernel/net/mpls/mpls_iptunnel.ko.xz: deps` -> mpls_iptunnel (modprobe treats - and _ alike)."""
    name = Path(line.split(":", 1)[0].strip()).name
    return name.split(".ko", 1)[0].replace("-", "_")


def _listed(name: str, listing: Path) -> bool | None:
    """Whether LISTING names module NAME; None when it cannot be read."""
    try:
        lines = listing.read_text().splitlines()
    except OSError:
        return None
    return any(module_name(line) == name for line in lines)


def builtin(name: str, mods: Path | None = None) -> bool:
    """True when the running kernel has NAME built in (modules.builtin lists it)."""
    return bool(_listed(name, (mods or modules_dir()) / "modules.builtin"))


def available(name: str, sys_module: Path = SYS_MODULE, mods: Path | None = None) -> bool | None:
    """Loaded, built in or loadable (modules.dep lists it): True; False when neither listing
    names it; None when there is no listing to read (cannot tell)."""
    if (sys_module / name).exists():
        return True
    answers = [_listed(name, (mods or modules_dir()) / listing) for listing in ("modules.builtin", "modules.dep")]
    if any(answers):
        return True
    return None if all(a is None for a in answers) else False
