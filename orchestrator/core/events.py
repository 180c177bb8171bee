"""What the decision core is told (events) and what it answers besides dataplane operations
(verdicts). Frozen, so every step of the core can be logged and replayed in tests."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.dataplane.ops import NextHop


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow as the client sent it (conntrack's original tuple; ports None without L4 ports)."""

    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None


@dataclass(frozen=True)
class FirstPacket:
    """The first packet of a new flow, as NFQUEUE handed it over (raw IP, no link layer), with
    the balancer's route to its source (`next_hop`, looked up by the daemon, since the core does
    no I/O): where a new session's S2C label route must send answers. None: no route, so the
    client cannot be answered and no session is opened for it."""

    queue: int
    packet_id: int
    data: bytes
    indev: str | None = None
    next_hop: NextHop | None = None


@dataclass(frozen=True)
class LabelledPacket:
    """On a server: the first packet of a new flow to a VIP that arrived under session label
    `label` (the ingress ruleset put the label into the packet mark before the label was popped)."""

    queue: int
    packet_id: int
    label: int
    data: bytes


@dataclass(frozen=True)
class FlowsStarted:
    """Conntrack confirmed these new flows carrying our tag. The daemon saw the first packet of
    most of them; the others were admitted by the kernel's fast path and belong to the session
    whose set element let them in."""

    flows: tuple[FlowKey, ...]


@dataclass(frozen=True)
class FlowsEnded:
    """Conntrack destroyed these flows."""

    flows: tuple[FlowKey, ...]


@dataclass(frozen=True)
class FlowTableResync:
    """A dump of our flows in conntrack: any other flow ended. Taken when events were lost
    (ENOBUFS), and as a periodic sweep (`sweep`): the kernel reports an expired flow's end only
    when its garbage collector or a lookup reaches it, which can take minutes; a dump does."""

    live: frozenset[FlowKey]
    sweep: bool = False


class Action(enum.StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    REFUSE = "refuse"  # rejected by the kernel with TCP RST or ICMP, as `refuse_with` says


@dataclass(frozen=True)
class PacketVerdict:
    queue: int
    packet_id: int
    action: Action
    refuse_with: str | None = None  # "rst" | "icmp" with REFUSE
    reason: str = ""
