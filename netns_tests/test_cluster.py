"""Two balancers sharing the session table in etcd (issue 16, docs/scale.md), on a real kernel:
the lab's balancer and a second one behind a client-side ECMP router, one etcd member, servers
running the agent (orchestrator/lab/cluster_lab.py). The router's multipath route spreads the
clients by its own L3 hash; the servers answer under the balancers' anycast transport label, which
p routes over both. A session made through either balancer is installed on both under the same
server and labels and served through both; then, under counted UDP streams, the first balancer is
SIGKILLed and its links go down: the kernel drops its next hops, every session goes on through
the second, no datagram lost but those of the reconvergence; the first comes back (links up,
daemon restarted, READY, announced again) and takes its clients back with no datagram lost.
The streams start NEW sessions while p sends every answer through lb2 and etcd's packets to lb2
are held 500 ms: c1's session is lb's, so its first answers reach lb2 before the row does; lb2 routes them to lb under lb's own label
(cluster.member_label, the forwarding routes of docs/scale.md), captured on p, none lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.lab.cluster_lab import LINK_EVENT, MEMBER_LABELS, TTL, ClusterLab
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.traffic import last_json, spawn_stream, wait, wait_running

INTERVAL = 0.02
KEYS = ("service", "key", "server", "c2s_label", "s2c_label")
IN_FLIGHT = 5  # datagrams (and their echoes) on the way when the links went down
# etcd's packets to lb2 held back while the streams start (ms): lb2 learns c1's new row that much
# after lb wrote it, so c1's first answers surely reach lb2 first (not left to the race's timing)
STORE_DELAY = 500


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[ClusterLab]:
    c = ClusterLab(lab, agents=True)
    try:
        c.start()
        yield c
    finally:
        c.close()


def rows(sessions: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["service"], s["key"]): s for s in sessions}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in KEYS)


def owned(cluster: ClusterLab, balancer: str, key: tuple[str, str]) -> bool:
    """`balancer` (lb or lb2) owns the session: it carried one of its flows last."""
    table = rows(cluster.lb1.sessions() if balancer == "lb" else cluster.cli2("sessions"))
    return key in table and "owner" not in table[key]


def agent_labels(cluster: ClusterLab, session: dict[str, Any], client: str, lab: Lab) -> tuple[int, int]:
    """(C2S, S2C) of the session the agent on the session's server learned from the client."""
    assert cluster.servers is not None
    found = [
        (s["c2s_label"], s["s2c_label"])
        for s in cluster.servers.agents[session["server"]].sessions()
        if (s["client"], s["vip"]) == (cluster.source(client), lab.vip)
    ]
    assert len(found) == 1, found
    return found[0]


