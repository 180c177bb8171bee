"""The session table: affinity between a client key and a service, with its labels and server.

Sessions are rows in columns (issue 15: memory per session): each field an `array` of numbers,
names (service, VIP, protocol, server, owner) as indexes into one table of strings, a session
keyed by its IPv4 client address (the common case) with that address as a number and found by
it in an `IntMap` (service index << 32 | address), its first flow kept in its row (its source
port; the rest follows from its key, VIP, protocol and port). What only some sessions have (any
other key, a second flow, other client addresses, stored objects) sits in side dicts by row.
A `Session` is a light view of a row, made on access (one per row while anyone holds it); one
that is not in a table, or was removed from it, holds its fields itself."""

from __future__ import annotations

import enum
import math
import weakref
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from orchestrator.analyze.keys import SessionKey, SessionKeyKind
from orchestrator.core.events import FlowKey
from orchestrator.core.intmap import IntMap
from orchestrator.dataplane import ops
from orchestrator.ipproto import BY_NAME


class State(enum.StrEnum):
    OPENING = "opening"  # objects being programmed; its first packet waits for them
    SERVING = "serving"  # flows alive
    DRAINING = "draining"  # no flow left; ends when the persistence timeout has passed
    CLOSING = "closing"  # removed; its objects are being deleted


_STATES = tuple(State)
_FREE = 255  # the state column of a row no session holds
_FREE_BYTE = bytes((_FREE,))
_SPAN = 4096  # rows whose free ones `SessionTable._row_at` counts at once
NOT_TAKEN, TAKEN, KNOWN, ANSWERED = 0, 1, 2, 3  # SessionTable.take's answers
_DRAINING, _SERVING = _STATES.index(State.DRAINING), _STATES.index(State.SERVING)
_KINDS = tuple(SessionKeyKind)
_ODD = 255  # the kind column of a session whose key is in the side dict (not an IPv4 client address)


class Derives(Protocol):
    """What a session's kernel objects follow from besides its row (core.balancer.Shape: the
    configuration in force when they were made)."""

    def objects(self, session: Session) -> list[ops.DataplaneObject]: ...


def v4(text: str) -> int:
    """The IPv4 address `text` as a number if it is one in inet_ntop's form, else -1 (such a
    number gives back exactly `text`, see `ntop`)."""
    parts = text.split(".")
    if len(parts) != 4:
        return -1
    try:
        a, b, c, d = map(int, parts)
    except ValueError:
        return -1
    if 0 <= a < 256 and 0 <= b < 256 and 0 <= c < 256 and 0 <= d < 256 and f"{a}.{b}.{c}.{d}" == text:
        return a << 24 | b << 16 | c << 8 | d
    return -1


def ntop(n: int) -> str:
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


Number = int | float


def _plain(t: SessionTable, v: Number) -> Any:
    return v


def _plain_in(t: SessionTable, v: Any) -> Number:
    return v  # type: ignore[no-any-return]


def _opt_int(t: SessionTable, v: Number) -> Any:
    return None if v < 0 else v


def _opt_int_in(t: SessionTable, v: Any) -> Number:
    return -1 if v is None else v


def _opt_float(t: SessionTable, v: Number) -> Any:
    return None if v != v else v  # NaN: None


def _opt_float_in(t: SessionTable, v: Any) -> Number:
    return math.nan if v is None else v


def _name(t: SessionTable, v: Number) -> Any:
    return t._names[int(v)]


def _name_in(t: SessionTable, v: Any) -> Number:
    return t._name_index(v)


def _state(t: SessionTable, v: Number) -> Any:
    return _STATES[int(v)]


def _state_in(t: SessionTable, v: Any) -> Number:
    return _STATES.index(v)  # tuple.index: identity first; an enum's hash is Python code


_Codec = tuple[Callable[["SessionTable", Number], Any], Callable[["SessionTable", Any], Number]]
_PLAIN: _Codec = (_plain, _plain_in)
_OPT_INT: _Codec = (_opt_int, _opt_int_in)
_OPT_FLOAT: _Codec = (_opt_float, _opt_float_in)
_NAME: _Codec = (_name, _name_in)
_STATE: _Codec = (_state, _state_in)

