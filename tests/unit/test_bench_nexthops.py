"""`lab bench nexthops`: its `ip -batch` input (the agent's nexthop ids, one gateway shared by
every route), the agent's configuration it plans with, and its table; no lab."""

from __future__ import annotations

from orchestrator.dataplane import records
from orchestrator.lab.bench import nexthops


def test_the_batches_hold_the_same_routes_plain_and_each_to_its_own_nexthop() -> None:
    plain = nexthops.ip_batch(3, nexthops=False)
    assert plain == [
        f"route add 10.64.0.{i + 1}/32 encap mpls 100/{1002 + 2 * i} via 10.255.0.2 dev fab0 table 100 proto 195"
        for i in range(3)
    ]
    with_nh = nexthops.ip_batch(3, nexthops=True)
    assert len(with_nh) == 6
    for i in range(3):
        nh = records.nexthop_id(1002 + 2 * i, 4)  # the id the agent gives the session's nexthop
        assert with_nh[2 * i] == f"nexthop add id {nh} encap mpls 100/{1002 + 2 * i} via 10.255.0.2 dev fab0 proto 195"
        assert with_nh[2 * i + 1] == f"route add 10.64.0.{i + 1}/32 nhid {nh} table 100 proto 195"


def test_the_table_shows_each_run_and_its_ratios() -> None:
    run = nexthops.NexthopRun(10000, 2, 100.0, 400.0, 4.0, 90.0, 180.0, 2.0, {})
    text = nexthops.format_runs([run])
    assert "10000" in text and "4.00" in text and "2.00" in text and "400.0" in text


def test_the_agent_is_planned_with_a_block_of_every_session_and_learns_them_all() -> None:
    from orchestrator.core.agent import ServerAgent
    from orchestrator.core.events import LabelledPacket
    from orchestrator.dataplane import ops
    from orchestrator.lab.bench import kernel_limit

    config = nexthops.agent_config(5)
    assert (config.fabric, str(config.next_hop(4))) == (("fab0",), "10.255.0.2")
    agent = ServerAgent(config)
    packets = [
        LabelledPacket(8, i, nexthops.s2c_of(i) - 1, kernel_limit.udp_packet(c, nexthops.VIP, 5353, 53))
        for i, c in enumerate(kernel_limit.clients(5))
    ]
    plan = agent.on_packets(packets, 0.0)
    kinds = [type(op.obj) for op in plan.ops]
    assert kinds.count(ops.EncapNexthop) == 5 and kinds.count(ops.NexthopRoute) == 5
    assert agent.counters["sessions_learned"] == 5
