"""`mplsorch lab run`: build the lab (in a VM when this kernel lacks MPLS), run CMD, tear down.

Teardown sits in a `finally`, and signal handlers only raise KeyboardInterrupt while CMD runs
(during build and teardown they just set a flag), so neither Ctrl-C nor SIGTERM can leave a half
removed lab behind. Exit status: CMD's; 2 bad topology or usage; 3 lab cannot be built; 130/143
interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.lab import netns, vm
from orchestrator.lab.topology import ROLES, Topology, TopologyError, load

EXIT_USAGE = 2
EXIT_ENV = 3


def say(msg: str) -> None:
    print(f"mplsorch lab: {msg}", file=sys.stderr, flush=True)


def kernel_has_mpls() -> bool:
    """True when this kernel can route MPLS (loading mpls_router first if we may)."""
    knob = Path("/proc/sys/net/mpls/platform_labels")
    if not knob.exists() and os.geteuid() == 0 and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "mpls_router"], capture_output=True, check=False)
    return knob.exists()


class _Signals:
    """SIGINT/SIGTERM: remember the signal; raise KeyboardInterrupt only while `armed`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)


def summary(topo: Topology) -> dict[str, Any]:
    return {"source": topo.source, "platform_labels": topo.platform_labels,
            "nodes": {role: topo.names(role) for role in ROLES},
            "segments": [s.name for s in topo.segments], "vips": [str(v) for v in topo.vips]}


def cmd_env(topo: Topology, paths: netns.LabPaths) -> dict[str, str]:
    """The documented environment of CMD."""
    env = dict(os.environ)
    env.pop(vm.RESULT_ENV, None)
    env |= {"MPLSORCH_LAB_JSON": str(paths.description), "MPLSORCH_LAB_DIR": str(paths.run_dir),
            "MPLSORCH_LAB_NODES": " ".join(topo.names()),
            "MPLSORCH_LAB_CLIENTS": " ".join(topo.names("client")),
            "MPLSORCH_LAB_BALANCERS": " ".join(topo.names("balancer")),
            "MPLSORCH_LAB_FABRIC": " ".join(topo.names("fabric")),
            "MPLSORCH_LAB_SERVERS": " ".join(topo.names("server")),
            "MPLSORCH_LAB_VIPS": " ".join(str(v) for v in topo.vips)}
    return env


def _run_cmd(cmd: list[str], env: dict[str, str], json_output: bool, sigs: _Signals) -> int:
    """Run CMD to completion; on a signal, pass SIGTERM on (SIGKILL after 5 s) and re-raise."""
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr if json_output else None)
    except OSError as e:
        say(f"cannot run {cmd[0]}: {e.strerror}")
        return 127 if isinstance(e, FileNotFoundError) else 126
    try:
        sigs.armed = True
        sigs.check()
        rc = proc.wait()
    except KeyboardInterrupt:
        sigs.armed = False
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    finally:
        sigs.armed = False
    return rc if rc >= 0 else 128 - rc


def _direct(topo: Topology, json_output: bool, cmd: list[str], result: dict[str, Any]) -> int:
    """Build the lab on this kernel, run CMD, tear down. Returns the exit code."""
    if os.geteuid() != 0:
        raise netns.LabError("the lab must run as root (network namespaces, sysctls, modprobe)")
    paths = netns.LabPaths(run_dir=Path(os.environ.get("MPLSORCH_LAB_RUNDIR", "/run/mplsorch-lab")))
    sigs = _Signals()
    sigs.install()
    try:
        with netns.lab_lock(paths):
            netns.load_modules()
            old = netns.cleanup_leftovers(paths)
            if old is not None:
                say(f"removed leftovers of an earlier lab run (pid {old.pid}): {' '.join(old.netns)}")
            state = netns.plan(topo, paths)
            netns.check_free(state)
            try:
                t0 = time.monotonic()
                netns.build(topo, paths, state, progress=say)
                paths.description.write_text(json.dumps(netns.describe(topo, paths, result["vm"]), indent=2))
                say(f"lab up in {time.monotonic() - t0:.1f}s ({len(topo.nodes)} nodes); running: {' '.join(cmd)}")
                sigs.check()
                rc = _run_cmd(cmd, cmd_env(topo, paths), json_output, sigs)
                result["exit_status"] = rc
                return rc
            finally:
                sigs.armed = False
                say("tearing down")
                problems = netns.remove(state, paths)
                for p in problems:
                    say(f"teardown: {p}")
    except KeyboardInterrupt:
        say(f"interrupted by signal {sigs.received or signal.SIGINT}")
        return sigs.exit_code
    finally:
        sigs.restore()


def _via_vm(topology_path: str | None, json_output: bool, cmd: list[str], result: dict[str, Any]) -> int:
    args = (["--topology", os.path.abspath(topology_path)] if topology_path else []) \
        + (["--json"] if json_output else []) + ["--"] + cmd
    try:
        kernel, vng = vm.find_kernel(), vm.find_vng()
        vm.check_qemu()
        say(f"this kernel ({platform.release()}) has no MPLS routing: booting {kernel.name} with {vng}")
        res = vm.run_in_vm(args)
    except vm.VMUnavailable as e:
        raise netns.LabError(f"this kernel ({platform.release()}) has no MPLS routing, and the lab VM "
                             f"cannot start: {e}") from None
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    if res.result is None:
        raise netns.LabError(f"the lab VM ended without a result (vng exit status {res.returncode})")
    inner = res.result
    result.update({k: inner.get(k) for k in ("exit_status", "error", "kernel")})
    result["lab_duration_s"] = inner.get("duration_s")
    return int(inner.get("exit_code", res.returncode))


def run_lab(topology_path: str | None, json_output: bool, cmd: list[str]) -> int:
    """The `lab run` command. Returns the process exit code (see module docstring)."""
    start = time.monotonic()
    in_vm = os.environ.get(vm.IN_VM_ENV) == "1"
    result: dict[str, Any] = {"topology": None, "exit_status": None, "exit_code": None, "duration_s": None,
                              "vm": in_vm, "kernel": platform.release(), "error": None}
    try:
        if not cmd:
            raise TopologyError("no command given: mplsorch lab run [--topology FILE] [--json] -- CMD...")
        topo = load(topology_path)
        result["topology"] = summary(topo)
        mode = os.environ.get("MPLSORCH_LAB_VM", "auto")
        if in_vm or mode == "never" or (mode != "always" and kernel_has_mpls()):
            code = _direct(topo, json_output, cmd, result)
        else:
            result["vm"] = True
            code = _via_vm(topology_path, json_output, cmd, result)
    except TopologyError as e:
        say(f"bad topology: {e}")
        result["error"], code = f"bad topology: {e}", EXIT_USAGE
    except netns.LabError as e:
        say(f"cannot build the lab: {e}")
        result["error"], code = f"cannot build the lab: {e}", EXIT_ENV
    result["exit_code"] = code
    result["duration_s"] = round(time.monotonic() - start, 3)
    if in_vm and os.environ.get(vm.RESULT_ENV):
        Path(os.environ[vm.RESULT_ENV]).write_text(json.dumps(result))
    elif json_output:
        print(json.dumps(result), flush=True)
    return code
