"""Which conntrack sweep reads the live flows back, and where the dumps run (issue 15: every
stall of the loop over the latency runs had the sweep's dump under way): a full sweep first,
then every FULL_SWEEP, and soon after a failed read or dump; the kernel's expiry pass (a dump
that reports no flow) in between. The expiry pass and the offload sampler's dump run in the
background executor's threads, at the lowest CPU priority, never in asyncio's default
executor's; the full sweep's dump is read on the loop's own thread a slice at a time, what is
ready served between slices (a decoding thread at idle priority held the GIL the loop waited
for: docs/design.md)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from orchestrator.capture import conntrack
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.core.events import FlowKey, FlowsEnded, FlowsStarted, FlowTableResync
from orchestrator.daemon import background, loop, offload_sampler
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import VIP, ScriptedConntrack, ScriptedDump, balancer_daemon, config, syn


class Recording(ScriptedConntrack):
    """Says which dump ran, in which thread, at which CPU priority."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []  # (dump, thread, priority)
        self.dumps: list[ScriptedDump] = []
        self.per_step, self.waits = 100, False
        self.trace: list[str] | None = None
        self.fail_at: int | None = None

    def _note(self, what: str) -> None:
        self.calls.append((what, threading.current_thread().name, background.priority()))

    def sweep(self) -> FlowTableResync:
        self._note("sweep")
        return super().sweep()

    def expire(self) -> None:
        self._note("expire")
        super().expire()

    def start_dump(self) -> ScriptedDump:
        self._note("dump")
        self.dumps.append(ScriptedDump(self.live, self.per_step, self.waits, self.trace, self.fail_at))
        return self.dumps[-1]


def lan_kernel() -> FakeProvider:
    """A fake kernel with a route to the clients, so that first packets make sessions."""
    fake = FakeProvider(["lan0", "fab0"])
    fake.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    fake.add_ip_route("10.0.0.0/16", "lan0")
    return fake


def test_a_full_sweep_first_then_expiry_passes_until_the_next_full_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a flow no event reported is live (here the first sweep adopts one: the fast path
    admitted it before the daemon listened), a full sweep every FULL_SWEEP; once a full sweep no
    longer finds it, none (the next test)."""
    monkeypatch.setattr(conntrack, "events_enabled", lambda: True)
    d = balancer_daemon(config(), lan_kernel())
    d.queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))  # type: ignore[union-attr]
    d.on_packets()
    d.conntrack = listener = Recording()
    before = FlowKey(6, "10.0.1.10", VIP, 40001, 80)  # the session's, never reported by an event
    listener.live = frozenset({FlowKey(6, "10.0.1.10", VIP, 40000, 80), before})
    d.sweep()  # the first: full
    assert [c[0] for c in listener.calls] == ["sweep"] and d.core.counters["conntrack_sweeps"] == 1
    assert d.core.counters["flows_fast_path"] == 1 and d.core.full_sweeps_needed()
    now = time.monotonic()
    assert loop.SWEEP - 1 < d.next_sweep - now <= loop.SWEEP
    assert loop.FULL_SWEEP - 1 < d.next_full_sweep - now <= loop.FULL_SWEEP
    for _ in range(3):  # the next ones, SWEEP apart, before FULL_SWEEP: the kernel's expiry only
        d.sweep()
    assert [c[0] for c in listener.calls] == ["sweep", "expire", "expire", "expire"]
    assert listener.expiries == d.core.counters["conntrack_expiries"] == 3
    assert d.core.counters["conntrack_sweeps"] == 1
    d.next_sweep = d.next_full_sweep  # FULL_SWEEP later: the flow is still live
    d.sweep()
    assert listener.calls[-1][0] == "sweep" and d.core.counters["conntrack_sweeps"] == 2
    assert d.core.full_sweeps_needed()
    listener.live = frozenset()  # it ended, and no destroy event said so: the sweep sees it
    d.next_sweep = d.next_full_sweep
    d.sweep()
    assert listener.calls[-1][0] == "sweep" and d.core.counters["conntrack_sweeps"] == 3
    assert not d.core.full_sweeps_needed() and d.core.table.by_flow(before) is None
    d.next_sweep = d.next_full_sweep
    d.sweep()
    assert listener.calls[-1][0] == "expire" and d.core.counters["conntrack_sweeps"] == 3
    listener.close()


@pytest.mark.parametrize("events", [True, False])
def test_full_sweeps_stop_once_every_live_flow_came_with_its_event_and_a_failure_brings_one_back(
    events: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flows the events reported (the daemon's own first packets, fast-path flows' new-flow
    events) end with destroy events; a lost event is an ENOBUFS resync at once. So after a full
    sweep that adopted nothing, the next ones at FULL_SWEEP are expiry passes; a failed read
    still makes the next sweep a full one. Unless the kernel sends no events at all
    (`nf_conntrack_events` 0): then every FULL_SWEEP a full sweep, as before."""
    monkeypatch.setattr(conntrack, "events_enabled", lambda: events)
    d = balancer_daemon(config(), lan_kernel())
    d.queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))  # type: ignore[union-attr]
    d.on_packets()
    d.conntrack = listener = Recording()
    first = FlowKey(6, "10.0.1.10", VIP, 40000, 80)
    later = FlowKey(6, "10.0.1.10", VIP, 40001, 80)
    d.core.on_flow_events([FlowsStarted((first, later))], time.monotonic())  # both reported
    listener.live = frozenset({first, later})
    d.sweep()
    assert [c[0] for c in listener.calls] == ["sweep"] and not d.core.full_sweeps_needed()
    for _ in range(3):
        d.next_sweep = d.next_full_sweep  # FULL_SWEEP later, and later again
        d.sweep()
    if not events:
        assert [c[0] for c in listener.calls] == ["sweep"] * 4
        listener.close()
        return
    assert [c[0] for c in listener.calls] == ["sweep", "expire", "expire", "expire"]
    d.retry_sweep()  # a failed read: what it would have told is read back
    d.next_sweep = d.next_full_sweep
    d.sweep()
    assert listener.calls[-1][0] == "sweep" and d.core.counters["conntrack_sweeps"] == 2
    d.next_sweep = d.next_full_sweep
    d.sweep()
    assert listener.calls[-1][0] == "expire"
    listener.close()


