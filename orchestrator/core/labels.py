"""Session label pairs: C2S odd, S2C = C2S + 1, with hold-down before reuse.

Pure: no I/O, no clock (every call that depends on time takes ``now`` in seconds). All
operations are O(1) amortised (heap operations on hold-down expiry are O(log n)); memory grows
with the highest pair ever touched (12 bytes of arrays per pair below it, no object per pair),
not with the size of the range, so a range of 2**19 pairs costs nothing until it is used.

Hold-down boundary: a pair released at ``t`` is allocatable at every ``now >= t + hold_down``
and at no earlier ``now``.

Reuse order: never-used pairs lowest first, then released pairs in the order their
hold-down expired (so a pair is reused as late as possible).
"""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["MAX_LABEL", "FIRST_USABLE_C2S", "LabelAllocator", "LabelStats", "c2s_of", "s2c_of"]

MAX_LABEL = (1 << 20) - 1
"""The largest MPLS label value (20 bits)."""
FIRST_USABLE_C2S = 17
"""Labels 0-15 are reserved, so the lowest pair is (17, 18)."""


def s2c_of(c2s: int) -> int:
    """S2C label of a C2S label (ValueError if ``c2s`` is not a usable C2S label)."""
    if c2s % 2 != 1 or c2s < FIRST_USABLE_C2S or c2s + 1 > MAX_LABEL:
        raise ValueError(f"{c2s} is not a C2S label (odd, {FIRST_USABLE_C2S}..{MAX_LABEL - 1})")
    return c2s + 1


def c2s_of(s2c: int) -> int:
    """C2S label of an S2C label (ValueError if ``s2c`` is not a usable S2C label)."""
    if s2c % 2 != 0 or s2c - 1 < FIRST_USABLE_C2S or s2c > MAX_LABEL:
        raise ValueError(f"{s2c} is not an S2C label (even, {FIRST_USABLE_C2S + 1}..{MAX_LABEL})")
    return s2c - 1


@dataclass(frozen=True)
class LabelStats:
    """Counts of label pairs. ``blocks`` maps each server's block to its own stats (empty when
    one pool serves all servers). ``total == in_use + held_down + free``."""

    total: int
    in_use: int
    held_down: int
    free: int
    blocks: Mapping[str, LabelStats] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def exhausted(self) -> bool:
        return self.free == 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total": self.total,
            "in_use": self.in_use,
            "held_down": self.held_down,
            "free": self.free,
        }
        if self.blocks:
            out["blocks"] = {name: s.to_dict() for name, s in self.blocks.items()}
        return out


def _pair_bounds(lo: int, hi: int) -> tuple[int, int]:
    """First and last C2S of the pairs lying wholly inside labels [lo, hi] (first > last: none)."""
    first = max(lo, FIRST_USABLE_C2S)
    if first % 2 == 0:
        first += 1
    last = hi - 1
    if last % 2 == 0:
        last -= 1
    return first, last


class _Pairs:
    """c2s -> an int > 0, for odd labels (0 and absence are one): the few dict methods the
    allocator uses, over an array indexed by pair that grows (doubling, up to the range) to the
    highest pair touched. A dict entry and its int were about 60 bytes of every session (issue
    15: memory per session); a slot here is 8 bytes of the pairs below the highest one used."""

    __slots__ = ("_first", "_size", "_values")

    def __init__(self, first: int, last: int, typecode: str = "Q") -> None:
        self._first = first >> 1  # an odd c2s's pair index is c2s >> 1
        self._size = max(0, (last >> 1) - self._first + 1)  # the array never grows past it
        self._values = array(typecode)

    def get(self, c2s: int, default: int | None = None) -> int | None:
        i = (c2s >> 1) - self._first
        if c2s & 1 and 0 <= i < len(self._values):
            value = self._values[i]
            if value:
                return value
        return default

    def __contains__(self, c2s: int) -> bool:
        return self.get(c2s) is not None

    def __getitem__(self, c2s: int) -> int:
        value = self.get(c2s)
        if value is None:
            raise KeyError(c2s)
        return value

    def __setitem__(self, c2s: int, value: int) -> None:
        i = (c2s >> 1) - self._first
        if not c2s & 1 or not 0 <= i < self._size or value <= 0:
            raise ValueError(f"label {c2s} (value {value}) is no C2S label of this allocator")
        values = self._values
        if i >= len(values):
            grown = min(self._size, max(i + 1, 2 * len(values), 1024))
            values.frombytes(bytes(values.itemsize * (grown - len(values))))
        values[i] = value

    def pop(self, c2s: int, default: int | None = None) -> int | None:
        value = self.get(c2s)
        if value is None:
            return default
        self._values[(c2s >> 1) - self._first] = 0
        return value

    def __iter__(self) -> Iterator[int]:
        """The labels present, lowest first."""
        base = self._first
        return ((base + i) << 1 | 1 for i, value in enumerate(self._values) if value)


