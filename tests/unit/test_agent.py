"""The server agent's core against the fake provider's forwarding model: learning from labelled
first packets, S2C = C2S + 1 return routes per VIP table (to a nexthop object per session, or
plain encap routes on a kernel without them), session end, label reuse, restart."""

from __future__ import annotations

import errno

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from orchestrator.core.agent import RULE_PRIORITY, ServerAgent, State
from orchestrator.core.events import Action, FlowKey, FlowsEnded, FlowTableResync, LabelledPacket
from orchestrator.dataplane import ops, records
from orchestrator.dataplane.fake import FakeProvider
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
    # The route points at the session's nexthop object, whose id says its S2C label.
    [nexthop] = nexthops(node)
    assert nexthop == ops.EncapNexthop(0x6D600000 | 1002, (100, 1002), "eth0", "10.1.1.1")
    assert return_routes(node) == [ops.NexthopRoute("10.0.1.10/32", nexthop.id, 100)]
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


def return_routes(node: AgentNode) -> list[ops.EncapRoute | ops.NexthopRoute]:
    return [i.obj for i in node.kernel.dump() if isinstance(i.obj, (ops.EncapRoute, ops.NexthopRoute))]


def nexthops(node: AgentNode) -> list[ops.EncapNexthop]:
    return [i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.EncapNexthop)]


def test_ipv6_clients_get_their_route_in_the_ipv6_vip_table() -> None:
    node = AgentNode()
    assert node.first(1003, ipv6_tcp("fd00:1::10", VIP6, 40000, 80)) == [Action.ACCEPT]
    assert node.answer("fd00:1::10", vip=VIP6) == (100, 1004)
    [nexthop] = nexthops(node)
    assert (nexthop.id, nexthop.via) == (0x6D700000 | 1004, "fd00:11::1")  # the IPv6 half of the range
    assert return_routes(node) == [ops.NexthopRoute("fd00:1::10/128", nexthop.id, 101)]


def test_the_nexthop_id_is_the_s2c_label_and_family_in_a_documented_range() -> None:
    assert records.nexthop_id(1002, 4) == 0x6D6003EA and records.nexthop_label(0x6D6003EA) == (1002, 4)
    assert records.nexthop_id(ops.MPLS_LABEL_MAX, 6) == records.NEXTHOP_IDS[-1]
    assert records.nexthop_label(records.NEXTHOP_IDS[0] - 1) is None
    assert records.nexthop_label(records.NEXTHOP_IDS[-1] + 1) is None
    with pytest.raises(ValueError):
        records.nexthop_id(1 << 20, 4)


def test_without_nexthop_objects_return_routes_are_plain_encap_routes() -> None:
    node = AgentNode(FakeProvider(["eth0"], nexthops=False))
    node.agent.nexthops = node.kernel.supports_nexthops()
    assert node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80)) == [Action.ACCEPT]
    assert node.answer("10.0.1.10") == (100, 1002)
    assert return_routes(node) == [ops.EncapRoute("10.0.1.10/32", (100, 1002), "eth0", "10.1.1.1", 100)]
    assert not nexthops(node)


def test_a_nexthop_refused_as_not_supported_turns_nexthops_off_and_the_route_is_made_plain() -> None:
    node = AgentNode(FakeProvider(["eth0"], nexthops=False))  # the agent believes it has them
    plan = node.agent.on_packets([LabelledPacket(8, 1, 1001, ipv4_tcp("10.0.1.10", VIP, 1, 80))], 0)
    results = node.kernel.apply(plan.ops)
    assert [r.errno for r in results] == [errno.EOPNOTSUPP, errno.EINVAL]  # the nexthop, then its route
    node.agent.commit(plan, results)
    assert not node.agent.nexthops and node.agent.counters["nexthops_unsupported"] == 1
    retry = node.agent.retry_ops()
    assert all(r.ok for r in node.kernel.apply(retry))
    assert node.answer("10.0.1.10") == (100, 1002) and not node.agent.retry
    assert return_routes(node) == [ops.EncapRoute("10.0.1.10/32", (100, 1002), "eth0", "10.1.1.1", 100)]


def test_more_flows_of_a_session_add_no_route_and_the_route_ends_after_the_last_flow_and_persistence() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40001, 80), now=1)
    assert len(return_routes(node)) == 1 and len(nexthops(node)) == 1
    node.agent.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.10", VIP, 40000, 80),))], now=2)
    assert node.agent.sessions[1001].state == State.SERVING
    node.agent.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.10", VIP, 40001, 80),))], now=3)
    assert node.agent.sessions[1001].state == State.DRAINING
    node.tick(3 + 29.9)
    assert node.answer("10.0.1.10") == (100, 1002)
    node.tick(3 + 30)
    assert node.answer("10.0.1.10") is None and not node.agent.sessions
    assert not return_routes(node) and not nexthops(node)  # the session's nexthop went with its route
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
    assert [n.labels for n in nexthops(node)] == [(100, 1006)]  # the route's nexthop only
    node.agent.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.10", VIP, 40001, 53),))], now=2)
    node.tick(40)
    assert node.answer("10.0.1.10") == (100, 1002)  # the older session still lives: its label again
    assert list(node.agent.sessions) == [1001]
    assert [n.labels for n in nexthops(node)] == [(100, 1002)]


