"""The main job (`mplsorch lab demo`) in the lab: every client's session carries HTTP with the
labels on the wire, and the JSON output keeps its documented keys."""

from __future__ import annotations

import json
import subprocess
import sys

from orchestrator.lab.kit import Lab

SESSION_KEYS = {"id", "client", "key", "vip", "protocol", "port", "server", "c2s_label", "s2c_label", "state"}


def test_demo_json(lab: Lab) -> None:
    run = subprocess.run([sys.executable, "-m", "orchestrator.lab.demo", "--json"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout)
    assert out["ok"] is True
    sessions = out["sessions"]
    assert len(sessions) == len(lab.names("client"))
    for s in sessions:
        assert SESSION_KEYS <= set(s)
        assert s["c2s_label"] % 2 == 1 and s["s2c_label"] == s["c2s_label"] + 1
        assert s["http_status"] == 200 and s["server_saw_client"] is True
        transport = lab.node(s["server"])["transport_label"]
        assert s["c2s_stack_on_wire"] == [transport, s["c2s_label"]]
        assert s["s2c_stack_on_wire"] == [lab.node("lb")["transport_label"], s["s2c_label"]]
    assert sum(out["servers"].values()) == len(sessions)
    # The demo removes what it installed: nothing of ours is left on the balancer.
    assert lab.provider("lb").dump() == []
