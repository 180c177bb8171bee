"""The netlink encoders, checked field by field and by decoding what they encode."""

from __future__ import annotations

import ipaddress
import struct
import sys

import pytest

from orchestrator.dataplane import ops, records
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import decode, encode, nla

DEVS = {"lo": 1, "lan0": 2, "fab0": 3, "eth0": 4}
NAMES = {v: k for k, v in DEVS.items()}
RTMSG = struct.Struct("=BBBBBBBBI")
TCMSG = struct.Struct("=BBHiIII")
IFADDRMSG = struct.Struct("=BBBBI")


def ifindex(name: str) -> int:
    return DEVS[name]


def test_label_stack_sets_bottom_of_stack_only_on_last() -> None:
    raw = encode.label_stack((102, 1001))
    assert raw == struct.pack("!II", 102 << 12, 1001 << 12 | 0x100)
    assert decode.labels_of(memoryview(raw)) == (102, 1001)


def test_mpls_pop_route_layout() -> None:
    kind, flags, body = encode.encode(ops.Add(ops.MplsRoute(1002, "lan0", via="10.0.1.10")), ifindex)
    assert kind == c.RTM_NEWROUTE
    assert flags == c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_EXCL
    family, dst_len, _, _, table, proto, scope, rtype, _ = RTMSG.unpack_from(body)
    assert (family, dst_len, table, proto, scope, rtype) == (c.AF_MPLS, 20, 254, c.RT_PROTO, 0, 1)
    a = nla.attrs(body, RTMSG.size)
    assert bytes(a[c.RTA_DST]) == struct.pack("!I", 1002 << 12 | 0x100)
    assert bytes(a[c.RTA_VIA]) == struct.pack("=H", c.AF_INET) + bytes([10, 0, 1, 10])
    assert nla.get_u32(a[c.RTA_OIF]) == 2
    assert c.RTA_NEWDST not in a


def test_replace_and_delete_flags() -> None:
    route = ops.MplsRoute(1002, "lan0", via="10.0.1.10")
    assert encode.encode(ops.Replace(route), ifindex)[1] == c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_REPLACE
    kind, flags, body = encode.encode(ops.Delete(route), ifindex)
    assert (kind, flags) == (c.RTM_DELROUTE, c.NLM_F_REQUEST)
    assert set(nla.attrs(body, RTMSG.size)) == {c.RTA_DST}  # the kernel deletes by label only


def test_encap_route_layout_in_high_table() -> None:
    route = ops.EncapRoute("10.0.1.10/32", (100, 1002), "eth0", via="10.1.2.1", table=1000)
    _, _, body = encode.encode(ops.Add(route), ifindex)
    family, dst_len, _, _, table, proto, *_ = RTMSG.unpack_from(body)
    assert (family, dst_len, table, proto) == (c.AF_INET, 32, 0, c.RT_PROTO)
    a = nla.attrs(body, RTMSG.size)
    assert nla.get_u32(a[c.RTA_TABLE]) == 1000
    assert nla.get_u16(a[c.RTA_ENCAP_TYPE]) == c.LWTUNNEL_ENCAP_MPLS
    assert decode.labels_of(nla.attrs(a[c.RTA_ENCAP])[c.MPLS_IPTUNNEL_DST]) == (100, 1002)


NH_ID = records.nexthop_id(1002, 4)


