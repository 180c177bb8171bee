"""The IPv4 FIB mirror (dataplane/netlink/fibmirror.py) over encoded rule and route messages: the
kernel's lookup where it can be exact, ASK where only the kernel can answer, off with other rules
or past its bound, rebuilt after a change; and the route cache asks the kernel only for what the
mirror leaves (a new client behind a known gateway costs no RTM_GETROUTE)."""

from __future__ import annotations

import ipaddress
import struct

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import nla
from orchestrator.dataplane.netlink.constants import (
    AF_INET,
    FR_ACT_TO_TBL,
    FRA_PRIORITY,
    FRA_PROTOCOL,
    FRA_SRC,
    FRA_SUPPRESS_PREFIXLEN,
    FRA_TABLE,
    RTA_DST,
    RTA_GATEWAY,
    RTA_MULTIPATH,
    RTA_NH_ID,
    RTA_OIF,
    RTA_TABLE,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTN_BLACKHOLE,
    RTN_BROADCAST,
    RTN_LOCAL,
    RTN_UNICAST,
    RTN_UNREACHABLE,
    RTNH_F_LINKDOWN,
)
from orchestrator.dataplane.netlink.fibmirror import ASK, Fib, FibMirror, default_rules
from orchestrator.dataplane.netlink.routewatch import RouteCache

LINKS = {2: "lan0", 3: "lan1", 1: "lo"}
THROW = 9


def route(
    dst: str,
    dev: str = "lan0",
    via: str | None = None,
    table: int = 254,
    rtype: int = RTN_UNICAST,
    tos: int = 0,
    flags: int = 0,
    extra: bytes = b"",
) -> bytes:
    """An RTM_NEWROUTE body as the kernel dumps it (fib_dump_info)."""
    net = ipaddress.ip_network(dst)
    body = nla.RTMSG.pack(AF_INET, net.prefixlen, 0, tos, min(table, 252), 3, 0, rtype, flags)
    body += nla.u32(RTA_TABLE, table)
    if net.prefixlen:
        body += nla.attr(RTA_DST, net.network_address.packed)
    if via is not None:
        body += nla.attr(RTA_GATEWAY, ipaddress.ip_address(via).packed)
    if rtype == RTN_UNICAST or rtype in (RTN_LOCAL, RTN_BROADCAST):
        body += nla.u32(RTA_OIF, {n: i for i, n in LINKS.items()}[dev])
    return body + extra


def rule(pref: int, table: int, action: int = FR_ACT_TO_TBL, extra: bytes = b"", src_len: int = 0) -> bytes:
    """An RTM_NEWRULE body as the kernel dumps it (fib_nl_fill_rule)."""
    body = nla.RTMSG.pack(AF_INET, 0, src_len, 0, table, 0, 0, action, 0)
    body += nla.u32(FRA_TABLE, table) + nla.u32(FRA_SUPPRESS_PREFIXLEN, 0xFFFFFFFF) + nla.u8(FRA_PROTOCOL, 2)
    if pref:
        body += nla.u32(FRA_PRIORITY, pref)
    return body + extra


DEFAULTS = [rule(0, 255), rule(32766, 254), rule(32767, 253)]
LOCAL = [
    route("10.1.0.1/32", table=255, rtype=RTN_LOCAL),
    route("10.1.0.255/32", table=255, rtype=RTN_BROADCAST),
    route("127.0.0.0/8", dev="lo", table=255, rtype=RTN_LOCAL),
]
BASE = [*LOCAL, route("10.1.0.0/24"), route("0.0.0.0/0", via="10.1.0.254")]


def fib(routes: list[bytes], max_routes: int = 1000) -> Fib:
    built = Fib.build(routes, LINKS.__getitem__, max_routes)
    assert built is not None
    return built


def test_longest_match_on_link_and_gateway() -> None:
    f = fib([*BASE, route("192.0.2.0/24", via="10.1.0.9"), route("192.0.2.0/25", dev="lan1", via="10.1.0.8")])
    assert f.lookup("10.1.0.7") == ops.NextHop("lan0")  # connected subnet: on-link
    assert f.lookup("198.51.100.1") == ops.NextHop("lan0", "10.1.0.254")  # default route
    assert f.lookup("192.0.2.200") == ops.NextHop("lan0", "10.1.0.9")
    assert f.lookup("192.0.2.5") == ops.NextHop("lan1", "10.1.0.8")  # the more specific route inside it
    assert f.lookup("192.0.2.5") is f.lookup("192.0.2.6")  # one shared NextHop (decode.shared_hop)