# A session's fields kept as one number each: name -> (array type code, codec).
COLUMNS: dict[str, tuple[str, _Codec]] = {
    "id": ("q", _PLAIN),
    "service": ("H", _NAME),
    "vip": ("H", _NAME),
    "protocol": ("H", _NAME),
    "port": ("i", _OPT_INT),
    "server": ("H", _NAME),
    "c2s": ("i", _PLAIN),
    "created": ("d", _PLAIN),
    "last_seen": ("d", _PLAIN),
    "state": ("B", _STATE),
    "ends_at": ("d", _OPT_FLOAT),
    "flows_total": ("I", _PLAIN),
    "packets_userspace": ("I", _PLAIN),
    "embryonic_until": ("d", _OPT_FLOAT),
    "sport": ("i", _OPT_INT),
    "label_packets": ("q", _OPT_INT),
    "label_check_at": ("d", _OPT_FLOAT),
    "owner": ("H", _NAME),
}
# Columns of what the side dicts complete: the key's kind (_ODD: the key is in `_odd_keys`) and
# IPv4 client address; the first flow's source port (-1: none in the row); the client addresses
# (0: none, 1: the key's client, 2: in `_addresses`); the shape and next hop (indexes into
# `_things`, 0: none; no shape: the objects are in `_stored`).
INNER = {"kind": "B", "address": "I", "flow_sport": "i", "clients": "B", "shape": "H", "hop": "H"}