def test_nexthop_object_layout_byte_for_byte() -> None:
    """struct nhmsg and the attributes as net/ipv4/nexthop.c rtm_to_nh_config reads them (v6.1):
    family of the gateway, scope/resvd/flags 0, our protocol; NHA_ID u32, NHA_OIF u32,
    NHA_GATEWAY 4 bytes, NHA_ENCAP_TYPE u16 (padded), NHA_ENCAP nested {MPLS_IPTUNNEL_DST}."""
    nexthop = ops.EncapNexthop(NH_ID, (100, 1002), "eth0", "10.1.2.1")
    kind, flags, body = encode.encode(ops.Add(nexthop), ifindex)
    assert (kind, flags) == (104, c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_EXCL)  # RTM_NEWNEXTHOP
    stack = struct.pack("!II", 100 << 12, 1002 << 12 | 0x100)
    assert body == (
        struct.pack("=BBBBI", 2, 0, 195, 0, 0)  # nhmsg: AF_INET, scope, protocol 195, resvd, flags
        + struct.pack("=HHI", 8, 1, NH_ID)  # NHA_ID
        + struct.pack("=HHI", 8, 5, 4)  # NHA_OIF: eth0
        + struct.pack("=HH", 8, 6)
        + bytes([10, 1, 2, 1])  # NHA_GATEWAY
        + struct.pack("=HHH2x", 6, 7, 1)  # NHA_ENCAP_TYPE: LWTUNNEL_ENCAP_MPLS
        + struct.pack("=HH", 4 + 4 + len(stack), 8 | 0x8000)  # NHA_ENCAP, nested
        + struct.pack("=HH", 4 + len(stack), 1)  # MPLS_IPTUNNEL_DST
        + stack
    )
    assert encode.encode(ops.Replace(nexthop), ifindex)[1] == c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_REPLACE
    # A delete names the id alone, under a header of zeros (nh_valid_get_del_req).
    kind, flags, body = encode.encode(ops.Delete(nexthop), ifindex)
    assert (kind, flags, body) == (105, c.NLM_F_REQUEST, bytes(8) + struct.pack("=HHI", 8, 1, NH_ID))
    v6 = ops.EncapNexthop(records.nexthop_id(1004, 6), (100, 1004), "eth0", "fd00:11::1")
    _, _, body = encode.encode(ops.Add(v6), ifindex)
    assert body[0] == c.AF_INET6
    assert bytes(nla.attrs(body, 8)[c.NHA_GATEWAY]) == ipaddress.IPv6Address("fd00:11::1").packed
    assert encode.nexthops_dump() == (106, bytes(8))  # RTM_GETNEXTHOP: every family, no filter


def test_route_to_a_nexthop_carries_only_its_id() -> None:
    route = ops.NexthopRoute("10.0.1.10/32", NH_ID, 1000)
    kind, flags, body = encode.encode(ops.Add(route), ifindex)
    assert (kind, flags) == (c.RTM_NEWROUTE, c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_EXCL)
    family, dst_len, _, _, table, proto, scope, rtype, _ = RTMSG.unpack_from(body)
    assert (family, dst_len, table, proto, scope, rtype) == (c.AF_INET, 32, 0, c.RT_PROTO, 0, 1)
    assert body[RTMSG.size :] == (
        struct.pack("=HH", 8, c.RTA_DST)
        + bytes([10, 0, 1, 10])
        + struct.pack("=HHI", 8, c.RTA_TABLE, 1000)
        # RTA_NH_ID (30); fib_semantics.c refuses it with a device, gateway or encap
        + struct.pack("=HHI", 8, 30, NH_ID)
    )
    # Deleted as the encap route is: by prefix and table.
    plain = ops.EncapRoute("10.0.1.10/32", (100, 1002), "eth0", via="10.1.2.1", table=1000)
    assert encode.encode(ops.Delete(route), ifindex) == encode.encode(ops.Delete(plain), ifindex)
    assert route.key == plain.key  # one route per (table, prefix) in the kernel


