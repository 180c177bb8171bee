"""The balancer's decision core: pure, no I/O. It takes events and the time and returns dataplane
operations and packet verdicts (as FRR's zebra separates its RIB from dataplane providers).

First packets, per batch: analyse -> find the service -> derive the session key -> existing
session: accept; new one: admission -> schedule -> labels -> operations. The daemon applies the
operations in one netlink batch, then `commit` turns the provider's results into verdicts: a
packet is accepted only after its session's objects are in the kernel, and a session whose
objects failed is rolled back, its packet dropped, nothing left half-programmed.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field, replace
from typing import Mapping, Protocol, Sequence

from orchestrator import ipproto
from orchestrator.analyze.keys import SessionKey, SessionKeyKind, ipv6_iid, key_value, session_key
from orchestrator.analyze.packet import Malformed, Packet, analyze
from orchestrator.config.model import BalancerConfig, LabelAllocation, Server, ServerFailure, Service, StoreDown
from orchestrator.core.events import (
    Action,
    FirstPacket,
    FlowKey,
    FlowsEnded,
    FlowsStarted,
    FlowTableResync,
    PacketVerdict,
)
from orchestrator.core.failover import Failover, Outcome, relabelled, replacement
from orchestrator.core.health import HealthEvent, HealthState, HealthView, apply_health
from orchestrator.core.label_blocks import BlockAllocator, BlockLayout
from orchestrator.core.labels import LabelAllocator
from orchestrator.core.remote import ClusterSession, RemoteDelete, RemotePut
from orchestrator.core.schedulers import Scheduler, ServerState, key_hash, make_scheduler
from orchestrator.core.servers import AdminState, ServerAdmin
from orchestrator.core.sessions import ANSWERED, KNOWN, NOT_TAKEN, FlowsNow, Session, SessionTable, State
from orchestrator.dataplane import handles, ops, records
from orchestrator.dataplane.ops import Operation, OpResult

FLOWER_PROTOS = frozenset(ipproto.BY_NAME)  # every service protocol has a flower ip_proto key
PREF_IPV4, PREF_IPV6 = 10, 11  # the kernel keeps one protocol per filter priority
PREF_ESP = 12  # cls_u32 nodes of esp-spi sessions, both families (protocol all): one classifier per priority too
PREF_LIVENESS = (
    13  # label-aware sessions' liveness filters (protocol mpls_uc), ingress of clients.label_aware_interfaces
)

# Session keys whose value is the client's address itself (session_of_flow finds the session of
# a flow by it: Balancer._adopt_started's inlined case).
_KEYED_BY_ADDRESS = frozenset({SessionKeyKind.CLIENT_IP, SessionKeyKind.MIP6_HOME_ADDRESS, SessionKeyKind.ESP_SPI})


class Ports(Protocol):
    """What `_add_client` reads of a session's first packet (a remote session gives its own)."""

    @property
    def sport(self) -> int | None: ...

    @property
    def dport(self) -> int | None: ...


@dataclass(frozen=True)
class _RemotePorts:
    sport: int | None
    dport: int | None


@dataclass
class Undo:
    """A session of an earlier batch as it was before this batch re-keyed it: a failed re-key
    puts it back and removes only what the re-key added."""

    clients: list[str]
    objects: list[ops.DataplaneObject]
    state: State
    ends_at: float | None
    flows: list[FlowKey] = field(default_factory=list)  # flows the re-keying packets added


@dataclass
class Plan:
    """Operations for one batch of first packets, and what each packet waits for."""

    ops: list[ops.Operation] = field(default_factory=list)
    # Session id -> the slices of `ops` that are its own: a session re-keyed later in the batch
    # than other sessions' packets has more than one, and is judged by its own operations only.
    groups: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    rekeyed: set[int] = field(default_factory=set)  # sessions of earlier batches that got a new client address
    undo: dict[int, Undo] = field(default_factory=dict)  # those sessions before their re-key
    # Fast-path element adds per session, kept out of `ops`: commit releases those of sessions
    # whose objects all got in (Commit.admit), so no element admits flows past a failed filter.
    elements: dict[int, list[Operation]] = field(default_factory=dict)
    # In packet order: each verdict, and the session whose objects it waits for (None: final).
    verdicts: list[tuple[int | None, PacketVerdict]] = field(default_factory=list)

    def settled(self, results: Sequence[OpResult]) -> list[PacketVerdict] | None:
        """The verdicts when every operation got in: then they are the planned ones, as
        `Balancer.commit` would give them, known before it books the batch (the daemon sends
        them first: a first packet waits for its objects only). None: some failed, and
        `commit` judges."""
        if not all(r.ok for r in results):
            return None
        return [v for _, v in self.verdicts]


@dataclass(frozen=True)
class Commit:
    verdicts: tuple[PacketVerdict, ...]
    cleanup: tuple[ops.Operation, ...]  # deletes of what a failed session did get installed
    failures: tuple[str, ...]
    # The fast-path elements of the sessions (and re-keys) whose objects all got in: applied
    # after `plan.ops` and the verdicts, so an element never exists for a session that failed.
    admit: tuple[ops.Operation, ...] = ()


class Shape:
    """A session's kernel objects as they follow from its row and the configuration in force when
    they were made (one Shape per configuration, shared by its sessions): the builders
    `Balancer._add_client` uses, and `objects`, which makes a single-client session's objects
    again, so the session need not store them (issue 15: memory per session). A reload makes a
    new Shape; sessions made before keep theirs, so what they derive is what was installed."""

    def __init__(self, config: BalancerConfig, transport: Mapping[str, int]) -> None:
        self.config = config
        self.transport = dict(transport)
        self.services = {svc.name: svc for svc in config.services}
        self.fabric = config.interfaces.fabric[0]
        self.offload = config.interfaces.offload_of(self.fabric)
        self._strings: dict[str, str] = {}
        self._hops: dict[ops.NextHop, ops.NextHop] = {}

    def filters(
        self, session: Session, client: str, n: int, ports: Sequence[int | None], sport: int | None, tag: bytes
    ) -> list[ops.FlowerFilter]:
        """The C2S filters of the session's `n`th client address, one per port."""
        host = 32 if ":" not in client else 128
        vip_host = 32 if ":" not in session.vip else 128
        proto = session.protocol if session.protocol in FLOWER_PROTOS else None
        push = ops.push_stack((self.transport[session.server], session.c2s))
        dst = self.intern(f"{session.vip}/{vip_host}")
        out = []
        for i, port in enumerate(ports):
            match = ops.FlowerMatch(
                src=f"{client}/{host}",
                dst=dst,
                ip_proto=proto,
                dst_port=port if proto else None,
                src_port=sport if proto else None,
            )
            handle = handles.filter_handle(session.c2s, n * len(ports) + i)
            out.append(
                ops.FlowerFilter(
                    self.fabric,
                    handle,
                    match,
                    push,
                    pref=PREF_IPV6 if host == 128 else PREF_IPV4,
                    tag=tag,
                    offload=self.offload,
                )
            )
        return out

    def s2c_route(self, session: Session, client: str, hop: ops.NextHop) -> ops.MplsRoute:
        """The S2C label route towards `client` through `hop`: it pops the label, or swaps S2C
        for S2C for a label-aware client."""
        aware = self.config.clients.is_label_aware(client)
        return ops.MplsRoute(session.s2c, hop.dev, via=hop.via or client, out_labels=(session.s2c,) if aware else ())

    def intern(self, text: str) -> str:
        """One string object for texts every session repeats (the VIP's prefix)."""
        return self._strings.setdefault(text, text)

    def next_hop(self, hop: ops.NextHop) -> ops.NextHop:
        """One object per next hop, shared by the sessions behind it."""
        return self._hops.setdefault(hop, hop)

    def c2s_route(self, session: Session) -> ops.MplsRoute:
        """The C2S label route of a label-aware client's session: the labelled packets its client
        agent sends, [C2S], leave into the fabric as [server transport, C2S], like the packets the
        C2S filter labels. Only the clients.label_aware_interfaces take MPLS input."""
        return ops.MplsRoute(
            session.c2s,
            self.fabric,
            via=str(self.config.interfaces.fabric_next_hop),
            out_labels=(self.transport[session.server], session.c2s),
        )

    def objects(self, session: Session) -> list[ops.DataplaneObject]:
        """A single-client session's objects, in `_add_client`'s order."""
        assert session.hop is not None and len(session.clients) == 1
        svc = self.services[session.service]
        client = session.clients[0]
        five = session.key.kind == SessionKeyKind.FIVE_TUPLE
        ports: tuple[int | None, ...] = (session.port,) if five else (svc.ports or (None,))
        tag = records.pack(Balancer._record(session))
        out: list[ops.DataplaneObject] = [
            *self.filters(session, client, 0, ports, session.sport if five else None, tag)
        ]
        out.append(self.s2c_route(session, client, session.hop))
        if self.config.clients.is_label_aware(client):
            out.append(self.c2s_route(session))
        out += Balancer.fast_elements(session, svc, client)
        return out


