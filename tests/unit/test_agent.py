"""The server agent's core against the fake provider's forwarding model: learning from labelled
first packets, S2C = C2S + 1 return routes per VIP table, session end, label reuse, restart."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from orchestrator.core.agent import RULE_PRIORITY, ServerAgent, State
from orchestrator.core.events import Action, FlowKey, FlowsEnded, FlowTableResync, LabelledPacket
from orchestrator.dataplane import ops
from tests.unit.conftest import VIP, AgentNode

VIP6 = "fd00:100::100"


def ipv4_tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


def ipv6_tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


def test_node_objects_terminate_the_block_and_select_the_vip_tables() -> None:
    node = AgentNode()
    assert node.kernel.receive_mpls([1001]).delivered_locally
    assert node.kernel.receive_mpls([1997]).delivered_locally
    assert node.kernel.mpls_lookup(1002) is None and node.kernel.mpls_lookup(1999) is None  # S2C, unpaired
    rules = [i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.Rule)]
    assert rules == [ops.Rule("10.0.0.100/32", 100, RULE_PRIORITY), ops.Rule("fd00:100::100/128", 101, RULE_PRIORITY)]


def test_a_labelled_first_packet_installs_the_s2c_return_route_before_its_verdict() -> None:
    node = AgentNode()
    assert node.answer("10.0.1.10") is None
    assert node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80)) == [Action.ACCEPT]
    assert node.answer("10.0.1.10") == (100, 1002)  # [balancer transport, S2C = C2S + 1]
    route = next(i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.EncapRoute))
    assert route == ops.EncapRoute("10.0.1.10/32", (100, 1002), "eth0", "10.1.1.1", 100)
    # Answers from another source than the VIP are not labelled.
    assert node.answer("10.0.1.10", vip="10.1.1.10") is None
    [session] = [s.view() for s in node.agent.sessions.values()]
    assert (session["client"], session["vip"], session["c2s_label"], session["s2c_label"], session["flows"]) == (
        "10.0.1.10",
        VIP,
        1001,
        1002,
        1,
    )


def test_ipv6_clients_get_their_route_in_the_ipv6_vip_table() -> None:
    node = AgentNode()
    assert node.first(1003, ipv6_tcp("fd00:1::10", VIP6, 40000, 80)) == [Action.ACCEPT]
    assert node.answer("fd00:1::10", vip=VIP6) == (100, 1004)
    route = next(i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.EncapRoute))
    assert (route.via, route.table) == ("fd00:11::1", 101)


def test_more_flows_of_a_session_add_no_route_and_the_route_ends_after_the_last_flow_and_persistence() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40001, 80), now=1)
    assert len([i for i in node.kernel.dump() if isinstance(i.obj, ops.EncapRoute)]) == 1
    node.agent.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.10", VIP, 40000, 80),))], now=2)
    assert node.agent.sessions[1001].state == State.SERVING
    node.agent.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.10", VIP, 40001, 80),))], now=3)
    assert node.agent.sessions[1001].state == State.DRAINING
    node.tick(3 + 29.9)
    assert node.answer("10.0.1.10") == (100, 1002)
    node.tick(3 + 30)
    assert node.answer("10.0.1.10") is None and not node.agent.sessions
    assert node.agent.counters["sessions_ended"] == 1


def test_a_new_flow_while_draining_keeps_the_session() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.agent.on_flow_events([FlowTableResync(frozenset())], now=1)
    assert node.agent.sessions[1001].state == State.DRAINING
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40002, 80), now=20)
    node.tick(100)
    assert node.answer("10.0.1.10") == (100, 1002)


def test_two_sessions_of_one_client_share_the_route_and_it_falls_back_when_the_newer_ends() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1005, ipv4_tcp("10.0.1.10", VIP, 40001, 53), now=1)  # another service on the VIP
    assert node.answer("10.0.1.10") == (100, 1006)
    node.agent.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.10", VIP, 40001, 53),))], now=2)
    node.tick(40)
    assert node.answer("10.0.1.10") == (100, 1002)  # the older session still lives: its label again
    assert list(node.agent.sessions) == [1001]


def test_a_reused_label_from_another_client_starts_a_new_session() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1001, ipv4_tcp("10.0.1.11", VIP, 40000, 80), now=100)
    assert node.answer("10.0.1.10") is None  # the old session's route went with it
    assert node.answer("10.0.1.11") == (100, 1002)
    assert node.agent.counters["label_reused"] == 1


@pytest.mark.parametrize(
    "label, data, counter",
    [
        (1002, ipv4_tcp("10.0.1.10", VIP, 1, 80), "label_outside_block"),  # an S2C label
        (5001, ipv4_tcp("10.0.1.10", VIP, 1, 80), "label_outside_block"),
        (1001, ipv4_tcp("10.0.1.10", "10.0.0.7", 1, 80), "not_a_vip"),
        (1001, b"\x45\x00", "malformed:truncated-ipv4-header"),
    ],
)
def test_packets_it_cannot_learn_from_are_accepted_and_counted(label: int, data: bytes, counter: str) -> None:
    node = AgentNode()
    assert node.first(label, data) == [Action.ACCEPT]  # the agent never breaks traffic
    assert node.agent.counters[counter] == 1 and not node.agent.sessions
    assert not [i for i in node.kernel.dump() if isinstance(i.obj, ops.EncapRoute)]


def test_a_failed_route_is_forgotten_so_the_next_first_packet_tries_again() -> None:
    node = AgentNode()
    plan = node.agent.on_packets([LabelledPacket(8, 1, 1001, ipv4_tcp("10.0.1.10", VIP, 1, 80))], 0)
    failed = [ops.OpResult(op, "No such device", 19) for op in plan.ops]
    assert [v.action for v in node.agent.commit(plan, failed)] == [Action.ACCEPT]
    assert node.agent.counters["route_errors"] == 1
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 2, 80), now=1)
    assert node.answer("10.0.1.10") == (100, 1002)


def test_restart_rebuilds_sessions_from_the_kernel_and_deletes_what_fits_no_vip() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1003, ipv4_tcp("10.0.1.11", VIP, 40000, 80), now=0)
    foreign = ops.EncapRoute("10.0.1.12/32", (100, 1008), "eth0", "10.1.1.1", 77)  # no VIP's table
    assert node.kernel.apply([ops.Add(foreign)])[0].ok
    fresh = ServerAgent(node.config)
    live = frozenset({FlowKey(6, "10.0.1.10", VIP, 40000, 80)})
    stale = fresh.restore(node.kernel.dump(), live, now=50)
    assert stale == [ops.Delete(foreign)]
    assert {c: (s.client, s.state) for c, s in fresh.sessions.items()} == {
        1001: ("10.0.1.10", State.SERVING),
        1003: ("10.0.1.11", State.DRAINING),
    }
    node.kernel.apply(stale)
    assert fresh.tick(50 + 30) == [ops.Delete(ops.EncapRoute("10.0.1.11/32", (100, 1004), "eth0", "10.1.1.1", 100))]
    # The restored session goes on: its next flow changes nothing in the kernel.
    plan = fresh.on_packets([LabelledPacket(8, 1, 1001, ipv4_tcp("10.0.1.10", VIP, 40001, 80))], 60)
    assert plan.ops == []


def test_a_reload_ends_the_sessions_of_a_vip_that_left_and_keeps_the_others() -> None:
    import dataclasses

    node = AgentNode()
    assert node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80)) == [Action.ACCEPT]
    assert node.first(1003, ipv6_tcp("fd00:1::10", VIP6, 40000, 80)) == [Action.ACCEPT]
    without_v4 = dataclasses.replace(node.config, vips=tuple(v for v in node.config.vips if str(v.address) != VIP))
    assert all(r.ok for r in node.kernel.apply(node.agent.reconfigure(without_v4)))
    assert set(node.agent.sessions) == {1003}
    assert node.answer("10.0.1.10") is None  # its return route left the old table
    assert node.answer("fd00:1::10", VIP6) == (100, 1004)
    assert node.agent.counters["sessions_ended"] == 1