def test_nexthop_and_its_route_decode_as_the_kernel_dumps_them() -> None:
    nexthop = ops.EncapNexthop(NH_ID, (100, 1002), "eth0", "10.1.2.1")
    _, _, body = encode.encode(ops.Add(nexthop), ifindex)
    # A dump says the scope (nh_fill_node); ours are known by protocol.
    dumped = bytearray(body)
    dumped[1] = 0xFD  # RT_SCOPE_LINK
    installed = decode.nexthop(memoryview(bytes(dumped)), NAMES.__getitem__)
    assert installed is not None and installed.obj == nexthop
    dumped[2] = 3  # RTPROT_BOOT: someone else's
    assert decode.nexthop(memoryview(bytes(dumped)), NAMES.__getitem__) is None
    # With nexthop_compat_mode (the default) a route dump adds the nexthop's device, gateway and
    # encap after RTA_NH_ID: the id is what counts.
    route = ops.NexthopRoute("10.0.1.10/32", NH_ID, 1000)
    _, _, body = encode.encode(ops.Add(route), ifindex)
    extra = nla.u32(c.RTA_OIF, 4) + nla.attr(c.RTA_GATEWAY, bytes([10, 1, 2, 1]))
    extra += nla.u16(c.RTA_ENCAP_TYPE, c.LWTUNNEL_ENCAP_MPLS)
    extra += nla.nest(c.RTA_ENCAP, nla.attr(c.MPLS_IPTUNNEL_DST, encode.label_stack((100, 1002))))
    for raw in (body, body + extra):
        decoded = decode.route(memoryview(raw), NAMES.__getitem__)
        assert decoded is not None and decoded.obj == route


def test_flower_filter_layout() -> None:
    flt = ops.FlowerFilter(
        "fab0",
        7,
        ops.FlowerMatch(src="10.0.1.10/32", dst="10.0.0.100/32", ip_proto="tcp", dst_port=80),
        ops.push_stack((102, 1001)),
        pref=10,
    )
    kind, flags, body = encode.encode(ops.Add(flt), ifindex)
    assert kind == c.RTM_NEWTFILTER and flags & c.NLM_F_EXCL
    _, _, _, idx, handle, parent, info = TCMSG.unpack_from(body)
    assert (idx, handle, parent) == (3, 7, 0xFFFFFFF3)
    assert info >> 16 == 10 and struct.pack("=H", info & 0xFFFF) == b"\x08\x00"
    o = nla.attrs(nla.attrs(body, TCMSG.size)[c.TCA_OPTIONS])
    assert bytes(o[c.TCA_FLOWER_KEY_IPV4_SRC_MASK]) == b"\xff" * 4
    assert nla.get_be16(o[c.TCA_FLOWER_KEY_TCP_DST]) == 80
    acts = [nla.attrs(p) for _, p in nla.iter_attrs(o[c.TCA_FLOWER_ACT])]
    labels = [nla.get_u32(nla.attrs(a[c.TCA_ACT_OPTIONS])[c.TCA_MPLS_LABEL]) for a in acts]
    assert labels == [1001, 102]  # innermost pushed first: the wire shows [102, 1001]
    assert all(bytes(a[c.TCA_ACT_COOKIE]).startswith(c.TC_COOKIE_PREFIX) for a in acts)


def _roundtrip(obj: ops.DataplaneObject) -> ops.DataplaneObject:
    _, _, body = encode.encode(ops.Add(obj), ifindex)
    view = memoryview(body)
    if isinstance(obj, (ops.FlowerFilter, ops.U32Filter)):
        installed = decode.tc_filter(view, NAMES.__getitem__)
    elif isinstance(obj, ops.Rule):
        installed = decode.rule(view)
    else:
        installed = decode.route(view, NAMES.__getitem__)
    assert installed is not None
    return installed.obj


