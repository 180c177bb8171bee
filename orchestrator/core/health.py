"""Server health as the decision core sees it: the rise/fall state machine per (pool, server) and
the snapshot the schedulers read. Pure (no I/O, no clock): the checkers of `orchestrator.health`
feed it results, so the core never depends on the package that owns sockets and timers.

The state machine is fed check results and the time, and returns an event only when a server's state changes,
so the daemon logs exactly the changes and the decision core learns them as input. A server that
was never checked is UNKNOWN and counts as available, as before health checks existed: a restart
or a reload does not refuse new sessions while the first checks run. From UNKNOWN the first
success confirms UP at once (nothing to wait for: it already serves), while `fall` consecutive
failures are needed for DOWN. From UP, `fall` consecutive failures make it DOWN; from DOWN,
`rise` consecutive successes make it UP again.

The response time a scheduler sees is an exponentially weighted moving average of successful
checks (one slow answer does not swing every new session away); it is forgotten when the server
goes DOWN, so a recovered server is judged by its new answers only.

`core.schedulers.ServerState` has two fields that health decides: `available` (a DOWN server
takes no new session, whatever the scheduler) and `response_time` (seconds, None until measured: the
`response-time` scheduler picks the lowest and tries unmeasured servers first). `HealthView` is an
immutable snapshot of the health table; `apply_health` folds it into the states the core built, so
the core needs no knowledge of checks, sockets or clocks.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, NamedTuple

from orchestrator.core.schedulers import ServerState

__all__ = [
    "CheckResult",
    "HealthEvent",
    "HealthMachine",
    "HealthState",
    "HealthTable",
    "HealthView",
    "ServerHealth",
    "Target",
    "DEFAULT_SMOOTHING",
    "apply_health",
]

DEFAULT_SMOOTHING = 0.3  # weight of the newest response time in the moving average


class HealthState(enum.StrEnum):
    UNKNOWN = "unknown"  # not checked yet, or its pool has no health check: available
    UP = "up"
    DOWN = "down"  # takes no new sessions; its sessions follow on_server_failure

    @property
    def available(self) -> bool:
        return self is not HealthState.DOWN


class CheckResult(NamedTuple):
    """One check's outcome: (ok, response_time_s, reason). response_time_s is None when the check
    failed before an answer (timeout, refused)."""

    ok: bool
    response_time: float | None
    reason: str


@dataclass(frozen=True)
class HealthEvent:
    """A server's health state changed (only changes are events)."""

    pool: str
    server: str
    old: HealthState
    new: HealthState
    reason: str  # the check result that decided it, e.g. "timeout after 1s"
    response_time: float | None  # of that check, seconds
    at: float  # the time given with the result (the daemon's monotonic clock)

    def describe(self) -> str:
        rt = f", {self.response_time * 1000:.1f} ms" if self.response_time is not None else ""
        return f"server {self.server} (pool {self.pool}) {self.old} -> {self.new}: {self.reason}{rt}"


@dataclass(frozen=True)
class ServerHealth:
    """A server's health as `mplsorch servers`, the metrics and the scheduler see it."""

    pool: str
    server: str
    state: HealthState = HealthState.UNKNOWN
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    response_time: float | None = None  # smoothed, seconds; None until measured or while down
    last_reason: str = ""
    last_check: float | None = None
    since: float | None = None  # when the current state began (None: never changed)

    @property
    def available(self) -> bool:
        return self.state.available

    def view(self) -> dict[str, object]:
        """JSON-ready (times still monotonic: the control socket converts them)."""
        return {
            "pool": self.pool,
            "server": self.server,
            "health": self.state.value,
            "response_time_s": None if self.response_time is None else round(self.response_time, 6),
            "successes": self.successes,
            "failures": self.failures,
            "reason": self.last_reason,
            "last_check": self.last_check,
            "since": self.since,
        }


