"""Conntrack events are read on the loop's tick, never when their socket turns readable (issue 15:
the new-flow event of an existing session's connect woke the daemon in the middle of that
connect, docs/design.md "The kernel fast path"), and always before the tick ends sessions: a
session whose persistence timeout passed while a new flow of it waited unread in the socket
serves on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import tempfile
import time

from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.core.events import FlowKey, FlowsEnded, FlowsStarted, FlowTableResync
from orchestrator.core.sessions import State
from orchestrator.daemon import loop
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import BALANCER_EXAMPLE, ScriptedConntrack, ScriptedQueue, config, scripted_capture, syn


class Quiet(BalancerDaemon):
    """The real loop over scripted sockets, without the node's setup."""

    def setup(self) -> None:
        self.queue = self.capture.queue(0, 0)
        self.conntrack = self.capture.conntrack()


class AlwaysReadable(ScriptedConntrack):
    """A socket that stays readable (a byte in its pipe nobody takes) and counts its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def fileno(self) -> int:
        fd = super().fileno()
        assert self._fds is not None
        os.write(self._fds[1], b"x")
        return fd

    def read(self) -> list[FlowsStarted | FlowsEnded | FlowTableResync]:
        self.reads += 1
        return []


def run_for(daemon: BalancerDaemon, seconds: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        daemon.control_socket = os.path.join(tmp, "control.sock")

        async def scenario() -> int:
            task = asyncio.create_task(daemon.run())
            await asyncio.sleep(seconds)
            daemon.flag("stop")
            return await task

        return asyncio.run(scenario())


def kernel() -> FakeProvider:
    fake = FakeProvider(["lan0", "fab0"])
    fake.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    fake.add_ip_route("10.0.0.0/16", "lan0")
    return fake


def test_a_readable_conntrack_socket_does_not_wake_the_loop_it_is_read_once_a_tick() -> None:
    flows = AlwaysReadable()
    queue = ScriptedQueue()
    daemon = Quiet(str(BALANCER_EXAMPLE), kernel(), scripted_capture(queue, flows), config())
    assert run_for(daemon, 3 * loop.TICK) == 0
    # Woken by readability, the loop would have read it thousands of times; a tick reads it once
    # (the sweep at the start reads it once more).
    assert 1 <= flows.reads <= 3 + 2


def test_a_session_due_to_end_serves_on_when_its_new_flow_waits_unread_at_the_tick() -> None:
    flows = ScriptedConntrack()
    queue = ScriptedQueue()
    daemon = Quiet(str(BALANCER_EXAMPLE), kernel(), scripted_capture(queue, flows), config())
    daemon.queue = queue
    queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))
    daemon.on_packets()
    [session] = daemon.core.table
    # Its first flow ended a persistence timeout (30 s) and more ago: the next tick would end it...
    daemon.core.on_flow_events([FlowsEnded(tuple(session.flows))], time.monotonic() - 31)
    assert session.state == State.DRAINING
    # ... but a new flow of it, admitted by the kernel's fast path, waits in the socket.
    later = FlowKey(6, "10.0.1.10", "10.0.0.100", 40001, 80)
    flows.events.append(FlowsStarted((later,)))
    assert run_for(daemon, 2 * loop.TICK) == 0
    assert [s.state for s in daemon.core.table] == [State.SERVING]
    assert daemon.core.counters["flows_fast_path"] == 1
    assert daemon.core.counters.get("sessions_ended", 0) == 0


def test_a_first_packet_that_comes_during_a_tick_goes_before_the_tick_s_next_part() -> None:
    """The tick's parts take turns with the queue (`serve_waiting`): a packet that came while the
    liveness checks ran is verdicted before the embryonic checks' round trips, not after the
    whole tick; and the queue is not read when nothing waits in it."""
    queue = ScriptedQueue()
    daemon = Quiet(str(BALANCER_EXAMPLE), kernel(), scripted_capture(queue), config())
    daemon.queue = queue
    readable_r, readable_w = os.pipe()
    os.set_blocking(readable_r, False)
    daemon.waiting = select.poll()
    daemon.waiting.register(readable_r, select.POLLIN)
    order: list[str] = []
    checked = daemon.check_liveness

    def liveness_while_a_packet_comes() -> None:
        checked()
        queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))
        os.write(readable_w, b"x")  # the queue's socket turns readable

    def embryonic() -> None:
        order.append(f"embryonic after {len(queue.sent)} verdicts")
        with contextlib.suppress(BlockingIOError):
            os.read(readable_r, 1)  # read: nothing waits any more

    daemon.check_liveness = liveness_while_a_packet_comes  # type: ignore[method-assign]
    daemon.end_embryonic = embryonic  # type: ignore[method-assign]
    try:
        daemon.tick()
        assert order == ["embryonic after 1 verdicts"]
        assert [v.packet_id for v in queue.sent] == [1]
        queue.script(QueuedPacket(0, 2, syn("10.0.1.11"), 2, None, 0))  # scripted, not readable
        daemon.check_liveness = checked  # type: ignore[method-assign]
        daemon.tick()
        assert order == ["embryonic after 1 verdicts"] * 2 and queue.batches, "no read without a packet"
    finally:
        os.close(readable_r)
        os.close(readable_w)
