"""Dataplane objects and the operations on them: the only language between the core and providers.

The decision core returns lists of operations; a provider (netlink or fake) applies them and reports
one result per operation. Objects are frozen so operations can be logged, compared and replayed.
Label stacks are always written outermost first, as they appear on the wire.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field

from orchestrator.inet import pton
from orchestrator.ipproto import IPPROTO_ESP

MPLS_LABEL_MAX = (1 << 20) - 1
MPLS_FIRST_UNRESERVED = 16


class OffloadPolicy(enum.StrEnum):
    """Where a tc filter may run: `auto` lets the driver decide (software always, hardware too
    where the driver takes it), `never` keeps it in software (skip_hw), `required` fails unless
    the hardware takes it (skip_sw). The words are the configuration's (`interfaces.offload`)."""

    AUTO = "auto"
    NEVER = "never"
    REQUIRED = "required"


class Direction(enum.StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


def _net(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(prefix, strict=True)


# Entries of the two address caches below: the addresses that come back (VIPs, gateways, a batch's
# clients between its checks and its encoding). Sized for those, not for every client: an entry
# and its strings cost about 300 bytes, so 2^17 of them were 40 MB, a third of the daemon's
# memory at 100,000 sessions (issue 15: memory per session), for clients seen once.
ADDRESS_CACHE = 1 << 12


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def parse_address(text: str) -> tuple[int, bytes]:
    """(4 or 6, packed bytes) of an IP address, as inet_pton reads it. Cached: parsing costs a few
    microseconds on the session-setup path and the same addresses come back."""
    try:
        return pton(text)
    except ValueError:
        raise InvalidOperation(f"{text!r} is not an IP address") from None


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def parse_prefix(text: str) -> tuple[int, bytes, int]:
    """(4 or 6, packed network address, prefix length) of a CIDR prefix (a bare address is a
    host prefix); host bits must be zero."""
    address, slash, length = text.partition("/")
    version, packed = parse_address(address)
    bits = 32 if version == 4 else 128
    if not slash:
        return version, packed, bits
    if not length.isdigit() or int(length) > bits:
        raise InvalidOperation(f"{text!r} has a bad prefix length")
    plen = int(length)
    if int.from_bytes(packed, "big") & ((1 << (bits - plen)) - 1):
        raise InvalidOperation(f"{text!r} has host bits set")
    return version, packed, plen


def family_of(address: str) -> int:
    """4 or 6 for an address or prefix string."""
    return parse_prefix(address)[0]


@dataclass(frozen=True, slots=True)
class MplsRoute:
    """An entry of the kernel's label table (AF_MPLS): pop (no out_labels) or swap to out_labels,
    then forward to `via` on `dev`; without `via` the packet is delivered locally (`dev lo`)."""

    label: int
    dev: str
    via: str | None = None
    out_labels: tuple[int, ...] = ()

    @property
    def key(self) -> tuple[object, ...]:
        return ("mpls", self.label)

    def describe(self) -> str:
        text = f"mpls route {self.label}"
        if self.out_labels:
            text += " as " + "/".join(str(label) for label in self.out_labels)
        if self.via:
            text += f" via inet{'6' if family_of(self.via) == 6 else ''} {self.via}"
        return text + f" dev {self.dev}"


def _route_key(dst: str, table: int) -> tuple[object, ...]:
    """The kernel holds one IPv4/IPv6 route per (table, prefix): EncapRoute's and NexthopRoute's
    key, so a Replace turns one kind into the other."""
    return ("encap", family_of(dst), table, str(_net(dst)))


@dataclass(frozen=True, slots=True)
class EncapRoute:
    """An IPv4/IPv6 route whose packets get an MPLS label stack (lwtunnel encap mpls)."""

    dst: str
    labels: tuple[int, ...]
    dev: str
    via: str | None = None
    table: int = 254

    @property
    def family(self) -> int:
        return family_of(self.dst)

    @property
    def key(self) -> tuple[object, ...]:
        return _route_key(self.dst, self.table)

    def describe(self) -> str:
        stack = "/".join(str(label) for label in self.labels)
        via = f" via {self.via}" if self.via else ""
        return f"route {self.dst} encap mpls {stack}{via} dev {self.dev} table {self.table}"


@dataclass(frozen=True, slots=True)
class EncapNexthop:
    """A nexthop object (RTM_NEWNEXTHOP, net/ipv4/nexthop.c): gateway `via` on `dev`, whose
    packets get an MPLS label stack (lwtunnel encap, as EncapRoute's). Routes point at it by its
    id (NexthopRoute). Why: the kernel's IPv4 route insert compares the lwtunnel encaps of every
    route sharing a gateway (fib_info hash chain), so N plain encap routes cost O(N^2), while a
    route with a nexthop id hashes by the id. The family is the gateway's."""

    id: int
    labels: tuple[int, ...]
    dev: str
    via: str

    @property
    def family(self) -> int:
        return family_of(self.via)

    @property
    def key(self) -> tuple[object, ...]:
        return ("nexthop", self.id)

    def describe(self) -> str:
        stack = "/".join(str(label) for label in self.labels)
        return f"nexthop id {self.id} encap mpls {stack} via {self.via} dev {self.dev}"


@dataclass(frozen=True, slots=True)
class NexthopRoute:
    """An IPv4/IPv6 route to a nexthop object (RTA_NH_ID): the route of EncapRoute, its next hop
    and label stack held by the EncapNexthop `nexthop`. The kernel knows one route per (table,
    prefix) either way, so both kinds share one key: a Replace turns one into the other."""

    dst: str
    nexthop: int
    table: int = 254

    @property
    def family(self) -> int:
        return family_of(self.dst)

    @property
    def key(self) -> tuple[object, ...]:
        return _route_key(self.dst, self.table)

    def describe(self) -> str:
        return f"route {self.dst} nhid {self.nexthop} table {self.table}"


@dataclass(frozen=True)
class Rule:
    """A policy routing rule `from SRC lookup TABLE` (the per-VIP return table on servers)."""

    src: str
    table: int
    priority: int

    @property
    def family(self) -> int:
        return family_of(self.src)

    @property
    def key(self) -> tuple[object, ...]:
        return ("rule", self.family, self.priority, str(_net(self.src)), self.table)

    def describe(self) -> str:
        return f"rule pref {self.priority} from {self.src} lookup {self.table}"


@dataclass(frozen=True)
class ClsactQdisc:
    """The clsact qdisc that holds ingress/egress filters of a device."""

    dev: str

    @property
    def key(self) -> tuple[object, ...]:
        return ("qdisc", self.dev)

    def describe(self) -> str:
        return f"qdisc clsact dev {self.dev}"


@dataclass(frozen=True, slots=True)
class FlowerMatch:
    """What a flower filter matches. Prefixes are CIDR strings; ports need ip_proto."""

    src: str | None = None
    dst: str | None = None
    ip_proto: str | None = None  # "tcp" | "udp" | "sctp" | "esp" (ports: not with esp)
    src_port: int | None = None
    dst_port: int | None = None
    mpls_label: int | None = None  # the top label of an MPLS packet (protocol mpls_uc, no IP keys)

    @property
    def family(self) -> int:
        for prefix in (self.src, self.dst):
            if prefix:
                return family_of(prefix)
        return 4

    def describe(self) -> str:
        parts = [] if self.mpls_label is None else [f"mpls_label {self.mpls_label}"]
        if self.ip_proto:
            parts.append(f"ip_proto {self.ip_proto}")
        if self.src:
            parts.append(f"src_ip {self.src}")
        if self.dst:
            parts.append(f"dst_ip {self.dst}")
        if self.src_port is not None:
            parts.append(f"src_port {self.src_port}")
        if self.dst_port is not None:
            parts.append(f"dst_port {self.dst_port}")
        return " ".join(parts)


ACT_MPLS_TTL_DEFAULT = 255  # what act_mpls stores (and dumps) for a push given no TTL


@dataclass(frozen=True, slots=True)
class MplsPush:
    """act_mpls push of one label (bottom-of-stack is set by the kernel). The TTL is explicit
    because the kernel reports one either way: what we ask for is what a dump gives back."""

    label: int
    ttl: int = ACT_MPLS_TTL_DEFAULT

    def describe(self) -> str:
        return f"mpls push {self.label}"


@dataclass(frozen=True, slots=True)
class MplsPop:
    """act_mpls pop; `protocol` is the ethertype of what lies under the popped label."""

    protocol: str = "ip"  # "ip" | "ipv6" | "mpls_uc"

    def describe(self) -> str:
        return f"mpls pop protocol {self.protocol}"


@dataclass(frozen=True, slots=True)
class SetMark:
    """act_skbedit mark: the packet mark, so later hooks (nftables, after the label is popped)
    know which session label the packet came under."""

    mark: int

    def describe(self) -> str:
        return f"skbedit mark {self.mark}"


@dataclass(frozen=True, slots=True)
class Pass:
    """act_gact pass (TC_ACT_OK): the packet goes on as if no filter had matched; the action
    only counts it (the balancer's liveness filters of label-aware sessions)."""

    def describe(self) -> str:
        return "gact pass"


Action = MplsPush | MplsPop | SetMark | Pass


def push_stack(labels: tuple[int, ...] | list[int]) -> tuple[MplsPush, ...]:
    """Actions that leave `labels` (outermost first) on the packet: innermost is pushed first."""
    return tuple(MplsPush(label) for label in reversed(labels))


@dataclass(frozen=True, slots=True)
class FlowerFilter:
    """A cls_flower filter with act_mpls actions, identified by dev, direction, pref and handle.
    The C2S imposition of a session: match client key and VIP, push [transport, C2S]."""

    dev: str
    handle: int
    match: FlowerMatch
    actions: tuple[Action, ...]
    direction: Direction = Direction.EGRESS
    pref: int = 10
    offload: OffloadPolicy = OffloadPolicy.AUTO
    # Opaque bytes the kernel keeps with the filter (in its actions' TC cookies) and gives back
    # in dumps: what restore needs beyond the match (dataplane/records.py says what they mean).
    tag: bytes = b""

    @property
    def protocol(self) -> str:
        if self.match.mpls_label is not None:
            return "mpls_uc"
        return "ipv6" if self.match.family == 6 else "ip"

    @property
    def key(self) -> tuple[object, ...]:
        return ("flower", self.dev, str(self.direction), self.pref, self.protocol, self.handle)

    def describe(self) -> str:
        actions = " ".join(f"action {a.describe()}" for a in self.actions)
        skip = {OffloadPolicy.AUTO: "", OffloadPolicy.NEVER: " skip_hw", OffloadPolicy.REQUIRED: " skip_sw"}[
            self.offload
        ]
        return (
            f"filter dev {self.dev} {self.direction} protocol {self.protocol} pref {self.pref} "
            f"handle {self.handle} flower{skip} {self.match.describe()} {actions}"
        ).rstrip()


NFT_TABLE = "mplsorch"  # the balancer's nftables table (family inet), made by its ruleset
FAST_PATH_PROTOS = ("tcp", "udp", "sctp", "esp")


@dataclass(frozen=True, slots=True)
class FastPathElement:
    """An element of a fast-path set of the balancer's ruleset (table inet mplsorch): a new flow
    (ct state new) whose packet matches it is tagged and accepted by the kernel, so a session's
    later flows never reach userspace. Its set follows from what it holds:

    - `fast4`/`fast6`: saddr . daddr . l4proto . dport (a service with ports);
    - `fastproto4`/`fastproto6`: saddr . daddr . l4proto (a service without ports);
    - `fastesp4`/`fastesp6`: saddr . daddr . esp spi (an esp-spi session of an ESP service).

    The client address is always in it: a session's new address needs its own C2S filter first,
    which only the daemon can add."""

    client: str
    vip: str
    proto: str  # "tcp" | "udp" | "sctp" | "esp"
    port: int | None = None
    spi: int | None = None

    @property
    def family(self) -> int:
        # Only IPv6 text has a colon: no parse for each of a restart's 100,000 elements' keys
        # (validate parses the addresses before anything reaches a kernel).
        return 6 if ":" in self.client else 4

    @property
    def set_name(self) -> str:
        kind = "esp" if self.spi is not None else "" if self.port is not None else "proto"
        return f"fast{kind}{self.family}"

    @property
    def key(self) -> tuple[object, ...]:
        return ("setelem", self.set_name, self.client, self.vip, self.proto, self.port, self.spi)

    def describe(self) -> str:
        last = f" . spi 0x{self.spi:08x}" if self.spi is not None else "" if self.port is None else f" . {self.port}"
        return f"element inet {NFT_TABLE} {self.set_name} {{ {self.client} . {self.vip} . {self.proto}{last} }}"


@dataclass(frozen=True, slots=True)
class U32Key:
    """One 32-bit word of the packet, `offset` bytes from its network header, compared under a
    mask: (word & mask) == value."""

    value: int
    mask: int
    offset: int


def esp_keys(src: str, dst: str, spi: int) -> tuple[U32Key, ...]:
    """The u32 keys of ESP packets from `src` to `dst` under `spi`, read at fixed offsets, so
    only where ESP directly follows the fixed IP header. IPv4: version 4 with a 20-byte header
    (a packet with IP options does not match), protocol ESP, source, destination, the SPI at 20.
    IPv6: version 6, next header ESP (offset 6), source (8..23), destination (24..39), the SPI
    at 40 (ESP behind extension headers does not match: the ruleset drops it, see
    capture.nftables)."""
    version, src_bytes = parse_address(src)
    _, dst_bytes = parse_address(dst)
    if version == 6:
        words = [int.from_bytes(b[i : i + 4], "big") for b in (src_bytes, dst_bytes) for i in range(0, 16, 4)]
        return (
            U32Key(0x60000000, 0xF0000000, 0),
            U32Key(IPPROTO_ESP << 8, 0x0000FF00, 4),
            *(U32Key(w, 0xFFFFFFFF, 8 + 4 * i) for i, w in enumerate(words)),
            U32Key(spi, 0xFFFFFFFF, 40),
        )
    return (
        U32Key(0x45000000, 0xFF000000, 0),
        U32Key(IPPROTO_ESP << 16, 0x00FF0000, 8),
        U32Key(int.from_bytes(src_bytes, "big"), 0xFFFFFFFF, 12),
        U32Key(int.from_bytes(dst_bytes, "big"), 0xFFFFFFFF, 16),
        U32Key(spi, 0xFFFFFFFF, 20),
    )


def esp_of(keys: tuple[U32Key, ...]) -> tuple[str, str, int] | None:
    """(source, destination, SPI) of keys `esp_keys` made, either family; None for any other
    selector."""
    if len(keys) == 5 and keys[:2] == esp_keys("0.0.0.0", "0.0.0.0", 0)[:2]:
        src, dst, spi = keys[2], keys[3], keys[4]
        if (src.offset, dst.offset, spi.offset) != (12, 16, 20) or {src.mask, dst.mask, spi.mask} != {0xFFFFFFFF}:
            return None
        return str(ipaddress.IPv4Address(src.value)), str(ipaddress.IPv4Address(dst.value)), spi.value
    if len(keys) == 11 and keys[:2] == esp_keys("::", "::", 0)[:2]:
        words = keys[2:]
        if [k.offset for k in words] != list(range(8, 44, 4)) or {k.mask for k in words} != {0xFFFFFFFF}:
            return None
        source = b"".join(k.value.to_bytes(4, "big") for k in words[:4])
        destination = b"".join(k.value.to_bytes(4, "big") for k in words[4:8])
        return str(ipaddress.IPv6Address(source)), str(ipaddress.IPv6Address(destination)), words[8].value
    return None


U32_PROTOCOLS = {"all": 0x0003, "ip": 0x0800}  # ETH_P_ALL, ETH_P_IP


@dataclass(frozen=True, slots=True)
class U32Filter:
    """A cls_u32 node with act_mpls actions: the C2S imposition of an `esp-spi` session, which
    flower cannot classify (it has no SPI key). Nodes live in the root hash table 800: of their
    pref, so `handle` is 0x800:0:NODE (dataplane/handles.py). One classifier (protocol `all`)
    holds the nodes of both families: a second u32 classifier on the device would get another
    root table (801:, ...) in the order they were made, which no handle could name in advance.
    `ip` is the protocol of nodes an earlier, IPv4-only version made (restore makes them again
    as `all`, core.balancer)."""

    dev: str
    handle: int
    keys: tuple[U32Key, ...]
    actions: tuple[Action, ...]
    direction: Direction = Direction.EGRESS
    pref: int = 12
    tag: bytes = b""  # as FlowerFilter.tag
    protocol: str = "all"  # "all" | "ip" (an earlier version's IPv4 nodes)

    @property
    def key(self) -> tuple[object, ...]:
        return ("u32", self.dev, str(self.direction), self.pref, self.protocol, self.handle)

    def describe(self) -> str:
        esp = esp_of(self.keys)
        match = (
            f"esp src {esp[0]} dst {esp[1]} spi 0x{esp[2]:08x}"
            if esp
            else " ".join(f"match u32 0x{k.value:08x} 0x{k.mask:08x} at {k.offset}" for k in self.keys)
        )
        actions = " ".join(f"action {a.describe()}" for a in self.actions)
        return (
            f"filter dev {self.dev} {self.direction} protocol {self.protocol} pref {self.pref} handle "
            f"{self.handle >> 20:x}:{(self.handle >> 12) & 0xFF:x}:{self.handle & 0xFFF:x} u32 {match} {actions}"
        )


DataplaneObject = (
    MplsRoute
    | EncapRoute
    | EncapNexthop
    | NexthopRoute
    | Rule
    | ClsactQdisc
    | FlowerFilter
    | U32Filter
    | FastPathElement
)


@dataclass(frozen=True)
class Add:
    """Create; fails if an object with the same key exists."""

    obj: DataplaneObject
    verb: str = field(default="add", init=False)


@dataclass(frozen=True)
class Replace:
    """Create or overwrite the object with the same key."""

    obj: DataplaneObject
    verb: str = field(default="replace", init=False)


@dataclass(frozen=True)
class Delete:
    """Remove the object with the same key. Fails if there is none, except for MPLS label
    routes: the kernel's mpls_route_del() accepts an absent label (reconcile from a dump)."""

    obj: DataplaneObject
    verb: str = field(default="delete", init=False)


Operation = Add | Replace | Delete


def describe(op: Operation) -> str:
    return f"{op.verb} {op.obj.describe()}"


@dataclass(frozen=True)
class OpResult:
    """What became of one operation. `error` is None on success; `errno` is the kernel's (or
    EINVAL for an operation rejected before it reached the kernel)."""

    op: Operation
    error: str | None = None
    errno: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        return f"{describe(self.op)}: {'ok' if self.ok else self.error}"


OFFLOAD_STATES = ("in_hw", "not_in_hw", "trap", "offload_failed")  # OffloadState.state


@dataclass(frozen=True)
class OffloadState:
    """What the kernel says about hardware, as it says it: a tc filter's TCA_CLS_FLAGS_IN_HW /
    TCA_CLS_FLAGS_NOT_IN_HW (with the count of devices holding it), a route's RTM_F_OFFLOAD /
    RTM_F_TRAP / RTM_F_OFFLOAD_FAILED (or their RTNH_F_ next-hop forms). Nothing is inferred:
    `not_in_hw` is set only where the kernel reports it (filters)."""

    in_hw: bool = False
    in_hw_count: int = 0
    trap: bool = False
    failed: bool = False
    not_in_hw: bool = False

    @property
    def state(self) -> str:
        """One word of OFFLOAD_STATES: what `status` and the metrics count by."""
        if self.failed:
            return "offload_failed"
        if self.in_hw:
            return "in_hw"
        return "trap" if self.trap else "not_in_hw"

    def describe(self) -> str:
        if self.in_hw and not self.failed:
            return "in_hw" + (f" ({self.in_hw_count})" if self.in_hw_count else "")
        return self.state

    def to_dict(self) -> dict[str, object]:
        """The documented `offload` object of `mplsorch routes --json` (docs/json.md)."""
        return {
            "state": self.state,
            "in_hw": self.in_hw,
            "in_hw_count": self.in_hw_count,
            "not_in_hw": self.not_in_hw,
            "trap": self.trap,
            "offload_failed": self.failed,
        }


@dataclass(frozen=True)
class Installed:
    """One of our objects as the kernel reports it. `packets`: what a tc filter's first action has
    handled (its counter, for telling whether traffic still flows; None where nothing is counted);
    not part of the object's identity."""

    obj: DataplaneObject
    offload: OffloadState = OffloadState()
    packets: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class NextHop:
    """The node's own route to an address, as a provider's route lookup answers it: the device,
    and the gateway (None: the address is on-link on `dev`). The S2C label route of a client
    goes there, since an MPLS route can only name a neighbour."""

    dev: str
    via: str | None = None


class InvalidOperation(ValueError):
    """An operation that cannot be encoded at all (checked before anything reaches the kernel)."""


def _check_label(label: int, what: str) -> None:
    if not isinstance(label, int) or not 0 <= label <= MPLS_LABEL_MAX:
        raise InvalidOperation(f"{what} {label!r} is not an MPLS label (0..{MPLS_LABEL_MAX})")


def _check_address(address: str) -> int:
    """The family of a next hop, which must be an address, not a prefix."""
    try:
        return parse_address(address)[0]
    except InvalidOperation:
        raise InvalidOperation(f"next hop {address!r} is not an IP address") from None


TC_COOKIE_MAX_SIZE = 16  # include/uapi/linux/pkt_cls.h: the kernel refuses longer action cookies
TC_COOKIE_OWNER = 8  # len(b"mplsorch"), the ownership mark that opens the first action's cookie


def tag_capacity(actions: int) -> int:
    """Tag bytes a filter with `actions` actions can carry: the first cookie after the ownership
    mark, then whole cookies (the netlink encoder's split, encode.action_cookies)."""
    return 0 if actions == 0 else TC_COOKIE_MAX_SIZE - TC_COOKIE_OWNER + TC_COOKIE_MAX_SIZE * (actions - 1)


MAX_STACK = 30  # the kernel's MAX_NEW_LABELS (net/mpls/internal.h), for routes and encap


def validate(op: Operation) -> None:
    """Reject what no kernel could accept, so both providers report it the same way."""
    obj = op.obj
    if isinstance(obj, MplsRoute):
        _check_label(obj.label, "label")
        for label in obj.out_labels:
            _check_label(label, "out label")
        if obj.via:
            _check_address(obj.via)
    elif isinstance(obj, EncapRoute):
        parse_prefix(obj.dst)
        if not obj.labels and not isinstance(op, Delete):
            raise InvalidOperation("an encap route needs at least one label")
        for label in obj.labels:
            _check_label(label, "encap label")
        if obj.via and _check_address(obj.via) != obj.family:
            raise InvalidOperation(f"next hop {obj.via} is not of the family of {obj.dst}")
        if not 0 < obj.table < 1 << 32:
            raise InvalidOperation(f"table {obj.table} out of range")
    elif isinstance(obj, EncapNexthop):
        if not 0 < obj.id < 1 << 32:
            raise InvalidOperation(f"nexthop id {obj.id} out of range (1..2^32-1)")
        if not isinstance(op, Delete):
            if not obj.labels:
                raise InvalidOperation("an encap nexthop needs at least one label")
            for label in obj.labels:
                _check_label(label, "encap label")
            _check_address(obj.via)
    elif isinstance(obj, NexthopRoute):
        parse_prefix(obj.dst)
        if not 0 < obj.nexthop < 1 << 32:
            raise InvalidOperation(f"nexthop id {obj.nexthop} out of range (1..2^32-1)")
        if not 0 < obj.table < 1 << 32:
            raise InvalidOperation(f"table {obj.table} out of range")
    elif isinstance(obj, Rule):
        parse_prefix(obj.src)
        if not 0 < obj.table < 1 << 32 or not 0 <= obj.priority < 1 << 32:
            raise InvalidOperation("rule table or priority out of range")
    elif isinstance(obj, FastPathElement):  # Replace: added if absent, left as it is if present
        version = parse_address(obj.client)[0]
        if parse_address(obj.vip)[0] != version:
            raise InvalidOperation("client and VIP of a set element are of different families")
        if obj.proto not in FAST_PATH_PROTOS:
            raise InvalidOperation(f"proto {obj.proto!r} is not tcp, udp, sctp or esp")
        if obj.port is not None and (obj.proto == "esp" or not 0 <= obj.port <= 0xFFFF):
            raise InvalidOperation(f"port {obj.port!r} out of range or with esp")
        if obj.spi is not None and (obj.proto != "esp" or obj.port is not None or not 0 <= obj.spi < 1 << 32):
            raise InvalidOperation("an spi needs proto esp, no port, and 32 bits")
    elif isinstance(obj, U32Filter):
        if not obj.keys:
            raise InvalidOperation("a u32 filter needs at least one key")
        for k in obj.keys:
            if not (0 <= k.value < 1 << 32 and 0 <= k.mask < 1 << 32) or k.value & ~k.mask:
                raise InvalidOperation(f"u32 key {k} is not a masked 32-bit value")
            if k.offset % 4 or not 0 <= k.offset < 1 << 16:
                raise InvalidOperation(f"u32 key offset {k.offset} is not a word offset")
        if not obj.handle & 0xFFF or obj.handle >> 20 == 0:
            raise InvalidOperation(f"u32 handle {obj.handle:#x} names no node of a hash table")
        if not 0 < obj.pref < 1 << 16:
            raise InvalidOperation(f"pref {obj.pref} out of range (1..65535)")
        if obj.protocol not in U32_PROTOCOLS:
            raise InvalidOperation(f"u32 protocol {obj.protocol!r} is not one of {sorted(U32_PROTOCOLS)}")
        _check_actions(obj.actions, obj.tag)
    elif isinstance(obj, FlowerFilter):
        m = obj.match
        if m.src and m.dst and family_of(m.src) != family_of(m.dst):
            raise InvalidOperation("src and dst of a flower match are of different families")
        if m.ip_proto not in (None, "tcp", "udp", "sctp", "esp"):
            raise InvalidOperation(f"ip_proto {m.ip_proto!r} is not tcp, udp, sctp or esp")
        if (m.src_port is not None or m.dst_port is not None) and m.ip_proto not in ("tcp", "udp", "sctp"):
            raise InvalidOperation("a port match needs ip_proto tcp, udp or sctp")
        for port in (m.src_port, m.dst_port):
            if port is not None and not 0 <= port <= 0xFFFF:
                raise InvalidOperation(f"port {port} out of range")
        if m.mpls_label is not None:
            _check_label(m.mpls_label, "matched label")
            if m.src or m.dst or m.ip_proto:
                raise InvalidOperation("an mpls_label match takes no IP keys (the packet is MPLS)")
        if not 0 < obj.handle < 1 << 32:
            raise InvalidOperation(f"handle {obj.handle} out of range (1..2^32-1)")
        if not 0 < obj.pref < 1 << 16:
            raise InvalidOperation(f"pref {obj.pref} out of range (1..65535)")
        _check_actions(obj.actions, obj.tag)


def _check_actions(actions: tuple[Action, ...], tag: bytes) -> None:
    """The actions of a tc filter, and whether its tag fits their cookies."""
    if len(tag) > tag_capacity(len(actions)):
        raise InvalidOperation(
            f"a tag of {len(tag)} bytes does not fit the cookies of "
            f"{len(actions)} actions ({tag_capacity(len(actions))} bytes)"
        )
    for action in actions:
        if isinstance(action, MplsPush):
            _check_label(action.label, "pushed label")
            if not 1 <= action.ttl <= 255:
                raise InvalidOperation(f"ttl {action.ttl} out of range (1..255)")
        elif isinstance(action, MplsPop):
            if action.protocol not in ("ip", "ipv6", "mpls_uc"):
                raise InvalidOperation(f"pop protocol {action.protocol!r} unknown")
        elif isinstance(action, SetMark):
            if not 0 <= action.mark < 1 << 32:
                raise InvalidOperation(f"mark {action.mark} out of range (32 bits)")
        elif not isinstance(action, Pass):
            raise InvalidOperation(f"unknown filter action {action!r}")
