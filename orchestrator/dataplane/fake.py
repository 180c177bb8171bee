"""An in-memory provider for unit tests of the decision core.

It applies the same operations as the netlink provider to a model of one node's forwarding state,
rejects them with the errno the kernel would give (so a test that passes on the fake means something
on the kernel), and answers where a packet goes and with which labels.

Kernel behaviour mirrored, checked against the kernel sources (net/mpls/af_mpls.c,
net/ipv4/fib_trie.c, net/core/fib_rules.c, net/sched/cls_api.c, cls_flower.c, sch_api.c):

- deleting a missing MPLS route succeeds: mpls_route_del() only checks the label range and returns 0
  (unlike IPv4/IPv6 routes, ESRCH, and rules and tc filters, ENOENT);
- a reserved label (< 16), a label >= net.mpls.platform_labels, implicit null (3) in any out or
  encap stack and a stack deeper than MAX_NEW_LABELS all give EINVAL;
- a tc filter on a device without a clsact qdisc gives EINVAL ("Parent Qdisc doesn't exists"), so
  does a filter at a pref already used by another protocol; deleting the qdisc deletes its filters;
- `replace` of an existing clsact qdisc is a no-op success (no options to change);
- skip_sw (OffloadPolicy.REQUIRED) on a device that cannot offload gives EOPNOTSUPP;
- nexthop objects (net/ipv4/nexthop.c, fib_semantics.c): a route naming a nexthop id that does
  not exist gives EINVAL ("Nexthop id does not exist"), so does an IPv6 route to an IPv4
  nexthop; deleting a nexthop that is not there gives ENOENT, and deleting one deletes the
  routes that use it (remove_nexthop); a kernel without them (`nexthops=False`) answers
  EOPNOTSUPP to every nexthop request (no RTM_NEWNEXTHOP handler);
- a fast-path set element (nf_tables, net/netfilter/nf_tables_api.c): adding one that is there
  with NLM_F_EXCL gives EEXIST, deleting one that is not there ENOENT (nft_del_setelem). The sets
  themselves are the ruleset's (`nft -f`), taken as loaded.

Plain IP routes are modelled only as far as the balancer looks them up (`add_ip_route`,
`routes_to`: longest prefix match, no route gives None as the kernel's ENETUNREACH does); they
forward nothing. Interface addresses only as far as node setup reads and adds them (`addresses`,
`add_address`; lo starts with 127.0.0.1/8 and ::1/128): an address already on the device is the
kernel's EEXIST, which the providers count as success (IPv4: same address and prefix length, else
another address is added; IPv6: same address). Not modelled: neighbours, sysctls
(conf.<dev>.input is taken as enabled where the reference enables it, including lo on servers).
A filter's first-action packet counter (`Installed.packets` in dumps) counts the packets
`forward_ip` sent through it and, for ingress `mpls_label` filters, those `receive_mpls` took in
on their device.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from orchestrator import ipproto
from orchestrator.dataplane import offload, ops
from orchestrator.dataplane.ops import (
    ClsactQdisc,
    DataplaneObject,
    Delete,
    Direction,
    EncapNexthop,
    EncapRoute,
    FastPathElement,
    FlowerFilter,
    FlowerMatch,
    Installed,
    MplsPush,
    MplsRoute,
    NextHop,
    NexthopRoute,
    OffloadPolicy,
    OffloadState,
    Operation,
    OpResult,
    Replace,
    Rule,
    U32Filter,
)
from orchestrator.dataplane.provider import UnknownDevice

LOOPBACK = "lo"
MAIN_TABLE = 254
DEFAULT_TABLE = 253
IMPLICIT_NULL = 3
# The kernel's own rules that stay after ours: (priority, table). The local table (priority 0)
# holds no encap routes, so it is left out.
_DEFAULT_RULES = ((32766, MAIN_TABLE), (32767, DEFAULT_TABLE))
_KIND = {
    MplsRoute: "label route",
    EncapRoute: "route",
    NexthopRoute: "route",
    EncapNexthop: "nexthop",
    Rule: "rule",
    ClsactQdisc: "clsact qdisc",
    FlowerFilter: "filter",
    U32Filter: "filter",
    FastPathElement: "set element",
}
_U32_ROOT = 0x800  # the root hash table of the first u32 classifier of a device's egress
# Like an MPLS TTL: a swap loop through lo ends in a drop instead of hanging the test.
_MAX_HOPS = 255


@dataclass(frozen=True)
class Forwarding:
    """Where a packet goes: its label stack on leaving (outermost first, empty for plain IP), the
    next hop and device, or local delivery (dev lo, no labels left)."""

    labels: tuple[int, ...] = ()
    via: str | None = None
    dev: str | None = None
    delivered_locally: bool = False


class _Rejected(Exception):
    """An operation the kernel would refuse, with its errno."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class FakeProvider:
    """The Provider protocol over an in-memory forwarding model of one node."""

    def __init__(
        self,
        devices: Iterable[str],
        platform_labels: int = 100000,
        offload_capable: Iterable[str] = (),
        nexthops: bool = True,
    ) -> None:
        self.devices = frozenset(devices) | {LOOPBACK}
        # Indexes as a kernel numbers them: lo first, then the devices in the order given.
        self._indexes = {name: i for i, name in enumerate(dict.fromkeys([LOOPBACK, *devices]), start=1)}
        self.platform_labels = platform_labels
        self.nexthops = nexthops  # whether this kernel has nexthop objects
        self.offload_capable = frozenset(offload_capable)
        unknown = self.offload_capable - self.devices
        if unknown:
            raise ValueError(f"offload_capable names unknown devices: {sorted(unknown)}")
        # One dict keyed by obj.key: insertion order is kept, and Replace keeps the position
        # (which matters for rules of equal priority, evaluated in insertion order by the kernel).
        self._objects: dict[tuple[object, ...], DataplaneObject] = {}
        self._packets: dict[tuple[object, ...], int] = {}  # a filter's key -> packets it handled
        self._ip_routes: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, NextHop] = {}
        self.route_queries: list[tuple[str, ...]] = []  # the addresses of each routes_to call
        self._addresses: dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]] = {
            LOOPBACK: [ipaddress.ip_interface("127.0.0.1/8"), ipaddress.ip_interface("::1/128")]
        }

    # ---- Provider ----

    def apply(self, operations: Sequence[Operation]) -> list[OpResult]:
        return [self._apply_one(op) for op in operations]

    def twin(self) -> FakeProvider:
        """Itself: the fake kernel is one in-memory table (tests sample it on their own thread)."""
        return self

    def dump(self, elements: bool = True) -> list[Installed]:
        """Routes, rules, qdiscs and filters, as the netlink provider's rtnetlink dumps; the
        fast-path set elements come from `dump_elements` (whatever `elements` says)."""
        return [
            Installed(
                obj,
                self._offload_state(obj),
                self._packets.get(obj.key, 0) if isinstance(obj, (FlowerFilter, U32Filter)) else None,
            )
            for obj in self._objects.values()
            if not isinstance(obj, FastPathElement)
        ]

    def dump_elements(self) -> list[Installed]:
        return [Installed(obj) for obj in self._objects.values() if isinstance(obj, FastPathElement)]

    def offload_counts(self, keep: Callable[[Installed], bool] | None = None) -> dict[str, int]:
        return offload.counts(i for i in self.dump(elements=False) if keep is None or keep(i))

    def flush_elements(self) -> None:
        """What loading the ruleset does to the fast-path sets: they start empty."""
        for key in [k for k, obj in self._objects.items() if isinstance(obj, FastPathElement)]:
            del self._objects[key]

    def supports_nexthops(self) -> bool:
        return self.nexthops

    def routes_to(self, addresses: Iterable[str]) -> dict[str, NextHop | None]:
        """The node's route to each address, as the netlink provider's RTM_GETROUTE answers it."""
        wanted = tuple(dict.fromkeys(addresses))
        self.route_queries.append(wanted)
        out: dict[str, NextHop | None] = {}
        for address in wanted:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                out[address] = None
                continue
            nets = [net for net in self._ip_routes if ip in net]
            out[address] = self._ip_routes[max(nets, key=lambda n: n.prefixlen)] if nets else None
        return out

    def filter_packets(self, filters: Sequence[FlowerFilter | U32Filter]) -> list[int | None]:
        """The packets `forward_ip` sent through each filter; None for one not installed."""
        return [
            self._packets.get(f.key, 0) if isinstance(self._objects.get(f.key), (FlowerFilter, U32Filter)) else None
            for f in filters
        ]

    def addresses(self, dev: str) -> list[str]:
        """The addresses on `dev` without prefix length, in the order they were added."""
        return [str(iface.ip) for iface in self._device_addresses(dev)]

    def add_address(self, dev: str, address: str) -> None:
        """`ip address add ADDRESS dev DEV`, except that an address already there is no error."""
        iface = ipaddress.ip_interface(address)
        present = self._device_addresses(dev)
        if any(
            iface.ip == other.ip and (iface.version == 6 or iface.network.prefixlen == other.network.prefixlen)
            for other in present
        ):
            return  # the kernel's EEXIST: already done
        present.append(iface)

    def ifindex(self, name: str) -> int:
        if name not in self._indexes:
            raise UnknownDevice(name)
        return self._indexes[name]

    def ifname(self, index: int) -> str:
        """As the netlink provider: `ifN` for an index no device has."""
        return next((name for name, i in self._indexes.items() if i == index), f"if{index}")

    def close(self) -> None:
        """Nothing to release: the model lives in memory."""

    def _device_addresses(self, dev: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        if dev not in self.devices:
            raise OSError(errno.ENODEV, f"no such device {dev}")
        return self._addresses.setdefault(dev, [])

    # ---- plain IP routes (for lookups only) ----

    def add_ip_route(self, prefix: str, dev: str, via: str | None = None) -> None:
        """`ip route replace PREFIX [via GATEWAY] dev DEV`: without `via` the prefix is on-link."""
        if dev not in self.devices:
            raise ValueError(f"no such device {dev}")
        self._ip_routes[ipaddress.ip_network(prefix)] = NextHop(dev, via)

    # ---- forwarding queries (pure functions of the model) ----

    def mpls_lookup(self, label: int) -> MplsRoute | None:
        route = self._objects.get(("mpls", label))
        return route if isinstance(route, MplsRoute) else None

    def receive_mpls(self, stack: Sequence[int], dev: str | None = None) -> Forwarding | None:
        """A labelled packet arrives (on `dev`: its ingress `mpls_label` filters count it); None
        when the kernel drops it (no route for the top label).
        A route to lo with labels left loops back and the new top is looked up again, which is how a
        server pops a transport label and then terminates the session label under it."""
        labels = tuple(stack)
        if not labels:
            raise ValueError("an MPLS packet needs at least one label")
        for flt in self._objects.values():
            if (
                dev is not None
                and isinstance(flt, FlowerFilter)
                and flt.dev == dev
                and flt.direction == Direction.INGRESS
                and flt.match.mpls_label == labels[0]
            ):
                self._packets[flt.key] = self._packets.get(flt.key, 0) + 1
                break
        for _ in range(_MAX_HOPS):
            route = self.mpls_lookup(labels[0])
            if route is None:
                return None
            labels = route.out_labels + labels[1:]
            if route.dev != LOOPBACK:
                return Forwarding(labels, route.via, route.dev)
            if not labels:
                return Forwarding(dev=LOOPBACK, delivered_locally=True)
        return None

    def route_ip(self, src: str, dst: str) -> Forwarding | None:
        """Policy routing of a locally sent packet: rules `from SRC lookup TABLE` by priority, then
        main and default, longest prefix match among encap routes of each table. None: no route."""
        src_ip, dst_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        for table in self._tables_for(src_ip):
            route = self._longest_match(table, dst_ip)
            if isinstance(route, NexthopRoute):
                nexthop = self._objects[("nexthop", route.nexthop)]
                assert isinstance(nexthop, EncapNexthop)  # a route cannot outlive its nexthop
                return Forwarding(nexthop.labels, nexthop.via, nexthop.dev)
            if route is not None:
                return Forwarding(route.labels, route.via, route.dev)
        return None

    def forward_ip(
        self,
        src: str,
        dst: str,
        proto: str | None = None,
        sport: int | None = None,
        dport: int | None = None,
        out_dev: str | None = None,
        spi: int | None = None,
    ) -> Forwarding | None:
        """An IP packet leaving the node. With `out_dev`, a plain IP route (not modelled) sends it
        there and the egress flower filters of that device label it (first match by pref, then
        handle; u32 filters read the words of an IPv4 header without options or an IPv6 header
        without extension headers and, for ESP, `spi`).
        Without, policy routing decides (route_ip); the encap then makes it an MPLS packet, which
        ip/ipv6 filters no longer match."""
        if out_dev is None:
            return self.route_ip(src, dst)
        if out_dev not in self.devices:
            raise ValueError(f"no such device {out_dev}")
        src_ip, dst_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        labels: tuple[int, ...] = ()
        filters = sorted(
            (
                f
                for f in self._objects.values()
                if isinstance(f, (FlowerFilter, U32Filter)) and f.dev == out_dev and f.direction == Direction.EGRESS
            ),
            key=lambda f: (f.pref, f.handle),
        )
        header = _header_words(src_ip, dst_ip, proto, spi)
        for flt in filters:
            if (
                _matches(flt, src_ip, dst_ip, proto, sport, dport)
                if isinstance(flt, FlowerFilter)
                else (flt.protocol == "all" or src_ip.version == 4)
                and all(int.from_bytes(header[k.offset : k.offset + 4], "big") & k.mask == k.value for k in flt.keys)
            ):
                self._packets[flt.key] = self._packets.get(flt.key, 0) + 1
                for action in flt.actions:
                    if isinstance(action, MplsPush):
                        labels = (action.label,) + labels
                    elif labels:  # act_mpls pop of a packet without labels does nothing
                        labels = labels[1:]
                break
        return Forwarding(labels, None, out_dev)

    def fast_path(
        self, src: str, dst: str, proto: str, dport: int | None = None, spi: int | None = None
    ) -> FastPathElement | None:
        """The element that lets the kernel accept a new flow of this packet without queueing it
        (the ruleset's fast-path rules: the ESP set by SPI, else by port, else by protocol), or
        None: the packet goes to userspace."""
        candidates = []
        if proto == "esp" and spi is not None:
            candidates.append(FastPathElement(src, dst, proto, spi=spi))
        if dport is not None and proto != "esp":
            candidates.append(FastPathElement(src, dst, proto, port=dport))
        candidates.append(FastPathElement(src, dst, proto))
        for element in candidates:
            found = self._objects.get(element.key)
            if isinstance(found, FastPathElement):
                return found
        return None

    # ---- applying ----

    def _apply_one(self, op: Operation) -> OpResult:
        try:
            ops.validate(op)
        except (ValueError, TypeError) as exc:  # InvalidOperation, and bad addresses from ipaddress
            return OpResult(op, f"invalid operation: {exc}", errno.EINVAL)
        try:
            self._check_and_commit(op)
        except _Rejected as exc:
            return OpResult(op, str(exc), exc.errno)
        return OpResult(op)

    def _check_and_commit(self, op: Operation) -> None:
        obj = op.obj
        dev = getattr(obj, "dev", None)
        if dev is not None and dev not in self.devices:
            raise _Rejected(errno.ENODEV, f"no such device {dev}")
        missing = errno.ENOENT  # rules (fib_nl_delrule), qdiscs and tc filters
        if isinstance(obj, MplsRoute):
            self._check_mpls_route(obj)
            if isinstance(op, Delete):  # mpls_route_del() does not check that the label was routed
                self._objects.pop(obj.key, None)
                return
        elif isinstance(obj, EncapRoute):
            if not isinstance(op, Delete):
                _check_stack(obj.labels, "encap")
            missing = errno.ESRCH  # fib_table_delete / ip6_route_del: "No such process"
        elif isinstance(obj, NexthopRoute):
            if not isinstance(op, Delete):
                self._check_nexthop_route(obj)
            missing = errno.ESRCH
        elif isinstance(obj, EncapNexthop):
            if not self.nexthops:
                raise _Rejected(errno.EOPNOTSUPP, "Operation not supported (no nexthop objects)")
            if not isinstance(op, Delete):
                _check_stack(obj.labels, "encap")
            elif obj.key in self._objects:  # remove_nexthop(): its routes go with it
                for key, other in list(self._objects.items()):
                    if isinstance(other, NexthopRoute) and other.nexthop == obj.id:
                        del self._objects[key]
        elif isinstance(obj, FlowerFilter):
            self._check_filter(op, obj)
        elif isinstance(obj, U32Filter):
            self._check_u32(op, obj)

        exists = obj.key in self._objects
        if isinstance(op, Delete):
            if not exists:
                raise _Rejected(missing, f"no such {_KIND[type(obj)]}")
            del self._objects[obj.key]
            self._packets.pop(obj.key, None)
            if isinstance(obj, ClsactQdisc):  # the filters go with their qdisc
                for key, other in list(self._objects.items()):
                    if isinstance(other, (FlowerFilter, U32Filter)) and other.dev == obj.dev:
                        del self._objects[key]
            return
        if exists and not isinstance(op, Replace):
            raise _Rejected(errno.EEXIST, "object exists (use replace to overwrite)")
        self._objects[obj.key] = obj
        self._packets.pop(obj.key, None)  # a new filter's actions count from 0

    def _check_nexthop_route(self, route: NexthopRoute) -> None:
        nexthop = self._objects.get(("nexthop", route.nexthop))
        if not isinstance(nexthop, EncapNexthop):
            raise _Rejected(errno.EINVAL, "Nexthop id does not exist")
        if route.family == 6 and nexthop.family == 4:
            raise _Rejected(errno.EINVAL, "IPv6 routes can not use an IPv4 nexthop")

    def _check_mpls_route(self, route: MplsRoute) -> None:
        if route.label < ops.MPLS_FIRST_UNRESERVED:
            raise _Rejected(errno.EINVAL, f"label {route.label} is reserved (0-15 cannot be routed)")
        if route.label >= self.platform_labels:
            raise _Rejected(errno.EINVAL, f"label {route.label} >= net.mpls.platform_labels ({self.platform_labels})")
        _check_stack(route.out_labels, "out")

    def _check_filter(self, op: Operation, flt: FlowerFilter) -> None:
        if ClsactQdisc(flt.dev).key not in self._objects:
            raise _Rejected(errno.EINVAL, f"no clsact qdisc on {flt.dev} (kernel: Parent Qdisc doesn't exists)")
        same_pref = [
            f
            for f in self._objects.values()
            if isinstance(f, FlowerFilter) and f.dev == flt.dev and f.direction == flt.direction and f.pref == flt.pref
        ]
        if any(f.protocol != flt.protocol for f in same_pref):
            raise _Rejected(
                errno.EINVAL,
                f"pref {flt.pref} on {flt.dev} {flt.direction} is used by another protocol than {flt.protocol}",
            )
        if isinstance(op, Delete):
            return
        if flt.key not in self._objects and any(f.match == flt.match and f.protocol == flt.protocol for f in same_pref):
            # cls_flower keeps one filter per (mask, key) in a pref: fl_ht_insert_unique().
            raise _Rejected(errno.EEXIST, f"another filter at pref {flt.pref} on {flt.dev} has the same match")
        if flt.offload == OffloadPolicy.REQUIRED and flt.dev not in self.offload_capable:
            raise _Rejected(errno.EOPNOTSUPP, f"offload required (skip_sw) but {flt.dev} cannot offload tc filters")

    def _check_u32(self, op: Operation, flt: U32Filter) -> None:
        """A node's hash table must be the root of its pref (cls_u32: "Handle specified hash
        table address mismatch"); the pref keeps one classifier and protocol, as for flower."""
        if ClsactQdisc(flt.dev).key not in self._objects:
            raise _Rejected(errno.EINVAL, f"no clsact qdisc on {flt.dev} (kernel: Parent Qdisc doesn't exists)")
        same_pref = [
            f
            for f in self._objects.values()
            if isinstance(f, (FlowerFilter, U32Filter))
            and f.dev == flt.dev
            and f.direction == flt.direction
            and f.pref == flt.pref
        ]
        if any(not isinstance(f, U32Filter) for f in same_pref):
            raise _Rejected(errno.EINVAL, f"pref {flt.pref} on {flt.dev} {flt.direction} holds another classifier")
        if any(f.protocol != flt.protocol for f in same_pref if isinstance(f, U32Filter) and f.key != flt.key):
            raise _Rejected(errno.EINVAL, f"pref {flt.pref} on {flt.dev} {flt.direction} holds another protocol")
        if not isinstance(op, Delete) and flt.handle >> 20 != _U32_ROOT:
            raise _Rejected(errno.EINVAL, "Handle specified hash table address mismatch")

    # ---- model helpers ----

    def _offload_state(self, obj: DataplaneObject) -> OffloadState:
        if isinstance(obj, FlowerFilter) and obj.dev in self.offload_capable and obj.offload != OffloadPolicy.NEVER:
            return OffloadState(in_hw=True, in_hw_count=1)
        return OffloadState(not_in_hw=isinstance(obj, FlowerFilter))

    def _tables_for(self, src: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[int]:
        rules: list[tuple[int, int]] = list(_DEFAULT_RULES)  # the kernel's come first on ties
        rules += [
            (r.priority, r.table)
            for r in self._objects.values()
            if isinstance(r, Rule) and src in ipaddress.ip_network(r.src)
        ]
        return [table for _, table in sorted(rules, key=lambda rule: rule[0])]

    def _longest_match(
        self, table: int, dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> EncapRoute | NexthopRoute | None:
        best: EncapRoute | NexthopRoute | None = None
        best_len = -1
        for route in self._objects.values():
            if isinstance(route, (EncapRoute, NexthopRoute)) and route.table == table:
                net = ipaddress.ip_network(route.dst)
                if dst in net and net.prefixlen > best_len:
                    best, best_len = route, net.prefixlen
        return best


def _check_stack(labels: tuple[int, ...], what: str) -> None:
    """nla_get_labels(): at most MAX_NEW_LABELS, and never implicit null on the wire."""
    if len(labels) > ops.MAX_STACK:
        raise _Rejected(
            errno.EINVAL, f"{what} stack of {len(labels)} labels exceeds the kernel's maximum of {ops.MAX_STACK}"
        )
    if IMPLICIT_NULL in labels:
        raise _Rejected(errno.EINVAL, f"implicit null (3) cannot be in an {what} label stack")


def _header_words(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proto: str | None,
    spi: int | None,
) -> bytes:
    """The start of an IP packet as u32 sees it: an IPv4 header without options or an IPv6
    header without extension headers, then the first word of the transport header (the SPI)."""
    number = ipproto.BY_NAME.get(proto or "", 0)
    tail = (spi or 0).to_bytes(4, "big")
    if src.version == 6:
        return bytes([0x60, 0, 0, 0, 0, 0, number, 64]) + src.packed + dst.packed + tail
    return bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, number, 0, 0]) + src.packed + dst.packed + tail


def _matches(
    flt: FlowerFilter,
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proto: str | None,
    sport: int | None,
    dport: int | None,
) -> bool:
    m: FlowerMatch = flt.match
    if (6 if flt.protocol == "ipv6" else 4) != src.version:
        return False
    if m.src and src not in ipaddress.ip_network(m.src):
        return False
    if m.dst and dst not in ipaddress.ip_network(m.dst):
        return False
    if m.ip_proto is not None and m.ip_proto != proto:
        return False
    if m.src_port is not None and m.src_port != sport:
        return False
    return m.dst_port is None or m.dst_port == dport
