"""A conntrack sweep's resync in bounded steps (core.SweepResync; issue 15: one resync of 20,000
flows held the daemon's loop for 0.7 s while first packets waited): each step checks at most its
budget of flows, the outcome is the one-piece resync's, and flows that started or ended while the
dump ran (or while the resync is under way) are left as the events said."""

from __future__ import annotations

import asyncio

from orchestrator.core import balancer as core_balancer
from orchestrator.core.events import FlowKey, FlowsEnded, FlowsStarted, FlowTableResync
from orchestrator.core.sessions import State
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import ScriptedConntrack, balancer_daemon, clients, config, filled, flows_of


def states(node_core: core_balancer.Balancer) -> dict[int, tuple[State, int]]:
    return {s.id: (s.state, len(s.flows)) for s in node_core.table}


def test_each_step_checks_at_most_its_budget_and_the_outcome_is_the_one_piece_resyncs() -> None:
    sliced, whole = filled(1000), filled(1000)
    gone = {f for c in clients(300, first=101) for f in flows_of(sliced, c)}
    unknown = FlowKey(6, "10.0.200.1", "10.0.0.1", 40000, 80)  # a client without a session: not adopted
    live = frozenset(f for f in sliced.core.table.flows() if f not in gone) | {unknown}
    whole.core.on_flow_events([FlowTableResync(live, sweep=True)], whole.now)

    adopted = 0
    adopt = sliced.core.adopt

    def counted_adopt(flow: FlowKey, now: float) -> None:
        nonlocal adopted
        adopted += 1
        adopt(flow, now)

    sliced.core.adopt = counted_adopt  # type: ignore[method-assign]
    sliced.core.sweep_begins()
    resync = sliced.core.sweep_resync(live)
    known, adopting = len(resync.known), len(live)
    steps = 0
    while True:
        before = resync._next_known, adopted
        done = resync.step(sliced.now, budget=128)
        steps += 1
        assert resync._next_known - before[0] + adopted - before[1] <= 128  # flows checked this step
        if done:
            break
    # 1000 known flows then 701 live ones, 128 a step: ceil(1701 / 128) steps, none more
    assert steps == -(-(known + adopting) // 128) and resync.done
    assert states(sliced.core) == states(whole.core)
    assert sum(s.state == State.DRAINING for s in sliced.core.table) == 300
    assert sliced.core.counters["conntrack_sweeps"] == whole.core.counters["conntrack_sweeps"] == 1
    assert sliced.core._sweep_changed is None


def test_flows_that_changed_since_the_dump_began_keep_what_the_events_said() -> None:
    node = filled(10)
    started_late = clients(1, first=3)[0]
    ended_late = clients(1, first=4)[0]
    node.core.sweep_begins()  # the dump starts: it sees every flow but the one started after it
    late_flow = flows_of(node, started_late)[0]
    dying = flows_of(node, ended_late)[0]
    live = frozenset(f for f in node.core.table.flows() if f != late_flow)
    # while the dump ran: the late flow ended and started again (the dump missed it), and
    # another ended (the dump still saw it)
    node.core.on_flow_events([FlowsEnded((late_flow,))], node.now)
    node.core.on_flow_events([FlowsStarted((late_flow,))], node.now)
    node.core.on_flow_events([FlowsEnded((dying,))], node.now)
    resync = node.core.sweep_resync(live)
    while not resync.step(node.now, budget=3):
        pass
    late = node.core.table.get("http", started_late)
    dead = node.core.table.get("http", ended_late)
    assert late is not None and late.state == State.SERVING and late_flow in late.flows  # not ended
    assert dead is not None and dead.state == State.DRAINING and not dead.flows  # not revived
    assert all(s.state == State.SERVING for s in node.core.table if s not in (dead,))


def test_the_daemon_serves_its_loop_between_the_slices_of_a_resync() -> None:
    """The daemon runs the resync a slice a step, yielding to its loop between them."""
    kernel = FakeProvider(["lan0", "fab0"])
    d = balancer_daemon(config(), kernel)
    d.conntrack = ScriptedConntrack()
    live = frozenset(FlowKey(6, f"10.9.{i >> 8}.{i & 255}", "10.0.0.1", 40000, 80) for i in range(3 * 1000 + 1))
    d.conntrack.live = live
    turns = 0
    at_steps: list[int] = []
    sweep_resync = d.core.sweep_resync

    def counted(live: frozenset[FlowKey]) -> core_balancer.SweepResync:
        resync = sweep_resync(live)
        step = resync.step

        def counted_step(now: float, budget: int = core_balancer.SWEEP_SLICE) -> bool:
            at_steps.append(turns)
            return step(now, budget)

        resync.step = counted_step  # type: ignore[method-assign]
        return resync

    d.core.sweep_resync = counted  # type: ignore[method-assign]

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(ticker())
        d.sweep()
        assert d.sweeping is not None
        await d.sweeping
        task.cancel()

    asyncio.run(scenario())
    assert d.sweeping is None and d.core.counters["conntrack_sweeps"] == 1 and d.core._sweep_changed is None
    # 3,001 live flows the table does not know, SWEEP_SLICE a step: 4 steps, and the loop's
    # other work ran between each two of them
    assert len(at_steps) == 4 and all(b > a for a, b in zip(at_steps, at_steps[1:])), at_steps
