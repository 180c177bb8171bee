"""FakeProvider: the reference session (docs/design.md, "Kernel objects per session") as operations, and the
kernel's errors for what the kernel refuses."""

from __future__ import annotations

import errno
import inspect
from collections.abc import Callable

import pytest

from orchestrator.dataplane.fake import FakeProvider, Forwarding
from orchestrator.dataplane.netlink.provider import NetlinkProvider
from orchestrator.dataplane.ops import (
    MAX_STACK,
    Add,
    ClsactQdisc,
    Delete,
    EncapRoute,
    FlowerFilter,
    FlowerMatch,
    MplsPop,
    MplsRoute,
    OffloadPolicy,
    OffloadState,
    Replace,
    Rule,
    describe,
    push_stack,
)
from orchestrator.dataplane.provider import Provider, UnknownDevice

CLIENT, VIP = "10.0.1.10", "10.0.0.100"
C2S, S2C = 1001, 1002
T_LB, T_S2 = 100, 102  # transport labels of the balancer and of server s2 at the fabric switch

QDISC = ClsactQdisc("fab0")
C2S_FILTER = FlowerFilter("fab0", 1, FlowerMatch(src=f"{CLIENT}/32", dst=f"{VIP}/32"), push_stack((T_S2, C2S)))
S2C_ROUTE = MplsRoute(S2C, "lan0", via=CLIENT)
BALANCER_OPS = [Add(QDISC), Add(C2S_FILTER), Add(S2C_ROUTE)]

C2S_TERM = MplsRoute(C2S, "lo")
VIP_RULE = Rule(VIP, table=100, priority=1000)
S2C_ENCAP = EncapRoute(f"{CLIENT}/32", (T_LB, S2C), "eth0", via="10.1.2.1", table=100)
SERVER_OPS = [Add(C2S_TERM), Add(VIP_RULE), Add(S2C_ENCAP)]

FABRIC_OPS = [
    Add(MplsRoute(101, "ps1", via="10.1.1.10")),
    Add(MplsRoute(T_S2, "ps2", via="10.1.2.10")),
    Add(MplsRoute(T_LB, "pl", via="10.255.0.1")),
]


def _node(devices, op_list, **kwargs) -> FakeProvider:
    node = FakeProvider(devices, **kwargs)
    results = node.apply(op_list)
    assert all(r.ok for r in results), [str(r) for r in results]
    return node


@pytest.fixture
def lb() -> FakeProvider:
    return _node({"lan0", "fab0"}, BALANCER_OPS)


@pytest.fixture
def s2() -> FakeProvider:
    return _node({"eth0"}, SERVER_OPS)


@pytest.fixture
def p() -> FakeProvider:
    return _node({"pl", "ps1", "ps2"}, FABRIC_OPS)


def _one(node: FakeProvider, op):
    (result,) = node.apply([op])
    return result


# ---- the reference session ----


def test_reference_session_round_trip(lb, s2, p):
    # client -> VIP leaves the balancer's fabric link labelled [transport of s2, C2S]
    out = lb.forward_ip(CLIENT, VIP, proto="tcp", sport=40000, dport=80, out_dev="fab0")
    assert out == Forwarding((T_S2, C2S), None, "fab0")
    # the fabric pops the transport label (penultimate hop) towards s2
    assert p.receive_mpls(out.labels) == Forwarding((C2S,), "10.1.2.10", "ps2")
    # s2 terminates the session label
    assert s2.receive_mpls((C2S,)) == Forwarding((), None, "lo", delivered_locally=True)
    # the answer from the VIP gets [transport of the balancer, S2C]
    back = s2.forward_ip(VIP, CLIENT, proto="tcp", sport=80, dport=40000)
    assert back == Forwarding((T_LB, S2C), "10.1.2.1", "eth0")
    assert p.receive_mpls(back.labels) == Forwarding((S2C,), "10.255.0.1", "pl")
    # the balancer pops S2C and hands the plain IP packet to the client
    assert lb.receive_mpls((S2C,)) == Forwarding((), CLIENT, "lan0")
    assert lb.mpls_lookup(S2C) == S2C_ROUTE


def test_other_traffic_is_not_labelled(lb, s2):
    assert lb.forward_ip("10.0.1.11", VIP, out_dev="fab0") == Forwarding((), None, "fab0")
    assert lb.forward_ip(CLIENT, "10.0.0.101", out_dev="fab0").labels == ()
    # only answers from the VIP use the per-VIP table; s2's main table has no encap route
    assert s2.forward_ip("10.1.2.10", CLIENT) is None
    assert s2.route_ip(VIP, "10.0.1.11") is None
    assert s2.receive_mpls((C2S + 2,)) is None
    assert lb.receive_mpls((C2S,)) is None  # no label route for C2S on the balancer


