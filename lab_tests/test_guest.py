"""The lab's guest backend seen from the host, as a user runs it: `mplsorch lab run` on the
backend that `lab status` picks (UML on the development machines and CI). These run as root
outside any lab; they fail, never skip, when no backend can run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAB = [sys.executable, "-m", "orchestrator", "lab"]


def lab(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB, *args], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def backend() -> str:
    st = lab("status", "--json")
    assert st.returncode == 0, st.stderr
    name = json.loads(st.stdout)["backend"]
    assert name in ("host", "uml", "vm"), st.stdout
    return str(name)


def _host_state() -> dict[str, object]:
    """What a lab could leave on the host: namespaces, /etc/netns, its run dir, guest scratch dirs."""

    def ls(p: str) -> list[str]:
        return sorted(os.listdir(p)) if os.path.isdir(p) else []

    return {
        "netns": ls("/run/netns"),
        "etc_netns": ls("/etc/netns"),
        "run_dir": os.path.exists("/run/mplsorch-lab"),
        "scratch": [d for d in ls("/var/tmp") if d.startswith(("mplsorch-uml-", "mplsorch-vm-"))],
    }


def test_exit_status_stdout_and_stderr_pass_through(backend: str) -> None:
    run = lab("run", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7")
    assert run.returncode == 7
    assert run.stdout == "to-stdout\n"
    assert "to-stderr\n" in run.stderr


def test_the_json_summary_names_the_backend_and_the_guest_kernel(backend: str) -> None:
    run = lab("run", "--json", "--", "sh", "-c", 'uname -r; test -n "$MPLSORCH_LAB_JSON"')
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["backend"] == backend and out["exit_status"] == 0 and out["error"] is None
    assert out["vm"] == (backend != "host")
    assert out["kernel"] in run.stderr  # CMD's stdout (uname -r) went to stderr


def test_the_lab_has_mpls_and_builtin_modules_count(backend: str) -> None:
    run = lab("run", "--", "sh", "-c", "ip netns exec lb cat /proc/sys/net/mpls/platform_labels; ip netns list | wc -l")
    assert run.returncode == 0, run.stderr
    labels, namespaces = run.stdout.split()
    assert int(labels) > 0 and int(namespaces) >= 8


def test_sigterm_tears_the_guest_down_and_leaves_nothing_on_the_host(backend: str) -> None:
    before = _host_state()
    proc = subprocess.Popen(
        [*LAB, "run", "--", "sh", "-c", "echo up; sleep 600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"  # the lab is built and CMD runs
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert time.monotonic() - t0 < 30
    assert _host_state() == before


def test_a_backend_that_cannot_run_is_named_not_fallen_back_from(tmp_path: Path, backend: str) -> None:
    env = dict(os.environ, MPLSORCH_LAB_CACHE=str(tmp_path))  # an empty cache: no UML kernel
    run = lab("run", "--backend", "uml", "--", "true", env=env)
    assert run.returncode == 3
    assert "backend uml cannot run: no UML kernel is built" in run.stderr
    bad = lab("run", "--backend", "kvm", "--", "true")
    assert bad.returncode == 2 and "'kvm' is not one of host, uml, vm" in bad.stderr