class _Owners:
    """c2s -> (server, pool) of the pairs in use: per pair the index of its entry in a short
    list (one entry per server and pool, as _Pool.owned gives them), in a _Pairs."""

    __slots__ = ("_pairs", "_entries", "_numbers")

    def __init__(self, first: int, last: int) -> None:
        self._pairs = _Pairs(first, last, "I")
        self._entries: list[tuple[str, _Pool]] = []
        self._numbers: dict[tuple[str, _Pool], int] = {}

    def get(self, c2s: int) -> tuple[str, _Pool] | None:
        number = self._pairs.get(c2s)
        return None if number is None else self._entries[number - 1]

    def __contains__(self, c2s: int) -> bool:
        return c2s in self._pairs

    def __getitem__(self, c2s: int) -> tuple[str, _Pool]:
        return self._entries[self._pairs[c2s] - 1]

    def __setitem__(self, c2s: int, entry: tuple[str, _Pool]) -> None:
        number = self._numbers.get(entry)
        if number is None:
            self._entries.append(entry)
            number = self._numbers[entry] = len(self._entries)
        self._pairs[c2s] = number

    def pop(self, c2s: int, default: None = None) -> tuple[str, _Pool] | None:
        number = self._pairs.pop(c2s)
        return None if number is None else self._entries[number - 1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._pairs)


class _Pool:
    """One block (or the single shared pool). Free state is implicit: a pair is free when it is
    neither in use nor held down. Never-touched pairs are handed out from ``next_fresh`` upwards;
    pairs that were ever touched come back through ``recycled`` once their hold-down ends."""

    __slots__ = ("name", "lo", "hi", "total", "in_use", "held", "next_fresh", "recycled", "heap", "_owners")

    def __init__(self, name: str | None, lo: int, hi: int) -> None:
        self.name = name
        self.lo, self.hi = lo, hi  # first and last C2S, both odd
        self.total = (hi - lo) // 2 + 1 if hi >= lo else 0
        self.in_use = 0
        self.held = 0
        self.next_fresh = lo
        self.recycled: deque[tuple[int, int]] = deque()  # (c2s, generation when it became free)
        self.heap: list[tuple[float, int, int]] = []  # (usable at, c2s, generation when held)
        self._owners: dict[str, tuple[str, _Pool]] = {}

    def owned(self, server: str) -> tuple[str, _Pool]:
        """The (server, pool) entry of a pair in use: one tuple per server, shared by its pairs
        (a tuple per pair was 56 bytes of every session)."""
        entry = self._owners.get(server)
        if entry is None:
            entry = self._owners[server] = (server, self)
        return entry

    def contains(self, c2s: int) -> bool:
        return self.lo <= c2s <= self.hi and c2s % 2 == 1

    @property
    def free(self) -> int:
        return self.total - self.in_use - self.held