@pytest.mark.parametrize(
    "obj",
    [
        ops.MplsRoute(1002, "lan0", via="10.0.1.10"),
        ops.MplsRoute(1001, "lo"),
        ops.MplsRoute(2001, "fab0", via="fe80::1", out_labels=(102, 2001)),
        ops.EncapRoute("10.0.1.10/32", (100, 1002), "eth0", via="10.1.2.1", table=100),
        ops.EncapRoute("2001:db8::/64", (100,), "eth0", via="2001:db8:1::1", table=70000),
        ops.Rule("10.0.0.100/32", 100, 1000),
        ops.Rule("2001:db8::100/128", 101, 1001),
        ops.FlowerFilter(
            "fab0", 1, ops.FlowerMatch(src="10.0.1.10/32", dst="10.0.0.100/32"), ops.push_stack((102, 1001))
        ),
        ops.FlowerFilter(
            "fab0",
            2,
            ops.FlowerMatch(
                src="2001:db8::/64", dst="2001:db8:ff::100/128", ip_proto="udp", src_port=5000, dst_port=53
            ),
            (ops.MplsPush(1003, ttl=64), ops.MplsPush(101)),
            pref=20,
            offload=ops.OffloadPolicy.NEVER,
            direction=ops.Direction.INGRESS,
        ),
        ops.FlowerFilter(
            "lan0", 3, ops.FlowerMatch(dst="10.0.0.0/8"), (ops.MplsPop("ip"),), offload=ops.OffloadPolicy.REQUIRED
        ),
        ops.FlowerFilter(
            "fab0", 1001, ops.FlowerMatch(mpls_label=1001), (ops.SetMark(0x6D6003E9),), ops.Direction.INGRESS, pref=20
        ),
        ops.FlowerFilter(
            "fab0",
            4,
            ops.FlowerMatch(src="10.0.1.10/32", dst="10.0.0.100/32", ip_proto="sctp", dst_port=3868),
            ops.push_stack((102, 1007)),
        ),
        ops.FlowerFilter(
            "fab0",
            5,
            ops.FlowerMatch(src="2001:db8::7/128", dst="2001:db8:ff::100/128", ip_proto="esp"),
            ops.push_stack((102, 1009)),
            pref=11,
        ),
    ],
)
def test_decode_inverts_encode(obj: ops.DataplaneObject) -> None:
    assert _roundtrip(obj) == obj


def test_a_session_record_rides_in_the_action_cookies_and_comes_back() -> None:
    """The kernel keeps at most 16 bytes per action cookie (TC_COOKIE_MAX_SIZE): the record is
    spread over both pushes, the ownership mark first."""
    tag = records.pack(records.SessionRecord(42, "mip6-home-address", 80, home="2001:db8:aa::1"))
    flt = ops.FlowerFilter(
        "fab0",
        1001 << 8 | 1,
        ops.FlowerMatch(src="2001:db8:1::10/128", dst="2001:db8:ff::100/128", ip_proto="tcp", dst_port=80),
        ops.push_stack((102, 1001)),
        pref=11,
        tag=tag,
    )
    _, _, body = encode.encode(ops.Add(flt), ifindex)
    o = nla.attrs(nla.attrs(body, TCMSG.size)[c.TCA_OPTIONS])
    cookies = [bytes(nla.attrs(p)[c.TCA_ACT_COOKIE]) for _, p in nla.iter_attrs(o[c.TCA_FLOWER_ACT])]
    assert cookies == [c.TC_COOKIE_PREFIX + tag[:8], tag[8:]]
    assert all(len(cookie) <= ops.TC_COOKIE_MAX_SIZE for cookie in cookies)
    assert _roundtrip(flt) == flt
    too_long = ops.FlowerFilter("fab0", 1, flt.match, (ops.MplsPush(1001),), tag=tag)
    with pytest.raises(ops.InvalidOperation, match="does not fit the cookies of 1 actions"):
        encode.encode(ops.Add(too_long), ifindex)


def test_an_esp_u32_node_round_trips_with_its_record() -> None:
    tag = records.pack(records.SessionRecord(9, "esp-spi", None, spi=0x1001))
    node = ops.U32Filter(
        "fab0", 0x800 << 20 | 7, ops.esp_keys("10.0.1.30", "10.0.0.100", 0x1001), ops.push_stack((102, 1001)), tag=tag
    )
    kind, flags, body = encode.encode(ops.Add(node), ifindex)
    assert kind == c.RTM_NEWTFILTER and flags & c.NLM_F_EXCL
    _, _, _, idx, handle, parent, info = TCMSG.unpack_from(body)
    assert (idx, handle, parent, info >> 16) == (3, 0x80000007, 0xFFFFFFF3, 12)
    assert struct.pack("=H", info & 0xFFFF) == struct.pack("!H", 0x0003)  # protocol all: both families
    sel = bytes(nla.attrs(nla.attrs(body, TCMSG.size)[c.TCA_OPTIONS])[c.TCA_U32_SEL])
    assert sel[:4] == bytes([c.TC_U32_TERMINAL, 0, 5, 0]) and len(sel) == 16 + 5 * 16
    assert sel[16 + 4 * 16 : 16 + 4 * 16 + 8] == struct.pack("!II", 0xFFFFFFFF, 0x1001)  # the SPI word
    assert _roundtrip(node) == node
    assert ops.esp_of(node.keys) == ("10.0.1.30", "10.0.0.100", 0x1001)
    assert encode.encode(ops.Delete(node), ifindex)[0] == c.RTM_DELTFILTER


