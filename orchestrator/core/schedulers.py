"""Schedulers: pick a server for a new session.

Pure and deterministic: no clock, no randomness, and hashing by BLAKE2b (never Python's salted
``hash()``), so two instances fed the same calls make the same picks, across restarts too.

The caller owns server state: ``ServerState.available`` is False when a server is down,
draining, of weight 0 or at its max_sessions. Every scheduler returns None when no server given
is available. ``make_scheduler(name, **options)`` builds one by its configuration name.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ServerState",
    "Scheduler",
    "RoundRobin",
    "WeightedRoundRobin",
    "LeastConnections",
    "WeightedLeastConnections",
    "ResponseTime",
    "Maglev",
    "SourceHash",
    "make_scheduler",
    "register_scheduler",
    "scheduler_names",
    "key_hash",
    "smallest_prime_at_least",
]


@dataclass(frozen=True)
class ServerState:
    name: str
    weight: int = 1
    sessions: int = 0
    response_time: float | None = None  # seconds; None until measured
    available: bool = True


@runtime_checkable
class Scheduler(Protocol):
    name: str

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        """The server for a new session with this client key, or None if none is available."""
        ...

    def rebuild(self, servers: Sequence[ServerState]) -> float | None:
        """Take a new server set (membership or weights). Stateful schedulers (maglev) return the
        share 0..1 of the key space that now maps to another server; the others return None."""
        ...


def key_hash(data: str | bytes, person: bytes = b"mplsorch-key") -> int:
    """Stable 64-bit hash (BLAKE2b, personalised per use)."""
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "big")


def _key_hash2(key: str) -> tuple[int, int]:
    d = hashlib.blake2b(key.encode(), digest_size=16, person=b"mplsorch-key").digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def smallest_prime_at_least(n: int) -> int:
    while not _is_prime(n):
        n += 1
    return n


class _Stateless:
    def rebuild(self, servers: Sequence[ServerState]) -> float | None:
        return None


class RoundRobin(_Stateless):
    """Exact rotation over the available servers in the given order. The position is remembered
    by the name last picked, so servers becoming unavailable (skipped) or being removed do not
    disturb the order of the rest."""

    name = "rr"

    def __init__(self) -> None:
        self._last_name: str | None = None
        self._last_index = -1

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        n = len(servers)
        if n == 0:
            return None
        start = 0
        if self._last_name is not None:
            for i, s in enumerate(servers):
                if s.name == self._last_name:
                    start = i + 1
                    break
            else:  # the last server was removed: the one now in its slot comes next
                start = self._last_index
        for j in range(n):
            i = (start + j) % n
            s = servers[i]
            if s.available:
                self._last_name, self._last_index = s.name, i
                return s.name
        return None


class WeightedRoundRobin(_Stateless):
    """Smooth weighted round robin, as nginx (ngx_http_upstream_get_peer): each pick adds every
    available server's weight to its current weight, picks the largest (ties: first in order)
    and subtracts the total weight from it. Over a cycle of sum(weights) picks each server is
    picked exactly weight times, interleaved (5:1:1 gives a a b a c a a)."""

    name = "wrr"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        cur = self._current
        best: ServerState | None = None
        best_cur = 0
        total = 0
        for s in servers:
            if not s.available or s.weight <= 0:
                continue
            c = cur.get(s.name, 0) + s.weight
            cur[s.name] = c
            total += s.weight
            if best is None or c > best_cur:
                best, best_cur = s, c
        if best is None:
            return None
        cur[best.name] = best_cur - total
        if len(cur) > 2 * len(servers) + 8:  # forget servers that left the configuration
            names = {s.name for s in servers}
            for n in [n for n in cur if n not in names]:
                del cur[n]
        return best.name


class LeastConnections(_Stateless):
    """Fewest sessions; ties by order."""

    name = "lc"

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        best: ServerState | None = None
        for s in servers:
            if s.available and (best is None or s.sessions < best.sessions):
                best = s
        return best.name if best else None


class WeightedLeastConnections(_Stateless):
    """Least sessions/weight (compared exactly, without division); weight <= 0 excluded;
    ties by order."""

    name = "wlc"

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        best: ServerState | None = None
        for s in servers:
            if not s.available or s.weight <= 0:
                continue
            if best is None or s.sessions * best.weight < best.sessions * s.weight:
                best = s
        return best.name if best else None


class ResponseTime(_Stateless):
    """Lowest measured response time. Servers not yet measured (response_time None) go first, so
    they get measured. Ties (and the order among unmeasured servers): fewest sessions, then order."""

    name = "response-time"

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        best: ServerState | None = None
        best_rank: tuple[float, ...] | None = None
        for s in servers:
            if not s.available:
                continue
            rt = s.response_time
            rank = (0, 0.0, s.sessions) if rt is None else (1, rt, s.sessions)
            if best_rank is None or rank < best_rank:
                best, best_rank = s, rank
        return best.name if best else None


class SourceHash(_Stateless):
    """hash(key) over the sorted names of the available servers; no table (so any change of the
    available set remaps most keys: use maglev where that matters)."""

    name = "source-hash"

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        names = sorted(s.name for s in servers if s.available)
        if not names:
            return None
        return names[key_hash(key) % len(names)]


class Maglev:
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.

    Table size M is the smallest prime >= max(101, 100 * N) where N is the largest of: the
    number of servers of weight > 0 ever given to this instance, and ``capacity``. M never
    shrinks, so removing a server moves only its own keys; pass ``capacity`` >= the largest server
    count you expect (e.g. the configured server list) to make M, and so every pick, identical
    across restarts whatever membership changes happened before.

    Each server's permutation comes from two hashes of its name (offset, skip). The table is
    populated in turns, servers in name order (input order does not matter); a server of weight
    w earns w credits per round and takes one turn per max-weight credits, so table shares are
    proportional to weights. Weight 0 servers are left out.

    pick(key) = table[h1(key) % M]; if that entry's server is unavailable, the key walks its own
    probe sequence (h1 + j * skip(h2)) % M to the first available entry. Keys of unavailable
    servers therefore spread over the others in proportion to their shares, and no other key
    moves. ``pick`` rebuilds on its own when the membership or weights differ from the table's;
    call ``rebuild`` to learn the moved share.
    """

    name = "maglev"

    def __init__(self, capacity: int = 0) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._capacity = capacity
        self._size = 0
        self._table: list[str] = []
        self._signature: tuple[tuple[str, int], ...] | None = None
        self._raw: tuple[tuple[str, int], ...] | None = None  # input-order signature last seen

    @property
    def size(self) -> int:
        return self._size

    @property
    def table(self) -> tuple[str, ...]:
        return tuple(self._table)

    @staticmethod
    def _signature_of(servers: Sequence[ServerState]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((s.name, s.weight) for s in servers if s.weight > 0))

    @staticmethod
    def _populate(sig: tuple[tuple[str, int], ...], m: int) -> list[str]:
        if not sig:
            return []
        names = [n for n, _ in sig]
        weights = [w for _, w in sig]
        wmax = max(weights)
        offsets = [key_hash(n, b"mplsorch-mgoff") % m for n in names]
        skips = [key_hash(n, b"mplsorch-mgskp") % (m - 1) + 1 for n in names]
        nxt = [0] * len(names)
        credit = [0] * len(names)
        entry: list[int] = [-1] * m
        filled = 0
        while True:
            for i in range(len(names)):
                credit[i] += weights[i]
                while credit[i] >= wmax:
                    credit[i] -= wmax
                    off, skip, j = offsets[i], skips[i], nxt[i]
                    c = (off + j * skip) % m
                    while entry[c] >= 0:
                        j += 1
                        c = (off + j * skip) % m
                    entry[c] = i
                    nxt[i] = j + 1
                    filled += 1
                    if filled == m:
                        return [names[k] for k in entry]

    def rebuild(self, servers: Sequence[ServerState]) -> float | None:
        """Rebuild the table for ``servers``; returns the share of the key space whose server
        changed (table entries that changed when M is unchanged), or None on the first build."""
        sig = self._signature_of(servers)
        self._raw = None
        size = max(self._size, smallest_prime_at_least(max(101, 100 * max(len(sig), self._capacity))))
        first_build = self._signature is None
        if sig == self._signature and size == self._size:
            return 0.0
        old, old_size = self._table, self._size
        self._table = self._populate(sig, size)
        self._size, self._signature = size, sig
        if first_build:
            return None
        if not old or not self._table:
            return 0.0 if old == self._table else 1.0
        if size == old_size:
            return sum(a != b for a, b in zip(old, self._table)) / size
        # Different prime sizes: (h % M1, h % M2) is uniform over pairs (CRT), so a key keeps its
        # server with probability sum over servers of share_old * share_new.
        co, cn = Counter(old), Counter(self._table)
        return 1.0 - sum(co[n] * cn[n] for n in co) / (old_size * size)

    def pick(self, key: str, servers: Sequence[ServerState]) -> str | None:
        raw = tuple((s.name, s.weight) for s in servers)
        if raw != self._raw:  # membership or weights changed since the table was built
            if self._signature_of(servers) != self._signature:
                self.rebuild(servers)
            self._raw = raw
        table, m = self._table, self._size
        if not table:
            return None
        up = {s.name for s in servers if s.available and s.weight > 0}
        if not up:
            return None
        h1, h2 = _key_hash2(key)
        c = h1 % m
        if table[c] in up:
            return table[c]
        skip = h2 % (m - 1) + 1
        for _ in range(m - 1):
            c = (c + skip) % m
            if table[c] in up:
                return table[c]
        return None  # pragma: no cover - unreachable: m is prime, so the walk visits every slot


_REGISTRY: dict[str, Callable[..., Scheduler]] = {
    "rr": RoundRobin,
    "wrr": WeightedRoundRobin,
    "lc": LeastConnections,
    "wlc": WeightedLeastConnections,
    "response-time": ResponseTime,
    "maglev": Maglev,
    "source-hash": SourceHash,
}


def register_scheduler(name: str, factory: Callable[..., Scheduler]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"scheduler {name!r} is already registered")
    _REGISTRY[name] = factory


def scheduler_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_scheduler(name: str, **options: Any) -> Scheduler:
    """A new scheduler by its configuration name; options go to its constructor
    (maglev: ``capacity``). ValueError for an unknown name."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(_REGISTRY)}") from None
    return factory(**options)
