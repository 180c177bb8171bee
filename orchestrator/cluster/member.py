"""A balancer as a member of the cluster (docs/scale.md): the tasks around the store on the
daemon's asyncio loop. Before READY: connect, join (lease), claim a label block, load the shared
table and install every other member's session (`start`, then `sync` from the daemon's setup).
Then: the lease's keep-alive, the watch of the table (changes go to the core as remote events,
their operations to the kernel), the writer (one transaction per wake-up for everything the core
changed since: a first-packet batch's sessions together), and more blocks when ours run low.
When etcd stops answering, the core refuses new sessions (`when_store_down: refuse`, counted);
what forwards keeps forwarding; on its return the member joins again, reclaims its blocks, reads
the table again (sessions that ended meanwhile end here) and writes its own sessions back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from orchestrator.cluster.store import Store, StoreError, TableSnapshot, WatchEvent
from orchestrator.config.model import ClusterConfig, StoreDown
from orchestrator.core.balancer import Balancer, Plan
from orchestrator.core.label_blocks import BlockAllocator, next_block, wants_block
from orchestrator.core.remote import ClusterSession, RemoteDelete, RemotePut
from orchestrator.dataplane import ops

log = logging.getLogger("mplsorch")


def fields(**values: object) -> dict[str, object]:
    """`extra=` of a log call (as orchestrator.daemon.logs.fields, which this package may not
    import: the daemon imports it)."""
    return {"fields": values}


RETRY = 1.0  # seconds between tries while the store is away
SLICE = 128  # watch events installed in one step at least (a revision is never split)


class Host(Protocol):
    """What the member needs of its balancer daemon."""

    core: Balancer

    def program(self, operations: list[ops.Operation], why: str) -> list[ops.OpResult]: ...

    def routes_to(self, addresses: list[str]) -> dict[str, ops.NextHop | None]: ...


class LeaveRefused(Exception):
    """A graceful leave that cannot start (nothing changed): one line for the operator."""


class Member:
    def __init__(self, config: ClusterConfig, host: Host, store: Store | None = None) -> None:
        self.config = config
        self.host = host
        self.store = store or Store(config)
        self.snapshot: TableSnapshot | None = None
        self.members: set[str] = set()
        self.blocks: dict[int, str] = {}
        self.member_labels: dict[str, int] = {}  # member -> its member label (cluster.member_label)
        self.tasks: list[asyncio.Task[None]] = []
        self.wake = asyncio.Event()
        self.want_block = asyncio.Event()
        self.up = False
        self.revision = 0
        self.state = "member"  # "leaving", "left" (a graceful leave)
        self.store.on_late = lambda: self.core.count("store_deadlines_late")

    @property
    def core(self) -> Balancer:
        return self.host.core

    # -- before READY ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join and read the table; raises StoreError (the daemon does not start without it)."""
        await self.store.connect()
        await self.store.join()
        self.snapshot = await self.store.load()
        self.blocks = dict(self.snapshot.blocks)  # the claims below skip every block held already
        reserve = self.snapshot.reserves.get(self.config.name)
        if reserve is not None and self.snapshot.blocks.get(reserve) == self.config.name:
            self.labels.set_reserve(reserve)  # ours from before a restart, whatever its lease
        for index, holder in sorted(self.snapshot.blocks.items()):
            if holder == self.config.name and index != reserve:  # a restart that resumed its lease
                self.core.add_label_block(index)
        for _ in range(64):  # enough blocks for admission's reserve and a quarter block more
            if not self.wants_block() or not await self._claim(first=True):
                break
        await self._claim_reserve()
        self.up = True

    @property
    def labels(self) -> BlockAllocator:
        labels = self.core.labels
        assert isinstance(labels, BlockAllocator)
        return labels

    def wants_reserve(self) -> bool:
        cluster = self.core.config.cluster
        return cluster is not None and cluster.when_store_down is StoreDown.LOCAL and self.labels.reserve is None

    async def _claim_reserve(self) -> None:
        """With `when_store_down: local`, the reserve block: the lowest free one, claimed without
        a lease (codec.py). At start, and after a reload that sets the policy."""
        for _ in range(8):
            if not self.wants_reserve():
                return
            in_use = self.labels.in_use() + [r.c2s for r in (self.snapshot.sessions if self.snapshot else ())]
            index = next_block(self.labels.layout, set(self.blocks) | set(self.labels.held_blocks), in_use)
            if index is None:
                self.core.count("label_blocks_exhausted")
                log.warning("cluster: no free label block in labels.range for the reserve (when_store_down: local)")
                return
            if await self.store.claim_reserve(index):
                self.blocks[index] = self.config.name
                self.labels.set_reserve(index)
                lo, hi = self.labels.layout.bounds(index)
                log.info(
                    "cluster: label block %d (%d-%d) reserved for etcd's absence",
                    index,
                    lo,
                    hi,
                    extra=fields(event="label_reserve", block=index),
                )
                return
            self.blocks[index] = "?"

    def sync(self, now: float) -> None:
        """The table read by `start` into the core and the kernel (after the restore from the
        kernel, before the ruleset and the queue)."""
        assert self.snapshot is not None
        # A start that resumed its lease finds its own sessions in the table: what the kernel
        # restored beyond them belongs to sessions that ended while this member was down.
        self._apply_snapshot(self.snapshot, now, keep_ours=not self.store.resumed)
        self.snapshot = None

    def _apply_snapshot(self, snap: TableSnapshot, now: float, keep_ours: bool = True) -> None:
        self.members = set(snap.members)
        self.blocks = dict(snap.blocks)
        self.member_labels = dict(snap.member_labels)
        self.revision = snap.revision
        if snap.damaged:
            self.core.count("cluster_damaged_rows", snap.damaged)
        self._apply(self.core.remote_sync(self._puts(snap.sessions), now, keep_ours), now)
        self.forward()

    def forward(self) -> None:
        """The S2C labels of the blocks other members hold routed to them until their sessions'
        rows arrive (core.forward_blocks): one netlink batch per block that changed."""
        held = set(self.labels.held_blocks) | ({self.labels.reserve} - {None})
        owners = {
            index: self.member_labels[holder]
            for index, holder in self.blocks.items()
            if holder != self.config.name and index not in held and holder in self.member_labels
        }
        for batch in self.core.forward_blocks(owners):
            self.host.program(batch, "cluster forwarding")

    def wants_block(self) -> bool:
        labels = self.core.labels
        assert isinstance(labels, BlockAllocator)
        reserve = max((s.admission.min_free_labels for s in self.core.config.services), default=0) // 2 + 1
        return wants_block(labels.free(now=time.monotonic()), labels.layout.size, reserve)

    async def _claim(self, first: bool = False) -> bool:
        """One more label block: the lowest nobody holds and no session uses; a lost race tries
        the next."""
        labels = self.core.labels
        assert isinstance(labels, BlockAllocator)
        for _ in range(8):
            in_use = labels.in_use() + [r.c2s for r in (self.snapshot.sessions if self.snapshot else ())]
            index = next_block(labels.layout, set(self.blocks) | set(labels.held_blocks), in_use)
            if index is None:
                self.core.count("label_blocks_exhausted")
                if first:
                    log.warning("cluster: no free label block in labels.range")
                return False
            if await self.store.claim_block(index):
                self.blocks[index] = self.config.name
                self.core.add_label_block(index)
                if not first:
                    self.forward()  # a block forwarded to its former holder is ours now
                lo, hi = labels.layout.bounds(index)
                log.info(
                    "cluster: label block %d (%d-%d) claimed",
                    index,
                    lo,
                    hi,
                    extra=fields(event="label_block", block=index),
                )
                return True
            self.blocks[index] = "?"  # taken meanwhile: its holder shows up in the watch
        return False

    # -- the running member ---------------------------------------------------------------------------
    def run(self) -> None:
        """The member's tasks, on the running loop."""
        self.tasks = [
            asyncio.create_task(self._keepalive_loop()),
            asyncio.create_task(self._watch_loop()),
            asyncio.create_task(self._writer_loop()),
            asyncio.create_task(self._claim_loop()),
        ]

    def status(self) -> dict[str, object]:
        """`status --json`'s `cluster` (docs/json.md)."""
        labels = self.core.labels
        return {
            "name": self.config.name,
            "state": self.state,
            "ready": self.state == "member",
            "store": "up" if self.up else "down",
            "members": sorted(self.members),
            "label_blocks": list(labels.held_blocks) if isinstance(labels, BlockAllocator) else [],
            "reserve_block": labels.reserve if isinstance(labels, BlockAllocator) else None,
            "revision": self.revision,
            "remote_sessions": sum(1 for s in self.core.table if s.owner is not None),
            "loop_lag_max_ms": round(self.store.lag.worst * 1000),
        }

    def flush(self) -> None:
        """The core changed sessions of ours: the writer sends them (one transaction)."""
        if self.core.changes:
            self.wake.set()
        if self.up and self.wants_block():
            self.want_block.set()

    async def stop(self, leave: bool) -> None:
        """Write what is pending, then leave (revoke the lease: the others adopt our sessions)
        or let the lease run out."""
        await _cancel(self.tasks)
        if self.up and self.state == "member":
            with contextlib.suppress(StoreError):
                await self._write()
                if leave:
                    await self.store.leave()
        await self.store.close()

    async def leave(self) -> dict[str, object]:
        """The graceful leave (`mplsorch cluster leave`, docs/scale.md): no new session from
        now on (`state` leaving: the announcer withdraws this balancer), what is pending
        written, every session of ours handed to a member that stays (owner changed in the
        table, under that member's lease), our blocks and reserve given up, the lease revoked.
        The kernel's objects stay: the clients still sent here keep forwarding until the ECMP
        moves them. Raises LeaveRefused (nothing changed) when etcd is away or no other member
        is there to take our sessions; StoreError if etcd fails on the way (the sessions not
        handed over yet go with the lease, adopted as after a death)."""
        if self.state in ("leaving", "left"):
            raise LeaveRefused(f"already {self.state}")
        if not self.up:
            raise LeaveRefused("etcd is unreachable: the sessions cannot be handed over (try again once it is back)")
        leases = await self.store.member_leases()
        others = sorted(n for n in leases if n != self.config.name)
        owned = sum(1 for s in self.core.table if s.owner is None)
        if owned and not others:
            raise LeaveRefused(f"no other member to take this balancer's {owned} sessions")
        self.core.leaving = True
        self.state = "leaving"
        log.info(
            "cluster: leaving: no new sessions; %d sessions to hand over to %s",
            owned,
            ", ".join(others) or "nobody",
            extra=fields(event="cluster_leaving", sessions=owned),
        )
        # No watch, no block claim, no write of ours from now on; the keep-alive goes on until
        # the hand-over is written (a long one must not outlive the lease).
        keepalive, others_tasks = self.tasks[:1], self.tasks[1:]
        await _cancel(others_tasks)
        self.tasks = keepalive
        try:
            await self._write()
            rows = self.core.hand_over(others) if others else []
            txns = await self.store.hand_over(rows, leases)
            blocks, reserve = list(self.labels.held_blocks), self.labels.reserve
            await self.store.release_blocks(blocks, reserve)
            self.core.release_label_blocks()
        finally:
            await _cancel(self.tasks)
            self.tasks = []
        await self.store.leave()
        self.up = False
        self.state = "left"
        to: dict[str, int] = {}
        for row in rows:
            to[row.owner] = to.get(row.owner, 0) + 1
        released = sorted([*blocks, *([reserve] if reserve is not None else [])])
        log.info(
            "cluster: left: %d sessions handed over (%s), label blocks %s given up",
            len(rows),
            ", ".join(f"{n} to {m}" for m, n in sorted(to.items())) or "none",
            released,
            extra=fields(event="cluster_left", sessions=len(rows), blocks=released),
        )
        return {"left": True, "sessions": len(rows), "to": to, "label_blocks": released, "txns": txns}

    async def _keepalive_loop(self) -> None:
        every = max(0.5, self.config.lease_ttl / 3)
        while True:
            await asyncio.sleep(every if self.up else RETRY)
            if not self.up:
                await self._rejoin()
                continue
            try:
                alive = await self.store.keepalive()
            except StoreError as exc:
                self._down(str(exc))
                continue
            if not alive:
                self._down("the lease expired")
                continue
            self.want_block.set()

    def _down(self, why: str) -> None:
        if not self.up:
            return
        self.up = False
        self.core.store_up = False
        self.core.count("store_down")
        policy = self.core.config.cluster.when_store_down if self.core.config.cluster else StoreDown.REFUSE
        log.error(
            "cluster: etcd unreachable (%s): sessions keep forwarding, new ones %s (when_store_down: %s)",
            why,
            "take pairs of the reserve block" if policy is StoreDown.LOCAL else "are refused",
            policy.value,
            extra=fields(event="store_down", reason=why),
        )

    async def _rejoin(self) -> None:
        """The store answers again: a new lease if the old one expired, our blocks back, the
        table read again, our sessions written again."""
        try:
            await self.store.connect()
            alive = self.store.lease is not None and await self.store.keepalive()
            if not alive:
                await self.store.join()
                for index in self.core.labels.held_blocks if isinstance(self.core.labels, BlockAllocator) else ():
                    if not await self.store.claim_block(index):
                        self.core.count("label_block_lost")
                        log.error("cluster: label block %d was taken by another member while etcd was away", index)
            snap = await self.store.load()
        except StoreError as exc:
            log.debug("cluster: rejoin failed: %s", exc)
            return
        self._apply_snapshot(snap, time.monotonic())
        self.up = True
        self.core.store_up = True
        self.core.count("store_rejoins")
        log.info("cluster: etcd back; table reloaded at revision %d", snap.revision, extra=fields(event="store_up"))
        self.wake.set()

    async def _watch_loop(self) -> None:
        """Follow the table from the revision last read; after a failure, from the one the
        rejoin read."""
        while True:
            if not self.up:
                await asyncio.sleep(RETRY)
                continue
            pending: list[WatchEvent] = []
            handle: asyncio.Handle | None = None

            def drain(batch: list[WatchEvent] = pending) -> None:
                nonlocal handle
                handle = None
                events, batch[:] = list(batch), []
                try:
                    self._on_events(events)
                except Exception as exc:  # noqa: BLE001 - see below
                    # These events are lost to this member: it must not go on as if it had
                    # them. The store counts as down, and the rejoin reads the whole table.
                    log.exception("cluster: installing %d watch events failed", len(events))
                    self.core.count("cluster_watch_failures")
                    self._down(f"installing the watch's events failed: {type(exc).__name__}: {exc}")

            start = self.revision + 1
            try:
                async for event in self.store.watch(start):
                    if not self.up:
                        break  # the rejoin reloads the table; watch again from there
                    if len(pending) >= SLICE and event.revision != pending[-1].revision:
                        # A large response (the other member's flood) is installed a slice at
                        # a time, and the loop serves first packets and deadlines in between.
                        if handle is not None:
                            handle.cancel()
                        drain()
                        await asyncio.sleep(0)
                    pending.append(event)
                    self.revision = max(self.revision, event.revision)
                    # All events of one etcd response are queued before this task yields: drain
                    # them together (up to a slice, and never apart from the events of their
                    # own revision), so a lease's expiry (member key and sessions at once, one
                    # revision) is seen whole.
                    if handle is None:
                        handle = asyncio.get_running_loop().call_soon(drain)
            except StoreError as exc:
                self._down(str(exc))
            if handle is not None:
                handle.cancel()
                drain()

    def _on_events(self, events: list[WatchEvent]) -> None:
        gone = set()
        owners = False  # blocks or member labels changed: the forwarding routes follow
        for e in events:
            if e.what[0] == "member":
                owners = True
                if e.deleted:
                    self.members.discard(e.what[1])
                    self.member_labels.pop(e.what[1], None)
                    gone.add(e.what[1])
                else:
                    self.members.add(e.what[1])
                    if e.member_label is not None:
                        self.member_labels[e.what[1]] = e.member_label
            elif e.what[0] == "block":
                owners = True
                if e.deleted:
                    self.blocks.pop(int(e.what[1]), None)
                else:
                    self.blocks[int(e.what[1])] = e.holder or "?"
        rows = [e.row for e in events if e.what[0] == "session" and e.row is not None and not e.deleted]
        puts = iter(self._puts(rows))
        merged: list[RemotePut | RemoteDelete] = []
        for e in events:
            if e.what[0] != "session":
                continue
            if e.row is None:
                self.core.count("cluster_damaged_rows")
            elif e.deleted:
                owner = e.row.owner
                orphaned = owner != self.config.name and (owner in gone or owner not in self.members)
                merged.append(RemoteDelete(e.row.service, e.row.key, owner, orphaned))
            else:
                merged.append(next(puts))
        if merged:
            self._apply(self.core.on_remote(merged, time.monotonic()), time.monotonic())
            self.flush()  # adoptions are written back under our lease
        if owners:
            self.forward()

    def _puts(self, rows: Sequence[ClusterSession]) -> list[RemotePut]:
        """Rows with this node's next hop to each of their clients (one lookup for all)."""
        wanted = [c for r in rows if r.owner != self.config.name for c in r.clients]
        hops = self.host.routes_to(wanted) if wanted else {}
        return [RemotePut(r, {c: h for c in r.clients if (h := hops.get(c)) is not None}) for r in rows]

    def _apply(self, plan: Plan, now: float) -> None:
        results = self.host.program(plan.ops, "cluster")
        commit = self.core.commit(plan, results, now)
        self.host.program(list(commit.cleanup), "cluster rollback")
        self.host.program(list(commit.admit), "fast path")

    async def _claim_loop(self) -> None:
        """More label blocks while ours run low (checked after every batch and keep-alive)."""
        while True:
            await self.want_block.wait()
            self.want_block.clear()
            try:
                while self.up and self.wants_block() and await self._claim():
                    pass
                if self.up:
                    await self._claim_reserve()
            except StoreError as exc:
                self._down(str(exc))

    async def _writer_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self.up:
                continue  # kept in core.changes until the rejoin wakes us
            try:
                await self._write()
            except StoreError as exc:
                self._down(str(exc))
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("cluster: writing the table failed")
                self._down(f"writing failed: {type(exc).__name__}: {exc}")

    async def _write(self) -> None:
        changes = self.core.take_changes()
        if not changes:
            return
        try:
            txns = await self.store.write(changes)
        except BaseException:  # a failure, or a cancellation (a stop): nothing taken is lost
            for key, row in changes.items():  # written again once the store is back
                self.core.changes.setdefault(key, None if row is None else self.core.table.get(*key))
            raise
        self.core.count("cluster_txns", txns)
        self.core.count("cluster_rows_written", len(changes))


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
