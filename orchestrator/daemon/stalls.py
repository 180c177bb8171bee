"""Where the daemon's loop goes when a first packet waits (issue 15: a new session's connect
p99 of about 0.45 s with 10,000 sessions in the table, not explained by the p50 of 3.7 ms).

Two cheap witnesses, always on:

- the loop's own steps (a batch of first packets, the tick, a conntrack read or sweep, a control
  request, a reload) are timed; one that took STALL_S or more is a stall *of that step*;
- a sampler wakes every SAMPLE_S and notes how late it ran: a lateness of STALL_S or more with
  no long step in it is time the loop did not get: the GIL held by a thread (a dump's decoding),
  a garbage collection (timed through `gc.callbacks`), or the host (a loaded machine).

Each stall is one log line at info (at most LINES_PER_S a second, the rest counted) naming what
ran in its window: the steps and collections that took STEP_S or more, and the background work
(`busy`: the dumps under way). `counts()` gives the stalls per cause since the start, `spent()`
every step's runs and time (`status --json`'s `loop_steps`: where a first packet's time goes)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import time
from typing import Any, Callable, Iterator

from orchestrator.daemon.logs import Throttle, fields

log = logging.getLogger("mplsorch")
STALL_S = 0.05  # a step this long, or a loop this late, is a stall
STEP_S = 0.005  # steps and collections kept as witnesses of a stall's window
SAMPLE_S = 0.05  # the lateness sampler's period
KEEP = 256  # witnesses kept (the newest)
LINES_PER_S = 5


class LoopStalls:
    def __init__(self, busy: Callable[[], list[str]] = lambda: [], clock: Callable[[], float] = time.monotonic) -> None:
        """`busy`: the background work under way now (names), asked when a stall is logged."""
        self.busy = busy
        self.clock = clock
        self.witnesses: collections.deque[tuple[float, float, str]] = collections.deque(
            maxlen=KEEP
        )  # (end, took, what)
        self.stalls: collections.Counter[str] = collections.Counter()  # cause -> stalls
        self.worst: dict[str, float] = {}  # cause -> longest stall (seconds)
        self.lines = Throttle(LINES_PER_S)
        self.runs: dict[str, list[float]] = {}  # step -> [runs, seconds], every run however short
        self._gc_began: float | None = None
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[float]:
        """Time one step of the loop; it is given the clock's reading where it began (a first-packet
        batch's `now`: one reading fewer before its verdicts)."""
        began = self.clock()
        try:
            yield began
        finally:
            ended = self.clock()
            self.ran(what, began, ended)

    def laps(self, began: float) -> Laps:
        """Consecutive steps from `began` (a reading of this witness's clock), each ended by
        `Laps.lap`: one clock reading per step where `step` takes two (a first-packet batch's
        parts; issue 15: in the lab's UML guest a clock reading is a system call of about 16 us)."""
        return Laps(self, began)

    def ran(self, what: str, began: float, ended: float) -> None:
        took = ended - began
        runs = self.runs.get(what)
        if runs is None:
            self.runs[what] = [1, took]
        else:
            runs[0] += 1
            runs[1] += took
        if took >= STEP_S:
            self.witnesses.append((ended, took, what))
        if took >= STALL_S:
            self.stalled(what, took, ended)

    def late(self, by: float, now: float) -> None:
        """The sampler ran `by` seconds late: a stall unless a long step explains it (that step
        was counted as its own stall already)."""
        if by < STALL_S:
            return
        window = self.window(now - by - SAMPLE_S, now)
        if any(took >= STALL_S and not what.startswith("gc") for _, took, what in window):
            return
        collected = sum(took for _, took, what in window if what.startswith("gc"))
        cause = "gc" if collected >= by / 2 else "loop late"
        self.stalled(cause, by, now, window)

    def window(self, start: float, end: float) -> list[tuple[float, float, str]]:
        return [w for w in self.witnesses if w[0] >= start and w[0] - w[1] <= end]

    def stalled(
        self, cause: str, took: float, now: float, window: list[tuple[float, float, str]] | None = None
    ) -> None:
        self.stalls[cause] += 1
        self.worst[cause] = max(self.worst.get(cause, 0.0), took)
        allowed, suppressed = self.lines.allow("stall", now)
        if not allowed:
            return
        seen = window if window is not None else self.window(now - took, now)
        steps = ", ".join(f"{what} {took * 1000:.0f} ms" for _, took, what in seen if what != cause) or "none"
        busy = ", ".join(self.busy()) or "none"
        more = f" ({suppressed} more stalls not logged)" if suppressed else ""
        log.info(
            "loop stall: %s %.0f ms; steps and collections in it: %s; background: %s%s",
            cause,
            took * 1000,
            steps,
            busy,
            more,
            extra=fields(event="loop_stall", cause=cause, ms=round(took * 1000, 1), busy=busy),
        )

    def counts(self) -> dict[str, Any]:
        """Stalls per cause since the start, and the worst of each (ms)."""
        return {
            cause: {"stalls": n, "worst_ms": round(self.worst[cause] * 1000, 1)} for cause, n in self.stalls.items()
        }

    def noted(self, what: str, took: float) -> None:
        """Background work's time, counted beside the steps (`spent`) but never a stall of the
        loop's own: the kernel's expiry pass, whose system call freezes a one-CPU guest while it
        walks the conntrack table (the loop's lateness, if any, is the sampler's to see)."""
        runs = self.runs.setdefault(what, [0, 0.0])
        runs[0] += 1
        runs[1] += took

    def spent(self) -> dict[str, dict[str, float]]:
        """Each step's runs and their summed time since the start (seconds, to the microsecond)."""
        return {what: {"runs": int(n), "seconds": round(t, 6)} for what, (n, t) in self.runs.items()}

    # -- the garbage collector's pauses -----------------------------------------------------------
    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_began = self.clock()
        elif self._gc_began is not None:
            began, self._gc_began = self._gc_began, None
            ended = self.clock()
            if ended - began >= STEP_S:
                self.witnesses.append((ended, ended - began, f"gc gen {info.get('generation')}"))

    # -- the sampler ----------------------------------------------------------------------------------
    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop stalls")

    async def _run(self) -> None:
        while True:
            due = self.clock() + SAMPLE_S
            await asyncio.sleep(SAMPLE_S)
            now = self.clock()
            self.late(now - due, now)

    async def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Laps:
    """Steps that follow one another: each ends where the next begins (`LoopStalls.laps`). A
    step cut short by an exception is not counted (the enclosing `step` is)."""

    def __init__(self, stalls: LoopStalls, began: float) -> None:
        self.stalls = stalls
        self.last = began  # the clock when the latest step ended

    def lap(self, what: str) -> float:
        """End step `what` now; its duration in seconds."""
        ended = self.stalls.clock()
        began, self.last = self.last, ended
        self.stalls.ran(what, began, ended)
        return ended - began
