"""Workers (`nfqueue.workers: N`): how the balancer's work is split between N processes. Pure.

Each worker serves one NFQUEUE queue; the ruleset picks the queue by a hash of the client's
source address, so one client's first packets always reach the same worker. Each worker owns a
disjoint share of the label pairs (of `labels.range`, or of each server's `label_block`), and so
the sessions whose C2S label is in its share: that is how a restarted worker tells its sessions
among the kernel's objects, with nothing but the kernel to go by. Limits on sessions (a server's
or a service's `max_sessions`) are split between the workers too, so they hold in total.

Session ids: worker i of N hands out ids i+1, i+1+N, i+1+2N, ... so the union of the workers'
sessions has unique ids (a restored session keeps its recorded id)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from orchestrator.config.model import Admission, BalancerConfig, LabelAllocation
from orchestrator.core.labels import FIRST_USABLE_C2S
from orchestrator.dataplane import handles, ops


@dataclass(frozen=True)
class Shard:
    """Worker `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker {self.index} of {self.count}")


def split_labels(first: int, last: int, count: int) -> list[tuple[int, int]]:
    """[first, last] cut into `count` label ranges of whole (odd C2S, C2S + 1) pairs, as even as
    can be, in order. ValueError when there are fewer pairs than parts."""
    lo = max(first, FIRST_USABLE_C2S)
    lo += 1 - lo % 2  # the first odd C2S
    pairs = (last - lo + 1) // 2 if last > lo else 0
    if pairs < count:
        raise ValueError(f"labels {first}-{last} hold {pairs} pairs, fewer than {count} workers")
    out = []
    for i in range(count):
        start, end = i * pairs // count, (i + 1) * pairs // count
        out.append((lo + 2 * start, lo + 2 * end - 1))
    return out


def _limit(limit: int | None, shard: Shard) -> int | None:
    """A worker's part of a limit on sessions; the parts add up to it (at least one each)."""
    if limit is None:
        return None
    return max(1, limit // shard.count + (1 if shard.index < limit % shard.count else 0))


def worker_socket(control_socket: str, index: int) -> str:
    """The control socket of worker `index`, beside the balancer's own."""
    return f"{control_socket}.worker{index}"


def worker_config(config: BalancerConfig, shard: Shard) -> BalancerConfig:
    """The configuration worker `shard` runs with: its queue, its share of the labels and of the
    limits, its own control socket and no metrics endpoint (the supervisor serves the union)."""
    first_queue = config.nfqueue.queues[0]
    labels = config.labels
    pools = config.pools
    if labels.allocation is LabelAllocation.SERVER_BLOCKS:
        pools = tuple(
            replace(
                pool,
                servers=tuple(
                    replace(
                        s,
                        label_block=split_labels(*s.label_block, shard.count)[shard.index] if s.label_block else None,
                        max_sessions=_limit(s.max_sessions, shard),
                    )
                    for s in pool.servers
                ),
            )
            for pool in pools
        )
    else:
        labels = replace(labels, range=split_labels(*labels.range, shard.count)[shard.index])
        pools = tuple(
            replace(pool, servers=tuple(replace(s, max_sessions=_limit(s.max_sessions, shard)) for s in pool.servers))
            for pool in pools
        )
    services = tuple(
        replace(
            svc,
            admission=Admission(
                _limit(svc.admission.max_sessions, shard),
                svc.admission.min_free_labels,
                svc.admission.refuse_with,
            ),
        )
        for svc in config.services
    )
    return replace(
        config,
        node=replace(config.node, control_socket=worker_socket(config.node.control_socket, shard.index)),
        labels=labels,
        pools=pools,
        services=services,
        nfqueue=replace(config.nfqueue, queues=(first_queue + shard.index, first_queue + shard.index)),
        metrics=None,
    )


def owner_of_label(config: BalancerConfig, count: int) -> Callable[[int], int]:
    """Which worker owns C2S label `c2s` (a label of no share: worker 0, which deletes what
    belongs to no session, as a single daemon does)."""
    if config.labels.allocation is LabelAllocation.SERVER_BLOCKS:
        spans = [
            (lo, hi, i)
            for s in config.servers
            if s.label_block
            for i, (lo, hi) in enumerate(split_labels(*s.label_block, count))
        ]
    else:
        spans = [(lo, hi, i) for i, (lo, hi) in enumerate(split_labels(*config.labels.range, count))]

    def owner(c2s: int) -> int:
        for lo, hi, i in spans:
            if lo <= c2s <= hi:
                return i
        return 0

    return owner


def _filter_c2s(flt: ops.FlowerFilter | ops.U32Filter) -> int:
    pushes = [a.label for a in flt.actions if isinstance(a, ops.MplsPush)]
    if pushes:
        return pushes[0]
    return handles.handle_c2s(flt.handle) if isinstance(flt, ops.FlowerFilter) else 0


def _filter_ends(flt: ops.FlowerFilter | ops.U32Filter) -> tuple[str, str]:
    if isinstance(flt, ops.U32Filter):
        esp = ops.esp_of(flt.keys)
        return (esp[0], esp[1]) if esp else ("", "")
    return (flt.match.src or "").split("/")[0], (flt.match.dst or "").split("/")[0]


def share_of(installed: Sequence[ops.Installed], owner: Callable[[int], int], index: int) -> list[ops.Installed]:
    """Worker `index`'s part of a dump of the kernel: its sessions' filters and label routes (by
    C2S label), the fast-path elements of clients whose filter to the element's VIP is its own
    (an element of no filter: worker 0's, to delete), and everything else for worker 0."""
    by_client: dict[tuple[str, str], int] = {}
    for item in installed:
        if isinstance(item.obj, (ops.FlowerFilter, ops.U32Filter)):
            by_client.setdefault(_filter_ends(item.obj), owner(_filter_c2s(item.obj)))
    out = []
    for item in installed:
        obj = item.obj
        if isinstance(obj, ops.FastPathElement):
            mine = by_client.get((obj.client, obj.vip), 0) == index
        else:
            mine = is_mine(item, owner, index)
        if mine:
            out.append(item)
    return out


def is_mine(item: ops.Installed, owner: Callable[[int], int], index: int) -> bool:
    """Whether an object of a dump that is no fast-path element is worker `index`'s (share_of:
    the same answer, one object at a time)."""
    obj = item.obj
    if isinstance(obj, (ops.FlowerFilter, ops.U32Filter)):
        return owner(_filter_c2s(obj)) == index
    if isinstance(obj, ops.MplsRoute):
        return owner(obj.label - 1 + obj.label % 2) == index
    return index == 0
