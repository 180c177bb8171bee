"""The server agent's decision core: pure, like the balancer's (events and the time in, dataplane
operations and verdicts out).

A server learns each session in-band, from the first packet of each new flow that arrives under a
session label (the ingress ruleset copies the label into the packet mark; see
capture/server_rules): no message from the balancer. It answers with S2C = C2S + 1: one route
per (VIP, client) in the VIP's return table to a nexthop object of its session (encap [balancer
transport, S2C] via the fabric next hop; its id from the S2C label, dataplane/records.py), or,
on a kernel without nexthop objects, a plain lwtunnel encap route with the same stack. Return routes
end like balancer sessions: when conntrack has destroyed the session's last flow and the
persistence timeout has passed.

Two sessions of one client on one VIP (two services, or five-tuple keys) share that client's
return route: it carries the newest live session's S2C and falls back to the next one when that
ends, so no answer ever goes out under a label whose session has ended.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Sequence

from orchestrator.config.server_model import ServerConfig
from orchestrator.core.events import FlowKey, LabelledPacket, PacketVerdict
from orchestrator.core.learning import MARK_MASK as MARK_MASK
from orchestrator.core.learning import MARK_TAG as MARK_TAG
from orchestrator.core.learning import PREF_LEARN as PREF_LEARN
from orchestrator.core.learning import LearnedSession, LearningAgent, Plan, State, host
from orchestrator.core.learning import label_of as label_of
from orchestrator.dataplane import ops, records

__all__ = ["MARK_MASK", "MARK_TAG", "PREF_LEARN", "RULE_PRIORITY", "ReturnSession", "ServerAgent", "State", "label_of"]

RULE_PRIORITY = 1000  # `from VIP lookup TABLE`: before the main table (32766)


@dataclass
class ReturnSession(LearnedSession):
    """A session as the server knows it: the label it arrived under and where answers go."""

    c2s: int
    client: str
    vip: str

    @property
    def s2c(self) -> int:
        return self.c2s + 1

    def view(self) -> dict[str, Any]:
        """The documented JSON row of `mplsorch sessions --json` on a server."""
        return {"client": self.client, "vip": self.vip, "c2s_label": self.c2s, "s2c_label": self.s2c, **self.times()}


class ServerAgent(LearningAgent[ReturnSession]):
    """Sessions by C2S label."""

    OUTSIDE = "label_outside_block"

    def __init__(self, config: ServerConfig, nexthops: bool = True) -> None:
        super().__init__()
        # The sessions of each (VIP, client), by C2S: what its return route chooses from, found
        # without a walk over every session (which made learning quadratic in their number).
        self.by_pair: dict[tuple[str, str], dict[int, ReturnSession]] = {}
        self.routes: dict[tuple[str, str], int] = {}  # (VIP, client) -> S2C installed
        # (VIP, client) -> the nexthop object its route points at, as installed (or restored);
        # absent for a plain encap route.
        self.route_nexthops: dict[tuple[str, str], ops.EncapNexthop] = {}
        # Whether return routes use nexthop objects: the daemon says whether the kernel has them,
        # and a nexthop refused as not supported turns them off (`commit`).
        self.nexthops = nexthops
        self.retry: set[tuple[str, str]] = set()  # routes to program again, as plain encap routes
        self.configure(config)

    @property
    def persistence(self) -> float:
        return self.config.persistence_timeout

    def learned_labels(self) -> Sequence[int]:
        return self.block

    def label(self, session: ReturnSession) -> int:
        return session.c2s

    def configure(self, config: ServerConfig) -> None:
        self.config = config
        self.block = config.c2s_labels()
        self.tables = {str(v.address): v.table for v in config.vips}

    def reconfigure(self, config: ServerConfig) -> list[ops.Operation]:
        """A reload: the sessions of a VIP that is gone or has another table end now (their
        return routes are deleted from the old table); all others are kept."""
        kept = {str(v.address): v.table for v in config.vips}
        out = [op for s in list(self.sessions.values()) if kept.get(s.vip) != self.tables[s.vip] for op in self._end(s)]
        self.configure(config)
        return out

    # -- node objects -----------------------------------------------------------------------------
    def node_objects(self) -> list[ops.DataplaneObject]:
        """Once per node: for every C2S label of the block, a termination route (pop, deliver
        locally) and an ingress filter on each fabric link that marks the packet with its label
        (MARK_TAG | label) before the pop, so the ruleset can queue a new flow's first packet
        with its label; and one `from VIP lookup TABLE` rule per VIP."""
        objs = self.marking_objects(self.config.fabric)
        objs += [ops.Rule(host(vip), table, RULE_PRIORITY) for vip, table in self.tables.items()]
        return objs

    def return_route(self, vip: str, client: str, s2c: int) -> ops.EncapRoute:
        version = 6 if ":" in client else 4
        via = self.config.next_hop(version)
        return ops.EncapRoute(
            host(client),
            (self.config.balancer_transport_label, s2c),
            self.config.fabric[0],
            None if via is None else str(via),
            self.tables[vip],
        )

    def return_nexthop(self, client: str, s2c: int) -> ops.EncapNexthop | None:
        """The nexthop object of the return route under `s2c` to `client` (None without a next
        hop of the client's family)."""
        version = 6 if ":" in client else 4
        via = self.config.next_hop(version)
        if via is None:
            return None
        return ops.EncapNexthop(
            records.nexthop_id(s2c, version),
            (self.config.balancer_transport_label, s2c),
            self.config.fabric[0],
            str(via),
        )

    # -- first packets ----------------------------------------------------------------------------
    def on_packets(self, packets: Sequence[LabelledPacket], now: float) -> Plan:
        plan = Plan()
        touched: set[tuple[str, str]] = set()
        for p in packets:
            info = self.admit(p, plan)
            if info is None:
                continue
            if info.dst not in self.tables:
                self.counters["not_a_vip"] += 1
                continue
            if (
                info.version == 6
                and self.config.next_hop(6) is None
                or info.version == 4
                and self.config.next_hop(4) is None
            ):
                self.counters["no_next_hop"] += 1
                continue
            session = self.sessions.get(p.label)
            if session is not None and (session.client, session.vip) != (info.src, info.dst):
                # The balancer reused the label after the old session ended there: a new session.
                self.counters["label_reused"] += 1
                plan.ops += self._end(session)
                session = None
            if session is None:
                session = ReturnSession(p.label, info.src, info.dst, created=now, last_seen=now)
                self._add(session)
                self.counters["sessions_learned"] += 1
            self.serve(session, FlowKey(info.proto, info.src, info.dst, info.sport, info.dport), now)
            touched.add((session.vip, session.client))
        for vip, client in touched:
            plan.ops += self._route_ops(vip, client)
        return plan

    def commit(self, plan: Plan, results: Sequence[ops.OpResult]) -> list[PacketVerdict]:
        """Count failed return routes (their answers go out as plain IP; nothing is dropped) and
        forget what the kernel does not hold, so the next first packet tries again. A nexthop
        object refused as not supported (EOPNOTSUPP: a kernel without them) turns nexthops off;
        the routes that failed with it are in `retry`, for `retry_ops` to make as plain routes."""
        unsupported = False
        failed: list[tuple[str, str]] = []
        for r in results:
            if r.ok:
                continue
            obj = r.op.obj
            if isinstance(obj, ops.EncapNexthop):
                unsupported |= r.errno == errno.EOPNOTSUPP
                continue
            self.counters["route_errors"] += 1
            if isinstance(r.op, (ops.Add, ops.Replace)) and isinstance(obj, (ops.EncapRoute, ops.NexthopRoute)):
                vip = next(v for v, t in self.tables.items() if t == obj.table)
                pair = (vip, obj.dst.split("/")[0])
                self.routes.pop(pair, None)
                self.route_nexthops.pop(pair, None)
                failed.append(pair)
        if unsupported and self.nexthops:
            self.nexthops = False
            self.counters["nexthops_unsupported"] += 1
            self.retry.update(failed)
        return plan.verdicts

    def retry_ops(self) -> list[ops.Operation]:
        """The return routes a refused nexthop left out, now as plain encap routes."""
        pairs, self.retry = self.retry, set()
        return [op for vip, client in sorted(pairs) for op in self._route_ops(vip, client)]

    def _route_ops(self, vip: str, client: str) -> list[ops.Operation]:
        """Bring the (VIP, client) return route to the newest live session's S2C."""
        live = list(self.by_pair.get((vip, client), {}).values())
        current = self.routes.get((vip, client))
        old = self.route_nexthops.pop((vip, client), None)
        if not live:
            if current is None:
                return []
            del self.routes[vip, client]
            plain = self.return_route(vip, client, current)
            if old is None:
                return [ops.Delete(plain)]
            return [ops.Delete(ops.NexthopRoute(plain.dst, old.id, plain.table)), ops.Delete(old)]
        want = max(live, key=lambda s: (s.last_seen, s.created)).s2c
        if want == current:
            if old is not None:
                self.route_nexthops[vip, client] = old
            return []
        self.routes[vip, client] = want
        nexthop = self.return_nexthop(client, want) if self.nexthops else None
        out: list[ops.Operation] = []
        route: ops.EncapRoute | ops.NexthopRoute = self.return_route(vip, client, want)
        if nexthop is not None:
            # The nexthop first (create or overwrite: its id is the S2C's), then the route to it;
            # the old session's nexthop last, once no route uses it.
            self.route_nexthops[vip, client] = nexthop
            out.append(ops.Replace(nexthop))
            route = ops.NexthopRoute(route.dst, nexthop.id, route.table)
        out.append(ops.Replace(route) if current is not None else ops.Add(route))
        return out + ([ops.Delete(old)] if old is not None else [])

    def _add(self, session: ReturnSession) -> None:
        self.sessions[session.c2s] = session
        self.by_pair.setdefault((session.vip, session.client), {})[session.c2s] = session

    def _forget(self, session: ReturnSession) -> list[ops.Operation]:
        """The client's return route falls back to its next live session, or goes."""
        pair = self.by_pair[session.vip, session.client]
        del pair[session.c2s]
        if not pair:
            del self.by_pair[session.vip, session.client]
        return self._route_ops(session.vip, session.client)

    # -- restart ----------------------------------------------------------------------------------
    def restore(self, installed: Sequence[ops.Installed], live: frozenset[FlowKey], now: float) -> list[ops.Operation]:
        """Rebuild the sessions from our return routes after a restart (the kernel is the source
        of truth): route (client, table, S2C) -> session C2S = S2C - 1. Live conntrack flows
        between a client and a VIP join that session; routes without one drain. Routes in no
        VIP's table any more, or under a label outside the block, are deleted."""
        by_table = {table: vip for vip, table in self.tables.items()}
        nexthops = {
            i.obj.id: i.obj
            for i in installed
            if isinstance(i.obj, ops.EncapNexthop) and i.obj.id in records.NEXTHOP_IDS and i.obj.labels
        }
        used: set[int] = set()
        stale: list[ops.Operation] = []
        for item in installed:
            route = item.obj
            nexthop = None
            if isinstance(route, ops.NexthopRoute):
                nexthop = nexthops.get(route.nexthop)
                if nexthop is None or records.nexthop_label(nexthop.id) != (nexthop.labels[-1], nexthop.family):
                    stale.append(ops.Delete(route))  # to no nexthop of ours, or one whose id lies
                    continue
                s2c = nexthop.labels[-1]
            elif isinstance(route, ops.EncapRoute):
                s2c = route.labels[-1]
            else:
                continue
            vip = by_table.get(route.table)
            c2s = s2c - 1
            client = route.dst.split("/")[0]
            if vip is None or c2s not in self.block or c2s in self.sessions:
                stale.append(ops.Delete(route))
                continue
            self._add(ReturnSession(c2s, client, vip, created=now, last_seen=now))
            self.routes[vip, client] = c2s + 1
            if nexthop is not None:
                self.route_nexthops[vip, client] = nexthop
                used.add(nexthop.id)
        # Nexthops of ours that no kept route uses (a crash between a nexthop and its route).
        stale += [ops.Delete(nh) for nh_id, nh in nexthops.items() if nh_id not in used]
        of_flow = {(s.client, s.vip): s for s in self.sessions.values()}
        for flow in live:
            session = of_flow.get((flow.src, flow.dst))
            if session is not None:
                session.flows.add(flow)
                self.by_flow[flow] = session
        self.restored(now)
        return stale