def test_a_reused_label_from_another_client_starts_a_new_session() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1001, ipv4_tcp("10.0.1.11", VIP, 40000, 80), now=100)
    assert node.answer("10.0.1.10") is None  # the old session's route went with it
    assert node.answer("10.0.1.11") == (100, 1002)
    assert node.agent.counters["label_reused"] == 1
    # The index of sessions by (VIP, client) follows: the old client's entry went with it.
    assert node.agent.by_pair == {(VIP, "10.0.1.11"): {1001: node.agent.sessions[1001]}}


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
    assert not return_routes(node) and not nexthops(node)


def test_a_failed_route_is_forgotten_so_the_next_first_packet_tries_again() -> None:
    node = AgentNode()
    plan = node.agent.on_packets([LabelledPacket(8, 1, 1001, ipv4_tcp("10.0.1.10", VIP, 1, 80))], 0)
    failed = [ops.OpResult(op, "No such device", 19) for op in plan.ops]
    assert [v.action for v in node.agent.commit(plan, failed)] == [Action.ACCEPT]
    assert node.agent.counters["route_errors"] == 1 and node.agent.nexthops  # ENODEV: nexthops stay
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 2, 80), now=1)
    assert node.answer("10.0.1.10") == (100, 1002)


def test_restart_rebuilds_sessions_from_the_kernel_and_deletes_what_fits_no_vip() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1003, ipv4_tcp("10.0.1.11", VIP, 40000, 80), now=0)
    foreign = ops.EncapRoute("10.0.1.12/32", (100, 1008), "eth0", "10.1.1.1", 77)  # no VIP's table
    # A plain encap route of an earlier version (or a kernel without nexthops): adopted as it is.
    legacy = ops.EncapRoute("10.0.1.13/32", (100, 1010), "eth0", "10.1.1.1", 100)
    # A nexthop whose route never got in (a crash between the two), and one outside our range.
    orphan = ops.EncapNexthop(records.nexthop_id(1012, 4), (100, 1012), "eth0", "10.1.1.1")
    others = ops.EncapNexthop(7, (100, 1014), "eth0", "10.1.1.1")
    # A route of ours to a nexthop that is not ours: no session can be read from it.
    astray = ops.NexthopRoute("10.0.1.14/32", 7, 100)
    assert all(r.ok for r in node.kernel.apply([ops.Add(o) for o in (foreign, legacy, orphan, others, astray)]))
    before = node.kernel.dump()
    fresh = ServerAgent(node.config)
    live = frozenset({FlowKey(6, "10.0.1.10", VIP, 40000, 80), FlowKey(6, "10.0.1.13", VIP, 40000, 80)})
    stale = fresh.restore(before, live, now=50)
    assert stale == [ops.Delete(foreign), ops.Delete(astray), ops.Delete(orphan)]
    assert {c: (s.client, s.state) for c, s in fresh.sessions.items()} == {
        1001: ("10.0.1.10", State.SERVING),
        1003: ("10.0.1.11", State.DRAINING),
        1009: ("10.0.1.13", State.SERVING),
    }
    node.kernel.apply(stale)
    nexthop = ops.EncapNexthop(records.nexthop_id(1004, 4), (100, 1004), "eth0", "10.1.1.1")
    assert fresh.tick(50 + 30) == [
        ops.Delete(ops.NexthopRoute("10.0.1.11/32", nexthop.id, 100)),
        ops.Delete(nexthop),
    ]
    # The restored sessions go on: their next flows change nothing in the kernel.
    plan = fresh.on_packets(
        [
            LabelledPacket(8, 1, 1001, ipv4_tcp("10.0.1.10", VIP, 40001, 80)),
            LabelledPacket(8, 2, 1009, ipv4_tcp("10.0.1.13", VIP, 40001, 80)),
        ],
        60,
    )
    assert plan.ops == []
    assert node.answer("10.0.1.10") == (100, 1002) and node.answer("10.0.1.13") == (100, 1010)


def test_a_restart_leaves_what_the_kernel_holds_exactly() -> None:
    node = AgentNode()
    node.first(1001, ipv4_tcp("10.0.1.10", VIP, 40000, 80), now=0)
    node.first(1003, ipv6_tcp("fd00:1::10", VIP6, 40000, 80), now=0)
    before = node.kernel.dump()
    fresh = ServerAgent(node.config)
    assert fresh.restore(before, frozenset(), now=10) == []
    assert fresh.routes == node.agent.routes and fresh.route_nexthops == node.agent.route_nexthops
    assert {pair: set(by_c2s) for pair, by_c2s in fresh.by_pair.items()} == {
        (VIP, "10.0.1.10"): {1001},
        (VIP6, "fd00:1::10"): {1003},
    }
    # A later session of the same client moves the route to its own nexthop and frees the old one.
    plan = fresh.on_packets([LabelledPacket(8, 1, 1005, ipv4_tcp("10.0.1.10", VIP, 40001, 53))], 20)
    assert all(r.ok for r in node.kernel.apply(plan.ops))
    assert [type(op.obj).__name__ + ":" + op.verb for op in plan.ops] == [
        "EncapNexthop:replace",
        "NexthopRoute:replace",
        "EncapNexthop:delete",
    ]
    assert node.answer("10.0.1.10") == (100, 1006)
    assert {n.labels for n in nexthops(node)} == {(100, 1006), (100, 1004)}


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
