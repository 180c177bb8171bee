"""The client agent for real in the lab: the label-aware client c4 runs it, behind the real balancer
and the server agents. Its first packet is unlabelled and queued by the balancer; every later
packet, in both directions and on every connection of the session, is labelled on c4's link
([C2S] towards the balancer, [S2C] back) and switched by the balancer's kernel: its C2S flower
filter and its queue never see them (tc and nftables counters). Plain clients keep working beside
it, a UDP session ends on both sides, a SIGKILLed client agent keeps its session, a session
the balancer ended ends on the client when its answers stop, and a long label-aware session
lives on the balancer while its liveness filter counts (a counted stream several times longer
than its first flow's conntrack entry plus its persistence), then ends on both sides."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.dataplane import ops
from orchestrator.lab.balancer_lab import UDP_ASK
from orchestrator.lab.client_lab import (
    NODE,
    ClientAgentLab,
    Sniffer,
    balancer_changes,
    filter_packets,
    liveness_packets,
)
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.server_lab import ServerLab
from orchestrator.lab.traffic import last_json, spawn_stream, wait, wait_running

PERSISTENCE = 3.0  # the dns service's on the balancer
UDP_TIMEOUT = 3.0  # the balancer's nf_conntrack_udp_timeout (BalancerLab.start)
INTERVAL = 0.02  # the stream's datagrams


@pytest.fixture(scope="module")
def farm(lab: Lab) -> Iterator[ServerLab]:
    # dns sessions: the balancer's UDP conntrack entries last 3 s (BalancerLab), their persistence
    # 3 s, so a stream of seconds outlives its first flow's entry plus persistence many times over:
    # its later packets never reach the balancer's conntrack, its liveness filter counts them.
    f = ServerLab(lab, {**balancer_changes(lab), "services.dns.persistence_timeout": f"{PERSISTENCE:g}s"})
    try:
        f.start()
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def agent(lab: Lab, farm: ServerLab) -> Iterator[ClientAgentLab]:
    a = ClientAgentLab(lab)
    try:
        a.start()
        yield a
    finally:
        a.close()


def _lb_session(farm: ServerLab, service: str, client: str) -> tuple[int, int, int]:
    """(id, C2S, S2C) of the balancer's session of `client` for `service`, from its log."""
    found = farm.balancer.logged("start", service, client)
    assert len(found) == 1, farm.balancer.log()[-2000:]
    return found[0]["id"], found[0]["c2s_label"], found[0]["s2c_label"]


def _nft(farm: ServerLab) -> dict[str, Any]:
    counters: dict[str, Any] = farm.balancer.cli("status")["nft_counters"]
    return counters


def _wait_for(what: str, text: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + patience(timeout)
    while what not in text():
        assert time.monotonic() < deadline, (what, text()[-3000:])
        time.sleep(0.5)


def test_after_the_first_packet_the_session_crosses_the_balancer_on_labels_alone(
    lab: Lab, farm: ServerLab, agent: ClientAgentLab
) -> None:
    c4, vip = lab.address(NODE), lab.vip
    sniff = Sniffer(lab, "client-agent-http")
    before = _nft(farm)
    codes = [farm.balancer.curl(NODE) for _ in range(3)]  # three connections of one session
    assert codes == ["200"] * 3, (farm.balancer.log()[-2000:], agent.log()[-2000:])
    after = _nft(farm)
    packets = sniff.packets()
    session_id, c2s, s2c = _lb_session(farm, "http", c4)
    # Only the first packet left c4 unlabelled; everything else carried the session's labels.
    plain = [p for p in packets if not p[0]]
    assert plain == [((), c4, vip)], plain
    out = [p for p in packets if p[1:] == (c4, vip)]
    back = [p for p in packets if p[1:] == (vip, c4)]
    assert len(out) >= 3 * 4 and len(back) >= 3 * 4, packets  # three HTTP connections each way
    assert {p[0] for p in out[1:]} == {(c2s,)} and {p[0] for p in back} == {(s2c,)}, packets
    # The balancer queued that one packet; its kernel switched the rest on the label, unseen by
    # the session's flower filter (one packet) and by its ruleset (no fast-path admission either).
    assert after["queued_http"] - before["queued_http"] == 1, (before, after)
    assert after["fastpath_http"] == before["fastpath_http"], (before, after)
    assert filter_packets(lab, c2s) == 1
    routes = {i.obj.label: i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute)}
    transports = {lab.node(s)["transport_label"] for s in lab.names("server")}
    assert routes[c2s].dev == "fab0" and routes[c2s].out_labels[1:] == (c2s,), routes[c2s]
    assert routes[c2s].out_labels[0] in transports, routes[c2s]
    assert routes[s2c].out_labels == (s2c,)
    # The client agent: one session, learned from the first answer, the rest never queued there
    # (its sessions are asked for in the restart test: this one ends 2 s after its last flow).
    status = agent.cli("status")
    assert status["role"] == "client" and status["counters"]["sessions_learned"] == 1
    assert status["nft_counters"]["queued"] == 3  # the first answer of each connection
    assert status["nft_counters"]["labelled_established"] >= 3 * 3
    assert f"session learned: {c4} -> {vip} (tcp/80) c2s {c2s} s2c {s2c}" in agent.log()
    assert session_id >= 1


