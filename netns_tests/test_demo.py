"""The main job (`mplsorch lab demo`) in the lab: the balancer serves HTTP and UDP from every
client, the JSON output keeps its documented keys, and only first packets reach userspace."""

from __future__ import annotations

import json
import subprocess
import sys

from orchestrator.lab.kit import Lab, patience

SESSION_KEYS = {"id", "client", "key", "vip", "protocol", "port", "server", "c2s_label", "s2c_label",
                "state", "flows", "created", "last_seen"}


def test_demo_json(lab: Lab) -> None:
    run = subprocess.run([sys.executable, "-m", "orchestrator.lab.demo", "--json"], capture_output=True,
                         text=True, timeout=patience(120))
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout)
    assert out["ok"] is True
    clients = lab.names("client")
    sessions = out["sessions"]
    assert len(sessions) == 3 * len(clients)  # http over IPv4 and IPv6, and dns, per client
    assert {s["service"] for s in sessions} == {"http", "dns", "mobile"}
    for s in sessions:
        assert SESSION_KEYS <= set(s)
        assert s["c2s_label"] % 2 == 1 and s["s2c_label"] == s["c2s_label"] + 1
        assert s["c2s_stack_on_wire"] == [lab.node(s["server"])["transport_label"], s["c2s_label"]]
    assert set(out["servers"]) == set(lab.names("server")) and sum(out["servers"].values()) == len(sessions)
    packets = out["packets"]
    assert packets["userspace"] == packets["flows"] == 4 * len(clients)
    assert packets["total"] > 3 * packets["userspace"]
    # The demo removes what it installed: nothing of ours is left on the balancer.
    assert lab.provider("lb").dump() == []