class Balancer:
    config: BalancerConfig

    def __init__(self, config: BalancerConfig, now: float) -> None:
        self.table = SessionTable()
        self.counters: collections.Counter[str] = collections.Counter()
        self.admin = ServerAdmin()  # the operator's drain and weights
        self.health = HealthView()  # the latest health checks: every server unknown until then
        self._schedulers: dict[str, Scheduler] = {}
        # Pairs in hold-down whose S2C label is routed to the hold marker (dataplane.records):
        # C2S -> when the hold-down ends and the marker is deleted.
        self.markers: dict[int, float] = {}
        self.u32_nodes: set[int] = set()  # the u32 nodes our ESP filters hold (dataplane.handles)
        # Embryonic sessions by deadline: (embryonic_until, session id); entries of sessions that
        # ended or were answered meanwhile are skipped when they come up.
        self._embryonic: list[tuple[float, int]] = []
        # Liveness checks of label-aware sessions by when they are due: (label_check_at, session
        # id); entries whose session ended or was rescheduled meanwhile are skipped.
        self._liveness: list[tuple[float, int]] = []
        # Draining sessions by end: (ends_at, session id), and hold markers by end: (until, C2S),
        # so that a tick costs what is due, not a walk of the table (issue 15: 500,000 sessions).
        # Entries whose session or marker changed since are skipped when they come up.
        self._draining: list[tuple[float, int]] = []
        self._marker_ends: list[tuple[float, int]] = []
        # Cluster mode (config.cluster): the shared table's changes this balancer owes it, by
        # (service, key): the session to write, None to delete (taken by the daemon, see
        # take_changes); and whether the store answers (new sessions follow when_store_down).
        self.changes: dict[tuple[str, str], Session | None] = {}
        self.store_up = True
        self.leaving = False  # a graceful leave began: no new session, no takeover
        # The S2C labels of other members' blocks routed to their owner until a session's row
        # arrives (records.forward_route): block -> its owner's member label, and block ->
        # S2C -> the route in the kernel (`forward_blocks`).
        self.forward_labels: dict[int, int] = {}
        self.forwarding: dict[int, dict[int, ops.MplsRoute]] = {}
        # A conntrack sweep under way (sweep_begins .. its SweepResync done): the flows that
        # started or ended since its dump began, which the dump's older picture must not undo.
        self._sweep_changed: set[FlowKey] | None = None
        self._unreported: set[FlowKey] | None = None  # flows only sweeps saw (swept_flows); None: no full sweep yet
        self.configure(config, now)

    # -- configuration ---------------------------------------------------------------------
    def configure(self, config: BalancerConfig, now: float) -> None:
        """Apply a (re)loaded configuration; sessions in the table are kept as they are."""
        old_kinds = {svc.name: svc.scheduler for svc in self.config.services} if hasattr(self, "config") else {}
        blocks = None
        if config.labels.allocation == LabelAllocation.SERVER_BLOCKS:
            blocks = {s.name: s.label_block for p in config.pools for s in p.servers if s.label_block}
        block_size = config.cluster.label_block if config.cluster is not None else None
        shape = (config.labels.range, tuple(sorted((blocks or {}).items())), config.labels.hold_down, block_size)
        if shape != getattr(self, "_label_shape", None):
            # A new pool; the pairs of sessions in the table stay theirs.
            old = getattr(self, "labels", None)
            held = old.held_blocks if isinstance(old, BlockAllocator) else ()
            self.labels: LabelAllocator | BlockAllocator
            if block_size is not None:
                self.labels = BlockAllocator(
                    BlockLayout(config.labels.range[0], config.labels.range[1], block_size), config.labels.hold_down
                )
                for index in held:
                    if index < self.labels.layout.count:
                        self.labels.add_block(index)
            else:
                self.labels = LabelAllocator(
                    config.labels.range[0], config.labels.range[1], config.labels.hold_down, blocks
                )
            for session in self.table:
                self.labels.claim(session.c2s, session.server)
            for c2s in self.markers:  # held down again from now in the new pool
                self.labels.hold(c2s, now)
            self._label_shape = shape
        self.config = config
        self.servers: dict[str, Server] = {s.name: s for p in config.pools for s in p.servers}
        self.pools = {p.name: p for p in config.pools}
        self._by_name = {svc.name: svc for svc in config.services}
        self.services: dict[tuple[str, int, int | None], Service] = {}
        for svc in config.services:
            for port in svc.ports or (None,):
                self.services[(str(svc.vip), ipproto.BY_NAME[str(svc.protocol.value)], port)] = svc
        # A service keeps its scheduler's state (rr position, maglev table) across a reload
        # unless the reload changes which scheduler it uses.
        self._schedulers = {
            svc.name: self._schedulers[svc.name]
            if svc.name in self._schedulers and old_kinds.get(svc.name) == svc.scheduler
            else self._new_scheduler(svc)
            for svc in config.services
        }
        self.transport = {name: s.transport_label for name, s in self.servers.items()}
        self._shape = Shape(config, self.transport)
        self.admin.configure({name: s.weight for name, s in self.servers.items()})

    def _new_scheduler(self, svc: Service) -> Scheduler:
        """Maglev sized for the whole pool, so its table keeps one size whatever the weights
        (weight 0 leaves a server out): a weight change then moves only the entries it must."""
        if svc.scheduler.value == "maglev":
            return make_scheduler("maglev", capacity=len(self.pools[svc.pool].servers))
        return make_scheduler(svc.scheduler.value)

    def scheduler(self, service: str) -> Scheduler:
        return self._schedulers[service]

    def service_of(self, session: Session) -> Service | None:
        """The session's service, None once a reload removed it."""
        return self._by_name.get(session.service)

    def weight(self, server: str) -> int:
        """The weight in force: the operator's, else the configuration's."""
        return self.admin.weight(server, self.servers[server].weight)

    # -- the operator's commands (core.commands checks their arguments first) -------------------
    def set_admin(self, server: str, state: AdminState) -> AdminState:
        """Drain or enable a known server; the state it had before."""
        previous = self.admin.state(server)
        self.admin.set_state(server, state)
        return previous

    def set_weight(self, server: str, weight: int) -> None:
        """The operator's weight for a known server, until a reload changes its configured one."""
        self.admin.set_weight(server, self.servers[server].weight, weight)

    def sessions(self) -> list[Session]:
        """A snapshot of the table: callers may end sessions while they walk it."""
        return list(self.table)

    def session_count(self, service: str | None = None, server: str | None = None) -> int:
        return self.table.count(service=service, server=server)

    # -- first packets -----------------------------------------------------------------------
    def on_packets(self, packets: Sequence[FirstPacket], now: float) -> Plan:
        plan = Plan()
        for first in packets:
            self.counters["packets_userspace"] += 1
            verdict, session_id = self._packet(first, now, plan)
            plan.verdicts.append((session_id, verdict))
        return plan

    def _packet(self, first: FirstPacket, now: float, plan: Plan) -> tuple[PacketVerdict, int | None]:
        def verdict(action: Action, reason: str = "", refuse_with: str | None = None) -> PacketVerdict:
            return PacketVerdict(first.queue, first.packet_id, action, refuse_with, reason)

        info = analyze(first.data)
        if isinstance(info, Malformed):
            self.counters[f"malformed:{info.reason}"] += 1
            return verdict(Action.DROP, f"malformed {info.reason}"), None
        svc = self.services.get((info.dst, info.proto, info.dport)) or self.services.get((info.dst, info.proto, None))
        if svc is None:
            self.counters["no_service"] += 1
            return verdict(Action.DROP, "no service"), None
        key = session_key(info, svc.session_key)
        flow = FlowKey(info.proto, info.src, self._shape.intern(info.dst), info.sport, info.dport)  # dst: a VIP
        session = self.table.get(svc.name, key.value)
        # Answers go to the client through the balancer's own route to it. Without one the
        # client cannot be answered (a refusal could not reach it either): no session, no objects.
        needs_route = session is None or not session.has_client(key.client)
        if needs_route and first.next_hop is None:
            self.counters["no_route"] += 1
            return verdict(Action.DROP, f"no route to client {key.client}"), None
        if session is not None:
            if needs_route and (
                (len(session.clients) + 1) * self._filters_per_client(session, svc) > handles.FILTERS_PER_SESSION
                or self._by_spi(key)
                and self._free_node() is None
            ):
                self.counters["no_filter_handle"] += 1
                return verdict(
                    Action.DROP, f"session {session.id} has no filter handle left for client {key.client}"
                ), None
            if needs_route and session.id not in plan.groups:  # first re-key of an earlier session
                plan.undo[session.id] = Undo(
                    list(session.clients), list(session.objects), session.state, session.ends_at
                )
            self._add_flow(session, flow, now)
            session.packets_userspace += 1
            self._take_over(session)
            # The kernel's fast path admits a session's later flows from the addresses it knows;
            # a new address of the session (its key matched beyond the address) came here instead.
            if needs_route:
                self.counters[f"fastpath_unmatched:{key.kind}"] += 1
            elif key.kind != SessionKeyKind.FIVE_TUPLE:  # there: the same flow again, no element
                self.counters["fastpath_late"] += 1
            if needs_route and first.next_hop is not None:  # a mobile client's new care-of address
                undo = plan.undo.get(session.id)
                if undo is not None:
                    undo.flows.append(flow)
                self._rekey(session, svc, info, key, first.next_hop, plan)
                return verdict(Action.ACCEPT), session.id  # it waits for its new filter
            if session.state == State.OPENING:
                return verdict(Action.ACCEPT), session.id
            return verdict(Action.ACCEPT), None
        assert first.next_hop is not None
        if self._by_spi(key) and self._free_node() is None:
            self.counters["no_filter_handle"] += 1
            return verdict(Action.DROP, f"no u32 node left for an ESP session of {key.client}"), None
        refusal = self._admit(svc)
        server = None if refusal else self._schedule(svc, key, now)
        if refusal is None and server is None:
            refusal = "no-server"
        local = self.local_policy()
        if local:
            # etcd is away (when_store_down: local): a pair of the reserve, which no other member
            # can hand out; none left is refused as `refuse` would (the pool's headroom is not
            # the reserve's business: the reserve is this member's alone).
            assert isinstance(self.labels, BlockAllocator)
            c2s = None if refusal else self.labels.allocate_reserved(server, now)  # type: ignore[arg-type]
            if refusal is None and c2s is None:
                refusal = "store-down"
        else:
            # Headroom: the labels left free after this session's pair must not drop below the
            # minimum. No pair free at all is exhaustion, whatever the minimum (counted below).
            free = 0 if refusal else self.labels.free(server if self.labels.blocks else None, now=now)
            if refusal is None and free > 0 and 2 * (free - 1) < svc.admission.min_free_labels:
                refusal = "label-headroom"
            c2s = None if refusal else self.labels.allocate(server, now)  # type: ignore[arg-type]
            if refusal is None and c2s is None:
                refusal = "labels-exhausted"
        if refusal:
            self.counters[f"refused:{refusal}"] += 1
            return verdict(Action.REFUSE, refusal, str(svc.admission.refuse_with.value)), None
        assert server is not None and c2s is not None
        session = Session(
            id=self.table.new_id(),
            service=svc.name,
            key=key,
            vip=self._shape.intern(str(svc.vip)),
            protocol=self._shape.intern(str(svc.protocol.value)),
            port=info.dport,
            server=server,
            c2s=c2s,
            created=now,
            last_seen=now,
            sport=info.sport,
            packets_userspace=1,
        )
        timeout = self.config.sessions.embryonic_timeout
        # A label-aware client's later packets come under its C2S label route, past the C2S filter
        # the check counts: those clients are trusted edges (design.md), their sessions never embryonic.
        if timeout is not None and session.protocol == "tcp" and not self.config.clients.is_label_aware(key.client):
            session.embryonic_until = now + timeout
            heapq.heappush(self._embryonic, (session.embryonic_until, session.id))
        start = len(plan.ops)
        # Its objects are made before it joins the table: until then it holds its fields itself,
        # which its many reads and writes here find faster than in the table's columns.
        self._add_client(session, svc, info, key.client, first.next_hop, plan)
        self.table.add(session)
        self._add_flow(session, flow, now)
        plan.groups[session.id] = [(start, len(plan.ops))]
        self.counters["sessions_started"] += 1
        if local:
            self.counters["sessions_local"] += 1
        return verdict(Action.ACCEPT), session.id

    def _admit(self, svc: Service) -> str | None:
        """Admission control judges only new sessions: refuse rather than degrade those served."""
        if self.leaving:
            return "leaving"  # a graceful leave: the other members take the new sessions
        if self.config.cluster is not None and not self.store_up and not self.local_policy():
            return "store-down"  # cluster.when_store_down: refuse
        limit = svc.admission.max_sessions
        if limit is not None and self.table.count(service=svc.name) >= limit:
            return "service-full"
        return None

    def server_states(self, svc: Service, now: float) -> list[ServerState]:
        """The pool as the scheduler sees it: a server is available unless its weight is 0, an
        operator drains it, it holds max_sessions, its label block is used up, or its health
        check says it is down in this pool; its measured response time comes with it."""
        out = []
        for s in self.pools[svc.pool].servers:
            sessions = self.table.count(server=s.name)
            weight = self.weight(s.name)
            available = (
                weight > 0
                and s.name not in self.admin.draining
                and (s.max_sessions is None or sessions < s.max_sessions)
                and (not self.labels.blocks or self.labels.free(s.name, now=now) > 0)
            )
            out.append(ServerState(s.name, weight, sessions, None, available))
        return apply_health(out, svc.pool, self.health)

    def pick(self, svc: Service, key: str, now: float) -> str | None:
        return self._schedulers[svc.name].pick(key, self.server_states(svc, now))

    def _schedule(self, svc: Service, key: SessionKey, now: float) -> str | None:
        return self.pick(svc, key.value, now)

    def _add_client(
        self, session: Session, svc: Service, info: Ports, client: str, hop: ops.NextHop, plan: Plan
    ) -> None:
        """Objects that bring `client`'s packets into the session: the C2S imposition filter(s) on
        the fabric link and the S2C label route towards the balancer's next hop to the client (the
        client itself when on-link, else the gateway, on the device of that route). The route pops
        the label; for a label-aware client it swaps S2C for S2C, so the answer still carries it.
        A session's first client's objects are not stored when the Shape derives exactly them."""
        shape = self._shape
        n = len(session.clients)
        objects = session.materialize()
        session.add_client(client)
        five = session.key.kind == SessionKeyKind.FIVE_TUPLE
        ports: tuple[int | None, ...] = (info.dport,) if five else (svc.ports or (None,))
        tag = records.pack(self._record(session))
        if self._by_spi(SessionKey(session.key.kind, session.key.value, client)):
            # flower has no SPI key: a u32 node matches source, VIP and SPI.
            node = self._free_node()
            assert node is not None  # _packet checked
            self.u32_nodes.add(node)
            spi = int(session.key.value[len("spi:") :], 16)
            u32 = ops.U32Filter(
                shape.fabric,
                handles.u32_handle(node),
                ops.esp_keys(client, session.vip, spi),
                ops.push_stack((shape.transport[session.server], session.c2s)),
                pref=PREF_ESP,
                tag=tag,
            )
            plan.ops.append(ops.Add(u32))
            objects.append(u32)
            ports = ()
        for flt in shape.filters(session, client, n, ports, info.sport if five else None, tag):
            plan.ops.append(ops.Add(flt))
            objects.append(flt)
        route = shape.s2c_route(session, client, hop)
        # Replace: the session's own route (a re-key), or the hold marker of a pair whose
        # hold-down ended before the tick deleted the marker.
        # A forwarding route to the pair's owner (another member's block) is replaced likewise.
        forwarded = self._unforward(session.c2s)
        plan.ops.append(
            ops.Replace(route) if n or self.markers.pop(session.c2s, None) is not None or forwarded else ops.Add(route)
        )
        objects[:] = [o for o in objects if not (isinstance(o, ops.MplsRoute) and o.label == session.s2c)]
        objects.append(route)
        aware = self.config.clients.is_label_aware(client)
        if aware and hop.dev in self.config.clients.label_aware_interfaces:
            # Its client's labelled packets arrive there and are switched past conntrack: the
            # liveness filter counts them, so the session lives while they come (liveness_due).
            live = self.liveness_filter(session, hop.dev)
            if live not in objects:
                plan.ops.append(ops.Add(live))
                objects.append(live)
        c2s_route = shape.c2s_route(session)
        if aware and c2s_route not in objects:
            # The client agent labels the session's later packets [C2S]: switched on that alone.
            plan.ops.append(ops.Replace(c2s_route))
            objects.append(c2s_route)
        for element in self.fast_elements(session, svc, client):
            plan.elements.setdefault(session.id, []).append(ops.Add(element))
            objects.append(element)
        if n == 0 and ports:  # an ESP session's u32 node is not derived
            session.derive(shape, shape.next_hop(hop))

    def c2s_route(self, session: Session) -> ops.MplsRoute:
        """The C2S label route of a label-aware client's session (see Shape.c2s_route)."""
        return self._shape.c2s_route(session)

    def liveness_filter(self, session: Session, dev: str) -> ops.FlowerFilter:
        """The liveness filter of a label-aware session on `dev` (one of
        clients.label_aware_interfaces): ingress, `mpls_label C2S`, act_gact pass. It changes
        nothing of the packet's way (af_mpls switches it after tc ingress); its action counts
        the [C2S] packets the client agent sends, which the balancer's conntrack never sees."""
        return ops.FlowerFilter(
            dev,
            handles.filter_handle(session.c2s, 0),
            ops.FlowerMatch(mpls_label=session.c2s),
            (ops.Pass(),),
            direction=ops.Direction.INGRESS,
            pref=PREF_LIVENESS,
            offload=self.config.interfaces.offload_of(dev),
        )

    @staticmethod
    def liveness_filters(session: Session) -> list[ops.FlowerFilter]:
        return [o for o in session.objects if isinstance(o, ops.FlowerFilter) and _is_liveness(o)]

    @staticmethod
    def fast_elements(session: Session, svc: Service, client: str) -> list[ops.FastPathElement]:
        """The fast-path set elements that let the kernel admit `client`'s new flows to the
        session (the ruleset's rule for the service looks them up, see
        capture.nftables.fast_path_match): one per service port, one for a service without
        ports, the SPI for an esp-spi session. None for five-tuple: each flow is a session."""
        kind = session.key.kind
        if kind == SessionKeyKind.FIVE_TUPLE or session.protocol not in FLOWER_PROTOS:
            return []
        if kind == SessionKeyKind.ESP_SPI and session.protocol == "esp" and session.key.value.startswith("spi:"):
            return [ops.FastPathElement(client, session.vip, "esp", spi=int(session.key.value[4:], 16))]
        if session.protocol == "esp" or not svc.ports:
            return [ops.FastPathElement(client, session.vip, session.protocol)]
        return [ops.FastPathElement(client, session.vip, session.protocol, port) for port in svc.ports]

    @staticmethod
    def _by_spi(key: SessionKey) -> bool:
        """Is this an ESP session told apart by its SPI (a u32 filter, either family)?"""
        return key.kind == SessionKeyKind.ESP_SPI and key.value.startswith("spi:")

    def _free_node(self) -> int | None:
        """The lowest u32 node no filter of ours holds (None: all 4095 are taken)."""
        return next((n for n in range(1, handles.U32_NODES + 1) if n not in self.u32_nodes), None)

    def _forget(self, objects: Sequence[ops.DataplaneObject]) -> None:
        """The u32 nodes of filters that leave the kernel are free again."""
        for o in objects:
            if isinstance(o, ops.U32Filter):
                self.u32_nodes.discard(handles.u32_node(o.handle))

    @staticmethod
    def _record(session: Session) -> records.SessionRecord:
        """What the session's filters carry for a restart (dataplane.records): its id, key kind
        and port, and the key material their match cannot hold."""
        kind, value = session.key.kind, session.key.value
        home = value if kind == SessionKeyKind.MIP6_HOME_ADDRESS and ":" in value else None
        spi = int(value[len("spi:") :], 16) if kind == SessionKeyKind.ESP_SPI and value.startswith("spi:") else None
        return records.SessionRecord(session.id, str(kind), session.port, home, spi)

    @staticmethod
    def _filters_per_client(session: Session, svc: Service) -> int:
        """C2S filters each client address of the session takes (see `_add_client`)."""
        return 1 if session.key.kind == SessionKeyKind.FIVE_TUPLE else len(svc.ports) or 1

    def _rekey(
        self, session: Session, svc: Service, info: Packet, key: SessionKey, hop: ops.NextHop, plan: Plan
    ) -> None:
        """Same home address, new care-of address: same server, same labels; answers now go to
        the new address. The old address's filter stays until the session ends."""
        self.counters["rekeyed"] += 1
        if session.id not in plan.groups:
            plan.rekeyed.add(session.id)
        start = len(plan.ops)
        self._add_client(session, svc, info, key.client, hop, plan)
        plan.groups.setdefault(session.id, []).append((start, len(plan.ops)))

    def commit(self, plan: Plan, results: Sequence[ops.OpResult], now: float) -> Commit:
        """The provider's results for `plan.ops` decide the waiting packets' verdicts."""
        failed: dict[int, list[str]] = {}
        cleanup: list[ops.Operation] = []
        admit: list[ops.Operation] = []
        for session_id, slices in plan.groups.items():
            group = [r for start, end in slices for r in results[start:end]]
            bad = [str(r) for r in group if not r.ok]
            if not bad:
                session = self.table.by_id(session_id)
                if session is not None and session.state == State.OPENING:
                    self.table.set_state(session, State.SERVING)
                if session is not None:
                    self._publish(session)
                admit += plan.elements.get(session_id, [])
                continue
            failed[session_id] = bad
            session = self.table.by_id(session_id)
            undo = plan.undo.get(session_id)
            if undo is not None and session is not None:
                cleanup += self._undo_rekey(session, undo, group, now)
                continue
            # A new session: what did get in goes (a route that replaced a hold marker too), and
            # its pair is free at once: no packet of it can be in flight.
            cleanup += [self._vacate(r.op.obj) for r in group if r.ok and isinstance(r.op, (ops.Add, ops.Replace))]
            if session is not None:
                self.counters["sessions_failed"] += 1
                self.table.remove(session)
                self._forget(session.objects)
                self.labels.release(session.c2s, now, hold_down=False)
        verdicts = [
            v
            if session_id not in failed
            else PacketVerdict(
                v.queue, v.packet_id, Action.DROP, None, "programming failed: " + "; ".join(failed[session_id])
            )
            for session_id, v in plan.verdicts
        ]
        for v in verdicts:
            self.counters[f"verdict:{v.action}"] += 1
        return Commit(tuple(verdicts), tuple(cleanup), tuple(x for f in failed.values() for x in f), tuple(admit))

    def _undo_rekey(
        self, session: Session, undo: Undo, group: Sequence[ops.OpResult], now: float
    ) -> list[ops.Operation]:
        """A re-key whose operations failed: the session goes back to what it was (clients,
        objects, state); its new filters that did get in are deleted and its S2C route, if it was
        replaced, points back to the previous next hop. Nothing else of the session is touched."""
        self.counters["rekeys_failed"] += 1
        old_routes = {o.label: o for o in undo.objects if isinstance(o, ops.MplsRoute)}
        out: list[ops.Operation] = []
        for r in reversed(group):
            if not r.ok:
                continue
            if isinstance(r.op, ops.Add):
                out.append(ops.Delete(r.op.obj))
            elif isinstance(r.op, ops.Replace) and isinstance(r.op.obj, ops.MplsRoute):
                previous = old_routes.get(r.op.obj.label)
                out.append(ops.Replace(previous) if previous is not None else ops.Delete(r.op.obj))
        for flow in undo.flows:
            self._end_flow(flow)
        self._forget([o for o in session.objects if o not in undo.objects])
        session.clients, session.objects = undo.clients, undo.objects
        if not session.flows and undo.state == State.DRAINING and undo.ends_at is not None:
            self._drain(session, undo.ends_at)
        return list(dict.fromkeys(out))  # one S2C restore even after several re-keys

    # -- flows and time -------------------------------------------------------------------------
    def on_flow_events(self, events: Sequence[FlowsStarted | FlowsEnded | FlowTableResync], now: float) -> None:
        for event in events:
            if isinstance(event, FlowsStarted):
                self._adopt_started(event.flows, now)
                continue
            if isinstance(event, FlowsEnded):
                ended = event.flows
            else:
                self.counters["conntrack_sweeps" if event.sweep else "conntrack_resyncs"] += 1
                known = set(self.table.flows())
                ended = tuple(f for f in known if f not in event.live)
                adopted = set()
                for flow in event.live - known:  # fast-path flows whose start events were lost
                    if self._adopt(flow, now):
                        adopted.add(flow)
                if event.sweep:
                    self.swept_flows(event.live, adopted)
            for flow in ended:
                self.end_swept(flow, now)

    def _adopt_started(self, flows: Sequence[FlowKey], now: float) -> None:
        """`_adopt` of each flow of a FlowsStarted (issue 15: one per flow the kernel's fast path
        admits), its common cases inlined: a flow the table knows (the daemon saw it start), and
        a flow of a session keyed by its client's address that this balancer owns, whose
        adoption only adds the flow to the table; its counter is bumped once per batch. Any
        other flow takes `_adopt` (the same state, tests/unit/test_adopt_fast_path.py)."""
        take = self.table.take
        services = self.services
        changed = self._sweep_changed
        adopted = answered = 0
        for flow in flows:
            svc = services.get((flow.dst, flow.proto, flow.dport)) or services.get((flow.dst, flow.proto, None))
            taken = take(svc.name if svc is not None and svc.session_key in _KEYED_BY_ADDRESS else None, flow, now)
            if taken == KNOWN:
                continue
            if taken == NOT_TAKEN:
                self._adopt(flow, now)
                continue
            if changed is not None:
                changed.add(flow)
            adopted += 1
            answered += taken == ANSWERED
        if adopted:
            self.counters["flows_fast_path"] += adopted
        if answered:
            self.counters["embryonic_answered"] += answered

    def _add_flow(self, session: Session, flow: FlowKey, now: float) -> None:
        self.table.add_flow(session, flow, now)
        if self._sweep_changed is not None:
            self._sweep_changed.add(flow)

    def _end_flow(self, flow: FlowKey) -> Session | None:
        if self._sweep_changed is not None:
            self._sweep_changed.add(flow)
        return self.table.end_flow(flow)

    def sweep_begins(self) -> None:
        """A conntrack sweep's dump begins (the daemon takes it off the loop): from now until its
        resync is done, flows that start or end are noted, so that the dump, older than they
        are, neither ends the ones that started nor revives the ones that ended."""
        self._sweep_changed = set()

    def sweep_resync(self, live: frozenset[FlowKey]) -> SweepResync:
        """The sweep's dump found `live`: the flows it ends and adopts, as a SweepResync that
        the daemon runs a slice at a time between other work of its loop."""
        self.counters["conntrack_sweeps"] += 1
        return SweepResync(self, live, self.table.flows_now(), self._sweep_changed or set())

    def sweep_done(self) -> None:
        self._sweep_changed = None

    def swept_flows(self, live: frozenset[FlowKey], adopted: set[FlowKey]) -> None:
        """A full sweep found `live` and adopted `adopted` into sessions: flows no event reported.
        With `nf_conntrack_events` 2 (the default since Linux 5.19) an entry made while no
        listener existed (before the daemon started, or restarted) never reports its end: a full
        sweep is the only way to see it go. They are kept until a full sweep no longer finds
        them (`full_sweeps_needed`)."""
        if self._unreported is None:
            self._unreported = set(adopted)
        else:
            self._unreported = {f for f in self._unreported if f in live} | adopted

    def full_sweeps_needed(self) -> bool:
        """Whether periodic full sweeps must go on: before the first one, and while a flow that
        no event reported is live (`swept_flows`). Once every live flow of ours came with its
        new-flow event, its end comes as a destroy event, and a lost event is an ENOBUFS (a
        resync at once): the kernel's expiry passes are enough."""
        return self._unreported is None or bool(self._unreported)

    def end_swept(self, flow: FlowKey, now: float) -> None:
        """A flow of the table that a sweep did not find: it ended; its session drains when it
        was its last."""
        session = self._end_flow(flow)
        if session is not None and not session.flows and session.state != State.CLOSING:
            self._drain(session, now + self._persistence(session), now)

    def _check_liveness(self, session: Session, at: float) -> None:
        session.label_check_at = at
        heapq.heappush(self._liveness, (at, session.id))

    def adopt(self, flow: FlowKey, now: float) -> bool:
        """A live flow a sweep found (SweepResync): the session of its client takes it, unless
        it is known. Whether it did."""
        return self._adopt(flow, now)

    def _adopt(self, flow: FlowKey, now: float) -> bool:
        """A tagged flow the daemon did not see start: the kernel's fast path admitted it, so it
        belongs to the session of its client address, and keeps that session alive. Whether a
        session took it (False: known already, or no session's)."""
        if self.table.by_flow(flow) is not None:
            return False
        session = self.session_of_flow(flow)
        if session is None:
            return False
        self._add_flow(session, flow, now)
        self._take_over(session)
        self.counters["flows_fast_path"] += 1
        if session.embryonic_until is not None:  # the flow's first packet went through its filter
            session.embryonic_until = None
            self.counters["embryonic_answered"] += 1
        return True

    def session_of_flow(self, flow: FlowKey) -> Session | None:
        """The session whose fast-path element admits `flow`: of the flow's service, with the
        flow's source among its client addresses. Found by key where the address gives the key;
        mip6-home-address and esp-spi sessions (keyed by what conntrack does not record) are
        looked for among the service's sessions."""
        svc = self.services.get((flow.dst, flow.proto, flow.dport)) or self.services.get((flow.dst, flow.proto, None))
        if svc is None or svc.session_key == SessionKeyKind.FIVE_TUPLE:
            return None
        value = ipv6_iid(flow.src) if svc.session_key == SessionKeyKind.IPV6_IID and ":" in flow.src else flow.src
        session = self.table.get(svc.name, value)
        if session is not None and session.has_client(flow.src):
            return session
        if svc.session_key in (SessionKeyKind.MIP6_HOME_ADDRESS, SessionKeyKind.ESP_SPI):
            return next((s for s in self.table if s.service == svc.name and s.has_client(flow.src)), None)
        return None

    def fast_path_sync(self, installed: Sequence[ops.Installed] | None) -> list[ops.Operation]:
        """After the ruleset was (re)loaded, which empties the fast-path sets, or after a restart:
        the operations that make the sets hold exactly the elements of the sessions in the table
        (`installed`: what a dump of them shows), and each session's objects name its elements,
        so its end deletes them. A session whose service a reload removed gets none.
        `installed` None: a restart that kept the sets as they were (the kernel held the ruleset
        it would load, and the restore deleted no filter), not read back (the kernel dumps a set
        in time quadratic in its size): every element of the table's sessions is put in with
        Replace, which leaves one that is there as it is, and none is deleted. None can be stale:
        the provider adds a session's elements after its filters and deletes them before them,
        so whatever a crash interrupted, an element in a set has its session's filter in the
        kernel, and so its session in the restored table."""
        wanted: dict[tuple[object, ...], ops.FastPathElement] = {}
        for session in self.table:
            svc = self.service_of(session)
            mine = [e for client in session.clients for e in self.fast_elements(session, svc, client)] if svc else []
            current = session.objects
            if not any(isinstance(o, ops.FastPathElement) for o in current):  # as a restore leaves them
                if mine:
                    session.objects = [*current, *mine]
            else:
                keys = {e.key for e in mine}
                kept = [o for o in current if not isinstance(o, ops.FastPathElement) or o.key in keys]
                kept += [e for e in mine if e not in kept]
                if kept != current:  # a derived session's objects stay derived when they hold
                    session.objects = kept
            wanted.update((e.key, e) for e in mine)
        if installed is None:
            return [ops.Replace(e) for e in wanted.values()]
        present = {i.obj.key: i.obj for i in installed if isinstance(i.obj, ops.FastPathElement)}
        sync: list[ops.Operation] = [ops.Delete(e) for key, e in present.items() if key not in wanted]
        return sync + [ops.Add(e) for key, e in wanted.items() if key not in present]

    def _persistence(self, session: Session) -> float:
        """The persistence timeout of the session's service; a service a reload removed keeps
        none, so its sessions end as soon as their last flow has."""
        svc = self._by_name.get(session.service)
        return svc.persistence_timeout if svc is not None else 0.0

    def _drain(self, session: Session, ends_at: float, now: float | None = None) -> None:
        """The session's last flow has gone: it ends at `ends_at` unless a flow comes first. A
        label-aware session with a liveness filter is checked instead (given `now`: its count
        then, read at the next tick, and again when the persistence has passed; liveness_due,
        on_liveness)."""
        self.table.set_state(session, State.DRAINING)
        session.ends_at = ends_at
        heapq.heappush(self._draining, (ends_at, session.id))
        if now is not None and session.owner is None and self.liveness_filters(session):
            session.label_packets = None
            self._check_liveness(session, now)

    def _requeue(self, session: Session) -> None:
        """A draining session that became ours (adopted, taken over, moved): its end is due
        again (its entry was dropped while another member owned it)."""
        if session.state == State.DRAINING and session.ends_at is not None:
            heapq.heappush(self._draining, (session.ends_at, session.id))

    def tick(self, now: float) -> list[ops.Operation]:
        """Sessions whose persistence timeout has passed end: all their objects are deleted and
        their labels go back to the pool after the hold-down."""
        return self.expire(now)[0]

    def expire(self, now: float) -> tuple[list[ops.Operation], list[Session]]:
        """`tick`, and the sessions it ended (the daemon logs them). It costs what is due: the
        draining sessions and hold markers come off their heaps in end order; an entry whose
        session has since served again, drained again (a later entry) or ended is dropped."""
        out: list[ops.Operation] = []
        ended: list[Session] = []
        while self._draining and self._draining[0][0] <= now:
            ends_at, session_id = heapq.heappop(self._draining)
            session = self.table.by_id(session_id)
            if session is None or session.state != State.DRAINING or session.ends_at != ends_at:
                continue
            if session.owner is not None:
                continue  # another member's: it ends when its key leaves the shared table (_requeue)
            if session.label_check_at is not None:
                continue  # a label-aware session: its liveness check ends it (on_liveness)
            out += self.end(session, now, "persistence timeout")
            ended.append(session)
        while self._marker_ends and self._marker_ends[0][0] <= now:
            until, c2s = heapq.heappop(self._marker_ends)
            if self.markers.get(c2s) != until:
                continue  # replaced by a session's route, or held down again later
            del self.markers[c2s]  # the hold-down is over: the pair's marker goes
            out.append(ops.Delete(records.hold_marker(c2s + 1)))
        return out, ended

    def _mark(self, c2s: int, until: float) -> None:
        """The pair's hold marker stays until `until`."""
        self.markers[c2s] = until
        heapq.heappush(self._marker_ends, (until, c2s))

    # -- label-aware sessions' liveness ------------------------------------------------------------
    def liveness_due(self, now: float) -> dict[int, tuple[ops.FlowerFilter, ...]]:
        """Label-aware sessions whose liveness check is due, each with its liveness filters: the
        daemon asks the kernel how many packets went through them and hands the counts to
        `on_liveness`. Their later packets come labelled [C2S] and never reach the balancer's
        conntrack, so their first flow's entry (and with it the session's flows) ends while the
        client still sends: the filter's count tells. One request per due session, never a
        dump of every filter."""
        due: dict[int, tuple[ops.FlowerFilter, ...]] = {}
        while self._liveness and self._liveness[0][0] <= now:
            at, session_id = heapq.heappop(self._liveness)
            session = self.table.by_id(session_id)
            if session is None or session.label_check_at != at:
                continue  # ended, or checked at another time since
            filters = tuple(self.liveness_filters(session))
            if session.flows or session.owner is not None or not filters:
                session.label_check_at = None  # its flows decide again (a new drain checks anew)
                self._requeue(session)  # a draining one ends by its persistence again
                continue
            due[session_id] = filters
        return due

    def on_liveness(
        self,
        due: Mapping[int, Sequence[ops.FlowerFilter]],
        counts: Sequence[int | None],
        now: float,
    ) -> tuple[list[ops.Operation], list[Session]]:
        """`counts`: the packets that went through each filter of `due` (as `liveness_due`
        returned it), in that order; None where the kernel could not say. A session's first
        check (as it drains) only reads its count. At the next, a persistence timeout later:
        a count that moved keeps it `serving` (its client sent [C2S] meanwhile), checked again
        a persistence timeout later; a count that did not ends it, reason `persistence
        timeout`. A count the kernel cannot give keeps it and checks again later
        (`liveness_unchecked`): never end a session that may be in use. Returns the operations
        and the sessions ended."""
        out: list[ops.Operation] = []
        ended: list[Session] = []
        at = 0
        for session_id, filters in due.items():
            got = counts[at : at + len(filters)]
            at += len(filters)
            session = self.table.by_id(session_id)
            if session is None or session.label_check_at is None:
                continue
            persistence = self._persistence(session)
            self.counters["liveness_checks"] += 1
            if any(c is None for c in got) or len(got) != len(filters):
                self.counters["liveness_unchecked"] += 1
                self._check_liveness(session, now + persistence)
                continue
            count = sum(c for c in got if c is not None)
            if session.label_packets is None:  # the count as it drained: judged after its persistence
                session.label_packets = count
                if session.state == State.DRAINING:
                    session.ends_at = now + persistence
                self._check_liveness(session, now + persistence)
                continue
            if count != session.label_packets:  # (a filter replaced since counts from 0: kept too)
                session.label_packets = count
                self.table.set_state(session, State.SERVING)
                session.ends_at, session.last_seen = None, now
                self.counters["liveness_kept"] += 1
                self._check_liveness(session, now + persistence)
                continue
            session.label_check_at = None
            self.counters["liveness_ended"] += 1
            out += self.end(session, now, "persistence timeout")
            ended.append(session)
        return out, ended

    # -- embryonic sessions ------------------------------------------------------------------------
    def embryonic_due(self, now: float) -> dict[int, tuple[ops.FlowerFilter | ops.U32Filter, ...]]:
        """TCP sessions whose embryonic timeout has passed, each with its C2S filters: the daemon
        asks the kernel how many packets went through them and hands the counts to
        `on_embryonic`. The balancer's conntrack never sees a reply (answers come back under S2C
        labels, past netfilter), so the client's own packets tell: its first packet goes through
        a filter once; a handshake completed (or any later packet, a new flow of the session)
        makes it twice or more. A spoofed SYN never gets there."""
        due: dict[int, tuple[ops.FlowerFilter | ops.U32Filter, ...]] = {}
        while self._embryonic and self._embryonic[0][0] <= now:
            until, session_id = heapq.heappop(self._embryonic)
            session = self.table.by_id(session_id)
            if session is None or session.embryonic_until != until:
                continue  # ended, or answered, since
            due[session_id] = tuple(o for o in session.objects if isinstance(o, (ops.FlowerFilter, ops.U32Filter)))
        return due

    def on_embryonic(
        self,
        due: Mapping[int, Sequence[ops.FlowerFilter | ops.U32Filter]],
        counts: Sequence[int | None],
        now: float,
    ) -> tuple[list[ops.Operation], list[Session]]:
        """`counts`: the packets that went through each filter of `due` (as `embryonic_due`
        returned it), in that order; None where the kernel could not say. Two or more over a
        session's filters and it is answered; fewer and it ends as any session does (objects
        deleted, pair held down), reason `embryonic timeout`. A session whose filters' counts are
        all unknown is kept (`embryonic_unchecked`): never end a session that may be in use.
        Returns the operations and the sessions ended."""
        out: list[ops.Operation] = []
        ended: list[Session] = []
        at = 0
        for session_id, filters in due.items():
            known = [c for c in counts[at : at + len(filters)] if c is not None]
            at += len(filters)
            session = self.table.by_id(session_id)
            if session is None or session.embryonic_until is None:
                continue
            if not known or sum(known) >= 2:
                session.embryonic_until = None
                self.counters["embryonic_answered" if known else "embryonic_unchecked"] += 1
                continue
            out += self.end(session, now, "embryonic timeout")
            ended.append(session)
        return out, ended

    def embryonic_count(self) -> int:
        """Sessions still embryonic: those of the deadline heap (a walk of it, not of the table)."""
        return sum(
            1
            for until, session_id in self._embryonic
            if (s := self.table.by_id(session_id)) is not None and s.embryonic_until == until
        )

    def end(self, session: Session, now: float, reason: str) -> list[ops.Operation]:
        """The session leaves the table, its pair goes to hold-down; the deletes of its filters and
        the S2C route replaced by the pair's hold marker (kept in the kernel until the hold-down
        ends, so a restart holds the pair down again)."""
        self.table.remove(session)
        self._forget(session.objects)
        if self.config.cluster is not None and session.owner is None:
            self.changes[(session.service, session.key.value)] = None
        self.counters["sessions_ended"] += 1
        self.counters[f"ended:{reason}"] += 1
        out: list[ops.Operation] = [
            ops.Delete(o)
            for o in reversed(session.objects)
            if not (isinstance(o, ops.MplsRoute) and o.label == session.s2c)
        ]
        return out + self._hold(session.c2s, now)

    def _hold(self, c2s: int, now: float) -> list[ops.Operation]:
        """Release a pair into hold-down, with its marker in the kernel; a pair of another
        member's block gets its forwarding route to that member back instead (its owner holds
        the pair down)."""
        self.labels.release(c2s, now)
        route = self._forward(c2s)
        if route is not None:
            return [ops.Replace(route)]
        self._mark(c2s, now + self.labels.hold_down)
        return [ops.Replace(records.hold_marker(c2s + 1))]

    def drop_markers(self) -> list[ops.Operation]:
        """The deletes of every hold marker and forwarding route (a shutdown that removes all of
        its objects)."""
        out: list[ops.Operation] = [ops.Delete(records.hold_marker(c2s + 1)) for c2s in self.markers]
        out += [ops.Delete(r) for routes in self.forwarding.values() for r in routes.values()]
        self.markers.clear()
        self.forwarding.clear()
        self.forward_labels.clear()
        return out

    # -- forwarding to the owner of another member's block (cluster mode) ---------------------------
    def forward_blocks(self, owners: Mapping[int, int]) -> list[list[ops.Operation]]:
        """`owners`: every label block another member holds whose holder's member label is known,
        with that label. Each S2C label of those blocks without a session here is routed to the
        holder (records.forward_route), so an answer under a session made there a moment ago
        reaches it before the session's row arrives here; blocks no longer in `owners` (released,
        held here now, their holder gone) lose those routes. One batch of operations per block
        that changed (nothing for a block as it is, e.g. after an exact restore)."""
        if not isinstance(self.labels, BlockAllocator):
            return []
        layout = self.labels.layout
        fabric = self.config.interfaces.fabric[0]
        via = str(self.config.interfaces.fabric_next_hop)
        in_use: set[int] | None = None
        batches: list[list[ops.Operation]] = []
        for index in sorted(set(owners) | set(self.forward_labels) | set(self.forwarding)):
            label = owners.get(index)
            if index in self.forward_labels and label == self.forward_labels[index]:
                continue
            if label is None and index not in self.forwarding:
                self.forward_labels.pop(index, None)
                continue
            if in_use is None:
                in_use = {s.c2s for s in self.table}
            current = self.forwarding.pop(index, {})
            wanted: dict[int, ops.MplsRoute] = {}
            if label is not None and index < layout.count:
                lo, hi = layout.bounds(index)
                for c2s in range(lo, hi, 2):
                    if c2s not in in_use:
                        wanted[c2s + 1] = records.forward_route(c2s + 1, label, fabric, via)
            batch: list[ops.Operation] = [ops.Delete(r) for s2c, r in current.items() if s2c not in wanted]
            for s2c, route in wanted.items():
                if current.get(s2c) != route:
                    self.markers.pop(s2c - 1, None)  # a marker of ours there: overwritten
                    batch.append(ops.Replace(route))
            if wanted:
                self.forwarding[index] = wanted
                self.forward_labels[index] = label  # type: ignore[assignment]
            else:
                self.forward_labels.pop(index, None)
            if batch:
                batches.append(batch)
        self.counters["forward_routes"] = sum(len(r) for r in self.forwarding.values())
        return batches

    def _block(self, c2s: int) -> int | None:
        return self.labels.layout.block_of(c2s) if isinstance(self.labels, BlockAllocator) else None

    def _unforward(self, c2s: int) -> bool:
        """The pair's S2C label leaves the forwarding routes (a session takes it); was it one?"""
        index = self._block(c2s)
        if index is None or self.forwarding.get(index, {}).pop(c2s + 1, None) is None:
            return False
        self.counters["forward_routes"] -= 1
        return True

    def _forward(self, c2s: int) -> ops.MplsRoute | None:
        """The forwarding route the pair's S2C label gets back when its session here ends (its
        block another member's, with that member's label known), now counted as installed."""
        index = self._block(c2s)
        label = self.forward_labels.get(index) if index is not None else None
        if index is None or label is None:
            return None
        route = records.forward_route(
            c2s + 1, label, self.config.interfaces.fabric[0], str(self.config.interfaces.fabric_next_hop)
        )
        routes = self.forwarding.setdefault(index, {})
        if c2s + 1 not in routes:
            self.counters["forward_routes"] += 1
        routes[c2s + 1] = route
        return route

    def _vacate(self, obj: ops.DataplaneObject) -> ops.Operation:
        """The cleanup of an object a failed new session got in: deleted, except an S2C route of
        a forwarded pair, which gets its forwarding route back."""
        if isinstance(obj, ops.MplsRoute) and obj.label % 2 == 0:
            route = self._forward(obj.label - 1)
            if route is not None:
                return ops.Replace(route)
        return ops.Delete(obj)

    def count(self, event: str, n: int = 1) -> None:
        """An event the daemon saw around the core (a failed batch, conntrack errors), counted
        with the core's own so status and metrics report them together."""
        self.counters[event] += n

    def sessions_by_state(self) -> dict[str, int]:
        return self.table.by_state()

    # -- health -----------------------------------------------------------------------------------
    def on_health(self, view: HealthView, events: Sequence[HealthEvent], now: float) -> Failover:
        """The latest health view (new sessions avoid servers it says are down, the response-time
        scheduler reads its times); each server that went down takes its sessions with it as
        their services' `on_server_failure` says."""
        self.health = view
        plan = Failover()
        for event in events:
            if event.new is HealthState.DOWN:
                self._fail_over(event.pool, event.server, now, plan)
        return plan

    def _fail_over(self, pool: str, server: str, now: float, plan: Failover) -> None:
        """Every session on `server` of a service of `pool` follows its service's policy (see
        core.failover): reassigned to another server with a new pair, else reset."""
        for session in self.table.on_server(server):
            svc = self.service_of(session)
            if svc is None or svc.pool != pool or session.server != server or session.owner is not None:
                continue  # another member's session: its owner moves it, this one follows the table
            reason = f"server {server} down"
            if svc.on_server_failure is ServerFailure.REASSIGN:
                target = self.pick(svc, session.key.value, now)
                c2s = self.labels.allocate(target, now) if target is not None else None
                if target is not None and c2s is not None:
                    self._move(session, target, c2s, now, plan, reason)
                    continue
                reason += ": no other server available" if target is None else f": no label pair for {target}"
            plan.outcomes.append(
                Outcome(session.id, session.service, session.key.value, server, session.c2s, "reset", reason=reason)
            )
            plan.ops += self.end(session, now, "server down")

    def _move(self, session: Session, target: str, c2s: int, now: float, plan: Failover, reason: str) -> None:
        old_server, old_c2s, old = session.server, session.c2s, list(session.objects)
        new = relabelled(old, old_c2s, c2s, self.transport[target])
        self.table.reassign(session, target, c2s)
        session.objects = new
        start = len(plan.ops)
        steps = replacement(old, new)
        if self.markers.pop(c2s, None) is not None:  # the new pair's marker is overwritten
            steps = [
                ops.Replace(op.obj)
                if isinstance(op, ops.Add) and isinstance(op.obj, ops.MplsRoute) and op.obj.label == c2s + 1
                else op
                for op in steps
            ]
        # The old pair's S2C route becomes its hold marker instead of going.
        hold = self._hold(old_c2s, now)
        plan.ops += [
            hold[0]
            if isinstance(op, ops.Delete) and isinstance(op.obj, ops.MplsRoute) and op.obj.label == old_c2s + 1
            else op
            for op in steps
        ]
        plan.groups[session.id] = (start, len(plan.ops))
        if session.owner is not None:  # the member that moves it owns it from now on
            session.owner = None
            self._requeue(session)
        self._publish(session)
        self.counters["sessions_reassigned"] += 1
        plan.outcomes.append(
            Outcome(
                session.id, session.service, session.key.value, old_server, old_c2s, "reassign", target, c2s, reason
            )
        )

    def commit_failover(self, plan: Failover, results: Sequence[ops.OpResult], now: float) -> list[ops.Operation]:
        """A move whose batch failed in part leaves its session half on the new server: it ends,
        and whatever of its new objects did get in is deleted."""
        cleanup: list[ops.Operation] = []
        for session_id, (start, end) in plan.groups.items():
            group = results[start:end]
            if all(r.ok for r in group):
                continue
            session = self.table.by_id(session_id)
            cleanup += [ops.Delete(r.op.obj) for r in reversed(group) if r.ok and isinstance(r.op, ops.Add)]
            if session is not None:
                self._forget(session.objects)  # its u32 nodes, deleted or never added
                session.objects = []
                self.end(session, now, "reassign failed")
        return cleanup

    # -- restart ----------------------------------------------------------------------------------
    def restore(self, installed: Sequence[ops.Installed], live: frozenset[FlowKey], now: float) -> list[ops.Operation]:
        """Rebuild the session table from our kernel objects after a restart (the kernel is the
        source of truth). A C2S filter names its session's pair by handle (dataplane.handles), its
        client and VIP by match, its server by transport label, and carries the session's record
        (dataplane.records): id, key kind, port and the key material the match cannot hold; so
        every session comes back with its id, key, labels and server. Filters without a record
        (an older version's) are keyed from their source address. A session's S2C route is our
        route at label C2S + 1, whatever its form: pop, or swap to itself (a label-aware
        client), to the client or its gateway. A hold marker at a label no session has holds its
        pair down again, the timer restarted. Flows come from a conntrack dump. Objects that
        belong to no session (no service or server any more, a pair out of range, a route
        without its session) are deleted; u32 nodes of an earlier layout are made again in this
        one."""
        by_transport = {s.transport_label: name for name, s in self.servers.items()}
        routes = {i.obj.label: i.obj for i in installed if isinstance(i.obj, ops.MplsRoute)}
        stale: list[ops.Operation] = []
        filters: list[tuple[records.SessionRecord | None, ops.FlowerFilter | ops.U32Filter]] = []
        liveness: list[ops.Installed] = []
        for i in installed:  # one pass: a restart's dump holds 100,000 filters and as many routes
            obj = i.obj
            if isinstance(obj, (ops.FlowerFilter, ops.U32Filter)):
                if _is_liveness(obj):
                    liveness.append(i)
                else:
                    filters.append((records.unpack(obj.tag), obj))
        # Recorded sessions first (their ids are taken), each session's filters in handle order
        # (the order its client addresses came in: their indexes go on from there).
        filters.sort(key=lambda rf: (rf[0] is None, isinstance(rf[1], ops.U32Filter), rf[1].handle))
        for record, flt in filters:
            session = self._restore_filter(record, flt, by_transport, now)
            if session is None:
                stale.append(ops.Delete(flt))
                continue
            session.objects.append(flt)
            client = _filter_client(flt)
            if isinstance(flt, ops.U32Filter):
                self.u32_nodes.add(handles.u32_node(flt.handle))
            if not session.has_client(client):
                session.add_client(client)
        for session in self.table:  # the S2C route, then the C2S route, as _add_client leaves them
            route = routes.get(session.s2c)
            if route is not None and not records.is_hold_marker(route):
                session.objects.append(routes.pop(session.s2c))
            if any(self.config.clients.is_label_aware(c) for c in session.clients) and routes.get(
                session.c2s
            ) == self.c2s_route(session):
                session.objects.append(routes.pop(session.c2s))
        stale += self._restore_liveness(liveness)
        # Each live flow joins the first session (in table order) of its client and VIP that
        # takes it: an index by (client, VIP), so the flows cost one lookup each, not a table
        # scan. A five-tuple session takes only its own flow (its key is the flow's five-tuple):
        # joined to a sibling, it would drain and end while its flow lives.
        by_pair: dict[tuple[str, str], list[Session]] = {}
        for session in self.table:
            for client in session.clients:
                by_pair.setdefault((client, session.vip), []).append(session)
        for flow in live:
            for session in by_pair.get((flow.src, flow.dst), ()):
                if session.key.kind != SessionKeyKind.FIVE_TUPLE or session.key.value == key_value(
                    SessionKeyKind.FIVE_TUPLE,
                    6 if ":" in flow.src else 4,
                    flow.proto,
                    flow.src,
                    flow.sport,
                    flow.dst,
                    flow.dport,
                ):
                    self._add_flow(session, flow, now)
                    break
        for session in self.table:
            if not session.flows:
                counted = session.label_packets
                self._drain(session, now + self._persistence(session), now)
                if counted is not None:  # the dump's count: judged after its persistence
                    session.label_packets = counted
                    self._check_liveness(session, now + self._persistence(session))
            else:
                self.table.set_state(session, State.SERVING)
                session.label_packets = None
        claimed = {s.s2c for s in self.table}
        for label, route in routes.items():
            if label in claimed:
                continue
            if records.is_hold_marker(route) and label % 2 == 0 and self.labels.hold(label - 1, now):
                self._mark(label - 1, now + self.labels.hold_down)
                continue
            index = self._block(label - 1) if label % 2 == 0 else None
            if records.is_forward_route(route) and index is not None:
                # Ours, to another member's block: kept as it is until the blocks are known
                # (forward_blocks keeps, replaces or deletes it then).
                self.forwarding.setdefault(index, {})[label] = route
                continue
            stale.append(ops.Delete(route))
        self.counters["restored_sessions"] = len(self.table)
        self.counters["restored_hold_downs"] = len(self.markers)
        return stale + self._migrate_u32()

    def _restore_liveness(self, installed: Sequence[ops.Installed]) -> list[ops.Operation]:
        """Each liveness filter joins the session of its C2S label when it is exactly the one
        that session would have there (a label-aware client's, on a label-aware interface);
        the session's baseline is the count the dump gave. The others are deleted."""
        by_c2s = {s.c2s: s for s in self.table}
        stale: list[ops.Operation] = []
        counts: dict[int, list[int | None]] = {}
        for item in installed:
            flt = item.obj
            assert isinstance(flt, ops.FlowerFilter)
            session = by_c2s.get(flt.match.mpls_label or 0)
            if (
                session is None
                or flt in session.objects
                or flt != self.liveness_filter(session, flt.dev)
                or flt.dev not in self.config.clients.label_aware_interfaces
                or not any(self.config.clients.is_label_aware(c) for c in session.clients)
            ):
                stale.append(ops.Delete(flt))
                continue
            session.objects.append(flt)
            counts.setdefault(session.id, []).append(item.packets)
        for session_id, got in counts.items():
            session = self.table.by_id(session_id)
            if session is not None and all(c is not None for c in got):
                session.label_packets = sum(c for c in got if c is not None)
        return stale

    def _migrate_u32(self) -> list[ops.Operation]:
        """Restored u32 nodes of the IPv4-only layout (protocol ip) move to the protocol-all
        classifier, or no new ESP session could join their pref (the kernel keeps one protocol
        per pref). All of them go first, so their classifier goes with the last and the new one
        gets the root table 800: again; each session's packets pass unlabelled only between."""
        old = [(s, o) for s in self.table for o in s.objects if isinstance(o, ops.U32Filter) and o.protocol != "all"]
        adds: list[ops.Operation] = []
        for session, node in old:
            new = replace(node, protocol="all")
            session.objects[session.objects.index(node)] = new
            adds.append(ops.Add(new))
        if old:
            self.counters["u32_nodes_migrated"] += len(old)
        return [ops.Delete(node) for _, node in old] + adds

    def _restore_filter(
        self,
        record: records.SessionRecord | None,
        flt: ops.FlowerFilter | ops.U32Filter,
        by_transport: dict[int, str],
        now: float,
    ) -> Session | None:
        """The session one of our C2S filters belongs to, made on its first filter; None when it
        fits no service or server of the configuration, or contradicts the session it names."""
        pushes = [a.label for a in flt.actions if isinstance(a, ops.MplsPush)]
        if flt.direction != ops.Direction.EGRESS or len(pushes) != 2:
            return None
        src_port = dst_port = spi = None
        if isinstance(flt, ops.U32Filter):  # an ESP session's node: its C2S is the label it pushes
            esp = ops.esp_of(flt.keys)
            if esp is None or record is None or record.spi != esp[2]:
                return None
            client, vip, spi = esp
            proto, c2s = ipproto.IPPROTO_ESP, pushes[0]
        else:
            if flt.match.mpls_label is not None:
                return None
            client = (flt.match.src or "").split("/")[0]
            vip = (flt.match.dst or "").split("/")[0]
            proto = ipproto.BY_NAME.get(flt.match.ip_proto or "", 0)
            src_port, dst_port, c2s = flt.match.src_port, flt.match.dst_port, handles.handle_c2s(flt.handle)
            spi = record.spi if record else None
        svc = self.services.get((vip, proto, dst_port)) or self.services.get((vip, proto, None))
        server = by_transport.get(pushes[-1])
        if svc is None or server is None or pushes[0] != c2s or not client:
            return None
        kind = (_KEY_KINDS.get(record.kind) or SessionKeyKind(record.kind)) if record is not None else svc.session_key
        value = key_value(
            kind,
            6 if ":" in client else 4,
            proto,
            client,
            src_port,
            vip,
            dst_port,
            record.home if record else None,
            spi,
        )
        session = self.table.by_id(record.session_id) if record is not None else self.table.get(svc.name, value)
        if session is not None:
            same = (session.service, session.key.value, session.c2s, session.server) == (svc.name, value, c2s, server)
            return session if same else None
        if self.table.get(svc.name, value) is not None or not self.labels.claim(c2s, server):
            return None
        port = record.port if record is not None and record.port is not None else dst_port
        session = Session(
            id=record.session_id if record is not None else self.table.new_id(),
            service=svc.name,
            key=SessionKey(kind, value, client),
            vip=vip,
            protocol=str(svc.protocol.value),
            port=port,
            server=server,
            c2s=c2s,
            created=now,
            last_seen=now,
            state=State.SERVING,
        )
        self.table.add(session)
        return session

    # -- cluster mode (config.cluster; docs/scale.md) ------------------------------------------------
    def _publish(self, session: Session) -> None:
        """A session of ours changed (started, re-keyed, moved, taken over): the shared table
        gets it with the next write."""
        if self.config.cluster is not None and session.owner is None:
            self.changes[(session.service, session.key.value)] = session

    def local_policy(self) -> bool:
        """etcd is away and new sessions take pairs of the reserve (when_store_down: local)."""
        cluster = self.config.cluster
        return cluster is not None and not self.store_up and cluster.when_store_down is StoreDown.LOCAL

    def _take_over(self, session: Session) -> None:
        """Another member's session whose flows now come through this balancer (ECMP moved its
        client, or its owner died): this balancer owns it from now on, so its end follows the
        flows seen here. Not while leaving: its sessions go to the others, never back."""
        if session.owner is not None and not self.leaving:
            session.owner = None
            self.counters["cluster_taken_over"] += 1
            self._requeue(session)
            self._publish(session)

    def take_changes(self) -> dict[tuple[str, str], ClusterSession | None]:
        """What the shared table must learn since the last call: each changed session of ours as
        a row (None: its key goes). The daemon writes them all in one transaction."""
        out = {k: None if s is None else self.cluster_row(s) for k, s in self.changes.items()}
        self.changes.clear()
        return out

    def owned(self) -> list[ClusterSession]:
        """Every session this balancer owns, as rows (re-written after the store's return)."""
        return [self.cluster_row(s) for s in self.table if s.owner is None]

    def cluster_row(self, session: Session) -> ClusterSession:
        assert self.config.cluster is not None
        return ClusterSession(
            session.service,
            str(session.key.kind),
            session.key.value,
            tuple(session.clients) or (session.key.client,),
            session.vip,
            session.protocol,
            session.port,
            session.sport,
            session.server,
            session.c2s,
            session.owner or self.config.cluster.name,
        )

    def hand_over(self, members: Sequence[str]) -> list[ClusterSession]:
        """A graceful leave: every session of ours goes to one of `members` (the highest random
        weight of its key: spread evenly, the same choice on a retry), as an adoption after our
        lease's expiry would, without waiting for it. Their kernel objects stay here, as another
        member's session's do; the rows (owner: the new one) are for the writer. `leaving` must
        be set: no session comes back to us by a takeover."""
        assert self.leaving and members
        rows = []
        for session in self.table:
            if session.owner is not None:
                continue
            key = f"{session.service}/{session.key.value}"
            session.owner = max(members, key=lambda m: key_hash(f"{m}/{key}", b"mplsorch-leave"))
            self.changes.pop((session.service, session.key.value), None)
            rows.append(self.cluster_row(session))
            self.counters["cluster_handed_over"] += 1
        return rows

    def release_label_blocks(self) -> None:
        """Every block given up (a graceful leave, after `hand_over`): their pairs in use are
        other members' sessions' from now on."""
        assert isinstance(self.labels, BlockAllocator)
        self.labels.drop_blocks()

    def add_label_block(self, index: int) -> None:
        """A label block this balancer now holds in the shared table."""
        assert isinstance(self.labels, BlockAllocator)
        self.labels.add_block(index)
        self.counters["label_blocks_claimed"] += 1

    def on_remote(self, events: Sequence[RemotePut | RemoteDelete], now: float, plan: Plan | None = None) -> Plan:
        """The shared table's changes: another member's session gets its kernel objects here
        too (C2S filters, S2C route, fast-path elements, under its server and labels), so its
        client's packets may come through either balancer; a deleted key ends it here; an
        orphaned one (its owner's lease went) is adopted. `commit` settles the plan as for
        first packets (no verdicts). `plan`: to add to (a new one without)."""
        plan = Plan() if plan is None else plan
        assert self.config.cluster is not None
        me = self.config.cluster.name
        for event in events:
            if isinstance(event, RemoteDelete):
                session = self.table.get(event.service, event.key)
                if session is None:
                    continue
                if session.owner is None and event.owner != me and not event.orphaned:
                    continue  # a stale delete of a key this balancer has since written
                if self.leaving and event.orphaned and session.owner is not None:
                    continue  # an orphan while we leave: the members that stay adopt it
                if event.orphaned or session.owner is None:
                    # Its owner's lease expired (the owner died, or this balancer's own lease
                    # lapsed while the store was away): the session lives on, owned here.
                    session.owner = None
                    self.counters["cluster_adopted"] += 1
                    self._requeue(session)
                    self._publish(session)
                    continue
                self.counters["cluster_remote_ended"] += 1
                plan.ops += self.end(session, now, "ended elsewhere")
                continue
            self._remote_put(event, me, now, plan)
        return plan

    def _remote_put(self, event: RemotePut, me: str, now: float, plan: Plan) -> None:
        row = event.session
        owner = None if row.owner == me else row.owner
        svc = self._by_name.get(row.service)
        session = self.table.get(row.service, row.key)
        if session is not None and (session.server, session.c2s) == (row.server, row.c2s):
            if owner is not None and session.owner is None:
                self.counters["cluster_handed_over"] += 1  # its flows moved to the other member
            handed = owner is None and session.owner is not None
            if handed:
                session.owner = None
                self._requeue(session)
            session.owner = owner
            if handed:
                # Another member wrote it as ours (its graceful leave): written again, so that
                # our own write (and later our delete) holds the key.
                self.counters["cluster_received"] += 1
                self._publish(session)
            for client in row.clients:  # a re-key written by its owner
                hop = event.hops.get(client)
                if svc is not None and not session.has_client(client) and hop is not None:
                    start = len(plan.ops)
                    self._add_client(session, svc, _RemotePorts(row.sport, row.port), client, hop, plan)
                    plan.groups.setdefault(session.id, []).append((start, len(plan.ops)))
            return
        if owner is None:
            return  # our own write echoed, of a session since ended or replaced here
        if session is not None and session.owner is None and me < owner:
            # Both made it at once (the client reached both before either write): the same rule
            # on every member, whatever order the writes arrive in: the lower member name's
            # version stays. Ours: written again, so the table ends with it.
            self.counters["cluster_race_kept"] += 1
            self._publish(session)
            return
        if session is not None:  # the other member's version won the race, or its owner moved it
            self.counters["cluster_replaced"] += 1
            plan.ops += self.end(session, now, "replaced by the shared table")
            self.changes.pop((row.service, row.key), None)
        if svc is None or row.server not in self.servers:
            self.counters["cluster_unknown"] += 1  # another configuration's service or server
            return
        if not self.labels.claim(row.c2s, row.server):
            self.counters["cluster_label_conflict"] += 1
            return
        hops = [(c, event.hops[c]) for c in row.clients if c in event.hops]
        if not hops:
            self.labels.release(row.c2s, now, hold_down=False)
            self.counters["no_route"] += 1
            return
        session = Session(
            id=self.table.new_id(),
            service=row.service,
            key=SessionKey(SessionKeyKind(row.kind), row.key, row.clients[0]),
            vip=row.vip,
            protocol=row.protocol,
            port=row.port,
            server=row.server,
            c2s=row.c2s,
            created=now,
            last_seen=now,
            sport=row.sport,
            owner=owner,
        )
        self.table.add(session)
        start = len(plan.ops)
        for client, hop in hops:  # a hold marker of the pair here is replaced (_add_client)
            self._add_client(session, svc, _RemotePorts(row.sport, row.port), client, hop, plan)
        plan.groups[session.id] = [(start, len(plan.ops))]
        self.counters["cluster_remote_sessions"] += 1

    def remote_sync(self, rows: Sequence[RemotePut], now: float, keep_ours: bool = True) -> Plan:
        """The whole shared table (at start, and when the store is back): other members'
        sessions it no longer holds end here, the rest as `on_remote`. Sessions of ours it lacks
        are written again (`keep_ours`), or end: at a start that resumed this member's lease, a
        session restored from the kernel but absent from the table is another member's that
        ended while this one was down (ours would still be there under the lease)."""
        keys = {(p.session.service, p.session.key) for p in rows}
        gone = [
            RemoteDelete(s.service, s.key.value, s.owner)
            for s in self.table
            if s.owner is not None and (s.service, s.key.value) not in keys
        ]
        # A session of ours that the table holds under another member with another pair: that
        # member made it meanwhile (etcd was away from us, e.g. a session of the reserve). The
        # table's row wins, whatever the names: every other member has installed it already.
        plan = Plan()
        for put in rows:
            row = put.session
            mine = self.table.get(row.service, row.key)
            if (
                mine is not None
                and mine.owner is None
                and row.owner != self.config.cluster.name  # type: ignore[union-attr]
                and (mine.server, mine.c2s) != (row.server, row.c2s)
            ):
                self.counters["cluster_reconcile_conflicts"] += 1
                plan.ops += self.end(mine, now, "replaced by the shared table")
                self.changes.pop((row.service, row.key), None)
        self.on_remote([*gone, *rows], now, plan)
        for session in self.table:
            if session.owner is None and (session.service, session.key.value) not in keys:
                if keep_ours:
                    self.counters["cluster_reconciled"] += 1
                    self._publish(session)
                else:
                    self.counters["cluster_remote_ended"] += 1
                    plan.ops += self.end(session, now, "ended elsewhere")
                    self.changes.pop((session.service, session.key.value), None)
        return plan


