"""The main job (`mplsorch lab demo`) in the lab: the balancer serves HTTP and UDP from every
client, the JSON output keeps its documented keys, and only the first packet of each session
reaches userspace: every client's later flows are admitted by the kernel's fast path; the
label-aware client's sessions cross the balancer on labels after their first packet."""

from __future__ import annotations

import json
import subprocess
import sys

from orchestrator.lab.demo import HTTP6_PER_CLIENT, HTTP_PER_CLIENT, UDP_PER_CLIENT
from orchestrator.lab.kit import Lab, patience

SESSION_KEYS = {
    "id",
    "client",
    "key",
    "vip",
    "protocol",
    "port",
    "server",
    "c2s_label",
    "s2c_label",
    "state",
    "flows",
    "flows_total",
    "packets_userspace",
    "created",
    "last_seen",
}


def test_demo_json(lab: Lab) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator.lab.demo", "--json"], capture_output=True, text=True, timeout=patience(120)
    )
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
        per_client = {"http": HTTP_PER_CLIENT, "mobile": HTTP6_PER_CLIENT, "dns": UDP_PER_CLIENT}[s["service"]]
        assert s["packets_userspace"] == 1 and s["flows_total"] == per_client, s
    assert set(out["servers"]) == set(lab.names("server")) and sum(out["servers"].values()) == len(sessions)
    packets = out["packets"]
    flows = (HTTP_PER_CLIENT + HTTP6_PER_CLIENT + UDP_PER_CLIENT) * len(clients)
    assert packets["userspace"] == packets["queued"] == packets["sessions"] == len(sessions)
    assert packets["flows"] == flows and packets["fast_path"] == flows - len(sessions)
    assert packets["total"] > 3 * packets["userspace"]
    # The label-aware client: one plain packet per session (the balancer's filter labels it),
    # every later one labelled by the client, both ways, and switched by the balancer.
    aware = out["label_aware"]
    assert aware["ok"] is True and {r["service"] for r in aware["sessions"]} == {"http", "dns"}
    assert aware["plain_packets"] == len(aware["sessions"])
    for r in aware["sessions"]:
        assert r["balancer_filter_packets"] == 1 and r["later_packets"]["stack"] == [r["c2s_label"]], r
        assert r["labelled_out"] >= 1 and r["labelled_back"] >= 1 and r["client_ports"], r
    # The demo removes what it installed: nothing of ours is left on the balancer.
    assert lab.provider("lb").dump() == []
