"""The session table: affinity between a client key and a service, with its labels and server.
Indexed by (service, key) for new packets and by flow for conntrack's destroy events."""

from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.analyze.keys import SessionKey
from orchestrator.core.events import FlowKey
from orchestrator.dataplane import ops


class State(enum.StrEnum):
    OPENING = "opening"  # objects being programmed; its first packet waits for them
    SERVING = "serving"  # flows alive
    DRAINING = "draining"  # no flow left; ends when the persistence timeout has passed
    CLOSING = "closing"  # removed; its objects are being deleted


class Derives(Protocol):
    """What a session's kernel objects follow from besides its row (core.balancer.Shape: the
    configuration in force when they were made)."""

    def objects(self, session: Session) -> list[ops.DataplaneObject]: ...


@dataclass(slots=True)
class Session:
    """One row of the session table (mutable inside the core; exported via `view()`)."""

    id: int
    service: str
    key: SessionKey
    vip: str
    protocol: str
    port: int | None
    server: str
    c2s: int
    created: float
    last_seen: float
    state: State = State.OPENING
    # Its live flows (read them as `flows`): None, the one flow, or a set of two or more; most
    # sessions have one, and an empty set alone is 216 bytes (issue 15: memory per session).
    live: FlowKey | set[FlowKey] | None = None
    ends_at: float | None = None
    # Its addresses with a C2S filter (read and set them as `clients`): None, the one address,
    # or a list of two or more; most sessions have one, and a list of one is 88 bytes (issue 15).
    addresses: str | list[str] | None = None
    # Its objects in the kernel: `stored`, or None when `shape` derives them from the row and
    # `hop` (issue 15: a copy of every object was 820 of the 1,950 bytes of a session). Read
    # and set them as `objects`.
    stored: list[ops.DataplaneObject] | None = field(default_factory=list)
    shape: Derives | None = None
    hop: ops.NextHop | None = None  # its S2C route's next hop (a derived session's only client)
    flows_total: int = 0  # flows it has had: through the daemon or the kernel's fast path
    packets_userspace: int = 0  # its first packets that went through the daemon
    # Embryonic (TCP): until when its client may send nothing past its first packet; None once
    # it did (or never for a session that is not checked). See Balancer.embryonic_due.
    embryonic_until: float | None = None
    sport: int | None = None  # its first flow's source port (a five-tuple session's filter matches it)
    # A label-aware session's liveness (Balancer.liveness_due): the packets its liveness filters
    # had counted at the last check (None: not read yet), and when the next check is due (None:
    # none pending; its flows, or its persistence, decide its end as for any session).
    label_packets: int | None = None
    label_check_at: float | None = None
    owner: str | None = None  # cluster mode: the member that owns it in the shared table (None: this one)

    @property
    def s2c(self) -> int:
        return self.c2s + 1

    @property
    def flows(self) -> frozenset[FlowKey]:
        """Its live flows (the table changes them: SessionTable.add_flow, end_flow)."""
        live = self.live
        if live is None:
            return frozenset()
        return frozenset(live) if isinstance(live, set) else frozenset((live,))

    @property
    def clients(self) -> list[str]:
        """Its addresses with a C2S filter, first to last (a new list: change them by assigning,
        or with `add_client`)."""
        addresses = self.addresses
        if addresses is None:
            return []
        return list(addresses) if isinstance(addresses, list) else [addresses]

    @clients.setter
    def clients(self, clients: list[str]) -> None:
        self.addresses = None if not clients else clients[0] if len(clients) == 1 else list(clients)

    def add_client(self, client: str) -> None:
        """One more address with a C2S filter (last)."""
        addresses = self.addresses
        if addresses is None:
            self.addresses = client
        elif isinstance(addresses, list):
            addresses.append(client)
        else:
            self.addresses = [addresses, client]

    def has_client(self, client: str) -> bool:
        addresses = self.addresses
        return client in addresses if isinstance(addresses, list) else client == addresses

    @property
    def objects(self) -> list[ops.DataplaneObject]:
        """Its objects in the kernel; a derived session's are made anew on each read, so change
        them only by assigning (or `materialize` first)."""
        if self.stored is not None:
            return self.stored
        assert self.shape is not None
        return self.shape.objects(self)

    @objects.setter
    def objects(self, objects: list[ops.DataplaneObject]) -> None:
        self.stored, self.shape, self.hop = objects, None, None

    def materialize(self) -> list[ops.DataplaneObject]:
        """Its objects stored from now on (before they change in place); returns them."""
        if self.stored is None:
            self.objects = self.objects
        assert self.stored is not None
        return self.stored

    def derive(self, shape: Derives, hop: ops.NextHop) -> bool:
        """Keep no copy of its objects if `shape` derives exactly them; True if so."""
        stored = self.materialize()
        self.stored, self.shape, self.hop = None, shape, hop
        if shape.objects(self) == stored:
            return True
        self.objects = stored
        return False

    def view(self) -> dict[str, object]:
        """The documented JSON row of `mplsorch sessions --json`."""
        return {
            "id": self.id,
            "client": self.clients[-1] if self.clients else self.key.client,
            "clients": list(self.clients),
            "key": self.key.value,
            "key_kind": str(self.key.kind),
            "service": self.service,
            "vip": self.vip,
            "protocol": self.protocol,
            "port": self.port,
            "server": self.server,
            "c2s_label": self.c2s,
            "s2c_label": self.s2c,
            "state": str(self.state),
            "flows": len(self.flows),
            "flows_total": self.flows_total,
            "packets_userspace": self.packets_userspace,
            "embryonic": self.embryonic_until is not None,
            "label_packets": self.label_packets,
            "label_check_at": self.label_check_at,
            "created": self.created,
            "last_seen": self.last_seen,
            "ends_at": self.ends_at,
            **({} if self.owner is None else {"owner": self.owner}),
        }


