"""`mplsorch lab run`: build the lab on the chosen backend's kernel, run CMD, tear down.

On the host backend the lab is built here; on uml and vm the same `lab run` runs again inside the
guest (which builds it there) and its result comes back through a file.

Teardown sits in a `finally`, and signal handlers only raise KeyboardInterrupt while CMD runs
(during build and teardown they just set a flag), so neither Ctrl-C nor SIGTERM can leave a half
removed lab behind. Exit status: CMD's; 2 bad topology or usage; 3 lab cannot be built (no backend can run, the
guest ended without a result); 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.lab import backend, netns, uml, vm
from orchestrator.lab.guest import IN_GUEST_ENV, RESULT_ENV, GuestResult, GuestUnavailable
from orchestrator.lab.topology import ROLES, Topology, TopologyError, load

EXIT_USAGE = 2
EXIT_ENV = 3


def say(msg: str) -> None:
    print(f"mplsorch lab: {msg}", file=sys.stderr, flush=True)


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
    return {
        "source": topo.source,
        "platform_labels": topo.platform_labels,
        "nodes": {role: topo.names(role) for role in ROLES},
        "segments": [s.name for s in topo.segments],
        "vips": [str(v) for v in topo.vips],
    }


def cmd_env(topo: Topology, paths: netns.LabPaths) -> dict[str, str]:
    """The documented environment of CMD."""
    env = dict(os.environ)
    env.pop(RESULT_ENV, None)
    env |= {
        "MPLSORCH_LAB_JSON": str(paths.description),
        "MPLSORCH_LAB_DIR": str(paths.run_dir),
        "MPLSORCH_LAB_NODES": " ".join(topo.names()),
        "MPLSORCH_LAB_CLIENTS": " ".join(topo.names("client")),
        "MPLSORCH_LAB_BALANCERS": " ".join(topo.names("balancer")),
        "MPLSORCH_LAB_FABRIC": " ".join(topo.names("fabric")),
        "MPLSORCH_LAB_SERVERS": " ".join(topo.names("server")),
        "MPLSORCH_LAB_VIPS": " ".join(str(v) for v in topo.vips),
    }
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
                paths.description.write_text(
                    json.dumps(netns.describe(topo, paths, result["vm"], result["backend"]), indent=2)
                )
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


def _via_guest(
    choice: backend.Availability, topology_path: str | None, json_output: bool, cmd: list[str], result: dict[str, Any]
) -> int:
    """Run this same `lab run` inside the backend's guest kernel and take over its result."""
    args = (
        (["--topology", os.path.abspath(topology_path)] if topology_path else [])
        + (["--json"] if json_output else [])
        + ["--"]
        + cmd
    )
    sigs = _Signals()
    sigs.install()
    try:
        say(f"this kernel ({platform.release()}) has no MPLS routing: lab on {choice.detail}")
        sigs.armed = True
        sigs.check()
        res: GuestResult
        if choice.name == "uml":
            kernel = uml.built_kernel()
            if kernel is None:
                raise GuestUnavailable("the UML kernel went away")
            res = uml.run_in_uml(kernel, args, os.environ.get("MPLSORCH_LAB_MEMORY", "3G"))
        else:
            res = vm.run_in_vm(args, kvm=choice.kvm)
    except GuestUnavailable as e:
        raise netns.LabError(f"the {choice.name} guest cannot start: {e}") from None
    except KeyboardInterrupt:
        say(f"interrupted by signal {sigs.received or signal.SIGINT}: the {choice.name} guest is gone")
        return sigs.exit_code
    finally:
        sigs.armed = False
        sigs.restore()
    if res.result is None:
        raise netns.LabError(f"the {choice.name} guest ended without a result (exit status {res.returncode})")
    inner = res.result
    result.update({k: inner.get(k) for k in ("exit_status", "error", "kernel")})
    result["lab_duration_s"] = inner.get("duration_s")
    return int(inner.get("exit_code", res.returncode))


def run_lab(topology_path: str | None, json_output: bool, cmd: list[str], backend_name: str | None = None) -> int:
    """The `lab run` command. BACKEND_NAME: host, uml or vm (None: MPLSORCH_LAB_BACKEND, else the
    first available). Returns the process exit code (see module docstring)."""
    start = time.monotonic()
    in_guest = os.environ.get(IN_GUEST_ENV) == "1"
    result: dict[str, Any] = {
        "topology": None,
        "exit_status": None,
        "exit_code": None,
        "duration_s": None,
        "vm": in_guest,
        "backend": os.environ.get(backend.BACKEND_ENV) if in_guest else None,
        "kernel": platform.release(),
        "error": None,
    }
    try:
        if not cmd:
            raise TopologyError("no command given: mplsorch lab run [--topology FILE] [--json] -- CMD...")
        topo = load(topology_path)
        result["topology"] = summary(topo)
        if in_guest:
            code = _direct(topo, json_output, cmd, result)
        else:
            choice = backend.choose(backend_name or backend.requested())
            result["backend"] = choice.name
            if choice.name == "host":
                code = _direct(topo, json_output, cmd, result)
            else:
                result["vm"] = True
                os.environ[backend.BACKEND_ENV] = choice.name  # the guest's run reports it
                code = _via_guest(choice, topology_path, json_output, cmd, result)
    except TopologyError as e:
        say(f"bad topology: {e}")
        result["error"], code = f"bad topology: {e}", EXIT_USAGE
    except (netns.LabError, backend.BackendError) as e:
        say(f"cannot build the lab: {e}")
        result["error"], code = f"cannot build the lab: {e}", EXIT_ENV
    result["exit_code"] = code
    result["duration_s"] = round(time.monotonic() - start, 3)
    if in_guest and os.environ.get(RESULT_ENV):
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))
    elif json_output:
        print(json.dumps(result), flush=True)
    return code