def test_plain_clients_keep_working_beside_it(lab: Lab, farm: ServerLab, agent: ClientAgentLab) -> None:
    for client in ("c1", "c2"):
        assert farm.balancer.curl(client) == "200", farm.balancer.log()[-2000:]
        _, c2s, s2c = _lb_session(farm, "http", lab.address(client))
        routes = {i.obj.label: i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute)}
        assert c2s not in routes and routes[s2c].out_labels == ()  # no C2S route, S2C popped


HOLD = (
    "import socket,sys,time; s=socket.create_connection((sys.argv[1], 80)); time.sleep(float(sys.argv[2]));"
    "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100).split(b'\\r\\n')[0].decode())"
)


def test_a_sigkilled_client_agent_keeps_its_session(lab: Lab, farm: ServerLab, agent: ClientAgentLab) -> None:
    # A connection held open across the kill and the restart, its request sent after them.
    out = Path(lab.node(NODE)["runtime_dir"]) / "hold.out"
    holder = lab.spawn(NODE, sys.executable, "-c", HOLD, lab.vip, str(patience(25)), log=out)
    deadline = time.monotonic() + patience(30)
    while not (before := {s["s2c_label"]: s for s in agent.cli("sessions") if s["flows"]}):
        assert time.monotonic() < deadline and holder.poll() is None, agent.log()[-2000:]
        time.sleep(0.5)
    agent.kill()
    sniff = Sniffer(lab, "client-agent-restart")
    assert farm.balancer.curl(NODE) == "200"  # the filters stayed in the kernel: still labelled
    agent.spawn()
    agent.wait_running()
    assert farm.balancer.curl(NODE) == "200"
    after = {s["s2c_label"]: s for s in agent.cli("sessions")}
    keys = ("c2s_label", "vip", "clients", "ports")
    assert {k: [after[k][x] for x in keys] for k in before} == {k: [s[x] for x in keys] for k, s in before.items()}
    assert agent.cli("status")["counters"]["restored_sessions"] >= len(before)
    assert holder.wait(timeout=patience(90)) == 0
    assert "200" in out.read_text(), out.read_text()  # the held connection lived through it all
    packets = sniff.packets()
    assert packets and all(p[0] for p in packets), packets


def test_a_udp_session_ends_on_both_sides(lab: Lab, farm: ServerLab, agent: ClientAgentLab) -> None:
    c4 = lab.address(NODE)
    asks = "import subprocess,sys\nfor _ in range(3): subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])"
    answers = lab.sh(NODE, sys.executable, "-c", asks, UDP_ASK, lab.vip).stdout.split()
    assert answers.count("hello") == 3, answers
    session_id, c2s, s2c = _lb_session(farm, "dns", c4)
    # Learned from the first answer (the row may already be draining: UDP flows end after 3 s here).
    assert f"session learned: {c4} -> {lab.vip} (udp/53) c2s {c2s} s2c {s2c}" in agent.log()
    # The client: flows gone (conntrack's UDP timeout, 3 s) plus its persistence (2 s).
    _wait_for(f"session end: {c4} -> {lab.vip} (udp/53) c2s {c2s} s2c {s2c} (persistence timeout)", agent.log, 180)
    dev = lab.iface(NODE, towards="lb")["dev"]
    assert str(c2s) not in lab.sh(NODE, "tc", "filter", "show", "dev", dev, "egress").stdout
    # The balancer: its first flow's entry gone, then its persistence (3 s); the C2S route goes.
    _wait_for(f"session {session_id} end", farm.balancer.log, 180)
    routes = {i.obj.label: i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute)}
    assert c2s not in routes, routes


def c2s_of(rows: list[dict[str, Any]]) -> int:
    return int(rows[-1]["c2s_label"]) if rows else 0


