"""Issue 15's scale: the balancer's tick, status and metrics cost what is due, never a walk of the
session table (at 500,000 sessions a walk per tick stalled the daemon). A table that refuses to
be walked proves it; the counts kept as states change are checked against a walk."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.core.events import Action, FirstPacket, FlowsEnded
from orchestrator.core.sessions import Session, SessionTable, State
from orchestrator.daemon import loop
from orchestrator.dataplane import offload, ops, records
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import Node, ScriptedConntrack, balancer_daemon, clients, config, filled, flows_of, syn

PERSISTENCE = 30.0  # the example's http service
HOLD_DOWN = 2.0  # the example's labels.hold_down


class NoWalk(SessionTable):
    """A table whose walk fails the test: lookups by key, id and flow only."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the session table was walked")

    def page(self, offset: int, limit: int | None) -> list[Session]:
        raise AssertionError("the session table was paged")


def walked_states(table: SessionTable) -> dict[str, int]:
    return dict(collections.Counter(str(s.state) for s in SessionTable.__iter__(table)))


def test_a_tick_ends_the_due_sessions_without_walking_the_table() -> None:
    node = filled(1000)
    ending = clients(5, first=11)
    node.core.on_flow_events([FlowsEnded(tuple(f for c in ending for f in flows_of(node, c)))], node.now)
    node.core.table.__class__ = NoWalk
    node.advance(PERSISTENCE - 1)  # not yet due
    assert len(node.core.table) == 1000
    operations, ended = node.core.expire(node.now + 2)
    assert sorted(s.key.value for s in ended) == sorted(ending)
    assert all(r.ok for r in node.kernel.apply(operations))
    assert len(node.core.table) == 995 and node.core.counters["ended:persistence timeout"] == 5
    for client in ending:  # their filters and S2C routes are gone, their pairs' markers in place
        assert node.labels_of(client) == ()
    assert node.core.sessions_by_state() == {"serving": 995}
    assert node.core.embryonic_count() == 995  # TCP sessions, none checked yet (check_embryonic)
    # The hold markers end by their own heap, at the hold-down's end, again without a walk.
    markers = dict(node.core.markers)
    assert len(markers) == 5
    node.now += 2
    assert all(r.ok for r in node.kernel.apply(node.core.tick(node.now + HOLD_DOWN - 0.5)))
    assert node.core.markers == markers
    deletes = node.core.tick(node.now + HOLD_DOWN + 0.5)
    assert sorted(deletes, key=str) == sorted((ops.Delete(records.hold_marker(c + 1)) for c in markers), key=str)
    assert node.core.markers == {}


def test_a_session_that_serves_again_before_its_end_is_not_ended_by_its_old_entry() -> None:
    node = filled(3)
    client = clients(1)[0]
    flows = flows_of(node, client)
    node.core.on_flow_events([FlowsEnded(flows)], node.now)
    node.now += 10
    node.packets(syn(client, sport=40001))  # a new flow: serving again
    session = node.core.table.get("http", client)
    assert session is not None and session.state == State.SERVING
    node.advance(PERSISTENCE)  # the first drain's end has passed
    assert node.core.table.get("http", client) is session
    node.core.on_flow_events([FlowsEnded(tuple(session.flows))], node.now)  # drains again, from now
    node.advance(PERSISTENCE - 1)
    assert node.core.table.get("http", client) is session and session.state == State.DRAINING
    node.advance(2)
    assert node.core.table.get("http", client) is None
    assert node.core.counters["ended:persistence timeout"] == 1


def test_the_counts_by_state_follow_every_change() -> None:
    node = filled(50)
    table = node.core.table
    assert table.by_state() == walked_states(table) == {"serving": 50}
    node.core.on_flow_events([FlowsEnded(tuple(f for c in clients(20) for f in flows_of(node, c)))], node.now)
    assert table.by_state() == walked_states(table) == {"serving": 30, "draining": 20}
    node.packets(*(syn(c, sport=40001) for c in clients(5)))  # five serve again
    assert table.by_state() == walked_states(table) == {"serving": 35, "draining": 15}
    node.advance(PERSISTENCE + 1)  # the fifteen end
    assert table.by_state() == walked_states(table) == {"serving": 35}
    # A first packet whose objects fail: its session never counts once it is rolled back.
    hop = ops.NextHop("lan0", None)
    plan = node.core.on_packets([FirstPacket(0, 1, syn("10.0.9.9"), "lan0", hop)], node.now)
    assert table.by_state() == walked_states(table) == {"serving": 35, "opening": 1}
    results = [ops.OpResult(op, "EEXIST", 17) for op in plan.ops]
    assert [v.action for v in node.core.commit(plan, results, node.now).verdicts] == [Action.DROP]
    assert table.by_state() == walked_states(table) == {"serving": 35}