def test_pop_transport_then_lookup_session_label_via_lo(s2):
    # without penultimate hop popping the server pops its transport label to lo and looks again
    assert _one(s2, Add(MplsRoute(T_S2, "lo"))).ok
    assert s2.receive_mpls((T_S2, C2S)) == Forwarding((), None, "lo", delivered_locally=True)
    assert s2.receive_mpls((T_S2, 5000)) is None  # the label under it has no route: dropped
    assert s2.receive_mpls((C2S, 5000)) is None


def test_swap_keeps_the_labels_below():
    node = _node({"fab0"}, [Add(MplsRoute(2001, "fab0", via="10.255.0.2", out_labels=(102, 2001)))])
    assert node.receive_mpls((2001, 77)) == Forwarding((102, 2001, 77), "10.255.0.2", "fab0")


def test_swap_loop_through_lo_is_dropped():
    node = _node(
        set(), [Add(MplsRoute(2000, "lo", out_labels=(2001,))), Add(MplsRoute(2001, "lo", out_labels=(2000,)))]
    )
    assert node.receive_mpls((2000,)) is None


# ---- flower matching and order ----


def _filters_node(*filters) -> FakeProvider:
    return _node({"fab0"}, [Add(ClsactQdisc("fab0"))] + [Add(f) for f in filters])


def test_lowest_pref_then_lowest_handle_wins():
    vip_only = FlowerMatch(dst=f"{VIP}/32")
    node = _filters_node(
        FlowerFilter("fab0", 1, vip_only, push_stack((7001,)), pref=20),
        FlowerFilter("fab0", 9, FlowerMatch(src=f"{CLIENT}/32"), push_stack((5001,)), pref=10),
        FlowerFilter("fab0", 2, FlowerMatch(src="10.0.1.0/24"), push_stack((6001,)), pref=10),
    )
    assert node.forward_ip(CLIENT, VIP, out_dev="fab0").labels == (6001,)  # pref 10, handle 2
    assert node.forward_ip("10.0.1.99", VIP, out_dev="fab0").labels == (6001,)
    assert node.forward_ip("10.9.9.9", VIP, out_dev="fab0").labels == (7001,)


def test_match_by_protocol_and_ports():
    web = FlowerMatch(src=f"{CLIENT}/32", dst=f"{VIP}/32", ip_proto="tcp", dst_port=80)
    node = _filters_node(FlowerFilter("fab0", 1, web, push_stack((T_S2, C2S))))
    assert node.forward_ip(CLIENT, VIP, "tcp", 40000, 80, out_dev="fab0").labels == (T_S2, C2S)
    assert node.forward_ip(CLIENT, VIP, "udp", 40000, 80, out_dev="fab0").labels == ()
    assert node.forward_ip(CLIENT, VIP, "tcp", 40000, 443, out_dev="fab0").labels == ()
    assert node.forward_ip(CLIENT, VIP, out_dev="fab0").labels == ()
    from_port = FlowerMatch(src=f"{CLIENT}/32", ip_proto="udp", src_port=5000)
    assert _one(node, Add(FlowerFilter("fab0", 2, from_port, push_stack((9001,)), pref=20))).ok
    assert node.forward_ip(CLIENT, VIP, "udp", 5000, 53, out_dev="fab0").labels == (9001,)
    assert node.forward_ip(CLIENT, VIP, "udp", 5001, 53, out_dev="fab0").labels == ()


def test_ipv6_filter_does_not_match_ipv4_and_pop_action():
    v6 = FlowerFilter("fab0", 1, FlowerMatch(dst="2001:db8::100/128"), push_stack((4001,)), pref=5)
    both = FlowerFilter("fab0", 1, FlowerMatch(), push_stack((1, 2)) + (MplsPop(),), pref=6)
    node = _filters_node(v6, both)
    assert node.forward_ip("2001:db8::1", "2001:db8::100", out_dev="fab0").labels == (4001,)
    assert node.forward_ip(CLIENT, VIP, out_dev="fab0").labels == (2,)  # push 2, push 1, pop
    assert node.forward_ip("2001:db8::1", "2001:db8::200", out_dev="fab0").labels == ()


