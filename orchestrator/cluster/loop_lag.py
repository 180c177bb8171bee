"""How late the daemon's asyncio loop runs: a timer every TICK seconds notes how much later than
asked it fired. A busy loop (a flood of first packets, a large watch response being installed)
delays every callback, the expiry of an etcd call's deadline included: the store uses this to
tell a loop that was late from an etcd that did not answer (docs/scale.md, lab bench cluster)."""

from __future__ import annotations

import asyncio
import collections
import contextlib

__all__ = ["LoopLag"]

TICK = 0.05  # seconds between samples
KEEP = 400  # samples kept: 20 s at TICK


class LoopLag:
    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=KEEP)  # (ran at, late by)
        self.due: float | None = None  # when the pending tick should run
        self.task: asyncio.Task[None] | None = None
        self.worst = 0.0  # the worst lag seen since start

    def start(self) -> None:
        """The sampler, on the running loop (again after `stop`)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
            self.due = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.due = loop.time() + self.tick
            await asyncio.sleep(self.tick)
            now = loop.time()
            late = max(0.0, now - self.due)
            self.samples.append((now, late))
            self.worst = max(self.worst, late)

    def since(self, start: float) -> float:
        """The loop's worst lateness (seconds) from `start` (loop.time()) until now: of the ticks
        that ran since, and of the one overdue now."""
        now = asyncio.get_running_loop().time()
        worst = max((late for at, late in self.samples if at >= start), default=0.0)
        if self.due is not None and now > self.due:
            worst = max(worst, now - self.due)
        return worst