class SessionTable:
    def __init__(self, first_id: int = 1, id_step: int = 1) -> None:
        """New ids are first_id, first_id + id_step, ... (a worker's ids: core.shards)."""
        # service -> key -> session: no (service, key) tuple per session (56 bytes each)
        self._by_key: dict[str, dict[str, Session]] = {}
        self._by_flow: dict[FlowKey, Session] = {}
        self._by_id: dict[int, Session] = {}
        self._next_id = first_id
        self._id_step = id_step
        # Sessions per (server, service), per server and per service: admission and the
        # schedulers ask for them on every new session, so they must not cost a scan.
        self._counts: collections.Counter[tuple[str | None, str | None]] = collections.Counter()
        # Sessions per state (status and the metrics): kept as states change (set_state), so
        # that asking costs no walk of the table.
        self._states: collections.Counter[State] = collections.Counter()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._by_id.values()))

    def page(self, offset: int, limit: int | None) -> list[Session]:
        """Sessions in table order, `offset` skipped, at most `limit` (all without one)."""
        return list(itertools.islice(self._by_id.values(), offset, None if limit is None else offset + limit))

    def new_id(self) -> int:
        self._next_id += self._id_step
        return self._next_id - self._id_step

    def get(self, service: str, key: str) -> Session | None:
        keys = self._by_key.get(service)
        return None if keys is None else keys.get(key)

    def by_flow(self, flow: FlowKey) -> Session | None:
        return self._by_flow.get(flow)

    def by_id(self, session_id: int) -> Session | None:
        return self._by_id.get(session_id)

    def add(self, session: Session) -> None:
        if session.id not in self._by_id:
            self._count(session, 1)
            self._states[session.state] += 1
        self._by_key.setdefault(session.service, {})[session.key.value] = session
        self._by_id[session.id] = session
        if session.id >= self._next_id:  # the next id of ours above it
            self._next_id = session.id + 1 + (self._next_id - session.id - 1) % self._id_step

    def add_flow(self, session: Session, flow: FlowKey, now: float) -> None:
        live = session.live
        if live is None:
            session.live = flow
            session.flows_total += 1
        elif isinstance(live, set):
            if flow not in live:
                live.add(flow)
                session.flows_total += 1
        elif live != flow:
            session.live = {live, flow}
            session.flows_total += 1
        session.last_seen = now
        session.ends_at = None
        if session.state == State.DRAINING:
            self.set_state(session, State.SERVING)
        self._by_flow[flow] = session

    def end_flow(self, flow: FlowKey) -> Session | None:
        session = self._by_flow.pop(flow, None)
        if session is not None:
            live = session.live
            if isinstance(live, set):
                live.discard(flow)
                if len(live) == 1:
                    session.live = next(iter(live))
            elif live == flow:
                session.live = None
        return session

    def flows(self) -> list[FlowKey]:
        return list(self._by_flow)

    def reassign(self, session: Session, server: str, c2s: int) -> None:
        """The session moves to another server under another pair (its server failed)."""
        self._count(session, -1)
        session.server, session.c2s = server, c2s
        self._count(session, 1)

    def remove(self, session: Session) -> None:
        keys = self._by_key.get(session.service)
        if keys is not None:
            keys.pop(session.key.value, None)
        if self._by_id.pop(session.id, None) is not None:
            self._count(session, -1)
            self._states[session.state] -= 1
        for flow in session.flows:  # a copy: `live` goes below
            self._by_flow.pop(flow, None)
        session.live = None
        session.state = State.CLOSING

    def set_state(self, session: Session, state: State) -> None:
        """Every state change of a session in the table goes through here (the counts by state)."""
        if session.id in self._by_id:
            self._states[session.state] -= 1
            self._states[state] += 1
        session.state = state

    def by_state(self) -> dict[str, int]:
        """Sessions per state, the states that have none left out."""
        return {str(state): n for state, n in self._states.items() if n > 0}

    def _count(self, session: Session, delta: int) -> None:
        for key in ((session.server, session.service), (session.server, None), (None, session.service)):
            self._counts[key] += delta

    def count(self, server: str | None = None, service: str | None = None) -> int:
        if server is None and service is None:
            return len(self._by_id)
        return self._counts[(server, service)]