def test_a_long_label_aware_session_lives_while_its_liveness_filter_counts(
    lab: Lab, farm: ServerLab, agent: ClientAgentLab
) -> None:
    """A counted UDP stream from c4, labelled [C2S] after its first datagram, runs until the
    balancer has kept its session five times on its liveness filter's count, long after its first
    flow's conntrack entry ended (3 s) plus its persistence (3 s): not one datagram lost, one
    session with one pair throughout. The liveness filter (tc ingress, gact pass) saw every [C2S]
    datagram of the capture and changed nothing of their way. Then the stream stops and the
    session ends on the balancer and on the client."""
    c4, vip = lab.address(NODE), lab.vip
    run = Path(lab.node(NODE)["runtime_dir"])
    log, stop = run / "liveness-stream.log", run / "liveness-stream.stop"
    stop.unlink(missing_ok=True)
    sniff = Sniffer(lab, "client-agent-liveness", expression=("udp port 53 or (mpls and udp port 53)",))
    kept_before = farm.balancer.cli("status")["counters"].get("liveness_kept", 0)
    stream = spawn_stream(lab, NODE, log, stop, patience(90), INTERVAL)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []  # the balancer's row of the stream's session, every half second
    try:
        wait_running([log], "running")

        def kept_four_times() -> bool:
            mine = [r for r in farm.balancer.sessions() if r["service"] == "dns" and r["client"] == c4]
            assert len(mine) <= 1, mine
            rows.extend(mine)
            counts = {r["label_packets"] for r in rows if r["label_packets"] is not None}
            return len(counts) >= 6  # the baseline as its first flow ended, then five keeps

        def poll() -> bool:
            time.sleep(0.5)
            return kept_four_times()

        wait("the balancer keeping the session five times on its label count", poll, 90)
        elapsed = time.monotonic() - started
    finally:
        stop.touch()
    # Read as the stream stops sending (the session lives at least a persistence timeout on).
    time.sleep(0.5)
    liveness, plain = liveness_packets(lab, c2s_of(rows)), filter_packets(lab, c2s_of(rows))
    labelled = filter_packets(lab, c2s_of(rows), NODE, lab.iface(NODE, towards="lb")["dev"])  # c4's C2S filter
    assert stream.wait(timeout=patience(30)) == 0
    result = last_json(log)
    assert result["lost"] == 0 and result["received"] == result["sent"] > 0, result
    # One session, one pair, one server throughout; its only flow (the first) ended, the
    # liveness filter's count grew at every check, and it lived several times the first flow's
    # entry plus the persistence a plain session gets.
    assert len({(r["id"], r["c2s_label"], r["s2c_label"], r["server"]) for r in rows}) == 1, rows
    session_id, c2s, s2c = rows[0]["id"], rows[0]["c2s_label"], rows[0]["s2c_label"]
    assert any(r["flows"] == 0 for r in rows), rows
    counts = [r["label_packets"] for r in rows if r["label_packets"] is not None]
    assert counts == sorted(counts) and len(set(counts)) >= 6, counts
    assert elapsed >= 2.5 * (UDP_TIMEOUT + PERSISTENCE), elapsed
    assert farm.balancer.cli("status")["counters"]["liveness_kept"] - kept_before >= 5
    assert f"session learned: {c4} -> {vip} (udp/53) c2s {c2s} s2c {s2c}" in agent.log()
    # Every datagram went one of two ways through the balancer's kernel, each counted there: the
    # first few left c4 plain and took the session's C2S filter (fab0 egress), the rest left
    # labelled [C2S] by c4's filter and passed the liveness filter (tc ingress of c4's link, gact
    # pass) before af_mpls switched them; every one was echoed, so the filter changed nothing of
    # their way. It counted exactly what c4 labelled [C2S] (`labelled`: c4's filters of the
    # session; besides the stream, any packet of c4's other sessions that the server agent's
    # shared return route answered under this session's S2C).
    assert liveness == labelled >= result["sent"] - plain and liveness > 10 * plain > 0, (
        liveness,
        labelled,
        plain,
        result,
    )
    packets = sniff.packets()  # the stream on c4's link: [C2S] out after its plain start, [S2C] back
    out = [p[0] for p in packets if p[1:] == (c4, vip)]
    assert set(out) == {(), (c2s,)} and out.index((c2s,)) == out.count(()) and out.count((c2s,)) <= liveness, out
    assert {p[0] for p in packets if p[1:] == (vip, c4)} == {(s2c,)}
    # The stream stopped: the session ends on the balancer (one or two persistence timeouts after
    # its last datagram) and on the client (its flow's 3 s, then its 2 s persistence).
    _wait_for(f"session {session_id} end", farm.balancer.log, 60)
    assert session_id not in {r["id"] for r in farm.balancer.sessions()}
    assert (
        f"{c2s}"
        not in lab.sh("lb", "tc", "filter", "show", "dev", lab.iface("lb", towards=NODE)["dev"], "ingress").stdout
    )
    routes = {i.obj.label: i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute)}
    assert c2s not in routes, routes
    _wait_for(f"session end: {c4} -> {vip} (udp/53) c2s {c2s} s2c {s2c} (persistence timeout)", agent.log, 60)