def test_an_ipv6_esp_u32_node_reads_the_spi_after_the_fixed_header() -> None:
    tag = records.pack(records.SessionRecord(9, "esp-spi", None, spi=0xABCD))
    node = ops.U32Filter(
        "fab0",
        0x800 << 20 | 8,
        ops.esp_keys("2001:db8:1::30", "fd00:100::100", 0xABCD),
        ops.push_stack((102, 1001)),
        tag=tag,
    )
    assert [(k.offset, k.mask) for k in node.keys] == [(0, 0xF0000000), (4, 0x0000FF00)] + [
        (offset, 0xFFFFFFFF) for offset in range(8, 44, 4)
    ]
    assert (node.keys[1].value, node.keys[-1].value) == (50 << 8, 0xABCD)  # next header ESP; the SPI at 40
    assert _roundtrip(node) == node
    assert ops.esp_of(node.keys) == ("2001:db8:1::30", "fd00:100::100", 0xABCD)
    assert ops.esp_of(node.keys[:-1]) is None and ops.esp_of(ops.esp_keys("10.0.0.1", "10.0.0.2", 1)[1:]) is None
    # An earlier version's IPv4 node (protocol ip) decodes with its protocol, so it is deleted under it.
    old = ops.U32Filter(
        "fab0", 0x800 << 20 | 9, ops.esp_keys("10.0.1.30", "10.0.0.100", 1), node.actions, tag=tag, protocol="ip"
    )
    assert _roundtrip(old) == old
    with pytest.raises(ops.InvalidOperation, match="u32 protocol"):
        encode.encode(ops.Add(ops.U32Filter("fab0", 0x800 << 20 | 9, old.keys, old.actions, protocol="ipv6")), ifindex)


def test_others_objects_are_not_ours() -> None:
    _, _, body = encode.encode(ops.Add(ops.MplsRoute(1002, "lan0", via="10.0.1.10")), ifindex)
    foreign = bytearray(body)
    foreign[5] = 4  # rtm_protocol static: someone else's route
    assert decode.route(memoryview(bytes(foreign)), NAMES.__getitem__) is None
    flt = ops.FlowerFilter("fab0", 1, ops.FlowerMatch(src="10.0.1.10/32"), ops.push_stack((5,)))
    _, _, fbody = encode.flower_filter(ops.Add(flt), flt, ifindex, cookie=b"other")
    assert decode.flower(memoryview(fbody), NAMES.__getitem__) is None
    assert decode.flower(memoryview(fbody), NAMES.__getitem__, require_cookie=False) is not None


