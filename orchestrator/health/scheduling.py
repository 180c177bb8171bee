"""What the schedulers need from health checks, as plain data the daemon can hand to the pure core.

`core.schedulers.ServerState` has two fields that health decides: `available` (a DOWN server takes
no new session, whatever the scheduler) and `response_time` (seconds, None until measured: the
`response-time` scheduler picks the lowest and tries unmeasured servers first). `HealthView` is an
immutable snapshot of the health table; `apply_health` folds it into the states the core built, so
the core needs no knowledge of checks, sockets or clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from orchestrator.core.schedulers import ServerState
from orchestrator.health.state import HealthState, ServerHealth

__all__ = ["HealthView", "apply_health"]


@dataclass(frozen=True)
class HealthView:
    """(pool, server) -> (state, smoothed response time). Servers it does not name are UNKNOWN:
    available and unmeasured, exactly as without health checks."""

    entries: tuple[tuple[str, str, HealthState, float | None], ...] = ()
    _index: Mapping[tuple[str, str], tuple[HealthState, float | None]] = field(
        init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index = {(pool, server): (state, rt) for pool, server, state, rt in self.entries}
        object.__setattr__(self, "_index", MappingProxyType(index))

    @classmethod
    def of(cls, health: Iterable[ServerHealth]) -> HealthView:
        """From a HealthTable (iterate it) or any ServerHealth records."""
        return cls(tuple((h.pool, h.server, h.state, h.response_time) for h in health))

    def state(self, pool: str, server: str) -> HealthState:
        return self._index.get((pool, server), (HealthState.UNKNOWN, None))[0]

    def available(self, pool: str, server: str) -> bool:
        return self.state(pool, server).available

    def response_time(self, pool: str, server: str) -> float | None:
        """None while DOWN too: a DOWN server is never picked anyway, and when it returns it is
        judged by its new answers."""
        return self._index.get((pool, server), (HealthState.UNKNOWN, None))[1]

    def down(self, pool: str) -> frozenset[str]:
        """The servers of `pool` that are DOWN: their sessions follow `on_server_failure`."""
        return frozenset(s for (p, s), (state, _) in self._index.items()
                         if p == pool and state is HealthState.DOWN)


def apply_health(states: Sequence[ServerState], pool: str, view: HealthView) -> list[ServerState]:
    """The scheduler's input with health folded in: available only if the core said so and the
    server is not DOWN in `pool`; the measured response time wherever the core had none."""
    out = []
    for s in states:
        rt = s.response_time if s.response_time is not None else view.response_time(pool, s.name)
        out.append(replace(s, available=s.available and view.available(pool, s.name), response_time=rt))
    return out