def test_policy_rules_by_priority_then_main_with_longest_prefix():
    node = _node(
        {"eth0", "eth1"},
        [
            Add(Rule(VIP, table=100, priority=1000)),
            Add(Rule("10.0.0.0/24", table=200, priority=500)),
            Add(Rule(VIP, table=300, priority=40000)),  # after the kernel's main-table rule (32766)
            Add(EncapRoute("10.0.1.0/24", (100, 3000), "eth0", table=100)),
            Add(EncapRoute("10.0.1.10/32", (100, 1002), "eth0", table=100)),
            Add(EncapRoute("10.0.2.0/24", (200, 2000), "eth1", table=200)),
            Add(EncapRoute("10.0.4.0/24", (254, 2540), "eth1")),
            Add(EncapRoute("10.0.0.0/8", (300, 3003), "eth1", table=300)),
            Add(EncapRoute("10.0.0.0/22", (100, 2200), "eth0", table=100)),  # added last, shorter
        ],
    )
    assert node.route_ip(VIP, CLIENT).labels == (100, 1002)  # /32 beats /24 in table 100
    assert node.route_ip(VIP, "10.0.1.11").labels == (100, 3000)
    assert node.route_ip(VIP, "10.0.2.5") == Forwarding((200, 2000), None, "eth1")  # pref 500
    assert node.route_ip(VIP, "10.0.3.5").labels == (100, 2200)
    assert node.route_ip(VIP, "10.0.4.5").labels == (254, 2540)  # falls through to main
    assert node.route_ip(VIP, "10.0.9.9").labels == (300, 3003)  # after main
    assert node.route_ip("192.0.2.1", CLIENT) is None  # no rule for this source


# ---- errors: the kernel's errno and a message ----

ERROR_CASES = [
    ("label out of 20 bits", Add(MplsRoute(1 << 20, "lo")), errno.EINVAL, "not an MPLS label"),
    ("bad prefix", Add(EncapRoute("10.0.1.10/24", (100,), "eth0")), errno.EINVAL, "host bits"),
    ("port without proto", Add(FlowerFilter("eth0", 1, FlowerMatch(dst_port=80), ())), errno.EINVAL, "ip_proto"),
    ("unknown device", Add(MplsRoute(2000, "eth9")), errno.ENODEV, "no such device eth9"),
    ("unknown device qdisc", Add(ClsactQdisc("eth9")), errno.ENODEV, "eth9"),
    ("reserved label", Add(MplsRoute(15, "lo")), errno.EINVAL, "reserved"),
    ("reserved label delete", Delete(MplsRoute(3, "lo")), errno.EINVAL, "reserved"),
    ("platform_labels", Add(MplsRoute(100000, "lo")), errno.EINVAL, "platform_labels"),
    (
        "implicit null swap",
        Add(MplsRoute(2000, "eth0", via="10.1.2.1", out_labels=(100, 3))),
        errno.EINVAL,
        "implicit null",
    ),
    ("implicit null encap", Add(EncapRoute("10.0.1.11/32", (3, 1002), "eth0")), errno.EINVAL, "implicit null"),
    (
        "deep swap",
        Add(MplsRoute(2000, "eth0", via="10.1.2.1", out_labels=tuple(range(16, 17 + MAX_STACK)))),
        errno.EINVAL,
        "maximum",
    ),
    ("deep encap", Add(EncapRoute("10.0.1.11/32", tuple(range(16, 17 + MAX_STACK)), "eth0")), errno.EINVAL, "maximum"),
    ("add existing mpls", Add(MplsRoute(C2S, "lo")), errno.EEXIST, "exists"),
    ("add existing encap", Add(S2C_ENCAP), errno.EEXIST, "exists"),
    ("add existing rule", Add(VIP_RULE), errno.EEXIST, "exists"),
    ("add existing qdisc", Add(ClsactQdisc("eth0")), errno.EEXIST, "exists"),
    (
        "add existing filter",
        Add(FlowerFilter("eth0", 7, FlowerMatch(src="10.9.9.9/32"), push_stack((1,)))),
        errno.EEXIST,
        "exists",
    ),
    (
        "same match other handle",
        Add(FlowerFilter("eth0", 8, FlowerMatch(dst=f"{VIP}/32"), push_stack((1,)))),
        errno.EEXIST,
        "same match",
    ),
    (
        "pref of other protocol",
        Add(FlowerFilter("eth0", 9, FlowerMatch(dst="2001:db8::/64"), ())),
        errno.EINVAL,
        "another protocol",
    ),
    ("delete missing encap", Delete(EncapRoute("10.0.1.99/32", (1,), "eth0", table=100)), errno.ESRCH, "no such route"),
    ("delete missing rule", Delete(Rule(VIP, table=100, priority=1001)), errno.ENOENT, "no such"),
    ("delete missing filter", Delete(FlowerFilter("eth0", 99, FlowerMatch(), ())), errno.ENOENT, "no such"),
    ("delete missing qdisc", Delete(ClsactQdisc("eth1")), errno.ENOENT, "no such"),
    (
        "filter without clsact",
        Add(FlowerFilter("eth1", 1, FlowerMatch(), push_stack((1,)))),
        errno.EINVAL,
        "no clsact qdisc on eth1",
    ),
    ("delete filter without clsact", Delete(FlowerFilter("eth1", 1, FlowerMatch(), ())), errno.EINVAL, "clsact"),
    (
        "offload required",
        Add(FlowerFilter("eth0", 2, FlowerMatch(src="10.8.8.8/32"), push_stack((1,)), offload=OffloadPolicy.REQUIRED)),
        errno.EOPNOTSUPP,
        "cannot offload",
    ),
]