def test_a_failed_conntrack_read_makes_the_next_sweep_a_full_one_soon() -> None:
    class Failing(Recording):
        def read(self) -> list[FlowsEnded | FlowTableResync]:
            raise OSError(105, "No buffer space available")

    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    d.conntrack = listener = Failing()
    d.next_full_sweep = time.monotonic() + loop.FULL_SWEEP  # a full sweep was just done
    assert not d.full_sweep_due()
    d._on_conntrack()
    assert d.core.counters["conntrack_errors"] == 1
    assert d.next_sweep - time.monotonic() <= loop.RETRY_SWEEP and d.full_sweep_due()
    listener.close()


def test_a_failed_expiry_pass_is_counted_and_a_full_sweep_follows_soon() -> None:
    class Failing(Recording):
        def expire(self) -> None:
            raise OSError(22, "Invalid argument")

    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    d.conntrack = listener = Failing()
    d.next_full_sweep = time.monotonic() + loop.FULL_SWEEP
    d.sweep()
    assert d.core.counters["conntrack_errors"] == 1 and "conntrack_expiries" not in d.core.counters
    assert d.next_sweep - time.monotonic() <= loop.RETRY_SWEEP and d.full_sweep_due()
    d.sweep()
    assert [c[0] for c in listener.calls] == ["sweep"] and d.core.counters["conntrack_sweeps"] == 1
    listener.close()


def test_the_daemons_dumps_run_in_the_background_threads_at_the_lowest_priority() -> None:
    """In a running loop: the full sweep's dump, the expiry pass and the offload sampler's dump
    each in a thread of the daemon's background executor, under SCHED_IDLE; asyncio's default
    executor's threads keep their priority."""
    kernel = FakeProvider(["lan0", "fab0"])
    offload_threads: list[tuple[str, str]] = []
    counts = kernel.offload_counts

    def offload_counts(keep: Any = None) -> dict[str, int]:
        offload_threads.append((threading.current_thread().name, background.priority()))
        return counts(keep)

    kernel.offload_counts = offload_counts  # type: ignore[method-assign]
    d = balancer_daemon(config(), kernel)
    d.conntrack = listener = Recording()

    async def scenario() -> str:
        await d.start_tasks()
        try:
            for _ in range(2):  # a full sweep, then an expiry pass
                d.sweep()
                task = d.sweeping
                assert task is not None
                await task
            for _ in range(50):
                if offload_threads:
                    break
                await asyncio.sleep(0.05)
            return await asyncio.to_thread(background.priority)
        finally:
            await d.stop_tasks()
            d.background_work.close()

    default_priority = asyncio.run(scenario())
    listener.close()
    assert [c[0] for c in listener.calls] == ["dump", "expire"]
    assert offload_threads
    lowest = ("idle", "nice 19")  # SCHED_IDLE, or nice 19 where the system refuses it
    _, thread, priority = listener.calls[0]  # the full sweep's dump: on the loop, never in a thread
    assert thread == "MainThread" and priority == "unchanged"
    _, thread, priority = listener.calls[1]
    assert thread.startswith(background.NAME) and priority in lowest
    assert all(t.startswith(background.NAME) and p in lowest for t, p in offload_threads)
    assert default_priority == "unchanged"  # the default executor's threads were never lowered
    assert d.core.counters["conntrack_sweeps"] == 1 and d.core.counters["conntrack_expiries"] == 1
    assert threading.current_thread().name == "MainThread" and background.priority() == "unchanged"


