"""A mirror of the node's IPv4 routing tables, so a new client's next hop costs no kernel round trip.

The balancer needs its route to every new client (an S2C label route can only name a neighbour).
Asking the kernel (RTM_GETROUTE) costs a round trip per first-packet batch of new clients; a copy
of the tables the kernel would read answers the same question in the daemon. It is kept only where
it can be exact:

- the IPv4 rules are exactly the kernel's three defaults (pref 0 -> local, 32766 -> main,
  32767 -> default, to-table, no selector of any kind): otherwise a rule could send the lookup
  elsewhere by something the mirror does not model, and the mirror is off;
- tables local (255), main (254) and default (253) hold at most `MAX_ROUTES` routes (a router
  with a full BGP table keeps asking the kernel; the dump would cost more than the lookups);
- at the longest prefix that matches in a table there is exactly one route, unicast, tos 0,
  without RTA_MULTIPATH or a nexthop object, its next hop neither dead nor link-down. Its answer
  is `decode.next_hop` of that route, as for the kernel's answer. A route the kernel answers as
  unusable for us (local, broadcast, anycast, multicast, blackhole, unreachable, prohibit) gives
  None as the kernel's answer or error does. Anything else (several routes for the prefix, a
  multipath route whose path the kernel picks per address by a hash, a nexthop object, throw, a
  dead or link-down next hop where the kernel would fall back to a shorter prefix, a tos) is
  `ASK`: that address goes to the kernel.

Local and main: with only the default rules the kernel keeps them in one trie (longest prefix of
both, local's route first at an equal prefix); once any rule was added it looks them up one after
the other (local first). Both give the same answer unless main's match is at least as long as
local's: then the mirror says ASK.

Kept current from outside: any notification about links, addresses, routes or rules (routewatch)
marks it stale, and the next lookup rebuilds it from fresh dumps (a link or address going down
flushes routes without a notification per route, so the tables are read again, never patched).
The building and the lookups are pure: `Fib.build` takes the dumped messages."""

from __future__ import annotations

import socket
from typing import Callable, Final, Iterable

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import decode, nla
from orchestrator.dataplane.netlink.constants import (
    AF_INET,
    FR_ACT_TO_TBL,
    FRA_PRIORITY,
    FRA_PROTOCOL,
    FRA_SUPPRESS_PREFIXLEN,
    FRA_TABLE,
    RT_TABLE_DEFAULT,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTA_DST,
    RTA_MULTIPATH,
    RTA_NH_ID,
    RTA_TABLE,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTN_ANYCAST,
    RTN_BLACKHOLE,
    RTN_BROADCAST,
    RTN_LOCAL,
    RTN_MULTICAST,
    RTN_PROHIBIT,
    RTN_UNICAST,
    RTN_UNREACHABLE,
    RTNH_F_DEAD,
    RTNH_F_LINKDOWN,
)


class _Ask:
    """The mirror's answer where only the kernel can answer."""

    def __repr__(self) -> str:
        return "ASK"


ASK: Final = _Ask()
MAX_ROUTES = 20_000  # routes in the IPv4 dump past which the mirror is off
DEFAULT_RULES = frozenset({(0, RT_TABLE_LOCAL), (32766, RT_TABLE_MAIN), (32767, RT_TABLE_DEFAULT)})
_NO_SUPPRESS = 0xFFFFFFFF  # FRA_SUPPRESS_PREFIXLEN of a rule without suppress_prefixlen
_RULE_ATTRS = frozenset({FRA_TABLE, FRA_PRIORITY, FRA_PROTOCOL, FRA_SUPPRESS_PREFIXLEN})
_UNUSABLE = frozenset(
    {RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST, RTN_MULTICAST, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT}
)
_TABLES = (RT_TABLE_LOCAL, RT_TABLE_MAIN, RT_TABLE_DEFAULT)

Answer = ops.NextHop | None | _Ask
# What a prefix of a table holds: a decided answer, or the one unicast route not decoded yet.
_Entry = ops.NextHop | None | _Ask | bytes
Ifname = Callable[[int], str]
Dump = Callable[[int, bytes], Iterable[tuple[int, memoryview]]]


def default_rules(rules: Iterable[memoryview | bytes]) -> bool:
    """Whether these IPv4 rule messages (RTM_NEWRULE bodies) are exactly the kernel's defaults."""
    seen: set[tuple[int, int]] = set()
    for body in rules:
        family, dst_len, src_len, tos, table, _r1, _r2, action, flags = nla.RTMSG.unpack_from(body)
        a = nla.attrs(body, nla.RTMSG.size)
        if family != AF_INET or dst_len or src_len or tos or flags or action != FR_ACT_TO_TBL:
            return False
        if not a.keys() <= _RULE_ATTRS:
            return False
        if FRA_SUPPRESS_PREFIXLEN in a and nla.get_u32(a[FRA_SUPPRESS_PREFIXLEN]) != _NO_SUPPRESS:
            return False
        pref = nla.get_u32(a[FRA_PRIORITY]) if FRA_PRIORITY in a else 0
        key = (pref, nla.get_u32(a[FRA_TABLE]) if FRA_TABLE in a else table)
        if key in seen:
            return False
        seen.add(key)
    return seen == DEFAULT_RULES


def _classify(body: memoryview | bytes) -> _Entry:
    """One route's answer if it is alone at its prefix (a unicast route stays as its bytes:
    decoded when first asked for)."""
    _family, _dst_len, _src_len, tos, _table, _proto, _scope, rtype, flags = nla.RTMSG.unpack_from(body)
    if tos or flags & (RTNH_F_DEAD | RTNH_F_LINKDOWN):  # the kernel may pass over it to a shorter prefix
        return ASK
    if rtype in _UNUSABLE:
        return None
    if rtype != RTN_UNICAST:
        return ASK
    a = nla.attrs(body, nla.RTMSG.size)
    if RTA_MULTIPATH in a or RTA_NH_ID in a:
        return ASK
    return bytes(body)


