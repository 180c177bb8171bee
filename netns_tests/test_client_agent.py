"""The client agent for real in the lab: the label-aware client c4 runs it, behind the real balancer
and the server agents. Its first packet is unlabelled and queued by the balancer; every later
packet, in both directions and on every connection of the session, is labelled on c4's link
([C2S] towards the balancer, [S2C] back) and switched by the balancer's kernel: its C2S flower
filter and its queue never see them (tc and nftables counters). Plain clients keep working beside
it, a UDP session ends on both sides, a SIGKILLed client agent keeps its session, and a session
the balancer ended ends on the client when its answers stop."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.dataplane import ops
from orchestrator.lab.balancer_lab import UDP_ASK
from orchestrator.lab.client_lab import NODE, ClientAgentLab, Sniffer, balancer_changes, filter_packets
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.server_lab import ServerLab


@pytest.fixture(scope="module")
def farm(lab: Lab) -> Iterator[ServerLab]:
    # dns sessions outlive their first flow's conntrack entry by 10 s: the later flows of a
    # label-aware session never reach the balancer's conntrack (see docs/design.md).
    f = ServerLab(lab, {**balancer_changes(lab), "services.dns.persistence_timeout": "10s"})
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
    found = re.findall(
        rf"session (\d+) start: {service} {re.escape(client)} -> \S+ c2s (\d+) s2c (\d+)", farm.balancer.log()
    )
    assert len(found) == 1, farm.balancer.log()[-2000:]
    return int(found[0][0]), int(found[0][1]), int(found[0][2])


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
    # The balancer: its first flow's entry gone, then its persistence (10 s); the C2S route goes.
    _wait_for(f"session {session_id} end", farm.balancer.log, 180)
    routes = {i.obj.label: i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute)}
    assert c2s not in routes, routes


def test_when_the_balancer_ends_the_session_the_client_agent_sees_its_answers_stop(
    lab: Lab, farm: ServerLab, agent: ClientAgentLab
) -> None:
    c4 = lab.address(NODE)
    out = Path(lab.node(NODE)["runtime_dir"]) / "hold-stop.out"
    holder = lab.spawn(NODE, sys.executable, "-c", HOLD, lab.vip, str(patience(6)), log=out)
    deadline = time.monotonic() + patience(30)
    while not (held := [s for s in agent.cli("sessions") if s["flows"] and s["ports"] == ["tcp/80"]]):
        assert time.monotonic() < deadline and holder.poll() is None, agent.log()[-2000:]
        time.sleep(0.5)
    s2c = held[0]["s2c_label"]
    starts = len(re.findall(rf"start: http {re.escape(c4)} ", farm.balancer.log()))
    # The balancer ends the session (its C2S route goes): the held connection's request, labelled,
    # meets no route there and nothing comes back; a whole answer_timeout (2 s) later the agent ends it.
    assert farm.balancer.cli("sessions", "flush", "--client", c4)["flushed"] >= 1
    _wait_for(f"c2s {s2c - 1} s2c {s2c} (answers stopped)", agent.log, 60)
    lab.stop(holder)
    assert s2c not in {s["s2c_label"] for s in agent.cli("sessions")}
    assert agent.cli("status")["counters"]["answers_stopped"] >= 1
    # Its packets leave plain again: the next connection is a first packet, a new session.
    assert farm.balancer.curl(NODE) == "200", (farm.balancer.log()[-2000:], agent.log()[-2000:])
    assert len(re.findall(rf"start: http {re.escape(c4)} ", farm.balancer.log())) == starts + 1
