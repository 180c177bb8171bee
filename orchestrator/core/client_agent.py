"""The client agent's decision core: pure, like the server agent's (events and the time in,
dataplane operations and verdicts out).

A label-aware client receives the answers of its sessions still labelled with the session's S2C
label (the balancer swaps instead of popping). The agent learns each session in-band, from the
first labelled answer of each new flow (an ingress filter on the balancer link copies the label
into the packet mark, the termination route pops the label and the packet re-enters on lo, the
ruleset queues it): no label protocol, C2S = S2C - 1. Before that answer is let go, the session's
C2S imposition is in the kernel: a flower filter on the egress of the balancer link that matches
the client address, the VIP, the protocol and the service port and pushes [C2S], so every later
packet of the session, on every connection, leaves labelled and the balancer only switches it.

A session ends when conntrack has destroyed its last flow and the persistence timeout has passed,
or when its answers stop: the client went on sending under C2S (its filters' packet counters
rose) and nothing came back under S2C (the marking filter's counter stood still) for a whole
`sessions.answer_timeout` after (the balancer has ended the session). Its filters are deleted and
its packets leave as plain IP again (the balancer then queues the next flow as a first packet). A restart rebuilds the sessions from the filters alone (the match
says client, VIP, protocol and port, the push says C2S).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from orchestrator import ipproto
from orchestrator.config.client_model import ClientConfig
from orchestrator.core.events import FlowKey, LabelledPacket, PacketVerdict
from orchestrator.core.learning import PREF_LEARN, LearnedSession, LearningAgent, Plan, State, host
from orchestrator.dataplane import handles, ops

__all__ = ["ClientAgent", "ClientSession", "Imposition", "State", "imposition_of"]

PREF_IMPOSE4 = 10  # the C2S filters of IPv4 sessions on the balancer link's egress
PREF_IMPOSE6 = 11  # and of IPv6 sessions (one protocol per pref)
PROTOS = {ipproto.IPPROTO_TCP: "tcp", ipproto.IPPROTO_UDP: "udp", ipproto.IPPROTO_SCTP: "sctp"}


@dataclass(frozen=True)
class Imposition:
    """What one C2S filter labels: a client address's packets to a VIP's service port."""

    client: str
    vip: str
    proto: str  # "tcp" | "udp" | "sctp"
    port: int


@dataclass
class ClientSession(LearnedSession):
    """A balancer session as the client knows it: the label its answers arrive under, and the
    filters that label its packets."""

    s2c: int
    vip: str
    filters: dict[Imposition, ops.FlowerFilter] = field(default_factory=dict)
    # (packets sent under C2S, answers under S2C), one sample per answer_timeout, the last three
    samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def c2s(self) -> int:
        return self.s2c - 1

    def view(self) -> dict[str, Any]:
        """The documented JSON row of `mplsorch sessions --json` on a client."""
        clients = sorted({i.client for i in self.filters})
        return {
            "vip": self.vip,
            "clients": clients,
            "ports": sorted({f"{i.proto}/{i.port}" for i in self.filters}),
            "c2s_label": self.c2s,
            "s2c_label": self.s2c,
            **self.times(),
        }


def imposition_of(flt: ops.FlowerFilter) -> tuple[Imposition, int] | None:
    """(what it labels, its C2S) of one of our C2S filters, None for any other filter."""
    m = flt.match
    if (
        flt.direction != ops.Direction.EGRESS
        or flt.pref not in (PREF_IMPOSE4, PREF_IMPOSE6)
        or len(flt.actions) != 1
        or not isinstance(flt.actions[0], ops.MplsPush)
        or m.src is None
        or m.dst is None
        or m.ip_proto is None
        or m.ip_proto not in PROTOS.values()
        or m.dst_port is None
    ):
        return None
    c2s = flt.actions[0].label
    if c2s % 2 == 0 or handles.handle_c2s(flt.handle) != c2s:
        return None
    return Imposition(m.src.split("/")[0], m.dst.split("/")[0], m.ip_proto, m.dst_port), c2s


class ClientAgent(LearningAgent[ClientSession]):
    """Sessions by S2C label."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__()
        self.configure(config)

    @property
    def persistence(self) -> float:
        return self.config.persistence_timeout

    def learned_labels(self) -> Sequence[int]:
        return self.labels

    def label(self, session: ClientSession) -> int:
        return session.s2c

    def configure(self, config: ClientConfig) -> None:
        self.config = config
        self.labels = config.s2c_labels()
        self.vips = {str(v) for v in config.vips}

    def reconfigure(self, config: ClientConfig) -> list[ops.Operation]:
        """A reload: sessions of a VIP that is gone, under a label outside the new range, or whose
        filters sit on another device end now; all others are kept."""
        self.configure(config)
        out: list[ops.Operation] = []
        for s in list(self.sessions.values()):
            if (
                s.vip not in self.vips
                or s.s2c not in self.labels
                or any(f.dev != config.impose_device for f in s.filters.values())
            ):
                out += self._end(s)
        return out

    # -- node objects -----------------------------------------------------------------------------
    def node_objects(self) -> list[ops.DataplaneObject]:
        """Once per node: for every S2C label of the range, a termination route (pop, deliver
        locally) and an ingress filter on each balancer link that marks the packet with its label
        (MARK_TAG | label) before the pop, so the ruleset can queue a new flow's first labelled
        answer with its label."""
        return self.marking_objects(self.config.balancer)

    def _filter(self, session: ClientSession, what: Imposition, index: int) -> ops.FlowerFilter:
        v6 = ":" in what.client
        return ops.FlowerFilter(
            self.config.impose_device,
            handles.filter_handle(session.c2s, index),
            ops.FlowerMatch(src=host(what.client), dst=host(what.vip), ip_proto=what.proto, dst_port=what.port),
            ops.push_stack((session.c2s,)),
            ops.Direction.EGRESS,
            PREF_IMPOSE6 if v6 else PREF_IMPOSE4,
        )

    def _free_index(self, session: ClientSession) -> int:
        used = {handles.handle_index(f.handle) for f in session.filters.values()}
        return next(i for i in range(handles.FILTERS_PER_SESSION) if i not in used)

    # -- labelled answers ---------------------------------------------------------------------------
    def on_packets(self, packets: Sequence[LabelledPacket], now: float) -> Plan:
        """Learn from a batch of first labelled answers (one per new flow). An answer from VIP
        port P to client C under S2C makes session S2C impose [S2C - 1] on C's packets to the
        VIP's port P (a new filter unless it has one); a filter of another session with that same
        match goes first (the balancer gave the client a new session there)."""
        plan = Plan()
        for p in packets:
            info = self.admit(p, plan)
            if info is None:
                continue
            if info.src not in self.vips:
                self.counters["not_a_vip"] += 1
                continue
            proto = PROTOS.get(info.proto)
            if proto is None or info.sport is None or info.dport is None:
                self.counters["no_ports"] += 1
                continue
            session = self.sessions.get(p.label)
            if session is not None and session.vip != info.src:
                self.counters["label_reused"] += 1
                plan.ops += self._end(session)
                session = None
            if session is None:
                session = ClientSession(p.label, info.src, created=now, last_seen=now)
                self.sessions[p.label] = session
                self.counters["sessions_learned"] += 1
            what = Imposition(info.dst, info.src, proto, info.sport)
            if what not in session.filters:
                plan.ops += self._take(what, session)
                flt = self._filter(session, what, self._free_index(session))
                session.filters[what] = flt
                plan.ops.append(ops.Replace(flt))
                self.counters["filters_added"] += 1
            self.serve(session, FlowKey(info.proto, info.dst, info.src, info.dport, info.sport), now)  # as sent
        return plan

    def _take(self, what: Imposition, session: ClientSession) -> list[ops.Operation]:
        """Take `what` from any other session (deleting its filter first; a session left without
        filters ends)."""
        out: list[ops.Operation] = []
        for other in list(self.sessions.values()):
            if other is session or what not in other.filters:
                continue
            self.counters["label_changed"] += 1
            out.append(ops.Delete(other.filters.pop(what)))
            if not other.filters:
                out += self._end(other)
        return out

    def commit(self, plan: Plan, results: Sequence[ops.OpResult]) -> list[PacketVerdict]:
        """A filter that did not get in is forgotten (the flow's packets leave as plain IP, which
        the balancer serves as before; the next labelled answer of a new flow tries again)."""
        for r in results:
            if r.ok or not isinstance(r.op, (ops.Add, ops.Replace)) or not isinstance(r.op.obj, ops.FlowerFilter):
                continue
            self.counters["filter_errors"] += 1
            for session in self.sessions.values():
                for what, flt in list(session.filters.items()):
                    if flt == r.op.obj:
                        del session.filters[what]
        return plan.verdicts

    # -- flows and time ---------------------------------------------------------------------------
    def on_counters(self, installed: Sequence[ops.Installed]) -> list[ops.Operation]:
        """One sample of the packet counters (a dump), taken every `sessions.answer_timeout`: what
        each session's C2S filters sent and what its S2C marking filters took in. A session that
        sent between the last two samples but got no answer from the one before them to this one
        (a whole timeout after its last packets) has lost its balancer session: it ends. A counter
        that went down (a filter made again) starts the samples over."""
        sent: dict[int, int] = {}
        answers: dict[int, int] = {}
        owner = {f.key: s for s in self.sessions.values() for f in s.filters.values()}
        for item in installed:
            flt = item.obj
            if item.packets is None or not isinstance(flt, ops.FlowerFilter):
                continue
            label = flt.match.mpls_label
            if (
                flt.direction == ops.Direction.INGRESS
                and flt.pref == PREF_LEARN
                and label is not None
                and label in self.sessions
            ):
                answers[label] = answers.get(label, 0) + item.packets
            session = owner.get(flt.key)
            if session is not None and flt in session.filters.values():
                sent[session.s2c] = sent.get(session.s2c, 0) + item.packets
        out: list[ops.Operation] = []
        for session in list(self.sessions.values()):
            if session.s2c not in sent or session.s2c not in answers:
                session.samples.clear()
                continue
            sample = (sent[session.s2c], answers[session.s2c])
            if session.samples and (sample[0] < session.samples[-1][0] or sample[1] < session.samples[-1][1]):
                session.samples.clear()
            session.samples = [*session.samples[-2:], sample]
            if len(session.samples) == 3:
                (sent0, answers0), (sent1, _), (_, answers2) = session.samples
                if sent1 > sent0 and answers2 == answers0:
                    self.counters["answers_stopped"] += 1
                    out += self._end(session)
        return out

    def _forget(self, session: ClientSession) -> list[ops.Operation]:
        """Its filters go: its packets leave as plain IP again."""
        return [ops.Delete(f) for f in session.filters.values()]

    # -- restart ----------------------------------------------------------------------------------
    def restore(self, installed: Sequence[ops.Installed], live: frozenset[FlowKey], now: float) -> list[ops.Operation]:
        """Rebuild the sessions from our C2S filters after a restart (the kernel is the source of
        truth): filter (client, VIP, protocol, port, C2S) -> session S2C = C2S + 1. Live conntrack
        flows to a session's VIP and port from its client join it; sessions without one drain.
        Filters outside the range, of a VIP no longer configured, on another device or a second
        filter of one match are deleted."""
        stale: list[ops.Operation] = []
        for item in installed:
            flt = item.obj
            if not isinstance(flt, ops.FlowerFilter):
                continue
            found = imposition_of(flt)
            if found is None:
                continue
            what, c2s = found
            session = self.sessions.get(c2s + 1)
            taken = any(what in s.filters for s in self.sessions.values())
            if (
                c2s + 1 not in self.labels
                or what.vip not in self.vips
                or flt.dev != self.config.impose_device
                or taken
                or (session is not None and session.vip != what.vip)
            ):
                stale.append(ops.Delete(flt))
                continue
            if session is None:
                session = self.sessions[c2s + 1] = ClientSession(c2s + 1, what.vip, created=now, last_seen=now)
            session.filters[what] = flt
        for flow in live:
            proto = PROTOS.get(flow.proto)
            for session in self.sessions.values():
                if proto and Imposition(flow.src, flow.dst, proto, flow.dport or 0) in session.filters:
                    session.flows.add(flow)
                    self.by_flow[flow] = session
                    break
        self.restored(now)
        return stale
