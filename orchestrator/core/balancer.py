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
from dataclasses import dataclass, field
from typing import Sequence

from orchestrator import ipproto
from orchestrator.analyze.keys import SessionKey, SessionKeyKind, ipv6_iid, session_key
from orchestrator.analyze.packet import Malformed, Packet, analyze
from orchestrator.config.model import BalancerConfig, LabelAllocation, Server, ServerFailure, Service
from orchestrator.core.events import (
    Action, FirstPacket, FlowKey, FlowsEnded, FlowsStarted, FlowTableResync, PacketVerdict,
)
from orchestrator.core.failover import Failover, Outcome, relabelled, replacement
from orchestrator.core.health import HealthEvent, HealthState, HealthView, apply_health
from orchestrator.core.labels import LabelAllocator
from orchestrator.core.schedulers import Scheduler, ServerState, make_scheduler
from orchestrator.core.servers import AdminState, ServerAdmin
from orchestrator.core.sessions import Session, SessionTable, State
from orchestrator.dataplane import handles, ops

FLOWER_PROTOS = frozenset(ipproto.BY_NAME)  # every service protocol has a flower ip_proto key
PREF_IPV4, PREF_IPV6 = 10, 11  # the kernel keeps one protocol per filter priority


@dataclass
class Plan:
    """Operations for one batch of first packets, and what each packet waits for."""

    ops: list[ops.Operation] = field(default_factory=list)
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)  # session id -> ops slice
    rekeyed: set[int] = field(default_factory=set)  # sessions of earlier batches that got a new client address
    # In packet order: each verdict, and the session whose objects it waits for (None: final).
    verdicts: list[tuple[int | None, PacketVerdict]] = field(default_factory=list)


@dataclass(frozen=True)
class Commit:
    verdicts: tuple[PacketVerdict, ...]
    cleanup: tuple[ops.Operation, ...]  # deletes of what a failed session did get installed
    failures: tuple[str, ...]