class _Table:
    """One routing table: prefix length -> network (an int) -> its routes' entry."""

    def __init__(self) -> None:
        self.prefixes: dict[int, dict[int, _Entry]] = {}
        self.lengths: list[int] = []  # the prefix lengths present, longest first

    def add(self, plen: int, net: int, body: memoryview | bytes) -> None:
        nets = self.prefixes.setdefault(plen, {})
        nets[net] = ASK if net in nets else _classify(body)  # a second route at a prefix: ask

    def seal(self) -> None:
        self.lengths = sorted(self.prefixes, reverse=True)

    def match(self, address: int) -> tuple[int, int] | None:
        """(prefix length, network) of the longest prefix that holds the address."""
        for plen in self.lengths:
            net = address & (0xFFFFFFFF ^ (0xFFFFFFFF >> plen))
            if net in self.prefixes[plen]:
                return plen, net
        return None


class Fib:
    """The IPv4 tables local, main and default as dumped, and the kernel's lookup over them."""

    def __init__(self, ifname: Ifname) -> None:
        self._ifname = ifname
        self._tables = {table: _Table() for table in _TABLES}

    @classmethod
    def build(cls, routes: Iterable[memoryview | bytes], ifname: Ifname, max_routes: int = MAX_ROUTES) -> Fib | None:
        """The mirror of these IPv4 route messages (RTM_NEWROUTE bodies of a dump); None past
        `max_routes` of them."""
        fib = cls(ifname)
        count = 0
        for body in routes:
            count += 1
            if count > max_routes:
                return None
            family, dst_len, _src_len, _tos, table, _proto, _scope, _type, _flags = nla.RTMSG.unpack_from(body)
            if family != AF_INET:
                continue
            a = nla.attrs(body, nla.RTMSG.size)
            target = fib._tables.get(nla.get_u32(a[RTA_TABLE]) if RTA_TABLE in a else table)
            if target is None:
                continue
            net = int.from_bytes(bytes(a[RTA_DST]), "big") if RTA_DST in a else 0
            target.add(dst_len, net, body)
        for t in fib._tables.values():
            t.seal()
        return fib

    def lookup(self, address: str) -> Answer:
        """The kernel's answer for an output route lookup of this destination (as
        encode.route_query asks it), or ASK."""
        try:
            packed = socket.inet_pton(socket.AF_INET, address)
        except OSError:  # IPv6, or not an address: the kernel's path answers it
            return ASK
        first = packed[0]
        if first == 0 or first == 127 or first >= 224:  # zeronet, loopback, multicast, class E
            return ASK
        value = int.from_bytes(packed, "big")
        local, main = self._tables[RT_TABLE_LOCAL], self._tables[RT_TABLE_MAIN]
        at_local, at_main = local.match(value), main.match(value)
        if at_local is not None and at_main is not None and at_main[0] >= at_local[0]:
            return ASK  # merged and separate local/main tables could disagree
        if at_local is not None:
            return self._answer(local, at_local)
        if at_main is not None:
            return self._answer(main, at_main)
        default = self._tables[RT_TABLE_DEFAULT]
        at_default = default.match(value)
        return None if at_default is None else self._answer(default, at_default)

    def _answer(self, table: _Table, at: tuple[int, int]) -> Answer:
        plen, net = at
        nets = table.prefixes[plen]
        entry = nets[net]
        if isinstance(entry, bytes):
            entry = nets[net] = decode.next_hop(entry, self._ifname)
        return entry


class FibMirror:
    """The Fib of a kernel, rebuilt from its dumps (`dump(kind, body)`: a netlink socket's) when
    first needed after `mark_stale`. Off (every address ASK) while the rules are not the defaults;
    off for good once the routes were past `max_routes` (a full table would be dumped again after
    each of its frequent changes)."""

    def __init__(self, dump: Dump, ifname: Ifname, max_routes: int = MAX_ROUTES) -> None:
        self._dump = dump
        self._ifname = ifname
        self._max = max_routes
        self._fib: Fib | None = None
        self._stale = True
        self.rebuilds = 0  # times the tables were read
        self.answered = 0  # addresses answered without asking the kernel
        self.off_reason: str | None = None  # why the mirror is off ("rules", "routes"), None if on

    def mark_stale(self) -> None:
        self._stale = True

    def _rebuild(self) -> None:
        self._stale = False
        self.rebuilds += 1
        self._fib = None
        request = nla.RTMSG.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        rules = [body for kind, body in self._dump(RTM_GETRULE, request) if kind == RTM_NEWRULE]
        if not default_rules(rules):
            self.off_reason = "rules"
            return
        routes = (body for kind, body in self._dump(RTM_GETROUTE, request) if kind == RTM_NEWROUTE)
        self._fib = Fib.build(routes, self._ifname, self._max)
        self.off_reason = None if self._fib is not None else "routes"

    def split(self, addresses: Iterable[str]) -> tuple[dict[str, ops.NextHop | None], list[str]]:
        """The answers the mirror has, and the addresses to ask the kernel about."""
        if self._stale and self.off_reason != "routes":  # past the bound: off for good (no dumps)
            self._rebuild()
        fib = self._fib
        if fib is None:
            return {}, list(addresses)
        found: dict[str, ops.NextHop | None] = {}
        ask: list[str] = []
        for address in addresses:
            answer = fib.lookup(address)
            if isinstance(answer, _Ask):
                ask.append(address)
            else:
                found[address] = answer
        self.answered += len(found)
        return found, ask
