"""Two balancers sharing the session table in etcd (issue 16, docs/scale.md), on a real kernel:
the lab's balancer and a second one (orchestrator.lab.cluster_lab.py), one etcd member, plain
servers. A session made through either balancer is installed on both under the same server and
labels, and a client served through the other balancer keeps it; then, under counted UDP
streams, the first balancer is SIGKILLed and its links go down, its clients and the fabric's way
back move to the second (the reconvergence ECMP and routing would make; the test makes it: the
lab's kernel has no IP multipath), and their sessions go on there: no datagram lost but those
sent between the links going down and the move."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.lab.cluster_lab import LB2_FAB, LB2_LAN, TTL, ClusterLab
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.traffic import spawn_stream, wait, wait_running

INTERVAL = 0.02
KEYS = ("service", "key", "server", "c2s_label", "s2c_label")


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[ClusterLab]:
    c = ClusterLab(lab)
    try:
        c.start()
        yield c
    finally:
        c.close()


def rows(sessions: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["service"], s["key"]): s for s in sessions}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in KEYS)


def test_sessions_through_either_balancer_are_served_by_both_and_survive_a_balancer(
    lab: Lab, cluster: ClusterLab
) -> None:
    lb1 = cluster.lb1
    st1, st2 = lb1.cli("status")["cluster"], cluster.cli2("status")["cluster"]
    assert st1["members"] == st2["members"] == ["lb1", "lb2"], (st1, st2)
    assert st1["label_blocks"] and st2["label_blocks"] and not set(st1["label_blocks"]) & set(st2["label_blocks"])
    cluster.via("c1", "lb")
    cluster.via("c2", "lb2")
    assert lb1.curl("c1") == "200"
    assert lb1.curl("c2") == "200"
    key1, key2 = ("http", lab.address("c1")), ("http", lab.address("c2"))
    wait("both sessions on both balancers", lambda: {key1, key2} <= rows(cluster.cli2("sessions")).keys()
         and {key1, key2} <= rows(lb1.sessions()).keys())  # fmt: skip
    on1, on2 = rows(lb1.sessions()), rows(cluster.cli2("sessions"))
    for key in (key1, key2):
        assert same(on1[key], on2[key]), (on1[key], on2[key])
    assert "owner" not in on1[key1] and on1[key2]["owner"] == "lb2"
    assert on2[key1]["owner"] == "lb1" and "owner" not in on2[key2]
    # each client through the other balancer: served, the same session (server, labels)
    cluster.via("c1", "lb2")
    cluster.via("c2", "lb")
    assert lb1.curl("c1") == "200"
    assert lb1.curl("c2") == "200"
    wait("the sessions taken over", lambda: "owner" not in rows(cluster.cli2("sessions"))[key1]
         and "owner" not in rows(lb1.sessions())[key2])  # fmt: skip
    after1, after2 = rows(lb1.sessions()), rows(cluster.cli2("sessions"))
    for key in (key1, key2):
        assert same(after1[key], on1[key]) and same(after2[key], on1[key])
    assert after1[key1]["owner"] == "lb2" and after2[key2]["owner"] == "lb1"

    # Counted UDP streams across the death of lb (c1 through lb, c2 through lb2).
    cluster.via("c1", "lb")
    cluster.via("c2", "lb2")
    seconds = patience(9)
    stop = cluster.dir / "stream-stop"  # never made: each stream runs its `seconds`
    streams = {c: spawn_stream(lab, c, cluster.dir / f"stream-{c}.log", stop, seconds, INTERVAL) for c in ("c1", "c2")}
    wait_running([cluster.dir / f"stream-{c}.log" for c in streams], "running")
    time.sleep(1)
    assert lb1.proc is not None
    os.kill(lb1.proc.pid, signal.SIGKILL)
    lb1.proc.wait(timeout=patience(15))
    down = time.time()
    # Its links down and the reconvergence (the clients' way in, the fabric's way back), all at
    # once: each `ip` is a process start, slow on a loaded UML.
    moves = [subprocess.Popen(["ip", "-n", "lb", "link", "set", dev, "down"]) for dev in ("lan0", "fab0", "mg0")] + [
        subprocess.Popen(["ip", "-n", "c1", "route", "replace", f"{lab.vip}/32", "via", LB2_LAN]),
        subprocess.Popen(["ip", "-n", "p", "route", "replace", "10.0.1.0/24", "via", LB2_FAB]),
    ]
    assert all(m.wait(timeout=patience(30)) == 0 for m in moves)
    moved = time.time()
    for proc in streams.values():
        proc.wait(timeout=patience(seconds + 30))
    result = {c: json.loads((cluster.dir / f"stream-{c}.log").read_text().splitlines()[-1]) for c in streams}
    window = moved - down
    print(f"\nfailover: links down to routes moved {window * 1000:.0f} ms; streams {result}")
    for client, r in result.items():
        # Lost: only datagrams sent (or echoed: 5 in flight) between the kill and the move. c2
        # went through lb2 all along, but its answers came back over lb until the fabric's move.
        first_after = int((moved - r["start"]) / INTERVAL) + 1
        last_before = int((down - r["start"]) / INTERVAL) - 5
        assert r["sent"] > first_after, (client, r, first_after)  # the stream outlived the failover
        assert last_before > 10, (client, r, last_before)  # and ran (echoed: none lost) before it
        assert all(last_before <= seq <= first_after for seq in r["missing"]), (
            client,
            r["missing"],
            last_before,
            first_after,
        )
        print(f"{client}: {r['sent']} sent, {r['received']} echoed, {r['lost']} lost, all in the window")
    # c1's dns session lives on lb2 under the same server and labels, now owned there; lb1 left.
    key = ("dns", lab.address("c1"))
    wait(
        "c1's dns session taken over by lb2",
        lambda: "owner" not in rows(cluster.cli2("sessions")).get(key, {"owner": 1}),
    )
    wait("lb1's lease expired", lambda: cluster.cli2("status")["cluster"]["members"] == ["lb2"], TTL + 15)
    final = rows(cluster.cli2("sessions"))
    assert same(final[key1], on1[key1]) and same(final[key2], on1[key2])
    assert all("owner" not in s for s in final.values()), final
    assert cluster.lb2 is not None and cluster.lb2.poll() is None
