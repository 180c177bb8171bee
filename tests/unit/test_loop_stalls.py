"""The loop's stall witness (daemon.stalls): a long step is a stall of that step, a late loop
with no long step in it is the GC's when collections fill it and the loop's lateness otherwise;
each is one log line naming what ran and the background work; lines are capped a second."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import tempfile

import pytest

from orchestrator.daemon import loop, stalls
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.stalls import LoopStalls
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import balancer_daemon, config


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_long_step_is_a_stall_of_that_step_logged_with_what_ran_in_it(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = LoopStalls(lambda: ["conntrack dump"], clock)
    with caplog.at_level(logging.INFO, logger="mplsorch"):
        with s.step("tick"):
            with s.step("tick: persistence ends"):
                clock.t += 0.2
            with s.step("tick: metrics"):
                clock.t += 0.001  # too short to name
        with s.step("first-packet batch"):
            clock.t += 0.01  # no stall
    assert s.counts() == {
        "tick": {"stalls": 1, "worst_ms": 201.0},
        "tick: persistence ends": {"stalls": 1, "worst_ms": 200.0},
    }
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1] == (
        "loop stall: tick 201 ms; steps and collections in it: tick: persistence ends 200 ms; "
        "background: conntrack dump"
    )


def test_lateness_without_a_long_step_is_the_loops_or_the_gcs(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = LoopStalls(clock=clock)
    with caplog.at_level(logging.INFO, logger="mplsorch"):
        s.late(0.02, clock.t)  # under the threshold: nothing
        assert s.counts() == {}
        clock.t += 1
        s.late(0.3, clock.t)  # nothing ran: the loop did not get the CPU (or the GIL)
        clock.t += 1
        s._on_gc("start", {"generation": 2})
        clock.t += 0.25
        s._on_gc("stop", {"generation": 2})
        clock.t += 0.01
        s.late(0.3, clock.t)
        clock.t += 1
        with s.step("first-packet batch"):
            clock.t += 0.4
        s.late(0.4, clock.t)  # explained by the step, counted once as the step's
    assert s.counts() == {
        "loop late": {"stalls": 1, "worst_ms": 300.0},
        "gc": {"stalls": 1, "worst_ms": 300.0},
        "first-packet batch": {"stalls": 1, "worst_ms": 400.0},
    }
    messages = [r.getMessage() for r in caplog.records]
    assert "loop stall: gc 300 ms; steps and collections in it: gc gen 2 250 ms; background: none" in messages


def test_stall_lines_are_capped_each_second_and_all_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = LoopStalls(clock=clock)
    with caplog.at_level(logging.INFO, logger="mplsorch"):
        for _ in range(stalls.LINES_PER_S + 3):
            with s.step("tick"):
                clock.t += 0.06
        clock.t = float(int(clock.t) + 1)
        with s.step("tick"):
            clock.t += 0.06
    assert s.counts()["tick"]["stalls"] == stalls.LINES_PER_S + 4
    lines = [r.getMessage() for r in caplog.records if "loop stall" in r.getMessage()]
    assert len(lines) < stalls.LINES_PER_S + 4 and lines[-1].endswith("more stalls not logged)")


def test_the_sampler_hooks_the_collector_and_unhooks_it_at_stop() -> None:
    async def run() -> None:
        s = LoopStalls()
        s.start()
        assert s._on_gc in gc.callbacks
        await asyncio.sleep(0.12)
        await s.stop()
        assert s._on_gc not in gc.callbacks and s._task is None

    asyncio.run(run())


def test_a_running_daemon_takes_the_gil_back_sooner_and_witnesses_its_stalls() -> None:
    """While the loop runs, a thread holding the GIL keeps it at most loop.SWITCH_INTERVAL from
    the loop's thread (Python's default 5 ms is restored at the stop), and the stall witness
    hooks the collector; both end with the loop."""

    class Quiet(BalancerDaemon):
        def setup(self) -> None:
            self.queue = self.capture.queue(0, 0)
            self.conntrack = self.capture.conntrack()

    d = balancer_daemon(config(), FakeProvider(["fab0"]), daemon_class=Quiet)
    with tempfile.TemporaryDirectory() as tmp:
        d.control_socket = os.path.join(tmp, "control.sock")
        seen: list[tuple[float, bool]] = []

        async def scenario() -> int:
            task = asyncio.create_task(d.run())
            await asyncio.sleep(0.3)
            seen.append((sys.getswitchinterval(), d.stalls._on_gc in gc.callbacks))
            d.flag("stop")
            return await task

        before = sys.getswitchinterval()
        assert asyncio.run(scenario()) == 0
    assert seen == [(pytest.approx(loop.SWITCH_INTERVAL), True)]
    assert sys.getswitchinterval() == before and d.stalls._on_gc not in gc.callbacks


def test_every_step_is_summed_however_short_and_status_says_so() -> None:
    """`status --json`'s `loop_steps` (every run of every step, where a first packet's time
    goes) and `loop_stalls` (the stalls by cause, counted past the log's cap)."""
    clock = Clock()
    s = LoopStalls(clock=clock)
    for took in (0.001, 0.002, 0.06):
        with s.step("first-packet batch"):
            with s.step("batch: rtnetlink"):
                clock.t += took
    assert s.spent() == {
        "batch: rtnetlink": {"runs": 3, "seconds": pytest.approx(0.063)},
        "first-packet batch": {"runs": 3, "seconds": pytest.approx(0.063)},
    }
    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    d.stalls = s
    status = d.status(clock.t)
    assert status["loop_steps"] == s.spent()
    assert status["loop_stalls"] == {"batch: rtnetlink": 1, "first-packet batch": 1}
