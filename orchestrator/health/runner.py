"""Run the configured health checks on the daemon's asyncio loop and report every result.

One task per (pool, server) of a pool with a `health_check`, each checking every `interval`
(drift-free; a check that overran skips the missed turns rather than bursting). Start times are
spread evenly over the first interval so a large pool is not checked in one burst. The runner
knows nothing of states: it hands each result and the time to `on_result`, which feeds the pure
HealthTable and logs the events it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from orchestrator.config.model import BalancerConfig, HealthCheck
from orchestrator.core.health import CheckResult, Target
from orchestrator.health.checks import run_check

__all__ = ["Probe", "HealthRunner", "probes_of", "targets_of"]

log = logging.getLogger("mplsorch")

OnResult = Callable[[str, str, CheckResult, float], None]
Checker = Callable[[HealthCheck, str], Awaitable[CheckResult]]


@dataclass(frozen=True)
class Probe:
    """What to check: a server of a pool, at its address, as the pool's health_check says."""

    pool: str
    server: str
    address: str
    check: HealthCheck


def probes_of(config: BalancerConfig) -> list[Probe]:
    return [
        Probe(pool.name, s.name, str(s.address), pool.health_check)
        for pool in config.pools
        if pool.health_check is not None
        for s in pool.servers
    ]


def targets_of(config: BalancerConfig) -> list[Target]:
    """The HealthTable's targets for this configuration (pools without a check have none)."""
    return [Target(p.pool, p.server, p.check.rise, p.check.fall) for p in probes_of(config)]


class HealthRunner:
    def __init__(
        self, on_result: OnResult, checker: Checker = run_check, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.on_result, self.checker, self.clock = on_result, checker, clock
        self._tasks: dict[tuple[str, str], tuple[Probe, asyncio.Task[None]]] = {}

    def configure(self, probes: Iterable[Probe]) -> None:
        """Start, restart (changed check or address) or stop tasks; call on the running loop."""
        wanted = {(p.pool, p.server): p for p in probes}
        for key in list(self._tasks):
            probe, task = self._tasks[key]
            if wanted.get(key) != probe:
                task.cancel()
                del self._tasks[key]
        new = [p for key, p in wanted.items() if key not in self._tasks]
        for i, probe in enumerate(new):
            delay = probe.check.interval * i / len(new)
            task = asyncio.get_running_loop().create_task(
                self._loop(probe, delay), name=f"health {probe.pool}/{probe.server}"
            )
            self._tasks[(probe.pool, probe.server)] = (probe, task)

    @property
    def probes(self) -> list[Probe]:
        return [probe for probe, _ in self._tasks.values()]

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, probe: Probe, delay: float) -> None:
        await asyncio.sleep(delay)
        interval = probe.check.interval
        due = self.clock()
        while True:
            try:
                result = await self.checker(probe.check, probe.address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a checker bug must not end the server's checks
                log.exception("health check of %s/%s failed", probe.pool, probe.server)
                result = CheckResult(False, None, f"check error: {exc}")
            try:
                self.on_result(probe.pool, probe.server, result, self.clock())
            except Exception:
                log.exception("health result of %s/%s not taken", probe.pool, probe.server)
            now = self.clock()
            due += interval
            if due < now:  # overran: skip the missed turns
                due += interval * ((now - due) // interval + 1)
            await asyncio.sleep(due - now)
