"""The balancer's offload counts, taken off the loop (issue 15: `status` under 1 s at any size).

The kernel tells an object's offload state only in a dump of it, and a dump of 500,000 sessions'
filters and routes takes minutes of decoding: on the request path it made `status` take 35 s at
60,000 sessions. So a background task dumps on a provider of its own (`Provider.twin`, sockets
of its own) in a worker thread (daemon.background: the lowest CPU priority), and `status` and the metrics report the latest counts with their
age. The next dump waits OFFLOAD_DUMP_EVERY seconds, or SPACING times as long as the last took,
whichever is longer: dumping never takes more than about a tenth of the process's time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from orchestrator.daemon.background import Background
from orchestrator.dataplane import ops

log = logging.getLogger("mplsorch")
OFFLOAD_DUMP_EVERY = 10.0  # seconds between dumps at least
SPACING = 10.0  # ... and at least this many times the last dump's duration
# While no device our filters are on can take a filter into hardware (`capable`: hw-tc-offload
# off on each), none is there and none gets there: the dump, which at 10,000 sessions took the
# lab VM's one CPU for most of a second, is taken this seldom; as soon as one can, every
# OFFLOAD_DUMP_EVERY again. The counts stay the kernel's, their age says how old.
OFFLOAD_IDLE_EVERY = 300.0


class OffloadSampler:
    def __init__(
        self,
        count: Callable[[], dict[str, int]],
        close: Callable[[], None] = lambda: None,
        background: Background | None = None,
        capable: Callable[[], bool] = lambda: True,
    ) -> None:
        """`count`: our objects' offload counts as a dump of the kernel reports them
        (offload.counts; callable from another thread; Provider.offload_counts counts as it
        decodes, no list of every object); `close`: releases what `count` uses, called once no
        dump runs any more; `background`: the executor whose threads take the dumps (the
        daemon's, at the lowest CPU priority; without one, asyncio's default executor);
        `capable`: whether a device of our filters can offload one now (OFFLOAD_IDLE_EVERY)."""
        self._capable = capable
        self._count = count
        self._close = close
        self._background = background
        # One tuple, replaced whole: the loop's thread reads it while the worker thread writes it.
        self._latest: tuple[dict[str, int], float | None] = (dict.fromkeys(ops.OFFLOAD_STATES, 0), None)
        self.took: float = 0.0  # seconds the last dump took
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # held by a dump, and by `close` (after the last dump)

    def sample(self) -> None:
        """One dump now, in the calling thread."""
        with self._lock:
            began = time.monotonic()
            counts = self._count()
            self.took = time.monotonic() - began
            self._latest = (counts, began)

    @property
    def busy(self) -> bool:
        """A dump is under way."""
        return self._lock.locked()

    def counts(self) -> dict[str, int]:
        """Our filters and routes by offload state, as the latest dump found them (every state
        present; all 0 before the first dump)."""
        return dict(self._latest[0])

    def age(self, now: float) -> float | None:
        """Seconds since the latest dump began (monotonic `now`); None before the first."""
        taken = self._latest[1]
        return None if taken is None else round(max(0.0, now - taken), 1)

    def wait(self) -> float:
        return max(OFFLOAD_DUMP_EVERY, SPACING * self.took)

    def due(self, now: float) -> bool:
        """Whether the next dump is due (monotonic `now`), asked every OFFLOAD_DUMP_EVERY or
        more (`wait`): always while a device can offload, else OFFLOAD_IDLE_EVERY after the last."""
        taken = self._latest[1]
        if taken is None or now - taken >= OFFLOAD_IDLE_EVERY:
            return True
        try:
            return self._capable()
        except Exception as exc:  # unknown: dump as if one could
            log.debug("offload counts: whether a device can offload is unknown: %s", exc)
            return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="offload sampler")

    async def _run(self) -> None:
        while True:
            if not self.due(time.monotonic()):
                await asyncio.sleep(self.wait())
                continue
            try:
                if self._background is not None:
                    await self._background.run(self.sample)
                else:
                    await asyncio.to_thread(self.sample)
            except Exception as exc:  # a failed dump keeps the previous counts (and their age)
                self.failures += 1
                log.error("offload counts: the dump failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.wait())

    async def stop(self) -> None:
        """Stop sampling; a dump under way finishes in its thread before `close`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self._close_after_dumps)

    def _close_after_dumps(self) -> None:
        with self._lock:
            self._close()