class Balancer:
    def __init__(self, config: BalancerConfig, now: float) -> None:
        self.table = SessionTable()
        self.counters: collections.Counter[str] = collections.Counter()
        self.admin = ServerAdmin()      # the operator's drain and weights
        self.health = HealthView()      # the latest health checks: every server unknown until then
        self._schedulers: dict[str, Scheduler] = {}
        self.configure(config, now)

    # -- configuration ---------------------------------------------------------------------
    def configure(self, config: BalancerConfig, now: float) -> None:
        """Apply a (re)loaded configuration; sessions in the table are kept as they are."""
        old_kinds = {svc.name: svc.scheduler for svc in self.config.services} if hasattr(self, "config") else {}
        blocks = None
        if config.labels.allocation == LabelAllocation.SERVER_BLOCKS:
            blocks = {s.name: s.label_block for p in config.pools for s in p.servers if s.label_block}
        shape = (config.labels.range, tuple(sorted((blocks or {}).items())), config.labels.hold_down)
        if shape != getattr(self, "_label_shape", None):
            # A new pool; the pairs of sessions in the table stay theirs.
            self.labels = LabelAllocator(config.labels.range[0], config.labels.range[1],
                                         config.labels.hold_down, blocks)
            for session in self.table:
                self.labels.claim(session.c2s, session.server)
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
            for svc in config.services}
        self.transport = {name: s.transport_label for name, s in self.servers.items()}
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
        flow = FlowKey(info.proto, info.src, info.dst, info.sport, info.dport)
        session = self.table.get(svc.name, key.value)
        # Answers go to the client through the balancer's own route to it. Without one the
        # client cannot be answered (a refusal could not reach it either): no session, no objects.
        needs_route = session is None or key.client not in session.clients
        if needs_route and first.next_hop is None:
            self.counters["no_route"] += 1
            return verdict(Action.DROP, f"no route to client {key.client}"), None
        if session is not None:
            if needs_route and (len(session.clients) + 1) * self._filters_per_client(session, svc) \
                    > handles.FILTERS_PER_SESSION:
                self.counters["no_filter_handle"] += 1
                return verdict(Action.DROP, f"session {session.id} has no filter handle left for client "
                                            f"{key.client}"), None
            self.table.add_flow(session, flow, now)
            session.packets_userspace += 1
            # The kernel's fast path admits a session's later flows from the addresses it knows;
            # a new address of the session (its key matched beyond the address) came here instead.
            if needs_route:
                self.counters[f"fastpath_unmatched:{key.kind}"] += 1
            elif key.kind != SessionKeyKind.FIVE_TUPLE:  # there: the same flow again, no element
                self.counters["fastpath_late"] += 1
            if needs_route and first.next_hop is not None:  # a mobile client's new care-of address
                self._rekey(session, svc, info, key, first.next_hop, plan)
            if session.state == State.OPENING:
                return verdict(Action.ACCEPT), session.id
            return verdict(Action.ACCEPT), None
        assert first.next_hop is not None
        refusal = self._admit(svc)
        server = None if refusal else self._schedule(svc, key, now)
        if refusal is None and server is None:
            refusal = "no-server"
        # Headroom: the labels left free after this session's pair must not drop below the minimum.
        if refusal is None and 2 * (self.labels.free(server if self.labels.blocks else None, now=now) - 1) \
                < svc.admission.min_free_labels:
            refusal = "label-headroom"
        c2s = None if refusal else self.labels.allocate(server, now)  # type: ignore[arg-type]
        if refusal is None and c2s is None:
            refusal = "labels-exhausted"
        if refusal:
            self.counters[f"refused:{refusal}"] += 1
            return verdict(Action.REFUSE, refusal, str(svc.admission.refuse_with.value)), None
        assert server is not None and c2s is not None
        session = Session(id=self.table.new_id(), service=svc.name, key=key, vip=str(svc.vip),
                          protocol=str(svc.protocol.value), port=info.dport, server=server, c2s=c2s,
                          created=now, last_seen=now)
        self.table.add(session)
        self.table.add_flow(session, flow, now)
        session.packets_userspace += 1
        start = len(plan.ops)
        self._add_client(session, svc, info, key.client, first.next_hop, plan)
        plan.groups[session.id] = (start, len(plan.ops))
        self.counters["sessions_started"] += 1
        return verdict(Action.ACCEPT), session.id

    def _admit(self, svc: Service) -> str | None:
        """Admission control judges only new sessions: refuse rather than degrade those served."""
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
            available = (weight > 0 and s.name not in self.admin.draining
                         and (s.max_sessions is None or sessions < s.max_sessions)
                         and (not self.labels.blocks or self.labels.free(s.name, now=now) > 0))
            out.append(ServerState(s.name, weight, sessions, None, available))
        return apply_health(out, svc.pool, self.health)

    def pick(self, svc: Service, key: str, now: float) -> str | None:
        return self._schedulers[svc.name].pick(key, self.server_states(svc, now))

    def _schedule(self, svc: Service, key: SessionKey, now: float) -> str | None:
        return self.pick(svc, key.value, now)

    def _add_client(self, session: Session, svc: Service, info: Packet, client: str,
                    hop: ops.NextHop, plan: Plan) -> None:
        """Objects that bring `client`'s packets into the session: the C2S imposition filter(s) on
        the fabric link and the S2C label route towards the balancer's next hop to the client (the
        client itself when on-link, else the gateway, on the device of that route). The route pops
        the label; for a label-aware client it swaps S2C for S2C, so the answer still carries it."""
        n = len(session.clients)
        session.clients.append(client)
        host = 32 if ":" not in client else 128
        vip_host = 32 if ":" not in session.vip else 128
        proto = session.protocol if session.protocol in FLOWER_PROTOS else None
        five = session.key.kind == SessionKeyKind.FIVE_TUPLE
        ports: tuple[int | None, ...] = (info.dport,) if five else (svc.ports or (None,))
        for i, port in enumerate(ports):
            match = ops.FlowerMatch(src=f"{client}/{host}", dst=f"{session.vip}/{vip_host}",
                                    ip_proto=proto, dst_port=port if proto else None,
                                    src_port=info.sport if five and proto else None)
            handle = handles.filter_handle(session.c2s, n * len(ports) + i)
            flt = ops.FlowerFilter(self.config.interfaces.fabric[0], handle, match,
                                   ops.push_stack((self.transport[session.server], session.c2s)),
                                   pref=PREF_IPV6 if host == 128 else PREF_IPV4)
            plan.ops.append(ops.Add(flt))
            session.objects.append(flt)
        aware = self.config.clients.is_label_aware(client)
        route = ops.MplsRoute(session.s2c, hop.dev, via=hop.via or client,
                              out_labels=(session.s2c,) if aware else ())
        plan.ops.append(ops.Replace(route) if n else ops.Add(route))
        session.objects = [o for o in session.objects if not (isinstance(o, ops.MplsRoute) and o.label == session.s2c)]
        session.objects.append(route)
        for element in self.fast_elements(session, svc, client):
            plan.ops.append(ops.Add(element))
            session.objects.append(element)

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
    def _filters_per_client(session: Session, svc: Service) -> int:
        """C2S filters each client address of the session takes (see `_add_client`)."""
        return 1 if session.key.kind == SessionKeyKind.FIVE_TUPLE else len(svc.ports) or 1

    def _rekey(self, session: Session, svc: Service, info: Packet, key: SessionKey,
               hop: ops.NextHop, plan: Plan) -> None:
        """Same home address, new care-of address: same server, same labels; answers now go to
        the new address. The old address's filter stays until the session ends."""
        self.counters["rekeyed"] += 1
        if session.id not in plan.groups:
            plan.rekeyed.add(session.id)
        start = len(plan.ops)
        self._add_client(session, svc, info, key.client, hop, plan)
        first, _ = plan.groups.get(session.id, (start, start))
        plan.groups[session.id] = (first, len(plan.ops))

    def commit(self, plan: Plan, results: Sequence[ops.OpResult], now: float) -> Commit:
        """The provider's results for `plan.ops` decide the waiting packets' verdicts."""
        failed: dict[int, list[str]] = {}
        cleanup: list[ops.Operation] = []
        for session_id, (start, end) in plan.groups.items():
            group = results[start:end]
            bad = [str(r) for r in group if not r.ok]
            if not bad:
                session = self.table.by_id(session_id)
                if session is not None and session.state == State.OPENING:
                    session.state = State.SERVING
                continue
            failed[session_id] = bad
            cleanup += [ops.Delete(r.op.obj) for r in group if r.ok and isinstance(r.op, ops.Add)]
            session = self.table.by_id(session_id)
            if session is not None:
                self.counters["sessions_failed"] += 1
                self.table.remove(session)
                self.labels.release(session.c2s, now)
        verdicts = [v if session_id not in failed else
                    PacketVerdict(v.queue, v.packet_id, Action.DROP, None,
                                  "programming failed: " + "; ".join(failed[session_id]))
                    for session_id, v in plan.verdicts]
        for v in verdicts:
            self.counters[f"verdict:{v.action}"] += 1
        return Commit(tuple(verdicts), tuple(cleanup), tuple(x for f in failed.values() for x in f))

    # -- flows and time -------------------------------------------------------------------------
    def on_flow_events(self, events: Sequence[FlowsStarted | FlowsEnded | FlowTableResync], now: float) -> None:
        for event in events:
            if isinstance(event, FlowsStarted):
                for flow in event.flows:
                    self._adopt(flow, now)
                continue
            if isinstance(event, FlowsEnded):
                ended = event.flows
            else:
                self.counters["conntrack_sweeps" if event.sweep else "conntrack_resyncs"] += 1
                known = set(self.table.flows())
                ended = tuple(f for f in known if f not in event.live)
                for flow in event.live - known:  # fast-path flows whose start events were lost
                    self._adopt(flow, now)
            for flow in ended:
                session = self.table.end_flow(flow)
                if session is not None and not session.flows and session.state != State.CLOSING:
                    session.state = State.DRAINING
                    session.ends_at = now + self._persistence(session)

    def _adopt(self, flow: FlowKey, now: float) -> None:
        """A tagged flow the daemon did not see start: the kernel's fast path admitted it, so it
        belongs to the session of its client address, and keeps that session alive."""
        if self.table.by_flow(flow) is not None:
            return
        session = self.session_of_flow(flow)
        if session is None:
            return
        self.table.add_flow(session, flow, now)
        self.counters["flows_fast_path"] += 1

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
        if session is not None and flow.src in session.clients:
            return session
        if svc.session_key in (SessionKeyKind.MIP6_HOME_ADDRESS, SessionKeyKind.ESP_SPI):
            return next((s for s in self.table if s.service == svc.name and flow.src in s.clients), None)
        return None

    def fast_path_sync(self, installed: Sequence[ops.Installed]) -> list[ops.Operation]:
        """After the ruleset was (re)loaded, which empties the fast-path sets, or after a restart:
        the operations that make the sets hold exactly the elements of the sessions in the table
        (`installed`: what a dump of them shows), and each session's objects name its elements,
        so its end deletes them. A session whose service a reload removed gets none."""
        wanted: dict[tuple[object, ...], ops.FastPathElement] = {}
        for session in self.table:
            svc = self.service_of(session)
            mine = [e for client in session.clients for e in self.fast_elements(session, svc, client)] if svc else []
            keys = {e.key for e in mine}
            session.objects = [o for o in session.objects if not isinstance(o, ops.FastPathElement) or o.key in keys]
            session.objects += [e for e in mine if e not in session.objects]
            wanted.update((e.key, e) for e in mine)
        present = {i.obj.key: i.obj for i in installed if isinstance(i.obj, ops.FastPathElement)}
        return ([ops.Delete(e) for key, e in present.items() if key not in wanted]
                + [ops.Add(e) for key, e in wanted.items() if key not in present])

    def _persistence(self, session: Session) -> float:
        """The persistence timeout of the session's service; a service a reload removed keeps
        none, so its sessions end as soon as their last flow has."""
        svc = self._by_name.get(session.service)
        return svc.persistence_timeout if svc is not None else 0.0

    def tick(self, now: float) -> list[ops.Operation]:
        """Sessions whose persistence timeout has passed end: all their objects are deleted and
        their labels go back to the pool after the hold-down."""
        out: list[ops.Operation] = []
        for session in self.table:
            if session.state == State.DRAINING and session.ends_at is not None and now >= session.ends_at:
                out += self.end(session, now, "persistence timeout")
        return out

    def end(self, session: Session, now: float, reason: str) -> list[ops.Operation]:
        """The session leaves the table, its pair goes to hold-down; the deletes of its objects."""
        self.table.remove(session)
        self.labels.release(session.c2s, now)
        self.counters["sessions_ended"] += 1
        self.counters[f"ended:{reason}"] += 1
        return [ops.Delete(o) for o in reversed(session.objects)]

    def count(self, event: str, n: int = 1) -> None:
        """An event the daemon saw around the core (a failed batch, conntrack errors), counted
        with the core's own so status and metrics report them together."""
        self.counters[event] += n

    def sessions_by_state(self) -> dict[str, int]:
        return dict(collections.Counter(str(s.state) for s in self.table))

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
        for session in self.table:
            svc = self.service_of(session)
            if svc is None or svc.pool != pool or session.server != server:
                continue
            reason = f"server {server} down"
            if svc.on_server_failure is ServerFailure.REASSIGN:
                target = self.pick(svc, session.key.value, now)
                c2s = self.labels.allocate(target, now) if target is not None else None
                if target is not None and c2s is not None:
                    self._move(session, target, c2s, now, plan, reason)
                    continue
                reason += ": no other server available" if target is None else f": no label pair for {target}"
            plan.outcomes.append(Outcome(session.id, session.service, session.key.value, server, session.c2s,
                                         "reset", reason=reason))
            plan.ops += self.end(session, now, "server down")

    def _move(self, session: Session, target: str, c2s: int, now: float, plan: Failover, reason: str) -> None:
        old_server, old_c2s, old = session.server, session.c2s, list(session.objects)
        new = relabelled(old, old_c2s, c2s, self.transport[target])
        self.labels.release(old_c2s, now)
        self.table.reassign(session, target, c2s)
        session.objects = new
        start = len(plan.ops)
        plan.ops += replacement(old, new)
        plan.groups[session.id] = (start, len(plan.ops))
        self.counters["sessions_reassigned"] += 1
        plan.outcomes.append(Outcome(session.id, session.service, session.key.value, old_server, old_c2s,
                                     "reassign", target, c2s, reason))

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
                session.objects = []
                self.end(session, now, "reassign failed")
        return cleanup

    # -- restart ----------------------------------------------------------------------------------
    def restore(self, installed: Sequence[ops.Installed], live: frozenset[FlowKey], now: float) -> list[ops.Operation]:
        """Rebuild the session table from our kernel objects after a restart (the kernel is the
        source of truth). Filters name their session by handle (dataplane.handles), their client and
        VIP by match, their server by transport label; flows come from a conntrack dump. A
        session's S2C route is our route at label C2S + 1, whatever its form: pop, or swap to
        itself (a label-aware client), to the client or its gateway. Objects that fit no service
        or server any more are deleted."""
        by_transport = {s.transport_label: name for name, s in self.servers.items()}
        routes = {i.obj.label: i.obj for i in installed if isinstance(i.obj, ops.MplsRoute)}
        stale: list[ops.Operation] = []
        for item in installed:
            flt = item.obj
            if not isinstance(flt, ops.FlowerFilter):
                continue
            pushes = [a.label for a in flt.actions if isinstance(a, ops.MplsPush)]
            c2s = handles.handle_c2s(flt.handle)
            client = (flt.match.src or "").split("/")[0]
            vip = (flt.match.dst or "").split("/")[0]
            proto = ipproto.BY_NAME.get(flt.match.ip_proto or "", 0)
            svc = self.services.get((vip, proto, flt.match.dst_port)) or self.services.get((vip, proto, None))
            server = by_transport.get(pushes[-1]) if len(pushes) == 2 else None
            if svc is None or server is None or pushes[0] != c2s:
                stale.append(ops.Delete(flt))
                continue
            kind = svc.session_key
            value = client if kind != SessionKeyKind.FIVE_TUPLE else \
                f"{proto}/{client}/{flt.match.src_port}/{vip}/{flt.match.dst_port}"
            session = self.table.get(svc.name, value)
            if session is None:
                if not self.labels.claim(c2s, server):
                    stale.append(ops.Delete(flt))
                    continue
                session = Session(id=self.table.new_id(), service=svc.name,
                                  key=SessionKey(kind, value, client), vip=vip, protocol=str(svc.protocol.value),
                                  port=flt.match.dst_port, server=server, c2s=c2s, created=now,
                                  last_seen=now, state=State.SERVING)
                self.table.add(session)
                if c2s + 1 in routes:
                    session.objects.append(routes.pop(c2s + 1))
            session.objects.insert(0, flt)
            if client not in session.clients:
                session.clients.append(client)
        for flow in live:
            for session in self.table:
                if flow.src in session.clients and flow.dst == session.vip and \
                        (session.port is None or flow.dport == session.port or session.key.kind != SessionKeyKind.FIVE_TUPLE):
                    self.table.add_flow(session, flow, now)
                    break
        for session in self.table:
            if not session.flows:
                session.state = State.DRAINING
                session.ends_at = now + self._persistence(session)
        claimed = {s.s2c for s in self.table}
        stale += [ops.Delete(r) for label, r in routes.items() if label not in claimed]
        self.counters["restored_sessions"] = len(self.table)
        return stale