def _filter_client(flt: ops.FlowerFilter | ops.U32Filter) -> str:
    """The client address a C2S filter matches."""
    if isinstance(flt, ops.U32Filter):
        esp = ops.esp_of(flt.keys)
        return esp[0] if esp else ""
    return (flt.match.src or "").split("/")[0]


_KEY_KINDS = {str(kind.value): kind for kind in SessionKeyKind}  # a record's kind -> the enum, no Enum call


def _is_liveness(flt: ops.FlowerFilter | ops.U32Filter) -> bool:
    """A label-aware session's liveness filter (ingress, matching its C2S label)?"""
    return (
        isinstance(flt, ops.FlowerFilter)
        and flt.direction == ops.Direction.INGRESS
        and flt.match.mpls_label is not None
    )


def qdiscs(config: BalancerConfig) -> list[ops.ClsactQdisc]:
    """The clsact qdiscs the balancer's filters need: its C2S filters' on the fabric devices,
    the liveness filters' on the label-aware client interfaces."""
    devs = (*config.interfaces.fabric, *config.clients.label_aware_interfaces)
    return [ops.ClsactQdisc(dev) for dev in dict.fromkeys(devs)]


SWEEP_SLICE = 1000  # flows a conntrack sweep's resync checks per step (SweepResync)