class LabelAllocator:
    """Allocates C2S/S2C label pairs from ``[first, last]`` (inclusive label values).

    ``blocks`` maps server name -> (first, last) labels of that server's own block; blocks lie
    inside ``[first, last]`` and are disjoint. Without blocks, one pool serves every server.
    """

    def __init__(
        self, first: int, last: int, hold_down: float, blocks: Mapping[str, tuple[int, int]] | None = None
    ) -> None:
        if not (0 <= first <= last <= MAX_LABEL):
            raise ValueError(f"label range {first}-{last} must satisfy 0 <= first <= last <= {MAX_LABEL}")
        if hold_down < 0:
            raise ValueError(f"hold_down must be >= 0, got {hold_down}")
        self.first, self.last, self.hold_down = first, last, float(hold_down)
        self._used = _Owners(first, last)  # c2s -> (server, pool)
        self._held: dict[int, int] = {}  # c2s -> generation of its hold-down
        self._gen = _Pairs(first, last)  # c2s -> state generation; present iff ever touched
        self._pools: dict[str, _Pool] = {}
        self._shared: _Pool | None = None
        self._blocks: dict[str, tuple[int, int]] = {}
        if blocks is None:
            lo, hi = _pair_bounds(first, last)
            if hi < lo:
                raise ValueError(
                    f"label range {first}-{last} holds no C2S/S2C pair "
                    f"(C2S odd >= {FIRST_USABLE_C2S}, S2C = C2S + 1 <= last)"
                )
            self._shared = _Pool(None, lo, hi)
            self._sorted: list[_Pool] = [self._shared]
            return
        spans = []
        for name, (blo, bhi) in blocks.items():
            if not (first <= blo <= bhi <= last):
                raise ValueError(f"label block {name!r} {blo}-{bhi} is not inside the range {first}-{last}")
            lo, hi = _pair_bounds(blo, bhi)
            if hi < lo:
                raise ValueError(f"label block {name!r} {blo}-{bhi} holds no C2S/S2C pair")
            spans.append((blo, bhi, name))
            self._blocks[name] = (blo, bhi)
            self._pools[name] = _Pool(name, lo, hi)
        spans.sort()
        widest: tuple[int, int, str] | None = None  # the block reaching furthest so far
        for blo, bhi, name in spans:
            if widest is not None and blo <= widest[1]:
                raise ValueError(
                    f"label blocks {widest[2]!r} {widest[0]}-{widest[1]} and {name!r} {blo}-{bhi} "
                    f"overlap at {blo}-{min(bhi, widest[1])}"
                )
            if widest is None or bhi > widest[1]:
                widest = (blo, bhi, name)
        self._sorted = [self._pools[n] for _, _, n in spans]

    # -- lookups ----------------------------------------------------------------------------------

    @property
    def blocks(self) -> Mapping[str, tuple[int, int]]:
        """server -> (first, last) label of its block as configured (empty without blocks)."""
        return MappingProxyType(dict(self._blocks))

    def c2s_range(self, server: str | None = None) -> tuple[int, int]:
        """(lowest, highest) C2S label the server's block (or the shared pool) can hand out."""
        if server is None:
            if self._shared is None:
                raise ValueError("labels are allocated per server block: name the server")
            return self._shared.lo, self._shared.hi
        pool = self._pool_for(server)
        return pool.lo, pool.hi

    def _pool_for(self, server: str) -> _Pool:
        if self._shared is not None:
            return self._shared
        try:
            return self._pools[server]
        except KeyError:
            raise ValueError(f"server {server!r} has no label block") from None

    def owner(self, c2s: int) -> str | None:
        """The server a C2S label is allocated to, or None."""
        entry = self._used.get(c2s)
        return entry[0] if entry else None

    def allocations(self) -> Iterator[tuple[int, str]]:
        """(c2s, server) of every pair in use, lowest label first."""
        for c2s in sorted(self._used):
            yield c2s, self._used[c2s][0]

    def is_held_down(self, c2s: int) -> bool:
        """True while a released pair waits out its hold-down (as of the last expiry)."""
        return c2s in self._held

    # -- state changes ----------------------------------------------------------------------------

    def _bump(self, c2s: int) -> int:
        g = (self._gen.get(c2s) or 0) + 1
        self._gen[c2s] = g
        return g

    def _expire(self, pool: _Pool, now: float) -> None:
        heap, held, gen = pool.heap, self._held, self._gen
        while heap and heap[0][0] <= now:
            _, c2s, g = heapq.heappop(heap)
            if held.get(c2s) != g:
                continue  # stale: claimed while held down
            del held[c2s]
            pool.held -= 1
            g = gen[c2s] + 1
            gen[c2s] = g
            pool.recycled.append((c2s, g))

    def allocate(self, server: str, now: float) -> int | None:
        """Allocate a pair for ``server``; returns its C2S label, or None when the server's block
        (or the shared pool) has no pair free at ``now``. ValueError for a server without a block."""
        pool = self._pool_for(server)
        self._expire(pool, now)
        if pool.in_use + pool.held >= pool.total:
            return None
        gen, used = self._gen, self._used
        c2s = pool.next_fresh
        while c2s <= pool.hi:  # never-used pairs first, so released ones are reused last
            if c2s not in gen:
                pool.next_fresh = c2s + 2
                gen[c2s] = 1
                used[c2s] = pool.owned(server)
                pool.in_use += 1
                return c2s
            c2s += 2  # touched (claimed) before the fresh pointer got here: tracked elsewhere
        pool.next_fresh = c2s
        recycled = pool.recycled
        while recycled:
            c2s, g = recycled.popleft()
            if gen.get(c2s) == g:  # not stale (not claimed since it became free)
                gen[c2s] = g + 1
                used[c2s] = pool.owned(server)
                pool.in_use += 1
                return c2s
        raise AssertionError("label pool counters out of step")  # pragma: no cover

    def release(self, c2s: int, now: float, hold_down: bool = True) -> None:
        """Release an allocated pair; it becomes allocatable again at ``now + hold_down``.
        With ``hold_down=False`` it is free at once: a session whose objects never made it into
        the kernel had no packet that could still be in flight. ValueError if ``c2s`` is not
        allocated."""
        entry = self._used.pop(c2s, None)
        if entry is None:
            state = "held down" if c2s in self._held else "not allocated"
            raise ValueError(f"label {c2s} is {state}; cannot release it")
        pool = entry[1]
        pool.in_use -= 1
        g = self._bump(c2s)
        if not hold_down:
            pool.recycled.appendleft((c2s, g))  # the next allocation takes it back
            return
        pool.held += 1
        self._held[c2s] = g
        heapq.heappush(pool.heap, (now + self.hold_down, c2s, g))

    def hold(self, c2s: int, now: float) -> bool:
        """Put a pair that is not in use into hold-down from ``now`` (a restart found it held down
        in the kernel: its timer restarts). False if ``c2s`` is no C2S label of the range (or of
        any block) or is in use; a pair already held down is held again from ``now``."""
        pool = self._shared if self._shared is not None else next((p for p in self._sorted if p.contains(c2s)), None)
        if pool is None or not pool.contains(c2s) or c2s in self._used:
            return False
        if self._held.pop(c2s, None) is None:
            pool.held += 1
        g = self._bump(c2s)
        self._held[c2s] = g
        heapq.heappush(pool.heap, (now + self.hold_down, c2s, g))
        return True

    def claim(self, c2s: int, server: str) -> bool:
        """Mark a pair in use for ``server`` (reconciling from the kernel after a restart).
        A held-down pair can be claimed (the kernel says it is in use). False if ``c2s`` is not a
        C2S label of the server's block (or of the range), or is already in use."""
        pool: _Pool | None = self._shared if self._shared is not None else self._pools.get(server)
        if pool is None:
            return False
        if not pool.contains(c2s) or c2s in self._used:
            return False
        if self._held.pop(c2s, None) is not None:
            pool.held -= 1  # its heap entry is now stale
        self._bump(c2s)  # any recycled entry is now stale; the fresh pointer skips it
        self._used[c2s] = pool.owned(server)
        pool.in_use += 1
        return True

    # -- counts -----------------------------------------------------------------------------------

    def free(self, server: str | None = None, *, now: float) -> int:
        """Pairs allocatable at ``now``: for ``server`` (its block, or the shared pool) or, with
        ``server=None``, in all blocks together."""
        pools = [self._pool_for(server)] if server is not None else self._sorted
        n = 0
        for pool in pools:
            self._expire(pool, now)
            n += pool.free
        return n

    def stats(self, now: float) -> LabelStats:
        """Totals at ``now`` (hold-downs that ended by ``now`` count as free)."""
        per: dict[str, LabelStats] = {}
        t = u = h = 0
        for pool in self._sorted:
            self._expire(pool, now)
            t, u, h = t + pool.total, u + pool.in_use, h + pool.held
            if pool.name is not None:
                per[pool.name] = LabelStats(pool.total, pool.in_use, pool.held, pool.free)
        return LabelStats(t, u, h, t - u - h, MappingProxyType(per))