def test_the_offload_sampler_dumps_seldom_while_no_device_can_offload() -> None:
    """No device of our filters with hw-tc-offload on: no object of ours can be in hardware, so
    after the first dump the next waits OFFLOAD_IDLE_EVERY; once one can, every check dumps."""
    capable: list[bool | None] = [False]  # None: the check fails

    def can() -> bool:
        if capable[0] is None:
            raise OSError(19, "No such device")
        return capable[0]

    dumps: list[int] = []

    def count() -> dict[str, int]:
        dumps.append(1)
        return {"not_in_hw": 4}

    sampler = offload_sampler.OffloadSampler(count, capable=can)
    assert sampler.due(time.monotonic())  # before the first dump, whatever the devices say
    sampler.sample()
    now = time.monotonic()
    assert not sampler.due(now) and not sampler.due(now + offload_sampler.OFFLOAD_IDLE_EVERY - 1)
    assert sampler.due(now + offload_sampler.OFFLOAD_IDLE_EVERY + 1)
    capable[0] = True
    assert sampler.due(now)
    capable[0] = None
    assert sampler.due(now)  # unknown: dumped as if a device could offload
    assert sampler.counts()["not_in_hw"] == 4 and dumps == [1]


def test_the_balancer_can_offload_only_with_hw_tc_offload_on_a_device_of_its_filters(
    monkeypatch: Any,
) -> None:
    from orchestrator.daemon import ethtool

    active = {"fab0": False, "lan0": True}
    asked: list[str] = []

    def feature(dev: str, name: str) -> ethtool.Feature | None:
        asked.append(dev)
        assert name == "hw-tc-offload"
        return ethtool.Feature(True, active[dev]) if dev in active else None

    monkeypatch.setattr(ethtool, "feature", feature)
    d = balancer_daemon(config(), FakeProvider(["lan0", "fab0"]))
    assert not d.can_offload()  # fab0 off; lan0 carries no filter of the example's
    assert "lan0" not in asked and "fab0" in asked
    active["fab0"] = True
    assert d.can_offload()


def test_a_full_sweeps_dump_is_read_on_the_loop_a_slice_at_a_time_first_packets_between() -> None:
    """The dump of 1,000 live flows is read 100 a step on the loop's thread; another task of the
    loop (what first packets are) runs between every two steps, also while the dump waits for
    the kernel ("wait"); the dump is closed, every flow read reaches the resync (none ends)."""
    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    flows = [FlowKey(6, f"198.51.100.{i % 250 + 1}", "192.0.2.10", 10_000 + i, 80) for i in range(1000)]
    d.conntrack = listener = Recording()
    listener.live = frozenset(flows)
    listener.waits = True
    order: list[str] = []
    listener.trace = order

    async def other_work(stop: asyncio.Event) -> None:
        while not stop.is_set():
            order.append("other")
            await asyncio.sleep(0)

    async def scenario() -> None:
        stop = asyncio.Event()
        other = asyncio.create_task(other_work(stop))
        await asyncio.sleep(0)
        d.sweep()
        assert d.sweeping is not None
        await d.sweeping
        stop.set()
        await other

    asyncio.run(scenario())
    dump = listener.dumps[0]
    assert dump.closed and dump.steps == 20  # 10 of 100 flows, 10 waits
    assert dump.live == frozenset(flows)
    steps = [i for i, what in enumerate(order) if what == "dump"]
    assert len(steps) == 20
    assert all(order[i + 1] == "other" for i in steps[:-1])  # never two slices in a row
    assert d.core.counters["conntrack_sweeps"] == 1 and d.core.counters["conntrack_errors"] == 0
    listener.close()


def test_a_full_sweep_whose_dump_fails_is_counted_and_retried_soon() -> None:
    """The kernel ends the dump with an error midway: one logged line, a count, the dump's socket
    closed, and a full sweep again after RETRY_SWEEP; nothing ends from a partial dump."""
    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    d.conntrack = listener = Recording()
    listener.live = frozenset(FlowKey(6, "198.51.100.1", "192.0.2.10", 10_000 + i, 80) for i in range(300))

    listener.fail_at = 2

    async def scenario() -> None:
        d.sweep()
        assert d.sweeping is not None
        await d.sweeping

    asyncio.run(scenario())
    assert listener.dumps[0].closed
    assert d.core.counters["conntrack_errors"] == 1 and d.core.counters["conntrack_sweeps"] == 0
    assert d.next_sweep - time.monotonic() <= loop.RETRY_SWEEP and d.full_sweep_due()
    listener.close()


def test_conntrack_events_are_enabled_by_the_sysctl_above_zero(tmp_path: Any) -> None:
    sysctl = tmp_path / "nf_conntrack_events"
    for value, enabled in (("2\n", True), ("1\n", True), ("0\n", False), ("", False), ("x", False)):
        sysctl.write_text(value)
        assert conntrack.events_enabled(str(sysctl)) is enabled, value
    assert conntrack.events_enabled(str(tmp_path / "missing")) is False
