"""What the two in-band learning agents share: the server agent (core.agent), which learns each
session from its first packet arriving under a C2S label, and the client agent
(core.client_agent), which learns it from its first answer arriving under an S2C label. Pure,
like every core.

Both keep their sessions by the label they learn them under, mark that label into the packet at
the ingress of their links (an ingress filter per label, `skbedit mark MARK_TAG | label`, before a
termination route pops it to lo, where their ruleset queues the first packet of each new flow),
take a batch of such packets the same way (every verdict an accept: an agent never breaks
traffic), drain a session when conntrack has ended its last flow and end it when the persistence
timeout has passed, and rebuild it from the kernel after a restart. A role gives its labels, its
links, which address of the packet is the VIP, its session type and what a session's end deletes.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Generic, Sequence, TypeVar

from orchestrator.analyze.packet import Packet, analyze
from orchestrator.core.events import (
    Action,
    FlowKey,
    FlowsEnded,
    FlowsStarted,
    FlowTableResync,
    LabelledPacket,
    PacketVerdict,
)
from orchestrator.dataplane import ops

MARK_TAG = 0x6D600000  # "m`" in the high 12 bits; the low 20 bits carry the session label
MARK_MASK = 0xFFF00000
PREF_LEARN = 20  # the ingress label-marking filters


def label_of(mark: int) -> int | None:
    """The session label a packet mark carries, or None for a mark that is not ours."""
    return mark & 0xFFFFF if mark & MARK_MASK == MARK_TAG else None


def host(address: str) -> str:
    """The host prefix of an address."""
    return f"{address}/{128 if ':' in address else 32}"


class State(enum.StrEnum):
    SERVING = "serving"  # flows alive
    DRAINING = "draining"  # no flow left; ends when the persistence timeout has passed


@dataclass(kw_only=True)
class LearnedSession:
    """What every learned session holds besides its role's own fields (which come first, so a
    role's session is made with its own fields by position and these by name)."""

    created: float
    last_seen: float
    state: State = State.SERVING
    flows: set[FlowKey] = field(default_factory=set)
    ends_at: float | None = None

    def times(self) -> dict[str, object]:
        """The part of the documented JSON row every role shows."""
        return {
            "state": str(self.state),
            "flows": len(self.flows),
            "created": self.created,
            "last_seen": self.last_seen,
            "ends_at": self.ends_at,
        }


@dataclass
class Plan:
    """The operations a batch of first labelled packets needs, and the packets' verdicts, sent
    only after the operations are applied (so what answers them already carries its label)."""

    ops: list[ops.Operation] = field(default_factory=list)
    verdicts: list[PacketVerdict] = field(default_factory=list)


S = TypeVar("S", bound=LearnedSession)


class LearningAgent(Generic[S]):
    """The shared core of both agents. `sessions` by the label a session is learned under."""

    OUTSIDE = "label_outside_range"  # the counter of a packet under a label not ours

    def __init__(self) -> None:
        self.sessions: dict[int, S] = {}
        self.by_flow: dict[FlowKey, S] = {}
        self.counters: collections.Counter[str] = collections.Counter()

    def count(self, event: str, n: int = 1) -> None:
        """An event the daemon saw around the core (unmarked packets, a failed batch), counted
        with the core's own."""
        self.counters[event] += n

    # -- what a role gives --------------------------------------------------------------------------
    @property
    def persistence(self) -> float:
        raise NotImplementedError

    def learned_labels(self) -> Sequence[int]:
        """The labels sessions are learned under (a container: `in` is asked per packet)."""
        raise NotImplementedError

    def _forget(self, session: S) -> list[ops.Operation]:
        """The deletes of what the session's end leaves without a use."""
        raise NotImplementedError

    def label(self, session: S) -> int:
        raise NotImplementedError

    # -- node objects -----------------------------------------------------------------------------
    def marking_objects(self, devs: Sequence[str]) -> list[ops.DataplaneObject]:
        """Once per node: a clsact qdisc on each link, for every learned label a termination route
        (pop, deliver locally) and an ingress filter on each link that marks the packet with its
        label (MARK_TAG | label) before the pop, so the ruleset can queue a new flow's first
        packet with its label."""
        labels = self.learned_labels()
        objs: list[ops.DataplaneObject] = [ops.ClsactQdisc(dev) for dev in devs]
        objs += [ops.MplsRoute(label, "lo") for label in labels]
        objs += [
            ops.FlowerFilter(
                dev,
                label,
                ops.FlowerMatch(mpls_label=label),
                (ops.SetMark(MARK_TAG | label),),
                ops.Direction.INGRESS,
                PREF_LEARN,
            )
            for dev in devs
            for label in labels
        ]
        return objs

    # -- first labelled packets -------------------------------------------------------------------
    def admit(self, p: LabelledPacket, plan: Plan) -> Packet | None:
        """A queued packet's verdict (accept, always) and its headers; None, counted, when it is
        malformed or came under a label that is not ours."""
        plan.verdicts.append(PacketVerdict(p.queue, p.packet_id, Action.ACCEPT))  # never break traffic
        self.counters["packets_userspace"] += 1
        info = analyze(p.data)
        if not isinstance(info, Packet):
            self.counters[f"malformed:{info.reason}"] += 1
            return None
        if p.label not in self.learned_labels():
            self.counters[self.OUTSIDE] += 1
            return None
        return info

    def serve(self, session: S, flow: FlowKey, now: float) -> None:
        """`flow` is the session's (taken from any other session that had it)."""
        old = self.by_flow.get(flow)
        if old is not None and old is not session:
            old.flows.discard(flow)
        session.flows.add(flow)
        self.by_flow[flow] = session
        session.state, session.ends_at, session.last_seen = State.SERVING, None, now

    # -- flows and time ---------------------------------------------------------------------------
    def on_flow_events(self, events: Sequence[FlowsStarted | FlowsEnded | FlowTableResync], now: float) -> None:
        """Flow ends drain sessions; flows are learned in-band, so starts say nothing new."""
        for event in events:
            if isinstance(event, FlowsStarted):
                continue
            if isinstance(event, FlowsEnded):
                ended: Sequence[FlowKey] = event.flows
            else:
                self.counters["conntrack_sweeps" if event.sweep else "conntrack_resyncs"] += 1
                ended = [f for f in self.by_flow if f not in event.live]
            for flow in ended:
                session = self.by_flow.pop(flow, None)
                if session is None:
                    continue
                session.flows.discard(flow)
                if not session.flows:
                    self._drain(session, now)

    def _drain(self, session: S, now: float) -> None:
        session.state = State.DRAINING
        session.ends_at = now + self.persistence

    def tick(self, now: float) -> list[ops.Operation]:
        out: list[ops.Operation] = []
        for session in list(self.sessions.values()):
            if session.state == State.DRAINING and session.ends_at is not None and now >= session.ends_at:
                out += self._end(session)
        return out

    def _end(self, session: S) -> list[ops.Operation]:
        del self.sessions[self.label(session)]
        for flow in session.flows:
            self.by_flow.pop(flow, None)
        self.counters["sessions_ended"] += 1
        return self._forget(session)

    # -- restart ----------------------------------------------------------------------------------
    def restored(self, now: float) -> None:
        """After a restore took the kernel's objects and conntrack's live flows: sessions without
        a flow drain from now."""
        for session in self.sessions.values():
            if not session.flows:
                self._drain(session, now)
        self.counters["restored_sessions"] = len(self.sessions)