def test_status_and_the_tick_of_the_daemon_never_walk_the_table() -> None:
    d = balancer_daemon(config(), FakeProvider(["lan0", "fab0"]))
    d.conntrack = ScriptedConntrack()
    d.core.table.__class__ = NoWalk
    d.tick()
    details: dict[str, Any] = d.status_details(time.monotonic())
    assert details["sessions"] == 0 and details["sessions_by_state"] == {} and details["sessions_embryonic"] == 0


def test_a_slow_conntrack_sweep_spaces_the_next_one() -> None:
    """A sweep dumps every live flow: the next waits SWEEP_SPACING times as long as it took."""

    class Slow(ScriptedConntrack):
        def sweep(self) -> Any:
            time.sleep(1.2)
            return super().sweep()

    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    d.conntrack = slow = Slow()
    d.sweep()
    slow.close()
    wait = d.next_sweep - time.monotonic()
    assert loop.SWEEP < loop.SWEEP_SPACING * 1.2 - 0.5 < wait <= loop.SWEEP_SPACING * 1.5
    assert d.core.counters["conntrack_sweeps"] == 1


def test_status_answers_at_once_while_the_offload_dump_runs_in_its_own_thread() -> None:
    """The offload counts come from a background dump on another thread (Provider.twin): status
    never waits for one, says how old its counts are, and they are the kernel's."""
    dumps: list[str] = []

    class Slow(FakeProvider):
        def dump(self, elements: bool = True) -> list[ops.Installed]:
            dumps.append(threading.current_thread().name)
            time.sleep(1.0)
            return super().dump(elements)

    kernel = Slow(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    d = balancer_daemon(config(), kernel)
    d.decide([QueuedPacket(0, n, syn(src), 0, None, 0) for n, src in ((1, "10.0.1.10"), (2, "10.0.1.11"))])
    assert len(d.core.table) == 2

    async def scenario() -> list[tuple[float, Any]]:
        answers = []
        await d.start_tasks()
        try:
            for _ in range(40):
                began = time.perf_counter()
                status = d.handle_request({"cmd": "status"})
                answers.append((time.perf_counter() - began, status["offload_age_s"]))
                if status["offload_age_s"] is not None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await d.stop_tasks()
        return answers

    answers = asyncio.run(scenario())
    assert answers[0][1] is None and answers[-1][1] is not None  # no counts, then the dump's
    assert max(took for took, _ in answers) < 0.5  # never the dump's second
    assert dumps and threading.main_thread().name not in dumps
    two_sessions = {"in_hw": 0, "not_in_hw": 4, "trap": 0, "offload_failed": 0}  # 2 filters, 2 S2C routes
    assert d.offload.counts() == offload.counts(FakeProvider.dump(kernel)) == two_sessions


def installed(node: Node) -> set[ops.DataplaneObject]:
    dumped = node.kernel.dump() + node.kernel.dump_elements()
    return {i.obj for i in dumped if not isinstance(i.obj, ops.ClsactQdisc)}


def test_a_sessions_objects_are_derived_not_stored_and_are_exactly_what_the_kernel_got() -> None:
    """A single-client session keeps no copy of its objects: they follow from its row and the
    configuration it was made under; what they derive is what was installed, and what its end
    deletes leaves the kernel with the hold marker only, even after a reload changed the ports."""
    node = filled(20)
    assert all(s.stored is None and s.shape is not None for s in SessionTable.__iter__(node.core.table))
    assert installed(node) == {o for s in SessionTable.__iter__(node.core.table) for o in s.objects}
    node.core.configure(config({"services.http.ports": [80, 8080]}), node.now)  # new sessions: two filters
    node.packets(syn("10.0.7.1"))
    new = node.core.table.get("http", "10.0.7.1")
    assert new is not None and new.stored is None
    assert sum(isinstance(o, ops.FlowerFilter) for o in new.objects) == 2
    old = node.core.table.get("http", clients(1)[0])
    assert old is not None and sum(isinstance(o, ops.FlowerFilter) for o in old.objects) == 1  # as installed
    assert installed(node) == {o for s in SessionTable.__iter__(node.core.table) for o in s.objects}
    for session in list(SessionTable.__iter__(node.core.table)):
        assert all(r.ok for r in node.kernel.apply(node.core.end(session, node.now, "flushed")))
    assert installed(node) == {records.hold_marker(c + 1) for c in node.core.markers}


def test_a_rekeyed_session_stores_its_objects() -> None:
    """A second client address (a mobile client's care-of address) is not derived: the session
    stores its objects from then on, the first client's included."""
    cfg = config()
    svc = next(s for s in cfg.services if s.session_key.value == "mip6-home-address")
    node = Node(cfg)
    home = "2001:db8:1::10"
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt

    def mobile(care_of: str) -> bytes:
        return bytes(
            IPv6(src=care_of, dst=str(svc.vip))
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
            / TCP(dport=svc.ports[0] if svc.ports else 80, flags="S")
        )

    node.packets(mobile("2001:db8:2::1"))
    [session] = list(SessionTable.__iter__(node.core.table))
    assert session.stored is None
    node.packets(mobile("2001:db8:2::2"))
    assert session.stored is not None and len(session.clients) == 2
    assert installed(node) == set(session.objects)


def test_a_sessions_flows_take_a_set_only_when_there_are_two_or_more() -> None:
    node = filled(1)
    [session] = list(SessionTable.__iter__(node.core.table))
    [first] = session.flows
    assert session.live == first  # one flow: the flow itself, no set
    node.packets(syn(session.key.client, sport=40001))
    assert isinstance(session.live, set) and len(session.flows) == 2 and session.flows_total == 2
    [second] = session.flows - {first}
    node.packets(syn(session.key.client, sport=40001))  # the same flow again: counted once
    assert session.flows == {first, second} and session.flows_total == 2
    assert node.core.table.end_flow(first) is session and session.live == second
    assert node.core.table.end_flow(second) is session and session.live is None and session.flows == frozenset()
    assert node.core.table.by_flow(first) is None and node.core.table.by_flow(second) is None


def test_the_daemons_sweep_dumps_in_a_thread_and_ends_only_flows_known_before_it() -> None:
    """The conntrack sweep's dump runs off the loop: first packets are decided meanwhile; a flow
    known before the dump and absent from it ends, a flow gained during it does not."""
    release = threading.Event()
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    d = balancer_daemon(config(), kernel)
    d.decide([QueuedPacket(0, n, syn(src), 0, None, 0) for n, src in ((1, "10.0.1.10"), (2, "10.0.1.11"))])
    kept, gone = (d.core.table.get("http", c) for c in ("10.0.1.10", "10.0.1.11"))
    assert kept is not None and gone is not None

    class Blocking(ScriptedConntrack):
        def sweep(self) -> Any:
            assert release.wait(10)
            return super().sweep()

    d.conntrack = conntrack = Blocking(kept.flows)  # the dump: only the first session's flow

    async def scenario() -> None:
        d.sweep()
        assert d.sweeping is not None
        await asyncio.sleep(0.2)  # the dump is under way in its thread; the loop goes on
        d.decide([QueuedPacket(0, 3, syn("10.0.1.12"), 0, None, 0)])
        assert d.core.table.get("http", "10.0.1.12") is not None
        d.sweep()  # one sweep at a time: this one is skipped
        release.set()
        task = d.sweeping
        assert task is not None
        await task

    asyncio.run(scenario())
    conntrack.close()
    gained = d.core.table.get("http", "10.0.1.12")
    assert gained is not None and gained.state == State.SERVING and len(gained.flows) == 1
    assert kept.state == State.SERVING and gone.state == State.DRAINING and not gone.flows
    assert d.core.counters["conntrack_sweeps"] == 1 and d.sweeping is None