@pytest.mark.parametrize(
    "op, words",
    [
        (ops.Add(ops.MplsRoute(1 << 20, "lo")), "not an MPLS label"),
        (ops.Add(ops.MplsRoute(100, "lo", out_labels=(-1,))), "not an MPLS label"),
        (ops.Add(ops.EncapRoute("10.0.1.10/32", (), "eth0")), "at least one label"),
        (ops.Add(ops.EncapRoute("10.0.1.10/24", (5,), "eth0")), "host bits"),
        (ops.Add(ops.FlowerFilter("fab0", 1, ops.FlowerMatch(dst_port=80), ops.push_stack((5,)))), "needs ip_proto"),
        (ops.Add(ops.FlowerFilter("fab0", 0, ops.FlowerMatch(), ops.push_stack((5,)))), "handle"),
    ],
)
def test_unencodable_operations_are_rejected_with_reason(op: ops.Operation, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        encode.encode(op, ifindex)


def test_mpls_label_filter_layout() -> None:
    """protocol mpls_uc in tcm_info and as the key's ethertype, the label as a host-order u32
    (the kernel reads it with nla_get_u32), then act_skbedit with its mark."""
    flt = ops.FlowerFilter(
        "fab0", 1001, ops.FlowerMatch(mpls_label=1001), (ops.SetMark(0x6D6003E9),), ops.Direction.INGRESS, pref=20
    )
    _kind, _flags, body = encode.flower_filter(ops.Add(flt), flt, ifindex)
    _ifindex, _handle, _parent, info = decode.tc_header(memoryview(body))
    assert info == 20 << 16 | 0x4788  # ETH_P_MPLS_UC in network order
    options = nla.attrs(nla.attrs(memoryview(body), 20)[c.TCA_OPTIONS])
    assert nla.get_be16(options[c.TCA_FLOWER_KEY_ETH_TYPE]) == 0x8847
    assert bytes(options[c.TCA_FLOWER_KEY_MPLS_LABEL]) == (1001).to_bytes(4, sys.byteorder)
    [(_order, action)] = list(nla.iter_attrs(options[c.TCA_FLOWER_ACT]))
    a = nla.attrs(action)
    assert nla.get_str(a[c.TCA_ACT_KIND]) == "skbedit"
    assert nla.get_u32(nla.attrs(a[c.TCA_ACT_OPTIONS])[c.TCA_SKBEDIT_MARK]) == 0x6D6003E9


@pytest.mark.parametrize(
    "match, words",
    [
        (ops.FlowerMatch(mpls_label=1 << 20), "not an MPLS label"),
        (ops.FlowerMatch(mpls_label=1001, dst="10.0.0.100/32"), "takes no IP keys"),
        (ops.FlowerMatch(dst="10.0.0.100/32", ip_proto="esp", dst_port=80), "needs ip_proto tcp, udp or sctp"),
        (ops.FlowerMatch(dst="10.0.0.100/32", ip_proto="gre"), "is not tcp, udp, sctp or esp"),
    ],
)
def test_bad_mpls_label_matches_are_refused(match: ops.FlowerMatch, words: str) -> None:
    with pytest.raises(ops.InvalidOperation, match=words):
        ops.validate(ops.Add(ops.FlowerFilter("fab0", 1, match, (ops.SetMark(1),), ops.Direction.INGRESS)))


@pytest.mark.parametrize(
    "address, family, plen, scope",
    [
        ("10.0.0.100/32", c.AF_INET, 32, c.RT_SCOPE_UNIVERSE),  # a VIP, as node setup passes it
        ("fd00:100::100/128", c.AF_INET6, 128, c.RT_SCOPE_UNIVERSE),
        ("10.0.1.5/24", c.AF_INET, 24, c.RT_SCOPE_UNIVERSE),  # host bits set: an interface address
        ("127.0.0.2", c.AF_INET, 32, c.RT_SCOPE_HOST),  # bare: host prefix; 127/8 scope host, as ip does
    ],
)
def test_address_add_layout(address: str, family: int, plen: int, scope: int) -> None:
    """What `ip address add ADDRESS dev eth0` sends: ifaddrmsg with family, prefix length, scope
    and index, the address in both IFA_LOCAL and IFA_ADDRESS, exclusive create."""
    kind, flags, body = encode.address_add(address, DEVS["eth0"])
    assert kind == c.RTM_NEWADDR
    assert flags == c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_EXCL
    assert IFADDRMSG.unpack_from(body) == (family, plen, 0, scope, 4)
    a = nla.attrs(body, IFADDRMSG.size)
    packed = ipaddress.ip_interface(address).ip.packed
    assert set(a) == {c.IFA_LOCAL, c.IFA_ADDRESS}
    assert bytes(a[c.IFA_LOCAL]) == bytes(a[c.IFA_ADDRESS]) == packed
    assert len(body) == IFADDRMSG.size + 2 * (4 + len(packed))


@pytest.mark.parametrize("address", ["lo", "10.0.0.300/32", "10.0.0.1/33", ""])
def test_address_add_refuses_what_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError):
        encode.address_add(address, 1)
