"""Label blocks: the one label pool cut into blocks of pairs that the balancers of a cluster lease
(docs/scale.md). Pure: which block holds a pair, which block to claim next, and an allocator that
hands out pairs only from the blocks this balancer holds while it tracks every pair any session
of the cluster uses. The claim itself is an etcd transaction (orchestrator/cluster/store.py): a
block key created only if absent, under the member's lease, so two balancers never hold one block.

With `cluster.when_store_down: local` one more block is the member's reserve: claimed without a
lease (it outlives an outage longer than the lease), used only while etcd is unreachable, so the
sessions made then take pairs that no other member can hand out (docs/scale.md).

Block i holds the C2S labels first_c2s + 2*size*i ... first_c2s + 2*size*(i+1) - 2 (odd), the last
incomplete block of the range is not used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from orchestrator.core.labels import FIRST_USABLE_C2S, LabelAllocator, LabelStats

__all__ = ["BlockAllocator", "BlockLayout", "next_block", "wants_block"]


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of the label range [first, last], `size` pairs each."""

    first: int
    last: int
    size: int

    @property
    def first_c2s(self) -> int:
        c2s = max(self.first, FIRST_USABLE_C2S)
        return c2s if c2s % 2 else c2s + 1

    @property
    def count(self) -> int:
        pairs = max(0, (self.last - self.first_c2s + 1) // 2)
        return pairs // self.size

    def bounds(self, index: int) -> tuple[int, int]:
        """(first, last) label of block `index`: C2S of its first pair, S2C of its last."""
        if not 0 <= index < self.count:
            raise ValueError(f"block {index} is outside 0..{self.count - 1}")
        lo = self.first_c2s + 2 * self.size * index
        return lo, lo + 2 * self.size - 1

    def block_of(self, c2s: int) -> int | None:
        """The block holding the pair of `c2s` (None: outside every block)."""
        if c2s < self.first_c2s or c2s % 2 == 0:
            return None
        index = (c2s - self.first_c2s) // (2 * self.size)
        return index if index < self.count else None


def next_block(layout: BlockLayout, held: Iterable[int], in_use: Iterable[int]) -> int | None:
    """The lowest block nobody holds (`held`: every member's, from etcd) and no session of the
    table still uses (`in_use`: C2S labels): the blocks of a dead member come back only after
    their sessions ended or moved. None when there is none."""
    taken = set(held) | {b for b in (layout.block_of(c) for c in in_use) if b is not None}
    return next((i for i in range(layout.count) if i not in taken), None)


def wants_block(free: int, size: int, reserve: int = 0) -> bool:
    """Claim another block when fewer than a quarter of a block's pairs are free beyond
    `reserve` (the pairs admission keeps free: the largest min_free_labels / 2)."""
    return free < max(1, size // 4) + reserve


class BlockAllocator:
    """The LabelAllocator interface the core uses, over the blocks this balancer holds. Pairs
    of other members' blocks are claimed too (remote sessions), so they are known in use, but
    never handed out: `allocate` takes only from held blocks."""

    def __init__(self, layout: BlockLayout, hold_down: float) -> None:
        self.layout = layout
        self.hold_down = float(hold_down)
        self._held: dict[int, LabelAllocator] = {}
        self._reserve: tuple[int, LabelAllocator] | None = None  # when_store_down: local
        self._foreign: dict[int, str] = {}  # c2s -> server, pairs outside our blocks

    # -- blocks -------------------------------------------------------------------------------
    def add_block(self, index: int) -> None:
        """A block this balancer now holds (its claim succeeded). Pairs already claimed in it
        (sessions of a member that held it before) stay in use."""
        if index in self._held or index == self.reserve:
            return
        self._held[index] = self._take(index)

    def _take(self, index: int) -> LabelAllocator:
        lo, hi = self.layout.bounds(index)
        alloc = LabelAllocator(lo, hi, self.hold_down)
        for c2s, server in list(self._foreign.items()):
            if self.layout.block_of(c2s) == index:
                del self._foreign[c2s]
                alloc.claim(c2s, server)
        return alloc

    def set_reserve(self, index: int) -> None:
        """The block this balancer reserved for sessions made while etcd is away (`local`)."""
        if self.reserve == index:
            return
        if self.reserve is not None or index in self._held:
            raise ValueError(f"block {index} cannot be the reserve: it is held, or a reserve is set")
        self._reserve = (index, self._take(index))

    @property
    def reserve(self) -> int | None:
        return None if self._reserve is None else self._reserve[0]

    def drop_blocks(self) -> None:
        """Give every block up (a graceful leave): the pairs still in use are other members'
        sessions from now on (handed over), known in use, never handed out here again."""
        allocs = [*self._held.values(), *([self._reserve[1]] if self._reserve else [])]
        self._held.clear()
        self._reserve = None
        for alloc in allocs:
            for c2s, server in alloc.allocations():
                self._foreign[c2s] = server

    @property
    def held_blocks(self) -> tuple[int, ...]:
        """The leased blocks (the reserve apart)."""
        return tuple(sorted(self._held))

    def _alloc_of(self, c2s: int) -> LabelAllocator | None:
        index = self.layout.block_of(c2s)
        if index is None:
            return None
        if self._reserve is not None and self._reserve[0] == index:
            return self._reserve[1]
        return self._held.get(index)

    # -- the LabelAllocator interface ------------------------------------------------------------
    @property
    def blocks(self) -> Mapping[str, tuple[int, int]]:
        return MappingProxyType({})  # no per-server blocks: every server draws from ours

    def allocate(self, server: str, now: float) -> int | None:
        for index in sorted(self._held):
            c2s = self._held[index].allocate(server, now)
            if c2s is not None:
                return c2s
        return None

    def allocate_reserved(self, server: str, now: float) -> int | None:
        """A pair of the reserve (etcd is away and the policy is `local`); None without one."""
        return self._reserve[1].allocate(server, now) if self._reserve is not None else None

    def reserve_free(self, now: float) -> int:
        return self._reserve[1].free(now=now) if self._reserve is not None else 0

    def release(self, c2s: int, now: float, hold_down: bool = True) -> None:
        alloc = self._alloc_of(c2s)
        if alloc is not None:
            alloc.release(c2s, now, hold_down)
        elif self._foreign.pop(c2s, None) is None:
            raise ValueError(f"label {c2s} is not allocated; cannot release it")

    def hold(self, c2s: int, now: float) -> bool:
        alloc = self._alloc_of(c2s)
        if alloc is not None:
            return alloc.hold(c2s, now)
        return self.layout.block_of(c2s) is not None and c2s not in self._foreign

    def claim(self, c2s: int, server: str) -> bool:
        alloc = self._alloc_of(c2s)
        if alloc is not None:
            return alloc.claim(c2s, server)
        if self.layout.block_of(c2s) is None or c2s in self._foreign:
            return False
        self._foreign[c2s] = server
        return True

    def in_use(self) -> list[int]:
        """Every C2S label in use here: ours and other members' (remote sessions)."""
        return [c for a in self._allocators() for c, _ in a.allocations()] + list(self._foreign)

    def _allocators(self) -> list[LabelAllocator]:
        return [*self._held.values(), *([self._reserve[1]] if self._reserve is not None else [])]

    def free(self, server: str | None = None, *, now: float) -> int:
        """Free pairs of the leased blocks (the reserve is only for etcd's absence)."""
        return sum(a.free(now=now) for a in self._held.values())

    def stats(self, now: float) -> LabelStats:
        t = u = h = 0
        for a in self._allocators():
            s = a.stats(now)
            t, u, h = t + s.total, u + s.in_use, h + s.held_down
        return LabelStats(t, u, h, t - u - h)
