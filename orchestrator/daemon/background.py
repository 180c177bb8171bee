"""The threads that take the daemon's background dumps (the conntrack sweeps' expiry pass, the
offload sampler), at the lowest CPU priority (issue 15: a new session's connect p99).

Only work that is almost all system calls belongs here: a thread at idle priority that holds the
GIL (decoding) and is preempted by normal-priority work keeps the loop waiting for the GIL until
it gets the CPU back (docs/design.md, conntrack); so a full sweep's dump, which decodes every
flow, is read on the loop in slices instead (capture.conntrack.FlowDump).

In the lab's VM one CPU serves the daemon's loop, the kernel's forwarding and the clients; a dump
thread at the loop's priority took that CPU for a whole system call or a slice of decoding, and
every stall of the loop logged over the latency runs had the conntrack sweep's dump under way. A
thread of this executor puts itself under SCHED_IDLE (Linux: the scheduler runs it only when
nothing else wants the CPU; nice 19 where that is refused), so the loop, the kernel's packet
processing and everything else go first. The default executor's threads are never lowered: they
serve whatever asks (`asyncio.to_thread`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from typing import Callable, TypeVar

log = logging.getLogger("mplsorch")
T = TypeVar("T")
WORKERS = 2  # the expiry pass and the offload sampler each have one: neither waits for the other
NAME = "mplsorch-background"


def lower_priority() -> str:
    """Put the calling thread (Linux: pid 0 is the calling thread) at the lowest CPU priority;
    returns what it got: "idle" (SCHED_IDLE), "nice 19", or "unchanged"."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return "nice 19"
    except (AttributeError, OSError) as exc:
        log.warning("background dumps: their thread's priority could not be lowered: %s", exc)
        return "unchanged"


def priority() -> str:
    """The calling thread's CPU priority, as `lower_priority` names it."""
    if os.sched_getscheduler(0) == os.SCHED_IDLE:
        return "idle"
    nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    return f"nice {nice}" if nice else "unchanged"


class Background:
    """The daemon's background executor: `await run(fn)` calls `fn` in one of its threads."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, NAME, initializer=lower_priority)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        """No new work; a dump under way finishes in its thread."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