def test_no_route_is_none_and_unusable_types_are_none() -> None:
    f = fib([*LOCAL, route("10.1.0.0/24"), route("203.0.113.0/24", rtype=RTN_BLACKHOLE)])
    assert f.lookup("198.51.100.1") is None  # no match in any table: ENETUNREACH
    assert f.lookup("203.0.113.9") is None
    f = fib([*LOCAL, route("0.0.0.0/0", rtype=RTN_UNREACHABLE)])
    assert f.lookup("198.51.100.1") is None
    assert f.lookup("10.1.0.1") is None  # our own address (local)
    assert f.lookup("10.1.0.255") is None  # broadcast


def test_local_table_first_and_ambiguous_local_main_asks() -> None:
    f = fib([*BASE, route("10.1.0.1/32", dev="lan1")])  # main holds the local address's /32 too
    assert f.lookup("10.1.0.1") is ASK  # merged trie and separate tables could differ
    f = fib([*BASE, route("10.1.0.0/23", dev="lan1", table=255, rtype=RTN_UNICAST)])
    assert f.lookup("10.1.1.5") == ops.NextHop("lan1")  # only local matches: local's
    assert f.lookup("10.1.0.5") is ASK  # main's /24 is longer than local's /23


def test_default_table_after_main() -> None:
    f = fib([*LOCAL, route("10.1.0.0/24"), route("0.0.0.0/0", via="10.1.0.253", table=253)])
    assert f.lookup("198.51.100.1") == ops.NextHop("lan0", "10.1.0.253")
    assert f.lookup("10.1.0.3") == ops.NextHop("lan0")


def test_what_only_the_kernel_can_answer() -> None:
    nested = nla.attr(RTA_MULTIPATH, struct.pack("=HBBi", 8, 0, 0, 2))
    f = fib(
        [
            *BASE,
            route("192.0.2.0/24", via="10.1.0.9", extra=nested),  # multipath
            route("198.51.100.0/24", via="10.1.0.9"),
            route("198.51.100.0/24", via="10.1.0.8", dev="lan1"),  # two routes (metrics) at a prefix
            route("203.0.113.0/24", extra=nla.u32(RTA_NH_ID, 7)),  # a nexthop object
            route("203.0.114.0/24", via="10.1.0.9", flags=RTNH_F_LINKDOWN),
            route("203.0.115.0/24", via="10.1.0.9", tos=0x10),
            route("203.0.116.0/24", rtype=THROW),
        ]
    )
    for address in ("192.0.2.1", "198.51.100.1", "203.0.113.1", "203.0.114.1", "203.0.115.1", "203.0.116.1"):
        assert f.lookup(address) is ASK, address
    for address in ("2001:db8::1", "not-an-address", "224.0.0.5", "127.0.0.1", "0.1.2.3", "10.1.0"):
        assert f.lookup(address) is ASK, address
    assert f.lookup("203.0.117.1") == ops.NextHop("lan0", "10.1.0.254")


def test_other_tables_are_ignored() -> None:
    f = fib([*BASE, route("198.51.100.0/24", via="10.1.0.9", table=100)])
    assert f.lookup("198.51.100.1") == ops.NextHop("lan0", "10.1.0.254")


def test_only_the_default_rules_keep_the_mirror_on() -> None:
    assert default_rules(DEFAULTS)
    assert not default_rules(DEFAULTS[:2])  # the default table's rule deleted
    assert not default_rules([*DEFAULTS, rule(100, 100)])  # ip rule add ... table 100
    src = rule(100, 254, extra=nla.attr(FRA_SRC, bytes([10, 9, 0, 0])), src_len=16)
    assert not default_rules([*DEFAULTS[:2], src])
    assert not default_rules([rule(0, 255), rule(32766, 254, extra=nla.u32(3, 2)), rule(32767, 253)])  # iif
    suppress = [rule(0, 255), rule(32766, 254), rule(32767, 253)]
    suppress[1] = suppress[1].replace(nla.u32(FRA_SUPPRESS_PREFIXLEN, 0xFFFFFFFF), nla.u32(FRA_SUPPRESS_PREFIXLEN, 0))
    assert not default_rules(suppress)
    assert not default_rules([rule(0, 255), rule(32766, 254, action=2), rule(32767, 253)])  # not to-table