class _Column:
    """A field of a session in a table (`_View`): its column's number, decoded."""

    __slots__ = ("name", "encode")

    def __init__(self, name: str) -> None:
        self.name = name
        self.encode = COLUMNS[name][1][1]

    def __get__(self, obj: _View | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._t._columns[self.name][obj._r]

    def __set__(self, obj: _View, value: Any) -> None:
        t = obj._t
        t._columns[self.name][obj._r] = self.encode(t, value)


class _Name(_Column):
    def __get__(self, obj: _View | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        t = obj._t
        return t._names[t._columns[self.name][obj._r]]


class _OptionalInt(_Column):
    def __get__(self, obj: _View | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        v = obj._t._columns[self.name][obj._r]
        return None if v < 0 else v


class _OptionalFloat(_Column):
    def __get__(self, obj: _View | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        v = obj._t._columns[self.name][obj._r]
        return None if v != v else v  # NaN: None


class _State(_Column):
    def __get__(self, obj: _View | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return _STATES[obj._t._columns[self.name][obj._r]]


_DESCRIPTORS: dict[int, type[_Column]] = {
    id(_PLAIN): _Column,
    id(_NAME): _Name,
    id(_OPT_INT): _OptionalInt,
    id(_OPT_FLOAT): _OptionalFloat,
    id(_STATE): _State,
}
_NO_STORED: list[ops.DataplaneObject] = []  # the default of `stored`: copied, never kept
FIELDS = (
    "id service key vip protocol port server c2s created last_seen state live ends_at addresses stored shape"
    " hop flows_total packets_userspace embryonic_until sport label_packets label_check_at owner"
).split()


class Session:
    """One session (mutable inside the core; exported via `view()`). As made, and once removed
    from its table, it holds its fields itself; in a table it is a `_View` of its row (the
    table changes its class both ways: the two have the same slots)."""

    __slots__ = (*FIELDS, "_t", "_r", "_k", "__weakref__")

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
    state: State
    # Its live flows (read them as `flows`): None, the one flow, or a set of two or more.
    live: FlowKey | set[FlowKey] | None
    ends_at: float | None
    # Its addresses with a C2S filter (read and set them as `clients`): None, the one address,
    # or a list of two or more.
    addresses: str | list[str] | None
    # Its objects in the kernel: `stored`, or None when `shape` derives them from the row and
    # `hop` (issue 15: a copy of every object was 820 of the 1,950 bytes of a session). Read
    # and set them as `objects`.
    stored: list[ops.DataplaneObject] | None
    shape: Derives | None
    hop: ops.NextHop | None  # its S2C route's next hop (a derived session's only client)
    flows_total: int  # flows it has had: through the daemon or the kernel's fast path
    packets_userspace: int  # its first packets that went through the daemon
    # Embryonic (TCP): until when its client may send nothing past its first packet; None once
    # it did (or never for a session that is not checked). See Balancer.embryonic_due.
    embryonic_until: float | None
    sport: int | None  # its first flow's source port (a five-tuple session's filter matches it)
    # A label-aware session's liveness (Balancer.liveness_due): the packets its liveness filters
    # had counted at the last check (None: not read yet), and when the next check is due (None:
    # none pending; its flows, or its persistence, decide its end as for any session).
    label_packets: int | None
    label_check_at: float | None
    owner: str | None  # cluster mode: the member that owns it in the shared table (None: this one)

    def __init__(
        self,
        id: int,
        service: str,
        key: SessionKey,
        vip: str,
        protocol: str,
        port: int | None,
        server: str,
        c2s: int,
        created: float,
        last_seen: float,
        state: State = State.OPENING,
        live: FlowKey | set[FlowKey] | None = None,
        ends_at: float | None = None,
        addresses: str | list[str] | None = None,
        stored: list[ops.DataplaneObject] | None = _NO_STORED,
        shape: Derives | None = None,
        hop: ops.NextHop | None = None,
        flows_total: int = 0,
        packets_userspace: int = 0,
        embryonic_until: float | None = None,
        sport: int | None = None,
        label_packets: int | None = None,
        label_check_at: float | None = None,
        owner: str | None = None,
    ) -> None:
        self.id, self.service, self.key, self.vip, self.protocol, self.port = id, service, key, vip, protocol, port
        self.server, self.c2s, self.created, self.last_seen, self.state = server, c2s, created, last_seen, state
        self.live, self.ends_at, self.addresses = live, ends_at, addresses
        self.stored = [] if stored is _NO_STORED else stored
        self.shape, self.hop, self.flows_total, self.packets_userspace = shape, hop, flows_total, packets_userspace
        self.embryonic_until, self.sport, self.label_packets = embryonic_until, sport, label_packets
        self.label_check_at, self.owner = label_check_at, owner
        self._t: SessionTable | None = None
        self._r = -1
        self._k: SessionKey | None = None

    def fields(self) -> dict[str, Any]:
        """Every field by name (a copy)."""
        return {name: getattr(self, name) for name in FIELDS}

    def __repr__(self) -> str:
        return f"Session({', '.join(f'{k}={v!r}' for k, v in self.fields().items())})"

    # -- derived --------------------------------------------------------------------------------
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
            self.addresses = [*addresses, client]
        else:
            self.addresses = [addresses, client]

    def has_client(self, client: str) -> bool:
        addresses = self.addresses
        return client in addresses if isinstance(addresses, list) else client == addresses

    @property
    def objects(self) -> list[ops.DataplaneObject]:
        """Its objects in the kernel; a derived session's are made anew on each read, so change
        them only by assigning (or `materialize` first)."""
        stored = self.stored
        if stored is not None:
            return stored
        shape = self.shape
        assert shape is not None
        return shape.objects(self)

    @objects.setter
    def objects(self, objects: list[ops.DataplaneObject]) -> None:
        self.stored, self.shape, self.hop = objects, None, None

    def materialize(self) -> list[ops.DataplaneObject]:
        """Its objects stored from now on (before they change in place); returns them."""
        if self.stored is None:
            self.objects = self.objects
        stored = self.stored
        assert stored is not None
        return stored

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
        clients = self.clients
        key = self.key
        return {
            "id": self.id,
            "client": clients[-1] if clients else key.client,
            "clients": clients,
            "key": key.value,
            "key_kind": str(key.kind),
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


class _View(Session):
    """A session in a table: its fields are its row's (the columns' descriptors are set below)."""

    __slots__ = ()
    _t: SessionTable

    @property
    def key(self) -> SessionKey:
        k = self._k
        if k is None:
            k = self._k = self._t._key(self._r)
        return k

    @key.setter
    def key(self, value: SessionKey) -> None:
        raise AttributeError("a session's key does not change in its table")

    @property
    def live(self) -> FlowKey | set[FlowKey] | None:
        return self._t._live(self._r)

    @live.setter
    def live(self, value: FlowKey | set[FlowKey] | None) -> None:
        raise AttributeError("the table changes a session's flows: add_flow, end_flow")

    @property
    def addresses(self) -> str | list[str] | None:
        return self._t._addresses_of(self._r)

    @addresses.setter
    def addresses(self, value: str | list[str] | None) -> None:
        self._t._set_addresses(self._r, value)

    @property
    def stored(self) -> list[ops.DataplaneObject] | None:
        return self._t._stored_of(self._r)

    @stored.setter
    def stored(self, value: list[ops.DataplaneObject] | None) -> None:
        if value is None:
            self._t._stored.pop(self._r, None)
        else:
            self._t._stored[self._r] = value

    @property
    def shape(self) -> Derives | None:
        t = self._t
        return t._things[t._inner["shape"][self._r]]  # type: ignore[return-value]

    @shape.setter
    def shape(self, value: Derives | None) -> None:
        self._t._inner["shape"][self._r] = self._t._thing_index(value)

    @property
    def hop(self) -> ops.NextHop | None:
        t = self._t
        return t._things[t._inner["hop"][self._r]]  # type: ignore[return-value]

    @hop.setter
    def hop(self, value: ops.NextHop | None) -> None:
        self._t._inner["hop"][self._r] = self._t._thing_index(value)


for _field, (_, _codec) in COLUMNS.items():
    setattr(_View, _field, _DESCRIPTORS[id(_codec)](_field))


class SessionTable:
    def __init__(self, first_id: int = 1, id_step: int = 1) -> None:
        """New ids are first_id, first_id + id_step, ... (a worker's ids: core.shards)."""
        self._columns: dict[str, array[Any]] = {name: array(code) for name, (code, _) in COLUMNS.items()}
        self._inner: dict[str, array[int]] = {name: array(code) for name, code in INNER.items()}
        # every column in `add`'s order: COLUMNS', then INNER's
        self._all_columns: list[array[Any]] = [*self._columns.values(), *self._inner.values()]
        self._free = array("i")  # rows no session holds, reused last freed first
        self._names: list[str | None] = [None]  # index 0: None
        self._name_at: dict[str, int] = {}
        self._things: list[object] = [None]  # shapes and next hops, by identity; index 0: None
        self._thing_at: dict[int, int] = {}
        self._by_key = IntMap()  # service index << 32 | IPv4 client address -> row
        self._by_id = IntMap()  # id -> row
        # What only some sessions have, by row: another key (and its index by (service index,
        # value)), flows besides the one in the row (and their index), client addresses other
        # than the key's, stored objects.
        self._odd_keys: dict[int, SessionKey] = {}
        self._by_odd_key: dict[tuple[int, str], int] = {}
        self._more_flows: dict[int, set[FlowKey]] = {}
        self._by_flow: dict[FlowKey, int] = {}
        self._addresses: dict[int, str | list[str]] = {}
        self._stored: dict[int, list[ops.DataplaneObject]] = {}
        # (VIP, protocol number, port) -> service indexes: where a flow kept in a row is looked for
        self._services_at: dict[tuple[str, int, int], list[int]] = {}
        self._views: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()
        self._next_id = first_id
        self._id_step = id_step
        # Sessions per (server, service), per server and per service: admission and the
        # schedulers ask for them on every new session, so they must not cost a scan.
        self._counts: Counter[tuple[str | None, str | None]] = Counter()
        # Sessions per state (status and the metrics): kept as states change (set_state), so
        # that asking costs no walk of the table.
        self._states: Counter[State] = Counter()

    # -- shared tables -----------------------------------------------------------------------------
    def _name_index(self, name: str | None) -> int:
        if name is None:
            return 0
        i = self._name_at.get(name)
        if i is None:
            i = self._name_at[name] = len(self._names)
            self._names.append(name)
        return i

    def _thing_index(self, thing: object) -> int:
        if thing is None:
            return 0
        i = self._thing_at.get(id(thing))
        if i is None:
            i = self._thing_at[id(thing)] = len(self._things)
            self._things.append(thing)  # kept: its id stays its own
        return i

    def _view(self, row: int) -> Session:
        view = self._views.get(row)
        if view is None:
            view = _View.__new__(_View)
            view._t, view._r, view._k = self, row, None
            self._views[row] = view
        return view

    # -- rows ------------------------------------------------------------------------------------
    def _key(self, row: int) -> SessionKey:
        kind = self._inner["kind"][row]
        if kind == _ODD:
            return self._odd_keys[row]
        text = ntop(self._inner["address"][row])
        return SessionKey(_KINDS[kind], text, text)

    def _primary(self, row: int) -> FlowKey | None:
        """The flow kept in the row, if any."""
        inner = self._inner
        sport = inner["flow_sport"][row]
        if sport < 0:
            return None
        c, names = self._columns, self._names
        vip, protocol = names[c["vip"][row]], names[c["protocol"][row]]
        assert vip is not None and protocol is not None
        return FlowKey(BY_NAME[protocol], ntop(inner["address"][row]), vip, sport, c["port"][row])

    def _is_primary(self, row: int, flow: FlowKey) -> bool:
        """Whether `flow` is the flow kept in the row, the row found by the flow's source
        address (so its address is the row's): `_primary(row) == flow` without making it."""
        c, names = self._columns, self._names
        return (
            self._inner["flow_sport"][row] == flow.sport
            and c["port"][row] == flow.dport
            and names[c["vip"][row]] == flow.dst
            and BY_NAME.get(names[c["protocol"][row]] or "") == flow.proto
        )

    def _live(self, row: int) -> FlowKey | set[FlowKey] | None:
        primary, more = self._primary(row), self._more_flows.get(row)
        if not more:
            return primary
        if primary is None:
            return set(more) if len(more) > 1 else next(iter(more))
        return {primary, *more}

    def _addresses_of(self, row: int) -> str | list[str] | None:
        mode = self._inner["clients"][row]
        if mode == 0:
            return None
        if mode == 1:
            return ntop(self._inner["address"][row])
        return self._addresses[row]

    def _set_addresses(self, row: int, value: str | list[str] | None) -> None:
        inner = self._inner
        self._addresses.pop(row, None)
        if value is None:
            inner["clients"][row] = 0
        elif isinstance(value, str) and inner["kind"][row] != _ODD and v4(value) == inner["address"][row]:
            inner["clients"][row] = 1
        else:
            inner["clients"][row] = 2
            self._addresses[row] = value

    def _stored_of(self, row: int) -> list[ops.DataplaneObject] | None:
        if self._inner["shape"][row]:
            return self._stored.get(row)
        return self._stored.setdefault(row, [])

    def _flow_row(self, flow: FlowKey) -> int:
        """The row that holds `flow` in itself (-1: none)."""
        if flow.sport is None or flow.dport is None:
            return -1
        services = self._services_at.get((flow.dst, flow.proto, flow.dport))
        if services is None:
            return -1
        address = v4(flow.src)
        if address < 0:
            return -1
        for service in services:
            row = self._by_key.get(service << 32 | address)
            if row >= 0 and self._is_primary(row, flow):
                return row
        return -1

    def _may_hold(self, row: int, flow: FlowKey) -> bool:
        """Whether `flow` can be kept in the row (its row has none, and it is the client's flow
        to the session's VIP, protocol and port)."""
        inner, c, names = self._inner, self._columns, self._names
        if inner["flow_sport"][row] >= 0 or inner["kind"][row] == _ODD or flow.sport is None or flow.sport < 0:
            return False
        protocol = names[c["protocol"][row]]
        return (
            flow.dport is not None
            and c["port"][row] == flow.dport
            and protocol in BY_NAME
            and BY_NAME[protocol] == flow.proto
            and names[c["vip"][row]] == flow.dst
            and v4(flow.src) == inner["address"][row]
        )

    # -- the table -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def _rows(self) -> Iterator[int]:
        state = self._columns["state"]
        return (row for row in range(len(state)) if state[row] != _FREE)

    def __iter__(self) -> Iterator[Session]:
        """Each session once, its view made as it comes (a view kept by nobody goes at once:
        a list of every view would be an object per session again). Sessions removed on the
        way are skipped; rows the table has when the walk begins are the ones walked."""
        return (self._view(row) for row in self._rows())

    def on_server(self, server: str) -> list[Session]:
        """The sessions on `server` (a scan of the server column; only theirs get a view)."""
        index = self._name_at.get(server)
        if index is None:
            return []
        servers = self._columns["server"]
        state = self._columns["state"]
        return [self._view(row) for row in range(len(servers)) if servers[row] == index and state[row] != _FREE]

    def page(self, offset: int, limit: int | None) -> list[Session]:
        """Sessions in table order, `offset` skipped, at most `limit` (all without one)."""
        return [self._view(row) for row in self._page_rows(offset, limit)]

    def page_views(self, offset: int, limit: int | None) -> list[dict[str, object]]:
        """`page`'s sessions as their `view()`s, each built from its row's columns without a
        `Session` (issue 15: a page of 1,000 views cost about 150 us a row in the lab's guest).
        A row with what only some sessions have (another key, client addresses other than its
        key's, flows beside its own) is left to its `Session.view`: one place for those."""
        c, inner, names = self._columns, self._inner, self._names
        ids, services, vips, protocols, ports = c["id"], c["service"], c["vip"], c["protocol"], c["port"]
        servers, c2ss, created, last_seen, states = c["server"], c["c2s"], c["created"], c["last_seen"], c["state"]
        ends_at, flows_total, packets, embryonic = (
            c["ends_at"],
            c["flows_total"],
            c["packets_userspace"],
            c["embryonic_until"],
        )
        label_packets, label_check_at, owners = c["label_packets"], c["label_check_at"], c["owner"]
        kinds, addresses, modes, sports = inner["kind"], inner["address"], inner["clients"], inner["flow_sport"]
        kind_names = [str(kind) for kind in _KINDS]
        state_names = [str(state) for state in _STATES]
        more = self._more_flows
        out: list[dict[str, object]] = []
        for row in self._page_rows(offset, limit):
            kind, mode = kinds[row], modes[row]
            if kind == _ODD or mode > 1 or row in more:
                out.append(self._view(row).view())
                continue
            client = ntop(addresses[row])
            port, packets_read, check_at, ends, owner = (
                ports[row],
                label_packets[row],
                label_check_at[row],
                ends_at[row],
                owners[row],
            )
            c2s = c2ss[row]
            view: dict[str, object] = {
                "id": ids[row],
                "client": client,
                "clients": [client] if mode else [],
                "key": client,
                "key_kind": kind_names[kind],
                "service": names[services[row]],
                "vip": names[vips[row]],
                "protocol": names[protocols[row]],
                "port": None if port < 0 else port,
                "server": names[servers[row]],
                "c2s_label": c2s,
                "s2c_label": c2s + 1,
                "state": state_names[states[row]],
                "flows": 1 if sports[row] >= 0 else 0,
                "flows_total": flows_total[row],
                "packets_userspace": packets[row],
                "embryonic": embryonic[row] == embryonic[row],  # not NaN
                "label_packets": None if packets_read < 0 else packets_read,
                "label_check_at": None if check_at != check_at else check_at,
                "created": created[row],
                "last_seen": last_seen[row],
                "ends_at": None if ends != ends else ends,
            }
            if owner:
                view["owner"] = names[owner]
            out.append(view)
        return out

    def _page_rows(self, offset: int, limit: int | None) -> Iterable[int]:
        """The rows of `page`: from the row of the session `offset` sessions in (`_row_at`, no
        walk of the rows before it), the next `limit` rows that hold a session."""
        state = self._columns["state"]
        end, row = len(state), self._row_at(offset)
        if not self._free:
            return range(row, end if limit is None else min(end, row + limit))
        rows: list[int] = []
        while row < end and (limit is None or len(rows) < limit):
            if state[row] != _FREE:
                rows.append(row)
            row += 1
        return rows

    def _row_at(self, offset: int) -> int:
        """The row of the session `offset` sessions into the table's order (the number of rows
        if there is none): `offset` itself while no row is free; else the rows before it are
        counted a span at a time in the state column's bytes (C's count), never read one by one
        (issue 15: the last page at 500,000 sessions walked 499,000 rows, 0.09 s in the guest)."""
        state = self._columns["state"]
        end = len(state)
        if not self._free:
            return min(offset, end)
        data = state.tobytes()
        row = 0
        while row < end:
            stop = min(row + _SPAN, end)
            held = stop - row - data.count(_FREE_BYTE, row, stop)
            if held > offset:
                break
            offset -= held
            row = stop
        while row < end:  # within the span that holds it
            if data[row] != _FREE:
                if not offset:
                    return row
                offset -= 1
            row += 1
        return end

    def new_id(self) -> int:
        self._next_id += self._id_step
        return self._next_id - self._id_step

    def get(self, service: str, key: str) -> Session | None:
        index = self._name_at.get(service)
        if index is None:
            return None
        address = v4(key)
        if address >= 0:
            row = self._by_key.get(index << 32 | address)
            if row >= 0:
                return self._view(row)
        row = self._by_odd_key.get((index, key), -1)
        return None if row < 0 else self._view(row)

    def by_flow(self, flow: FlowKey) -> Session | None:
        row = self._by_flow.get(flow)
        if row is None:
            row = self._flow_row(flow)
        return None if row < 0 else self._view(row)

    def by_id(self, session_id: int) -> Session | None:
        row = self._by_id.get(session_id)
        return None if row < 0 else self._view(row)

    def add(self, session: Session) -> None:
        if session._t is self:  # in the table already
            return
        if session._t is not None:  # another table's: this one takes a copy of its row
            fields = session.fields()
            session._t.remove(session)
            for name, value in fields.items():
                setattr(session, name, value)
        f = session  # its own fields, read before it becomes a view of its row
        old = self._by_id.get(f.id)
        if old >= 0:
            self.remove(self._view(old))
        index = self._name_index
        service, vip, protocol, server, owner = (
            index(f.service),
            index(f.vip),
            index(f.protocol),
            index(f.server),
            index(f.owner),
        )
        port, ends_at, embryonic_until, sport, label_packets, label_check_at, shape, hop = (
            f.port,
            f.ends_at,
            f.embryonic_until,
            f.sport,
            f.label_packets,
            f.label_check_at,
            f.shape,
            f.hop,
        )
        key: SessionKey = f.key
        addresses = f.addresses
        address = v4(key.value) if key.value == key.client else -1
        values = (
            f.id,
            service,
            vip,
            protocol,
            -1 if port is None else port,
            server,
            f.c2s,
            f.created,
            f.last_seen,
            _STATES.index(f.state),
            math.nan if ends_at is None else ends_at,
            f.flows_total,
            f.packets_userspace,
            math.nan if embryonic_until is None else embryonic_until,
            -1 if sport is None else sport,
            -1 if label_packets is None else label_packets,
            math.nan if label_check_at is None else label_check_at,
            owner,
            _KINDS.index(key.kind) if address >= 0 else _ODD,
            max(address, 0),
            -1,
            0 if addresses is None else 1 if address >= 0 and addresses == key.client else 2,
            0 if shape is None else self._thing_index(shape),
            0 if hop is None else self._thing_index(hop),
        )
        columns = self._all_columns
        if self._free:
            row = self._free.pop()
            for column, value in zip(columns, values, strict=True):
                column[row] = value
        else:
            row = len(columns[0])
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        if address >= 0:
            self._by_key.put(service << 32 | address, row)
            number = BY_NAME.get(f.protocol)
            if port is not None and number is not None:
                at = self._services_at.setdefault((f.vip, number, port), [])
                if service not in at:
                    at.append(service)
        else:
            self._odd_keys[row] = key
            self._by_odd_key[(service, key.value)] = row
        if values[-3] == 2 and addresses is not None:
            self._addresses[row] = addresses
        if f.stored is not None:
            self._stored[row] = f.stored
        self._by_id.put(f.id, row)
        live, state, session_id = f.live, f.state, f.id
        session.__class__ = _View
        session._t, session._r, session._k = self, row, key
        self._views[row] = session
        for flow in live if isinstance(live, set) else () if live is None else (live,):
            self._hold(row, flow)
        self._count(session, 1)
        self._states[state] += 1
        if session_id >= self._next_id:  # the next id of ours above it
            self._next_id = session_id + 1 + (self._next_id - session_id - 1) % self._id_step

    def _hold(self, row: int, flow: FlowKey) -> bool:
        """The row's session has `flow` (True: it did not before)."""
        held = self._inner["flow_sport"][row]
        if held < 0:
            if self._may_hold(row, flow):
                assert flow.sport is not None
                self._inner["flow_sport"][row] = flow.sport
                return True
        elif held == flow.sport and self._is_primary(row, flow) and v4(flow.src) == self._inner["address"][row]:
            return False
        more = self._more_flows.get(row)
        if more is None:
            more = self._more_flows[row] = set()
        held = len(more)
        more.add(flow)
        if len(more) == held:
            return False
        self._by_flow[flow] = row
        return True

    def _add_flow_at(self, row: int, flow: FlowKey, now: float) -> None:
        c = self._columns
        if self._hold(row, flow):
            c["flows_total"][row] += 1
        c["last_seen"][row] = now
        c["ends_at"][row] = math.nan
        if c["state"][row] == _DRAINING:
            c["state"][row] = _SERVING
            self._states[State.DRAINING] -= 1
            self._states[State.SERVING] += 1

    def add_flow(self, session: Session, flow: FlowKey, now: float) -> None:
        assert session._t is self, "a session of the table"
        self._add_flow_at(session._r, flow, now)

    def take(self, service: str | None, flow: FlowKey, now: float) -> int:
        """Balancer._adopt_started's common case in row terms, without a view of the session:
        KNOWN if a session has `flow` already; else, `service` given, its session keyed by the
        flow's source address takes `flow` (as `add_flow`) if it is this balancer's own and has
        that address among its clients: TAKEN, or ANSWERED when that session was embryonic (the
        flow's first packet went through its filter, so its client sent more than its first
        packet: it is embryonic no longer); else NOT_TAKEN (nothing changed)."""
        if flow in self._by_flow:
            return KNOWN
        src, sport = flow.src, flow.sport
        address = v4(src)
        index = None if service is None else self._name_at.get(service)
        row = -1
        if address >= 0 and sport is not None and flow.dport is not None:
            services = self._services_at.get((flow.dst, flow.proto, flow.dport))
            for other in services or ():
                found = self._by_key.get(other << 32 | address)
                if found >= 0 and self._is_primary(found, flow):
                    return KNOWN
                if other == index:
                    row = found
        if index is None:
            return NOT_TAKEN
        if row < 0 and address >= 0:
            row = self._by_key.get(index << 32 | address)
        if row < 0:
            row = self._by_odd_key.get((index, src), -1)
            if row < 0:
                return NOT_TAKEN
        if self._columns["owner"][row]:
            return NOT_TAKEN
        mode = self._inner["clients"][row]
        if mode == 1:
            if self._inner["address"][row] != address:
                return NOT_TAKEN
        elif mode == 2:
            addresses = self._addresses[row]
            if not (src in addresses if isinstance(addresses, list) else src == addresses):
                return NOT_TAKEN
        else:
            return NOT_TAKEN
        self._add_flow_at(row, flow, now)
        embryonic = self._columns["embryonic_until"]
        if embryonic[row] == embryonic[row]:  # not NaN
            embryonic[row] = math.nan
            return ANSWERED
        return TAKEN

    def end_flow(self, flow: FlowKey) -> Session | None:
        row = self._by_flow.pop(flow, None)
        if row is not None:
            more = self._more_flows[row]
            more.discard(flow)
            if not more:
                del self._more_flows[row]
            return self._view(row)
        row = self._flow_row(flow)
        if row < 0:
            return None
        self._inner["flow_sport"][row] = -1
        return self._view(row)

    def flows(self) -> list[FlowKey]:
        held = self._inner["flow_sport"]
        out = [flow for row in range(len(held)) if held[row] >= 0 and (flow := self._primary(row)) is not None]
        return out + list(self._by_flow)

    def flows_now(self) -> FlowsNow:
        """The table's flows as they are now, each made when read (a sweep's resync reads them
        a slice at a time: a list of every flow would be a FlowKey and an address string per
        session at once)."""
        held = self._inner["flow_sport"]
        return FlowsNow(self, array("i", (row for row in range(len(held)) if held[row] >= 0)), list(self._by_flow))

    def reassign(self, session: Session, server: str, c2s: int) -> None:
        """The session moves to another server under another pair (its server failed)."""
        self._count(session, -1)
        session.server, session.c2s = server, c2s
        self._count(session, 1)

    def remove(self, session: Session) -> None:
        if session._t is not self:
            if session._t is None:
                session.live, session.state = None, State.CLOSING
            return
        row = session._r
        fields = session.fields()
        self._count(session, -1)
        self._states[session.state] -= 1
        inner = self._inner
        service = self._name_at[fields["service"]]
        if inner["kind"][row] == _ODD:
            key = self._odd_keys.pop(row)
            if self._by_odd_key.get((service, key.value)) == row:
                del self._by_odd_key[(service, key.value)]
        else:
            packed = service << 32 | inner["address"][row]
            if self._by_key.get(packed) == row:
                self._by_key.pop(packed)
        self._by_id.pop(fields["id"])
        for flow in self._more_flows.pop(row, ()):
            self._by_flow.pop(flow, None)
        self._addresses.pop(row, None)
        self._stored.pop(row, None)
        inner["flow_sport"][row] = -1
        self._columns["state"][row] = _FREE
        self._views.pop(row, None)
        self._free.append(row)
        fields["live"], fields["state"] = None, State.CLOSING
        session.__class__ = Session
        for name, value in fields.items():
            setattr(session, name, value)
        session._t, session._r, session._k = None, -1, None

    def set_state(self, session: Session, state: State) -> None:
        """Every state change of a session in the table goes through here (the counts by state)."""
        if session._t is self:
            self._states[session.state] -= 1
            self._states[state] += 1
        session.state = state

    def by_state(self) -> dict[str, int]:
        """Sessions per state, the states that have none left out."""
        return {str(state): n for state, n in self._states.items() if n > 0}

    def _count(self, session: Session, delta: int) -> None:
        server, service = session.server, session.service
        for key in ((server, service), (server, None), (None, service)):
            self._counts[key] += delta

    def count(self, server: str | None = None, service: str | None = None) -> int:
        if server is None and service is None:
            return len(self._by_id)
        return self._counts[(server, service)]


class FlowsNow:
    """`SessionTable.flows_now`: the rows that held a flow in themselves, then the flows beside
    them. A row's flow is read when asked for; None if the row holds none any more (it ended, or
    its session did: whatever replaced it started later)."""

    def __init__(self, table: SessionTable, rows: array[int], more: list[FlowKey]) -> None:
        self._table, self._rows, self._more = table, rows, more

    def __len__(self) -> int:
        return len(self._rows) + len(self._more)

    def slice(self, start: int, stop: int) -> list[FlowKey | None]:
        rows, primary = self._rows, self._table._primary
        out: list[FlowKey | None] = [primary(row) for row in rows[start:stop]]
        if stop > len(rows):
            out += self._more[max(0, start - len(rows)) : stop - len(rows)]
        return out