class HealthMachine:
    """The rise/fall counter of one server in one pool."""

    def __init__(self, pool: str, server: str, rise: int, fall: int, smoothing: float = DEFAULT_SMOOTHING) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be within (0, 1]")
        self.rise, self.fall, self.smoothing = rise, fall, smoothing
        self._h = ServerHealth(pool, server)

    @property
    def health(self) -> ServerHealth:
        return self._h

    def retune(self, rise: int, fall: int) -> None:
        """New rise/fall (a reload) without forgetting the state or the counts so far."""
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise, self.fall = rise, fall

    def observe(self, result: CheckResult, now: float) -> HealthEvent | None:
        h = self._h
        if result.ok:
            successes, failures = h.successes + 1, 0
            rt = h.response_time
            if result.response_time is not None:
                rt = (
                    result.response_time
                    if rt is None
                    else self.smoothing * result.response_time + (1.0 - self.smoothing) * rt
                )
        else:
            successes, failures, rt = 0, h.failures + 1, h.response_time
        new = h.state
        if h.state is HealthState.UNKNOWN:
            if result.ok:
                new = HealthState.UP
            elif failures >= self.fall:
                new = HealthState.DOWN
        elif h.state is HealthState.UP and failures >= self.fall:
            new = HealthState.DOWN
        elif h.state is HealthState.DOWN and successes >= self.rise:
            new = HealthState.UP
        if new is HealthState.DOWN:
            rt = None
        self._h = replace(
            h,
            state=new,
            successes=successes,
            failures=failures,
            response_time=rt,
            last_reason=result.reason,
            last_check=now,
            since=now if new is not h.state else h.since,
        )
        if new is h.state:
            return None
        return HealthEvent(h.pool, h.server, h.state, new, result.reason, result.response_time, now)


@dataclass(frozen=True)
class Target:
    """One (pool, server) to check, with its pool's rise and fall."""

    pool: str
    server: str
    rise: int
    fall: int


@dataclass
class HealthTable:
    """Every checked (pool, server). `configure` follows the configuration (a reload keeps the
    state of servers that stay); servers without a machine are UNKNOWN, so available."""

    smoothing: float = DEFAULT_SMOOTHING
    _machines: dict[tuple[str, str], HealthMachine] = field(default_factory=dict)

    def configure(self, targets: Iterable[Target]) -> None:
        wanted = {(t.pool, t.server): t for t in targets}
        for key in [k for k in self._machines if k not in wanted]:
            del self._machines[key]
        for key, t in wanted.items():
            m = self._machines.get(key)
            if m is None:
                self._machines[key] = HealthMachine(t.pool, t.server, t.rise, t.fall, self.smoothing)
            else:
                m.retune(t.rise, t.fall)

    def observe(self, pool: str, server: str, result: CheckResult, now: float) -> HealthEvent | None:
        """Feed one result; a result for a (pool, server) no longer configured (a check that was
        running during a reload) is ignored."""
        m = self._machines.get((pool, server))
        return None if m is None else m.observe(result, now)

    def get(self, pool: str, server: str) -> ServerHealth:
        m = self._machines.get((pool, server))
        return m.health if m is not None else ServerHealth(pool, server)

    def __iter__(self) -> Iterator[ServerHealth]:
        return (m.health for m in self._machines.values())

    def __len__(self) -> int:
        return len(self._machines)


# -- what the schedulers read ------------------------------------------------------------
@dataclass(frozen=True)
class HealthView:
    """(pool, server) -> (state, smoothed response time). Servers it does not name are UNKNOWN:
    available and unmeasured, exactly as without health checks."""

    entries: tuple[tuple[str, str, HealthState, float | None], ...] = ()
    _index: Mapping[tuple[str, str], tuple[HealthState, float | None]] = field(
        init=False, repr=False, compare=False, hash=False
    )

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
        return frozenset(s for (p, s), (state, _) in self._index.items() if p == pool and state is HealthState.DOWN)


def apply_health(states: Sequence[ServerState], pool: str, view: HealthView) -> list[ServerState]:
    """The scheduler's input with health folded in: available only if the core said so and the
    server is not DOWN in `pool`; the measured response time wherever the core had none."""
    out = []
    for s in states:  # built directly: dataclasses.replace costs several times more (once per first packet)
        rt = s.response_time if s.response_time is not None else view.response_time(pool, s.name)
        out.append(ServerState(s.name, s.weight, s.sessions, rt, s.available and view.available(pool, s.name)))
    return out