def test_an_ipv6_session_is_labelled_both_ways(lab: Lab, farm: ServerLab, agent: ClientAgentLab) -> None:
    """c4's IPv6 address is label-aware too: after its first packet (plain), every packet of three
    connections to the IPv6 VIP leaves [C2S] and comes back [S2C] (the client agent's pref 11
    filter, the balancer's C2S route and liveness filter)."""
    c4, vip = lab.address(NODE, version=6), lab.vip6
    sniff = Sniffer(lab, "client-agent-ipv6")
    codes = [farm.balancer.curl(NODE, vip) for _ in range(3)]
    assert codes == ["200"] * 3, (farm.balancer.log()[-2000:], agent.log()[-2000:])
    packets = sniff.packets()
    [row] = [r for r in farm.balancer.sessions() if r["client"] == c4 and r["vip"] == vip]
    c2s, s2c = row["c2s_label"], row["s2c_label"]
    out = [p[0] for p in packets if p[1:] == (c4, vip)]
    back = [p[0] for p in packets if p[1:] == (vip, c4)]
    assert len(out) >= 3 * 4 and len(back) >= 3 * 4, packets  # three HTTP connections each way
    assert out[0] == () and set(out[1:]) == {(c2s,)} and set(back) == {(s2c,)}, packets
    assert f"session learned: {c4} -> {vip} (tcp/80) c2s {c2s} s2c {s2c}" in agent.log()
    assert filter_packets(lab, c2s) == 1  # the balancer's C2S filter labelled the first packet only
    assert liveness_packets(lab, c2s) >= len(out) - 1  # its liveness filter saw the [C2S] ones
    routes = {i.obj.label: i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute)}
    assert routes[c2s].out_labels[1:] == (c2s,) and routes[s2c].out_labels == (s2c,)


# Last: its held connection, killed, goes on retransmitting towards the VIP for a while, and the
# server agents answer a client's packets of every service of a VIP under its newest session's
# S2C (one return route per VIP and client), which the client agent then learns for that port.
def test_when_the_balancer_ends_the_session_the_client_agent_sees_its_answers_stop(
    lab: Lab, farm: ServerLab, agent: ClientAgentLab
) -> None:
    c4 = lab.address(NODE)
    out = Path(lab.node(NODE)["runtime_dir"]) / "hold-stop.out"
    holder = lab.spawn(NODE, sys.executable, "-c", HOLD, lab.vip, str(patience(6)), log=out)
    deadline = time.monotonic() + patience(30)
    while not (
        held := [s for s in agent.cli("sessions") if s["flows"] and s["ports"] == ["tcp/80"] and s["vip"] == lab.vip]
    ):
        assert time.monotonic() < deadline and holder.poll() is None, agent.log()[-2000:]
        time.sleep(0.5)
    s2c = held[0]["s2c_label"]
    starts = len(farm.balancer.logged("start", "http", c4, at_least=0))
    # The balancer ends the session (its C2S route goes): the held connection's request, labelled,
    # meets no route there and nothing comes back; a whole answer_timeout (2 s) later the agent ends it.
    assert farm.balancer.cli("sessions", "flush", "--client", c4)["flushed"] >= 1
    _wait_for(f"c2s {s2c - 1} s2c {s2c} (answers stopped)", agent.log, 60)
    lab.stop(holder)
    assert s2c not in {s["s2c_label"] for s in agent.cli("sessions")}
    assert agent.cli("status")["counters"]["answers_stopped"] >= 1
    # Its packets leave plain again: the next connection is a first packet, a new session.
    assert farm.balancer.curl(NODE) == "200", (farm.balancer.log()[-2000:], agent.log()[-2000:])
    assert len(farm.balancer.logged("start", "http", c4, at_least=starts + 1)) == starts + 1
