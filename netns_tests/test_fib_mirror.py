"""The balancer's IPv4 FIB mirror (dataplane/netlink/fibmirror.py) against the kernel, in the lab's
balancer namespace: across routing configurations made with iproute2 (connected subnet, gateway
route, a more specific route inside it, multipath, blackhole, unreachable, a link without carrier,
a link down, an extra `ip rule`), the provider's answers (`routes_to`: cache, mirror, kernel for
what the mirror leaves) equal the kernel's own RTM_GETROUTE answers (`_routes_to`) for every
address, each change is followed (the mirror is rebuilt before the next answer), and new clients
behind a known gateway cost no kernel lookup. No daemon: a provider of our own in lb's namespace."""

from __future__ import annotations

from typing import Iterator

import pytest

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink.provider import NetlinkProvider
from orchestrator.lab.kit import Lab

A, B = "fibA", "fibB"  # a veth pair inside lb: fibA carries the test's routes, fibB its carrier
GW1, GW2 = "10.77.0.2", "10.77.0.3"
CONNECTED = ["10.77.0.9", "10.77.0.200"]
BEHIND = ["10.78.1.1", "10.78.5.7", "10.78.200.1"]  # 10.78.0.0/16 via GW1; 10.78.5.0/24 via GW2 later
MULTIPATH = ["10.79.0.1", "10.79.3.4", "10.79.200.9"]
BLACKHOLE, UNREACHABLE = "10.80.0.1", "10.81.0.1"
OTHERS = ["10.0.1.10", "10.0.1.1", "10.77.0.1", "10.77.0.255", "10.255.0.2", "192.0.2.1", "fd00:1::10"]
ADDRESSES = [*CONNECTED, *BEHIND, *MULTIPATH, BLACKHOLE, UNREACHABLE, *OTHERS]


@pytest.fixture(scope="module")
def lb(lab: Lab) -> Iterator[NetlinkProvider]:
    lab.sh("lb", "ip", "link", "add", A, "type", "veth", "peer", "name", B)
    provider = NetlinkProvider(lab.netns("lb"))
    try:
        for cmd in (
            ("ip", "addr", "add", "10.77.0.1/24", "dev", A),
            ("ip", "link", "set", B, "up"),
            ("ip", "link", "set", A, "up"),
        ):
            lab.sh("lb", *cmd)
        yield provider
    finally:
        provider.close()
        lab.sh("lb", "ip", "rule", "del", "pref", "100", check=False)
        for prefix in ("10.79.0.0/16", "10.80.0.0/16", "10.81.0.0/16"):
            lab.sh("lb", "ip", "route", "del", prefix, check=False)
        lab.sh("lb", "ip", "link", "del", A, check=False)


def _follows(lab: Lab, lb: NetlinkProvider, *cmd: str, asked: list[str]) -> dict[str, ops.NextHop | None]:
    """After `ip CMD` in lb: the provider's answers, checked against the kernel's for every
    address; the mirror was rebuilt once, and only `asked` went to the kernel."""
    before = lb.route_counters()
    lab.sh("lb", "ip", *cmd)
    answers = lb.routes_to(ADDRESSES)
    after = lb.route_counters()
    kernel = lb._routes_to(ADDRESSES)
    assert answers == kernel, (cmd, {a: (answers[a], kernel[a]) for a in ADDRESSES if answers[a] != kernel[a]})
    assert lb._fib is not None
    assert sorted(lb._fib.split(ADDRESSES)[1]) == sorted(asked), cmd  # what the mirror leaves to the kernel
    assert after["mirror_rebuilds"] == before["mirror_rebuilds"] + 1, (cmd, before, after)
    assert after["kernel_lookups"] - before["kernel_lookups"] == len(asked), (cmd, before, after)
    assert after["mirror_answers"] - before["mirror_answers"] == len(ADDRESSES) - len(asked), (cmd, before, after)
    return answers


def test_the_mirror_answers_as_the_kernel_across_changes(lab: Lab, lb: NetlinkProvider) -> None:
    v6 = ["fd00:1::10"]
    answers = _follows(lab, lb, "route", "add", "10.78.0.0/16", "via", GW1, asked=v6)
    assert answers["10.77.0.9"] == ops.NextHop(A) and answers["10.78.5.7"] == ops.NextHop(A, GW1)
    assert answers["10.0.1.10"] == ops.NextHop("lan0") and answers["10.77.0.1"] is None  # on-link; our own
    answers = _follows(lab, lb, "route", "add", "10.78.5.0/24", "via", GW2, asked=v6)  # more specific inside
    assert answers["10.78.5.7"] == ops.NextHop(A, GW2) and answers["10.78.1.1"] == ops.NextHop(A, GW1)
    multipath = ("route", "add", "10.79.0.0/16", "nexthop", "via", GW1, "nexthop", "via", GW2)
    answers = _follows(lab, lb, *multipath, asked=[*MULTIPATH, *v6])  # per-address hash: the kernel's
    assert {answers[a] for a in MULTIPATH} <= {ops.NextHop(A, GW1), ops.NextHop(A, GW2)}
    asked = [*MULTIPATH, *v6]  # from now on the multipath route's addresses go to the kernel
    answers = _follows(lab, lb, "route", "add", "blackhole", "10.80.0.0/16", asked=asked)
    assert answers[BLACKHOLE] is None
    answers = _follows(lab, lb, "route", "add", "unreachable", "10.81.0.0/16", asked=asked)
    assert answers[UNREACHABLE] is None
    # An extra rule: the mirror is off, every address goes to the kernel; deleted: on again.
    _follows(lab, lb, "rule", "add", "from", "10.99.0.0/16", "table", "100", "pref", "100", asked=ADDRESSES)
    assert lb._fib is not None and lb._fib.off_reason == "rules"
    _follows(lab, lb, "rule", "del", "pref", "100", asked=asked)
    assert lb._fib.off_reason is None
    # fibA without carrier: its routes (and the subnet's broadcast route) are link-down, which
    # the kernel may pass over: asked.
    answers = _follows(lab, lb, "link", "set", B, "down", asked=[*CONNECTED, *BEHIND, "10.77.0.255", *asked])
    _follows(lab, lb, "link", "set", B, "up", asked=asked)
    # fibA down: its routes are flushed (no notification per route); the mirror was rebuilt.
    answers = _follows(lab, lb, "link", "set", A, "down", asked=v6)
    assert all(answers[a] is None for a in [*CONNECTED, *BEHIND, *MULTIPATH]), answers


def test_new_clients_behind_a_known_gateway_cost_no_kernel_lookup(lab: Lab, lb: NetlinkProvider) -> None:
    for cmd in (("link", "set", B, "up"), ("link", "set", A, "up"), ("route", "replace", "10.78.0.0/16", "via", GW1)):
        lab.sh("lb", "ip", *cmd)
    lb.routes_to(["10.78.0.1"])  # the changes are read, the mirror rebuilt
    before = lb.route_counters()
    clients = [f"10.78.{i // 200 + 10}.{i % 200 + 1}" for i in range(100)]
    answers = lb.routes_to(clients)
    after = lb.route_counters()
    assert after["kernel_lookups"] == before["kernel_lookups"], (before, after)  # no RTM_GETROUTE
    assert after["mirror_answers"] == before["mirror_answers"] + 100
    assert after["mirror_rebuilds"] == before["mirror_rebuilds"]
    assert set(answers.values()) == {ops.NextHop(A, GW1)}
    assert lb._routes_to(clients) == answers