@pytest.fixture
def busy() -> FakeProvider:
    """A server with one of everything, for the error cases."""
    return _node(
        {"eth0", "eth1"},
        SERVER_OPS
        + [
            Add(ClsactQdisc("eth0")),
            Add(FlowerFilter("eth0", 7, FlowerMatch(dst=f"{VIP}/32"), push_stack((1,)), pref=10)),
        ],
    )


@pytest.mark.parametrize("op,code,text", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(busy, op, code, text):
    before = busy.dump()
    result = _one(busy, op)
    assert not result.ok
    assert result.errno == code, str(result)
    assert text in result.error
    assert str(result) == f"{describe(op)}: {result.error}"
    assert busy.dump() == before  # a refused operation changes nothing


def test_label_range_edges_are_accepted():
    node = FakeProvider({"eth0"}, platform_labels=2000)
    results = node.apply(
        [
            Add(MplsRoute(16, "lo")),
            Add(MplsRoute(1999, "lo")),
            Add(MplsRoute(2000, "lo")),
            Add(MplsRoute(17, "eth0", via="10.1.2.1", out_labels=tuple(range(16, 16 + MAX_STACK)))),
            Add(MplsRoute(18, "eth0", via="10.1.2.1", out_labels=(0, 2))),  # explicit nulls are fine
            Add(EncapRoute("10.0.1.11/32", tuple(range(16, 16 + MAX_STACK)), "eth0")),
        ]
    )
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert results[2].errno == errno.EINVAL and "2000" in results[2].error


def test_delete_of_missing_mpls_route_succeeds_like_the_kernel():
    # mpls_route_del() returns 0 for a label without a route (unlike IPv4, ESRCH); see fake.py
    node = FakeProvider(set())
    assert _one(node, Delete(MplsRoute(2000, "lo"))).ok


def test_offload_required_on_capable_device_is_in_hw():
    node = FakeProvider({"sw0", "eth0"}, offload_capable={"sw0"})
    hw = FlowerFilter("sw0", 1, FlowerMatch(src=f"{CLIENT}/32"), push_stack((1001,)), offload=OffloadPolicy.REQUIRED)
    sw = FlowerFilter("sw0", 2, FlowerMatch(src="10.0.1.11/32"), push_stack((1003,)), offload=OffloadPolicy.NEVER)
    auto = FlowerFilter("sw0", 3, FlowerMatch(src="10.0.1.12/32"), push_stack((1005,)))
    plain = FlowerFilter("eth0", 1, FlowerMatch(src=f"{CLIENT}/32"), push_stack((1001,)))
    results = node.apply(
        [
            Add(ClsactQdisc("sw0")),
            Add(ClsactQdisc("eth0")),
            Add(hw),
            Add(sw),
            Add(auto),
            Add(plain),
            Add(MplsRoute(2000, "sw0")),
        ]
    )
    assert all(r.ok for r in results), [str(r) for r in results]
    offload = {i.obj: i.offload for i in node.dump()}
    assert offload[hw] == offload[auto] == OffloadState(in_hw=True, in_hw_count=1)
    # Like the kernel: a filter outside hardware says not_in_hw, a route says nothing at all.
    assert offload[sw] == offload[plain] == OffloadState(not_in_hw=True)
    assert offload[MplsRoute(2000, "sw0")] == OffloadState()
    assert offload[hw].describe() == "in_hw (1)" and offload[sw].describe() == "not_in_hw"


# ---- batches, replace, delete, dump ----


def test_a_failure_does_not_stop_later_operations():
    node = FakeProvider({"lan0", "fab0"})
    batch = [
        Add(QDISC),
        Add(MplsRoute(S2C, "lan9", via=CLIENT)),
        Add(MplsRoute(7, "lo")),
        Add(C2S_FILTER),
        Add(S2C_ROUTE),
    ]
    results = node.apply(batch)
    assert [r.op for r in results] == batch
    assert [r.errno for r in results] == [None, errno.ENODEV, errno.EINVAL, None, None]
    assert node.forward_ip(CLIENT, VIP, out_dev="fab0").labels == (T_S2, C2S)
    assert node.receive_mpls((S2C,)) == Forwarding((), CLIENT, "lan0")


def test_replace_overwrites_and_creates(lb, s2):
    # a label-aware client: S2C is swapped instead of popped
    assert _one(lb, Replace(MplsRoute(S2C, "lan0", via=CLIENT, out_labels=(S2C,)))).ok
    assert lb.receive_mpls((S2C,)) == Forwarding((S2C,), CLIENT, "lan0")
    # the session moves to s1 (transport 101): the same filter key gets a new stack
    moved = FlowerFilter("fab0", 1, C2S_FILTER.match, push_stack((101, C2S)))
    assert _one(lb, Replace(moved)).ok
    assert lb.forward_ip(CLIENT, VIP, out_dev="fab0").labels == (101, C2S)
    assert _one(s2, Replace(EncapRoute(f"{CLIENT}/32", (T_LB, 4002), "eth0", table=100))).ok
    assert s2.forward_ip(VIP, CLIENT) == Forwarding((T_LB, 4002), None, "eth0")
    # replace of something absent creates it; replace of the qdisc keeps its filters
    assert _one(lb, Replace(MplsRoute(4002, "lan0", via="10.0.1.20"))).ok
    assert lb.receive_mpls((4002,)) == Forwarding((), "10.0.1.20", "lan0")
    assert _one(lb, Replace(QDISC)).ok
    assert lb.forward_ip(CLIENT, VIP, out_dev="fab0").labels == (101, C2S)
    assert len(lb.dump()) == 4


def test_delete_removes_forwarding(lb, s2):
    results = lb.apply([Delete(C2S_FILTER), Delete(S2C_ROUTE)])
    assert all(r.ok for r in results)
    assert lb.forward_ip(CLIENT, VIP, out_dev="fab0").labels == ()
    assert lb.receive_mpls((S2C,)) is None and lb.mpls_lookup(S2C) is None
    assert [i.obj for i in lb.dump()] == [QDISC]

    assert _one(s2, Delete(S2C_ENCAP)).ok
    assert s2.forward_ip(VIP, CLIENT) is None
    assert _one(s2, Add(S2C_ENCAP)).ok and _one(s2, Delete(VIP_RULE)).ok
    assert s2.forward_ip(VIP, CLIENT) is None  # the route is there, but no rule leads to it
    assert _one(s2, Delete(C2S_TERM)).ok
    assert s2.receive_mpls((C2S,)) is None


def test_deleting_the_qdisc_deletes_its_filters(lb):
    assert _one(lb, Delete(QDISC)).ok
    assert lb.forward_ip(CLIENT, VIP, out_dev="fab0").labels == ()
    assert [i.obj for i in lb.dump()] == [S2C_ROUTE]
    assert _one(lb, Add(QDISC)).ok
    assert _one(lb, Delete(C2S_FILTER)).errno == errno.ENOENT


def test_dump_round_trips(lb, s2):
    for node, added in ((lb, BALANCER_OPS), (s2, SERVER_OPS)):
        dumped = node.dump()
        assert [i.obj for i in dumped] == [op.obj for op in added]
        assert all(i.offload == OffloadState(not_in_hw=isinstance(i.obj, FlowerFilter)) for i in dumped)
        # what the dump says can rebuild the node (the daemon's reconcile after a restart)
        rebuilt = _node(node.devices, [Add(i.obj) for i in dumped])
        assert rebuilt.dump() == dumped


# ---- interface addresses (node setup) ----


def test_added_addresses_are_listed_and_adding_again_changes_nothing():
    node = FakeProvider({"eth0"})
    assert node.addresses("lo") == ["127.0.0.1", "::1"] and node.addresses("eth0") == []
    node.add_address("lo", f"{VIP}/32")
    node.add_address("lo", "fd00:100::100/128")
    node.add_address("lo", f"{VIP}/32")  # the kernel's EEXIST: already done
    node.add_address("lo", "fd00:100::100/64")  # IPv6: the same address whatever its prefix
    assert node.addresses("lo") == ["127.0.0.1", "::1", VIP, "fd00:100::100"]
    node.add_address("eth0", "10.1.2.2/24")
    assert node.addresses("eth0") == ["10.1.2.2"]


def test_addresses_of_an_unknown_device_are_enodev():
    node = FakeProvider({"eth0"})
    for call in (lambda: node.add_address("eth1", f"{VIP}/32"), lambda: node.addresses("eth1")):
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == errno.ENODEV


def test_both_providers_have_every_method_of_the_protocol_with_its_arguments() -> None:
    """A daemon runs over either: what the protocol declares, both take the same way."""
    declared = [
        name for name, value in vars(Provider).items() if inspect.isfunction(value) and not name.startswith("_")
    ]
    assert {"apply", "dump", "routes_to", "addresses", "add_address", "ifindex", "ifname", "close"} <= set(declared)

    def shape(function: Callable[..., object]) -> list[tuple[str, bool]]:
        """Each parameter's kind and whether it is required (names may differ)."""
        return [
            (p.kind.name, p.default is inspect.Parameter.empty) for p in inspect.signature(function).parameters.values()
        ]

    for cls in (FakeProvider, NetlinkProvider):
        for name in declared:
            assert shape(getattr(cls, name)) == shape(getattr(Provider, name)), f"{cls.__name__}.{name}"


def test_the_fake_numbers_devices_as_a_kernel_does() -> None:
    kernel = FakeProvider(["lan0", "fab0"])
    assert [kernel.ifindex(name) for name in ("lo", "lan0", "fab0")] == [1, 2, 3]
    assert [kernel.ifname(index) for index in (1, 2, 3, 9)] == ["lo", "lan0", "fab0", "if9"]
    with pytest.raises(UnknownDevice):
        kernel.ifindex("eth9")


def test_a_route_to_a_nexthop_object_forwards_with_its_labels_and_goes_with_it() -> None:
    from orchestrator.dataplane.ops import EncapNexthop, NexthopRoute

    node = _node(["eth0"], [Add(C2S_TERM), Add(VIP_RULE)])
    nexthop = EncapNexthop(7, (T_LB, S2C), "eth0", "10.1.2.1")
    route = NexthopRoute(f"{CLIENT}/32", 7, 100)
    # The kernel wants the nexthop first ("Nexthop id does not exist").
    assert _one(node, Add(route)).errno == errno.EINVAL
    assert _one(node, Add(nexthop)).ok and _one(node, Add(route)).ok
    assert node.forward_ip(VIP, CLIENT) == Forwarding((T_LB, S2C), "10.1.2.1", "eth0")
    assert _one(node, Add(nexthop)).errno == errno.EEXIST
    # One route per (table, prefix): a plain encap route replaces it, and back.
    assert _one(node, Replace(S2C_ENCAP)).ok
    assert node.forward_ip(VIP, CLIENT) == Forwarding((T_LB, S2C), "10.1.2.1", "eth0")
    assert [type(i.obj) for i in node.dump()].count(EncapRoute) == 1
    assert _one(node, Replace(route)).ok
    assert _one(node, Add(NexthopRoute("fd00:1::10/128", 7, 100))).errno == errno.EINVAL  # IPv6 to IPv4 nh
    # Deleting the nexthop takes its route along (remove_nexthop); deleting it again: ENOENT.
    assert _one(node, Delete(nexthop)).ok
    assert node.forward_ip(VIP, CLIENT) is None
    assert not [i for i in node.dump() if isinstance(i.obj, (NexthopRoute, EncapNexthop))]
    assert _one(node, Delete(nexthop)).errno == errno.ENOENT
    assert _one(node, Add(EncapNexthop(8, (T_LB, S2C), "eth9", "10.1.2.1"))).errno == errno.ENODEV


def test_a_kernel_without_nexthop_objects_refuses_them() -> None:
    from orchestrator.dataplane.ops import EncapNexthop

    node = FakeProvider(["eth0"], nexthops=False)
    assert not node.supports_nexthops() and FakeProvider(["eth0"]).supports_nexthops()
    assert _one(node, Add(EncapNexthop(7, (T_LB, S2C), "eth0", "10.1.2.1"))).errno == errno.EOPNOTSUPP