class Kernel:
    """Dumps of a scripted kernel: rules and routes that a test changes."""

    def __init__(self, rules: list[bytes], routes: list[bytes]) -> None:
        self.rules = rules
        self.routes = routes
        self.dumps: list[int] = []

    def dump(self, kind: int, body: bytes) -> list[tuple[int, memoryview]]:
        self.dumps.append(kind)
        assert nla.RTMSG.unpack_from(body)[0] == AF_INET
        if kind == RTM_GETRULE:
            return [(RTM_NEWRULE, memoryview(b)) for b in self.rules]
        assert kind == RTM_GETROUTE
        return [(RTM_NEWROUTE, memoryview(b)) for b in self.routes]


def test_off_with_another_rule_and_past_the_bound() -> None:
    kernel = Kernel([*DEFAULTS, rule(100, 100)], BASE)
    mirror = FibMirror(kernel.dump, LINKS.__getitem__)
    assert mirror.split(["10.1.0.7"]) == ({}, ["10.1.0.7"])
    assert mirror.off_reason == "rules" and kernel.dumps == [RTM_GETRULE]  # no route dump
    kernel = Kernel(DEFAULTS, [route(f"192.0.{i}.0/24", via="10.1.0.9") for i in range(20)] + BASE)
    mirror = FibMirror(kernel.dump, LINKS.__getitem__, max_routes=20)
    assert mirror.split(["10.1.0.7"]) == ({}, ["10.1.0.7"])
    assert mirror.off_reason == "routes"
    mirror.mark_stale()
    mirror.split(["10.1.0.7"])
    assert kernel.dumps == [RTM_GETRULE, RTM_GETROUTE] and mirror.rebuilds == 1  # off for good: no more dumps


def test_stale_mirror_is_rebuilt_before_answering() -> None:
    kernel = Kernel(DEFAULTS, list(BASE))
    mirror = FibMirror(kernel.dump, LINKS.__getitem__)
    assert mirror.split(["192.0.2.1", "10.1.0.1"]) == (
        {"192.0.2.1": ops.NextHop("lan0", "10.1.0.254"), "10.1.0.1": None},
        [],
    )
    kernel.routes.append(route("192.0.2.0/24", dev="lan1", via="10.1.0.8"))
    assert mirror.split(["192.0.2.1"])[0] == {"192.0.2.1": ops.NextHop("lan0", "10.1.0.254")}  # not told yet
    mirror.mark_stale()
    assert mirror.split(["192.0.2.1"])[0] == {"192.0.2.1": ops.NextHop("lan1", "10.1.0.8")}
    kernel.rules.append(rule(100, 100))  # an ip rule: the mirror goes off at the next change
    mirror.mark_stale()
    assert mirror.split(["192.0.2.1"]) == ({}, ["192.0.2.1"])
    kernel.rules.pop()
    mirror.mark_stale()
    assert mirror.split(["192.0.2.1"])[0] == {"192.0.2.1": ops.NextHop("lan1", "10.1.0.8")}
    assert mirror.rebuilds == 4 and mirror.off_reason is None


def test_new_clients_behind_a_known_gateway_cost_no_kernel_lookup() -> None:
    kernel = Kernel(DEFAULTS, list(BASE))
    mirror = FibMirror(kernel.dump, LINKS.__getitem__)
    changed = [False]

    def changes() -> bool:
        seen, changed[0] = changed[0], False
        if seen:
            mirror.mark_stale()
        return seen

    asked: list[list[str]] = []

    def lookup(addresses: list[str]) -> dict[str, ops.NextHop | None]:
        asked.append(addresses)
        return dict.fromkeys(addresses, ops.NextHop("lan1", "10.1.0.8"))

    cache: RouteCache[ops.NextHop | None] = RouteCache(changes)
    clients = [f"198.51.{i // 250}.{i % 250 + 1}" for i in range(100)]
    answers = cache.resolve(clients, lookup, mirror.split)
    assert set(answers.values()) == {ops.NextHop("lan0", "10.1.0.254")}
    assert cache.lookups == 0 and asked == [] and mirror.answered == 100
    answers = cache.resolve(["2001:db8::1", "198.51.0.1"], lookup, mirror.split)  # IPv6: the kernel
    assert asked == [["2001:db8::1"]] and cache.lookups == 1 and mirror.answered == 100
    kernel.routes.append(route("198.51.0.0/16", dev="lan1", via="10.1.0.8"))
    changed[0] = True
    assert cache.resolve(["198.51.0.1"], lookup, mirror.split) == {"198.51.0.1": ops.NextHop("lan1", "10.1.0.8")}
    assert cache.lookups == 1 and mirror.rebuilds == 2
