"""The cluster's I/O with etcd (aetcd, the asyncio etcd v3 client): connect to the first endpoint
that answers, a lease for this member, label blocks claimed in a transaction, the session table
read in one range and watched from that revision, and the rows written in one transaction per
batch. Every call has a deadline (`timeout`): a store that does not answer is an `StoreError`,
never a hang of the daemon's loop. The keys and values are codec.py's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import aetcd.rpc
import grpc

from orchestrator.cluster import codec
from orchestrator.cluster.loop_lag import LoopLag
from orchestrator.config.model import ClusterConfig, ClusterTls
from orchestrator.core.remote import ClusterSession

__all__ = ["MAX_TXN_OPS", "StoreError", "Store", "TableSnapshot", "WatchEvent"]

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default: a larger batch goes in several transactions
STALL = 0.5  # seconds: a deadline that expired while the loop was this late is waited again
MAX_WAITS = 3  # deadlines per call at most (a loop late every time: the third expiry counts)

log = logging.getLogger("mplsorch")


class StoreError(RuntimeError):
    """etcd did not answer in time, or refused: the caller counts it and treats the store as down
    (at start-up: the daemon does not start, exit code 5)."""


@dataclass(frozen=True)
class TableSnapshot:
    """The shared table at one revision."""

    revision: int
    members: frozenset[str]
    blocks: Mapping[int, str]  # index -> holder
    sessions: tuple[ClusterSession, ...]
    damaged: int  # session values that did not decode
    reserves: Mapping[str, int] = field(default_factory=dict)  # member -> its reserve block
    member_labels: Mapping[str, int] = field(default_factory=dict)  # member -> its member label


@dataclass(frozen=True)
class WatchEvent:
    """One key's change: ("member"|"block"|"session", the key's names), the new row of a session
    put, and for a delete the row it had (etcd's prev_kv); a block's holder and a member's label
    (cluster.member_label) as put."""

    deleted: bool
    what: tuple[str, str, str]
    row: ClusterSession | None
    revision: int
    holder: str | None = None  # a block put: the member holding it
    member_label: int | None = None  # a member put: its member label, if it advertises one


class _TlsClient(aetcd.Client):
    """aetcd 1.0 opens only plain channels: the same client over a TLS channel (cluster.tls)."""

    def __init__(self, tls: ClusterTls, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = grpc.ssl_channel_credentials(
            Path(tls.ca).read_bytes(), Path(tls.key).read_bytes(), Path(tls.cert).read_bytes()
        )

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials)
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel), timeout=self._timeout)
        self._connected.set()


class Store:
    def __init__(self, config: ClusterConfig, timeout: float = 2.0) -> None:
        self.config = config
        self.prefix = config.prefix
        self.timeout = timeout
        self.client: Any = None
        self.endpoint: tuple[str, int] | None = None
        self.lease: int | None = None
        self._written: dict[bytes, bytes] = {}  # our last value of each session key we own
        self.resumed = False  # join took over our previous lease (a restart within its TTL)
        self.lag = LoopLag()
        self.late_deadlines = 0  # deadlines that expired while the loop was late (waited again)
        self.last_stall = 0.0  # the loop's lag at the last expiry
        self.on_late: Callable[[], None] | None = None  # told of each late deadline (the counter)

    def _late(self) -> None:
        self.late_deadlines += 1
        if self.on_late is not None:
            self.on_late()

    async def _call(self, coro: Any) -> Any:
        """`coro` within the deadline. gRPC's own deadline (the client's `timeout`, kept by gRPC's
        core, not this loop) judges etcd; this one, on the daemon's loop, is a backstop for a call
        that hangs. A busy loop fires it late and handles a reply that came in time late too: a
        deadline that expired while the loop was late by STALL or more gets another one (up to
        MAX_WAITS in all), logged with the lag; only a deadline the loop kept is etcd's fault."""
        loop = asyncio.get_running_loop()
        self.lag.start()
        task = asyncio.ensure_future(coro)
        started = waiting = loop.time()
        try:
            for wait in range(1, MAX_WAITS + 1):
                done, _ = await asyncio.wait({task}, timeout=self.timeout)
                if done:
                    if task.cancelled():  # not by us (we are not cancelled): its channel closed
                        raise OSError("the call was cancelled (its channel closed)")
                    return task.result()
                now = loop.time()
                stall = max(self.lag.since(waiting), now - waiting - self.timeout)
                self.last_stall = stall
                if stall < STALL or wait == MAX_WAITS:
                    raise TimeoutError(
                        f"no answer in {now - started:.1f} s (the loop was late by up to {stall:.2f} s meanwhile)"
                    )
                self._late()
                log.warning(
                    "cluster: an etcd call's %.1f s deadline expired while the loop was %.2f s late: waiting again",
                    self.timeout,
                    stall,
                    extra={"fields": {"event": "store_deadline_late", "lag": round(stall, 3)}},
                )
                waiting = now
            raise AssertionError("unreachable")
        except (TimeoutError, aetcd.exceptions.ClientError, grpc.RpcError, OSError) as exc:
            raise StoreError(f"etcd {self._where()}: {type(exc).__name__}: {exc}") from exc
        finally:
            if not task.done():
                task.cancel()

    def _where(self) -> str:
        if self.endpoint is None:
            return "(no endpoint)"
        return f"{self.endpoint[0]}:{self.endpoint[1]}"

    # -- connection and membership ------------------------------------------------------------------
    async def connect(self) -> None:
        """The first endpoint that answers a status request."""
        errors = []
        for host, port in self.config.endpoints:
            await self.close()
            kwargs: dict[str, Any] = {"host": host, "port": port, "timeout": self.timeout}
            self.client = _TlsClient(self.config.tls, **kwargs) if self.config.tls else aetcd.Client(**kwargs)
            self.endpoint = (host, port)
            try:
                await self._call(self.client.status())
                return
            except StoreError as exc:
                errors.append(str(exc))
        raise StoreError("; ".join(errors) or "no endpoint")

    async def close(self) -> None:
        await self.lag.stop()
        if self.client is not None:
            try:
                await asyncio.wait_for(self.client.close(), self.timeout)
            except Exception:  # noqa: BLE001 - closing a dead channel may fail any way; nothing to do
                pass
            self.client = None

    async def join(self) -> None:
        """This member's key under a lease. A key of our name still alive (a restart within the
        lease's TTL) hands us its lease: its blocks and session keys stay ours, nothing moves.
        Two running balancers must not share a name (docs/scale.md)."""
        key = codec.member_key(self.prefix, self.config.name)
        t = self.client.transactions
        for _ in range(3):
            lease = await self._call(self.client.lease(self.config.lease_ttl))
            ok, _ = await self._call(
                self.client.transaction(
                    compare=[t.create(key) == 0],
                    success=[t.put(key, codec.encode_member(lease.id, self.config.member_label), lease=lease.id)],
                    failure=[],
                )
            )
            if ok:
                self.lease = lease.id
                return
            await self._call(self.client.revoke_lease(lease.id))
            got = await self._call(self.client.get(key))
            record = codec.decode_member(got.value) if got is not None else None
            old = record[0] if record is not None else 0
            if old:
                self.lease = old
                try:
                    if await self.keepalive():
                        self.resumed = True
                        return
                except StoreError:
                    pass
            self.lease = None
            await asyncio.sleep(0.2)  # it expired meanwhile: its keys are going; try again
        raise StoreError(f"member {self.config.name!r}: cannot create its key {key.decode()}")

    async def keepalive(self) -> bool:
        """Refresh the lease; False when etcd says it has expired (its keys are gone)."""
        assert self.lease is not None
        reply = await self._call(self.client.refresh_lease(self.lease))
        return reply is not None and reply.TTL > 0

    async def leave(self) -> None:
        """Revoke the lease: the member's key, its blocks and its sessions' keys go at once, and
        the other members adopt the sessions (docs/scale.md, membership)."""
        if self.lease is not None and self.client is not None:
            await self._call(self.client.revoke_lease(self.lease))
            self.lease = None

    # -- label blocks -------------------------------------------------------------------------------
    async def claim_block(self, index: int) -> bool:
        """Create blocks/INDEX under our lease unless it exists (or is ours already)."""
        assert self.lease is not None
        key = codec.block_key(self.prefix, index)
        t = self.client.transactions
        name = self.config.name.encode()
        ok, _ = await self._call(
            self.client.transaction(
                compare=[t.create(key) == 0], success=[t.put(key, name, lease=self.lease)], failure=[]
            )
        )
        if ok:
            return True
        ok, _ = await self._call(  # ours from before (a rejoin): put it under the new lease
            self.client.transaction(
                compare=[t.value(key) == name], success=[t.put(key, name, lease=self.lease)], failure=[]
            )
        )
        return bool(ok)

    async def claim_reserve(self, index: int) -> bool:
        """blocks/INDEX and reserve/NAME -> INDEX, both without a lease, unless the block exists:
        the reserve stays this member's through an outage longer than its lease (and a restart
        under the same name finds it again)."""
        block, reserve = codec.block_key(self.prefix, index), codec.reserve_key(self.prefix, self.config.name)
        t = self.client.transactions
        name = self.config.name.encode()
        ok, _ = await self._call(
            self.client.transaction(
                compare=[t.create(block) == 0],
                success=[t.put(block, name), t.put(reserve, str(index).encode())],
                failure=[],
            )
        )
        return bool(ok)

    async def release_blocks(self, indexes: list[int], reserve: int | None) -> None:
        """Give blocks up (a graceful leave), each only if it is still ours, and the reserve's
        keys with them."""
        t = self.client.transactions
        name = self.config.name.encode()
        ops: list[Any] = []
        for index in [*indexes, *([reserve] if reserve is not None else [])]:
            key = codec.block_key(self.prefix, index)
            ops.append(t.txn(compare=[t.value(key) == name], success=[t.delete(key)], failure=[]))
        if reserve is not None:
            ops.append(t.delete(codec.reserve_key(self.prefix, self.config.name)))
        for start in range(0, len(ops), MAX_TXN_OPS):
            await self._call(self.client.transaction(compare=[], success=ops[start : start + MAX_TXN_OPS], failure=[]))

    async def member_leases(self) -> dict[str, int]:
        """Every member's lease id (the value of its member key)."""
        got = await self._call(self.client.get_prefix(codec.member_key(self.prefix, "")))
        out = {}
        for kv in got:
            what = codec.parse_key(self.prefix, kv.key)
            record = codec.decode_member(kv.value) if what is not None and what[0] == "member" else None
            if what is not None and record is not None:
                out[what[1]] = record[0]
        return out

    async def hand_over(self, rows: list[ClusterSession], leases: Mapping[str, int]) -> int:
        """Rows of our sessions written with another member as owner, under that member's lease
        (a graceful leave: as an adoption, without waiting for our lease to expire); each only if
        the key still holds our value. The number of transactions."""
        t = self.client.transactions
        ops: list[Any] = []
        keys = []
        for row in rows:
            k = codec.session_key(self.prefix, row.service, row.key)
            put = t.put(k, codec.encode_session(row), lease=leases[row.owner])
            ours = self._written.get(k)
            ops.append(put if ours is None else t.txn(compare=[t.value(k) == ours], success=[put], failure=[]))
            keys.append(k)
        txns = 0
        for start in range(0, len(ops), MAX_TXN_OPS):
            await self._call(self.client.transaction(compare=[], success=ops[start : start + MAX_TXN_OPS], failure=[]))
            txns += 1
        for k in keys:
            self._written.pop(k, None)
        return txns

    # -- the table ------------------------------------------------------------------------------------
    async def load(self) -> TableSnapshot:
        """Members, blocks and sessions in one range read, with its revision."""
        got = await self._call(self.client.get_prefix(self.prefix.encode()))
        members, blocks, rows, damaged, reserves, labels = set(), {}, [], 0, {}, {}
        for kv in got:
            what = codec.parse_key(self.prefix, kv.key)
            if what is None:
                continue
            if what[0] == "member":
                members.add(what[1])
                record = codec.decode_member(kv.value)
                if record is not None and record[1] is not None:
                    labels[what[1]] = record[1]
            elif what[0] == "reserve":
                if kv.value.isdigit():
                    reserves[what[1]] = int(kv.value)
            elif what[0] == "block":
                blocks[int(what[1])] = kv.value.decode(errors="replace")
            else:
                row = codec.decode_session(kv.value)
                if row is None:
                    damaged += 1
                    continue
                rows.append(row)
                if row.owner == self.config.name:
                    self._written[kv.key] = kv.value
        return TableSnapshot(got.header.revision, frozenset(members), blocks, tuple(rows), damaged, reserves, labels)

    async def watch(self, revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under the prefix after `revision`, with the deleted rows' last values."""
        loop = asyncio.get_running_loop()
        for attempt in range(1, MAX_WAITS + 1):
            # aetcd waits for the watch's creation with a deadline on this loop: a late loop
            # gets another try, as in _call.
            asked = loop.time()
            try:
                watch = await self._call(
                    self.client.watch_prefix(self.prefix.encode(), start_revision=revision, prev_kv=True)
                )
                break
            except StoreError as exc:
                stall = self.lag.since(asked)
                if not isinstance(exc.__cause__, aetcd.exceptions.WatchTimeoutError) or stall < STALL:
                    raise
                if attempt == MAX_WAITS:
                    raise
                self._late()
                log.warning(
                    "cluster: the watch's creation timed out while the loop was %.2f s late: trying again",
                    stall,
                    extra={"fields": {"event": "store_deadline_late", "lag": round(stall, 3)}},
                )
        try:
            async for event in watch:
                what = codec.parse_key(self.prefix, event.kv.key)
                if what is None:
                    continue
                deleted = event.kind == "DELETE"
                raw = event.prev_kv.value if deleted and event.prev_kv is not None else event.kv.value
                row = codec.decode_session(raw) if what[0] == "session" and raw else None
                holder = raw.decode(errors="replace") if what[0] == "block" and not deleted else None
                record = codec.decode_member(raw) if what[0] == "member" and not deleted else None
                label = record[1] if record is not None else None
                yield WatchEvent(deleted, what, row, event.kv.mod_revision, holder, label)
        except (aetcd.exceptions.ClientError, grpc.RpcError) as exc:
            raise StoreError(f"etcd {self._where()}: watch: {type(exc).__name__}: {exc}") from exc
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), self.timeout)
            except Exception:  # noqa: BLE001 - the stream may be gone already
                pass

    async def write(self, changes: Mapping[tuple[str, str], ClusterSession | None]) -> int:
        """The rows of our sessions under our lease and the deletes of our ended ones, in one
        transaction per MAX_TXN_OPS keys. A delete only removes the value we wrote last: a key
        another member has since taken over stays. The number of transactions."""
        assert self.lease is not None
        t = self.client.transactions
        ops: list[Any] = []
        written: dict[bytes, bytes | None] = {}
        for (service, key), row in changes.items():
            k = codec.session_key(self.prefix, service, key)
            if row is not None:
                value = codec.encode_session(row)
                ops.append(t.put(k, value, lease=self.lease))
                written[k] = value
            elif k in self._written:
                ops.append(t.txn(compare=[t.value(k) == self._written[k]], success=[t.delete(k)], failure=[]))
                written[k] = None
        txns = 0
        for start in range(0, len(ops), MAX_TXN_OPS):
            await self._call(self.client.transaction(compare=[], success=ops[start : start + MAX_TXN_OPS], failure=[]))
            txns += 1
        for k, v in written.items():
            if v is None:
                self._written.pop(k, None)
            else:
                self._written[k] = v
        return txns