class SweepResync:
    """A conntrack sweep's resync in bounded steps (issue 15: at 20,000 flows one resync took the
    daemon's loop for 0.7 s in the lab, first packets waiting): each `step` checks at most `budget`
    flows, first the table's flows as they were when the resync began (those the dump did not
    find end), then the dump's (those the table does not know are adopted). Flows that started or
    ended since the dump began (Balancer.sweep_begins) are left as they are: the dump is older."""

    def __init__(self, core: Balancer, live: frozenset[FlowKey], known: FlowsNow, changed: set[FlowKey]) -> None:
        self.core, self.live, self.known, self.changed = core, live, known, changed
        self._next_known = 0
        self._adopting = iter(live)
        self.adopted: set[FlowKey] = set()
        self.done = False

    def step(self, now: float, budget: int = SWEEP_SLICE) -> bool:
        """Check up to `budget` flows; True once the resync is complete."""
        known, live, changed = self.known, self.live, self.changed
        while budget > 0 and self._next_known < len(known):
            for flow in known.slice(self._next_known, self._next_known + budget):
                if flow is not None and flow not in live and flow not in changed:
                    self.core.end_swept(flow, now)
            taken = min(budget, len(known) - self._next_known)
            self._next_known += taken
            budget -= taken
        if budget <= 0 and self._next_known < len(known):
            return False
        for flow in self._adopting:
            if flow not in changed and self.core.adopt(flow, now):
                self.adopted.add(flow)
            budget -= 1
            if budget <= 0:
                return False
        self.done = True
        self.core.swept_flows(live, self.adopted)
        self.core.sweep_done()
        return True