def test_sessions_served_through_both_balancers_survive_a_death_and_a_rejoin(lab: Lab, cluster: ClusterLab) -> None:
    t0 = time.monotonic()
    lb1 = cluster.lb1
    st1, st2 = lb1.cli("status")["cluster"], cluster.cli2("status")["cluster"]
    assert st1["members"] == st2["members"] == ["lb1", "lb2"], (st1, st2)
    assert st1["label_blocks"] and st2["label_blocks"] and not set(st1["label_blocks"]) & set(st2["label_blocks"])
    # The router's hash sends c1 to lb and c2 to lb2 (each from an address it hashes so).
    cluster.via("c1", "lb")
    cluster.via("c2", "lb2")
    assert lb1.curl("c1") == "200"
    assert lb1.curl("c2") == "200"
    key1, key2 = ("http", cluster.source("c1")), ("http", cluster.source("c2"))
    wait("both sessions on both balancers", lambda: {key1, key2} <= rows(cluster.cli2("sessions")).keys()
         and {key1, key2} <= rows(lb1.sessions()).keys())  # fmt: skip
    on1, on2 = rows(lb1.sessions()), rows(cluster.cli2("sessions"))
    for key in (key1, key2):
        assert same(on1[key], on2[key]), (on1[key], on2[key])
    # Each was made by the balancer the router chose: the traffic took the multipath route.
    assert "owner" not in on1[key1] and on1[key2]["owner"] == "lb2"
    assert on2[key1]["owner"] == "lb1" and "owner" not in on2[key2]
    # lb2 drained (its announcement withdrawn, its daemon running): c2's session served through
    # lb, the same session (server, labels), which lb takes over; then lb2 announced again.
    cluster.withdraw("lb2")
    assert lb1.curl("c2") == "200"
    wait("c2's session taken over by lb", lambda: owned(cluster, "lb", key2))
    assert same(rows(lb1.sessions())[key2], on1[key2]) and same(rows(cluster.cli2("sessions"))[key2], on1[key2])
    cluster.announce("lb2")

    # Counted UDP streams (c1 through lb, c2 through lb2) across lb's death and its rejoin, each
    # on a NEW dns session, while p sends every answer through lb2 (as its hash may) and lb2's
    # watch learns every row STORE_DELAY late: c1's first answers reach lb2 before c1's row, and
    # lb2 sends them to lb under lb's own label.
    dns = {c: ("dns", cluster.source(c)) for c in ("c1", "c2")}
    assert not set(dns.values()) & (rows(lb1.sessions()).keys() | rows(cluster.cli2("sessions")).keys())
    cluster.answers_through("lb2")
    cluster.delay_store("lb2", STORE_DELAY)
    crossing = lab.capture("p", "pl2", "forwarded")  # lb2's link: what lb2 sends to p and back
    print(f"\nsetup {time.monotonic() - t0:.0f} s")
    stop = cluster.dir / "stream-stop"
    logs = {c: cluster.dir / f"stream-{c}.log" for c in dns}
    streams = {c: spawn_stream(lab, c, logs[c], stop, patience(180), INTERVAL) for c in logs}
    wait_running(logs.values(), "running")
    wait("the dns sessions on both", lambda: set(dns.values()) <= rows(cluster.cli2("sessions")).keys()
         and set(dns.values()) <= rows(lb1.sessions()).keys())  # fmt: skip
    stacks = crossing.stacks()
    cluster.delay_store("lb2", 0)
    cluster.answers_through(None)
    before, before2 = rows(lb1.sessions()), rows(cluster.cli2("sessions"))
    s2c1 = before[dns["c1"]]["s2c_label"]
    forwarded = stacks.count((MEMBER_LABELS["lb1"], s2c1))
    # c1's answers crossed lb2 to lb under lb's label (before lb2 had c1's row), c2's never did
    assert forwarded >= 1, stacks[:20]
    assert not [st for st in stacks if st[:1] == (MEMBER_LABELS["lb1"],) and st != (MEMBER_LABELS["lb1"], s2c1)]
    print(f"c1's answers forwarded by lb2 to lb before its row: {forwarded}; {len(stacks)} packets captured")
    assert "owner" not in before[dns["c1"]] and "owner" not in before2[dns["c2"]], (before, before2)
    labelled = {c: agent_labels(cluster, before[dns[c]], c, lab) for c in logs}  # the agents learned them
    for c in logs:
        assert labelled[c] == (before[dns[c]]["c2s_label"], before[dns[c]]["s2c_label"]), (c, labelled[c])
        assert same(before[dns[c]], before2[dns[c]])
    print(f"streams running, checked {time.monotonic() - t0:.0f} s")

    killed, down = cluster.fail_lb1()
    # lb's next hops are still in the routes, skipped by the kernels: its links are down.
    assert cluster.announced == ["lb", "lb2"] and cluster.dead_hops() == {"router": ["lb"], "p": ["lb"]}
    wait("c1's dns session taken over by lb2", lambda: owned(cluster, "lb2", dns["c1"]))
    wait("lb1's lease expired", lambda: cluster.cli2("status")["cluster"]["members"] == ["lb2"], TTL + 15)
    cluster.withdraw("lb")  # as the routing protocol's hold time would, long after the kernels
    withdrawn = time.time()
    print(f"failed and lease expired {time.monotonic() - t0:.0f} s")

    announced = cluster.rejoin_lb1()
    print(f"rejoined {time.monotonic() - t0:.0f} s")
    # c1's flows hash to lb again: lb takes the session back; its C2S filters label them.
    wait("c1's dns session taken back by lb", lambda: owned(cluster, "lb", dns["c1"]))
    packets = lb1.kernel_packets()
    time.sleep(1)
    assert lb1.kernel_packets() > packets
    after1, after2 = rows(lb1.sessions()), rows(cluster.cli2("sessions"))
    for c in logs:
        assert agent_labels(cluster, after1[dns[c]], c, lab) == labelled[c]
    stop.touch()
    for proc in streams.values():
        proc.wait(timeout=patience(60))
    result = {c: last_json(logs[c]) for c in logs}
    print(f"streams done {time.monotonic() - t0:.0f} s")
    for c, r in result.items():
        print(
            c, {k: r[k] for k in ("sent", "received", "lost", "start", "max_gap_ms", "long_gaps")}, r["missing"][:300]
        )
    window = down - killed
    print(
        f"\nfailover: SIGKILL to links down {window * 1000:.0f} ms; lb1 announced again {announced - down:.1f} s later"
    )
    assert window < patience(10), window  # the reconvergence is bounded
    for client, r in result.items():
        first = int((killed - r["start"]) / INTERVAL) - IN_FLIGHT
        last = int((down + LINK_EVENT - r["start"]) / INTERVAL) + 1
        sent_at_rejoin = int((announced - r["start"]) / INTERVAL)
        assert first > 10, (client, r, first)  # the stream ran (echoed) before the failure
        assert r["sent"] > sent_at_rejoin + 25, (client, r, sent_at_rejoin)  # and outlived the rejoin
        assert last < int((withdrawn - r["start"]) / INTERVAL)  # the window ends before the withdrawal
        # Every loss lies in the reconvergence after the kill; none across the rejoin.
        assert all(first <= seq <= last for seq in r["missing"]), (client, r["missing"], first, last)
        print(
            f"{client}: {r['sent']} sent, {r['received']} echoed, {r['lost']} lost, all between datagrams "
            f"{first} and {last}; {r['sent'] - sent_at_rejoin} sent after the rejoin, none lost"
        )
    # Every session with the server and labels it had, on both balancers.
    for key in (key1, key2, dns["c1"], dns["c2"]):
        assert same(after1[key], before[key]) and same(after2[key], before[key]), key
    assert cluster.lb2 is not None and cluster.lb2.poll() is None
