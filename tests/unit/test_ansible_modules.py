"""The Ansible modules of ansible/roles run as Ansible runs them (a JSON file of arguments), here
without a node: the fallback supervisor against a stand-in daemon (a control socket, SIGHUP
answered in its log like mplsorch's), and mpls_node's argument checks. Each test stops what it
started, by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

LIBRARY = Path(__file__).resolve().parents[2] / "ansible" / "roles"
SERVICE = LIBRARY / "mplsorch" / "library" / "mplsorch_service.py"
MPLS_NODE = LIBRARY / "mpls_node" / "library" / "mpls_node.py"

# Like `mplsorch run`: opens its control socket once running; SIGHUP logs the reload's outcome
# ("reload rejected" when the file REJECT exists); SIGTERM ends it.
DAEMON = """
import os, signal, socket, sys, time
sock_path, reject = sys.argv[1], sys.argv[2]
flags = []
signal.signal(signal.SIGHUP, lambda *_: flags.append("hup"))
signal.signal(signal.SIGTERM, lambda *_: flags.append("term"))
time.sleep(0.3)
s = socket.socket(socket.AF_UNIX); s.bind(sock_path); s.listen()
print("stand-in running:", os.getpid(), flush=True)
while "term" not in flags:
    if "hup" in flags:
        flags.remove("hup")
        print("reload rejected, keeping the running configuration" if os.path.exists(reject)
              else "configuration reloaded from x", flush=True)
    time.sleep(0.05)
os.unlink(sock_path)
"""


def module(path: Path, tmp: Path, check: bool = False, **args: Any) -> dict[str, Any]:
    file = tmp / "args.json"
    file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": dict(args, _ansible_check_mode=check)}))
    out = subprocess.run([sys.executable, str(path), str(file)], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[dict[str, Any]]:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    args = {
        "command": [sys.executable, str(script), str(tmp_path / "run" / "d.sock"), str(tmp_path / "REJECT")],
        "pid_file": str(tmp_path / "run" / "d.pid"),
        "log_file": str(tmp_path / "log" / "d.log"),
        "ready_path": str(tmp_path / "run" / "d.sock"),
        "timeout": 30,
    }
    (tmp_path / "run").mkdir()
    yield args
    pid_file = Path(args["pid_file"])
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_start_is_idempotent_and_reload_waits_for_the_daemons_answer(tmp_path: Path, service: dict[str, Any]) -> None:
    would = module(SERVICE, tmp_path, check=True, **service)
    assert would["changed"] and "would start" in would["msg"] and not Path(service["pid_file"]).exists()
    started = module(SERVICE, tmp_path, **service)
    assert started["changed"] and started["pid"] > 0 and _alive(started["pid"])
    assert Path(service["ready_path"]).exists()
    again = module(SERVICE, tmp_path, **service)
    assert not again["changed"] and again["pid"] == started["pid"]
    reloaded = module(SERVICE, tmp_path, state="reloaded", **service)
    assert reloaded["changed"] and "configuration reloaded" in reloaded["msg"] and reloaded["pid"] == started["pid"]
    (tmp_path / "REJECT").touch()
    rejected = module(SERVICE, tmp_path, state="reloaded", **service)
    assert rejected.get("failed") and "rejected the reload" in rejected["msg"], rejected
    restarted = module(SERVICE, tmp_path, restart=True, **service)
    assert restarted["changed"] and restarted["pid"] != started["pid"] and not _alive(started["pid"])
    stopped = module(SERVICE, tmp_path, state="stopped", **service)
    assert stopped["changed"]
    deadline = time.monotonic() + 10
    while _alive(restarted["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(restarted["pid"])
    assert not module(SERVICE, tmp_path, state="reloaded", **service)["changed"]  # nothing runs


def test_a_daemon_that_exits_while_starting_fails_the_task_with_its_own_words(tmp_path: Path) -> None:
    args = {
        "command": [
            sys.executable,
            "-c",
            "import sys; print('mplsorch: node not ready: X; fix: Y', file=sys.stderr); sys.exit(4)",
        ],
        "pid_file": str(tmp_path / "p.pid"),
        "log_file": str(tmp_path / "p.log"),
        "ready_path": str(tmp_path / "p.sock"),
        "timeout": 30,
    }
    result = module(SERVICE, tmp_path, **args)
    assert result.get("failed") and result["rc"] == 4
    assert "exited with status 4 while starting" in result["msg"]
    assert "mplsorch: node not ready: X; fix: Y" in result["log"]


def test_mpls_node_refuses_mpls_input_both_on_and_off(tmp_path: Path) -> None:
    result = module(MPLS_NODE, tmp_path, check=True, input_interfaces=["fab0"], no_input_interfaces=["fab0"])
    assert result.get("failed") and "both on and off for fab0" in result["msg"]
