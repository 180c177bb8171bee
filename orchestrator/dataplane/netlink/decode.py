"""rtnetlink dump messages -> the objects of ops.py, with the offload state the kernel reports.
Each function returns None for a message that is not one of ours (other owner, other kind), and
raises DecodeError, and nothing else, for one it cannot read (truncated, a value out of range)."""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from typing import Callable, ParamSpec, TypeVar

from orchestrator import ipproto
from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import nla
from orchestrator.dataplane.netlink.constants import (
    AF_INET6,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_MPLS_UC,
    FRA_PRIORITY,
    FRA_PROTOCOL,
    FRA_SRC,
    FRA_TABLE,
    LWTUNNEL_ENCAP_MPLS,
    MPLS_IPTUNNEL_DST,
    NFT_OBJECT_COUNTER,
    NFTA_COUNTER_PACKETS,
    NFTA_DATA_VALUE,
    NFTA_OBJ_DATA,
    NFTA_OBJ_NAME,
    NFTA_OBJ_TABLE,
    NFTA_OBJ_TYPE,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_TABLE_USERDATA,
    NFTNL_UDATA_TABLE_COMMENT,
    NHA_ENCAP,
    NHA_ENCAP_TYPE,
    NHA_GATEWAY,
    NHA_ID,
    NHA_OIF,
    RT_PROTO,
    RTA_DST,
    RTA_ENCAP,
    RTA_ENCAP_TYPE,
    RTA_GATEWAY,
    RTA_NEWDST,
    RTA_NH_ID,
    RTA_OIF,
    RTA_TABLE,
    RTA_VIA,
    RTM_F_OFFLOAD,
    RTM_F_OFFLOAD_FAILED,
    RTM_F_TRAP,
    RTN_UNICAST,
    RTNH_F_OFFLOAD,
    RTNH_F_TRAP,
    TC_ACT_OK,
    TC_COOKIE_PREFIX,
    TC_H_MIN_EGRESS,
    TCA_ACT_COOKIE,
    TCA_ACT_KIND,
    TCA_ACT_OPTIONS,
    TCA_ACT_STATS,
    TCA_CLS_FLAGS_IN_HW,
    TCA_CLS_FLAGS_NOT_IN_HW,
    TCA_CLS_FLAGS_SKIP_HW,
    TCA_CLS_FLAGS_SKIP_SW,
    TCA_FLOWER_ACT,
    TCA_FLOWER_FLAGS,
    TCA_FLOWER_IN_HW_COUNT,
    TCA_FLOWER_KEY_ETH_TYPE,
    TCA_FLOWER_KEY_IP_PROTO,
    TCA_FLOWER_KEY_MPLS_LABEL,
    TCA_GACT_PARMS,
    TCA_KIND,
    TCA_MPLS_ACT_POP,
    TCA_MPLS_ACT_PUSH,
    TCA_MPLS_LABEL,
    TCA_MPLS_PARMS,
    TCA_MPLS_PROTO,
    TCA_MPLS_TTL,
    TCA_OPTIONS,
    TCA_SKBEDIT_MARK,
    TCA_STATS_BASIC,
    TCA_STATS_PKT64,
    TCA_U32_ACT,
    TCA_U32_DIVISOR,
    TCA_U32_SEL,
)
from orchestrator.dataplane.netlink.encode import ADDR_ATTRS, PORT_ATTRS, U32_KEY, U32_SEL

Ifname = Callable[[int], str]
P = ParamSpec("P")
R = TypeVar("R")


class DecodeError(RuntimeError):
    """A netlink message the decoder cannot read: the kernel's answer was cut or is not what its
    header says. A RuntimeError, so the daemon's start names it as a refused step."""


def _decoding(fn: Callable[P, R]) -> Callable[P, R]:
    """Whatever a malformed message makes the parsing raise becomes one DecodeError naming the
    decoder, so a caller handles one error, not struct's, ipaddress's and the ops' validation's."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DecodeError:
            raise
        except (struct.error, IndexError, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"{fn.__name__}: undecodable message: {type(exc).__name__}: {exc}") from exc

    return wrapper


_PROTO_NAMES = {ETH_P_IP: "ip", ETH_P_IPV6: "ipv6", ETH_P_MPLS_UC: "mpls_uc"}


_LABEL = struct.Struct("!I")


@_decoding
def labels_of(payload: memoryview) -> tuple[int, ...]:
    if len(payload) == 4:  # one label: every route of a restore's dump
        return (_LABEL.unpack_from(payload)[0] >> 12,)
    return tuple(_LABEL.unpack_from(payload, i)[0] >> 12 for i in range(0, len(payload), 4))


def _via(payload: memoryview) -> str:
    family = struct.unpack_from("=H", payload)[0]
    raw = bytes(payload[2:18] if family == AF_INET6 else payload[2:6])
    # IPv4 through inet_ntop, as prefix_text (a restore decodes one per session's S2C route).
    return socket.inet_ntop(socket.AF_INET, raw) if len(raw) == 4 else str(ipaddress.ip_address(raw))


def _route_offload(flags: int) -> ops.OffloadState:
    key = flags & (RTM_F_OFFLOAD | RTNH_F_OFFLOAD | RTM_F_TRAP | RTNH_F_TRAP | RTM_F_OFFLOAD_FAILED)
    state = _ROUTE_OFFLOAD.get(key)
    if state is None:  # frozen: one object per combination of flags serves every route
        state = _ROUTE_OFFLOAD[key] = ops.OffloadState(
            in_hw=bool(flags & (RTM_F_OFFLOAD | RTNH_F_OFFLOAD)),
            trap=bool(flags & (RTM_F_TRAP | RTNH_F_TRAP)),
            failed=bool(flags & RTM_F_OFFLOAD_FAILED),
        )
    return state


_ROUTE_OFFLOAD: dict[int, ops.OffloadState] = {}


@_decoding
def route(body: memoryview, ifname: Ifname) -> ops.Installed | None:
    """An AF_MPLS label route or an AF_INET/AF_INET6 encap route of ours."""
    family, dst_len, _src_len, _tos, table, proto, _scope, _type, flags = nla.RTMSG.unpack_from(body)
    if proto != RT_PROTO:
        return None
    a = nla.attrs(body, nla.RTMSG.size)
    oif = a.get(RTA_OIF)
    dev = ifname(nla.get_u32(oif)) if oif is not None else ""
    if family == 28:
        obj: ops.DataplaneObject = ops.MplsRoute(
            label=labels_of(a[RTA_DST])[0],
            dev=dev,
            via=_via(a[RTA_VIA]) if RTA_VIA in a else None,
            out_labels=labels_of(a[RTA_NEWDST]) if RTA_NEWDST in a else (),
        )
    else:
        dst = (
            ipaddress.ip_address(bytes(a[RTA_DST]))
            if RTA_DST in a
            else (ipaddress.IPv6Address(0) if family == AF_INET6 else ipaddress.IPv4Address(0))
        )
        if RTA_NH_ID in a:  # a route to a nexthop object: the id is all (the kernel may add its details)
            obj = ops.NexthopRoute(
                dst=f"{dst}/{dst_len}",
                nexthop=nla.get_u32(a[RTA_NH_ID]),
                table=nla.get_u32(a[RTA_TABLE]) if RTA_TABLE in a else table,
            )
            return ops.Installed(obj, _route_offload(flags))
        if RTA_ENCAP_TYPE not in a or nla.get_u16(a[RTA_ENCAP_TYPE]) != LWTUNNEL_ENCAP_MPLS:
            return None
        encap = nla.attrs(a[RTA_ENCAP])
        obj = ops.EncapRoute(
            dst=f"{dst}/{dst_len}",
            labels=labels_of(encap[MPLS_IPTUNNEL_DST]),
            dev=dev,
            via=str(ipaddress.ip_address(bytes(a[RTA_GATEWAY]))) if RTA_GATEWAY in a else None,
            table=nla.get_u32(a[RTA_TABLE]) if RTA_TABLE in a else table,
        )
    return ops.Installed(obj, _route_offload(flags))


@_decoding
def nexthop(body: memoryview, ifname: Ifname) -> ops.Installed | None:
    """A nexthop object of ours (RTM_NEWNEXTHOP of a dump, nexthop.c nh_fill_node): our protocol,
    a gateway and an MPLS encap. Others' nexthops, groups and blackholes are None."""
    _family, _scope, protocol, _resvd, _flags = nla.NHMSG.unpack_from(body)
    if protocol != RT_PROTO:
        return None
    a = nla.attrs(body, nla.NHMSG.size)
    if NHA_GATEWAY not in a or NHA_ENCAP not in a or NHA_ENCAP_TYPE not in a:
        return None
    if nla.get_u16(a[NHA_ENCAP_TYPE]) != LWTUNNEL_ENCAP_MPLS:
        return None
    obj = ops.EncapNexthop(
        id=nla.get_u32(a[NHA_ID]),
        labels=labels_of(nla.attrs(a[NHA_ENCAP])[MPLS_IPTUNNEL_DST]),
        dev=ifname(nla.get_u32(a[NHA_OIF])) if NHA_OIF in a else "",
        via=str(ipaddress.ip_address(bytes(a[NHA_GATEWAY]))),
    )
    return ops.Installed(obj)


@_decoding
def next_hop(body: memoryview | bytes, ifname: Ifname) -> ops.NextHop | None:
    """The answer to a route query (encode.route_query): device and gateway (RTA_GATEWAY, or
    RTA_VIA for an IPv4 route via an IPv6 gateway; neither: on-link). None for anything but a
    unicast route out of a device: a local address, a broadcast, a blackhole."""
    _family, _dst_len, _src_len, _tos, _table, _proto, _scope, rtype, _flags = nla.RTMSG.unpack_from(body)
    a = nla.attrs(body, nla.RTMSG.size)
    if rtype != RTN_UNICAST or RTA_OIF not in a:
        return None
    via = (
        str(ipaddress.ip_address(bytes(a[RTA_GATEWAY])))
        if RTA_GATEWAY in a
        else (_via(a[RTA_VIA]) if RTA_VIA in a else None)
    )
    return shared_hop(ifname(nla.get_u32(a[RTA_OIF])), via)


# A node has a handful of next hops and a client's answer is kept with its session: one object
# per (device, gateway), not one per client (issue 15: memory per session). Bounded.
_HOPS: dict[tuple[str, str | None], ops.NextHop] = {}
MAX_HOPS = 4096


def shared_hop(dev: str, via: str | None) -> ops.NextHop:
    """The NextHop(dev, via), one object for equal answers."""
    hop = _HOPS.get((dev, via))
    if hop is None:
        if len(_HOPS) >= MAX_HOPS:
            _HOPS.clear()
        hop = _HOPS[(dev, via)] = ops.NextHop(dev, via)
    return hop


@_decoding
def rule(body: memoryview) -> ops.Installed | None:
    family, _dst_len, src_len, _tos, table, _r1, _r2, _action, _flags = nla.RTMSG.unpack_from(body)
    a = nla.attrs(body, nla.RTMSG.size)
    if FRA_PROTOCOL not in a or nla.get_u8(a[FRA_PROTOCOL]) != RT_PROTO or FRA_SRC not in a:
        return None
    src = ipaddress.ip_address(bytes(a[FRA_SRC]))
    return ops.Installed(
        ops.Rule(
            src=f"{src}/{src_len}",
            table=nla.get_u32(a[FRA_TABLE]) if FRA_TABLE in a else table,
            priority=nla.get_u32(a[FRA_PRIORITY]) if FRA_PRIORITY in a else 0,
        )
    )


@_decoding
def tc_header(body: memoryview) -> tuple[int, int, int, int]:
    """(ifindex, handle, parent, info) of a tcmsg."""
    _family, _pad1, _pad2, ifindex, handle, parent, info = nla.TCMSG.unpack_from(body)
    return ifindex, handle, parent, info


@_decoding
def qdisc_kind(body: memoryview) -> str:
    a = nla.attrs(body, nla.TCMSG.size)
    return nla.get_str(a[TCA_KIND]) if TCA_KIND in a else ""


def _action(payload: memoryview) -> tuple[ops.Action, bytes] | None:
    """An act_mpls push/pop, act_skbedit mark or act_gact pass with its cookie; None for any
    other action (a gact of another verdict too)."""
    a = nla.attrs(payload)
    kind = nla.get_str(a[TCA_ACT_KIND]) if TCA_ACT_KIND in a else ""
    if kind not in ("mpls", "skbedit", "gact") or TCA_ACT_OPTIONS not in a:
        return None
    cookie = bytes(a[TCA_ACT_COOKIE]) if TCA_ACT_COOKIE in a else b""
    opts = nla.attrs(a[TCA_ACT_OPTIONS])
    if kind == "gact":
        parms = opts.get(TCA_GACT_PARMS)
        if parms is None or len(parms) < 20 or struct.unpack_from("=IIiii", parms)[2] != TC_ACT_OK:
            return None
        return ops.Pass(), cookie
    if kind == "skbedit":
        return (ops.SetMark(nla.get_u32(opts[TCA_SKBEDIT_MARK])), cookie) if TCA_SKBEDIT_MARK in opts else None
    m_action = struct.unpack_from("=IIiiii", opts[TCA_MPLS_PARMS])[5]
    if m_action == TCA_MPLS_ACT_PUSH:
        ttl = nla.get_u8(opts[TCA_MPLS_TTL]) if TCA_MPLS_TTL in opts else ops.ACT_MPLS_TTL_DEFAULT
        return ops.MplsPush(nla.get_u32(opts[TCA_MPLS_LABEL]), ttl=ttl), cookie
    if m_action == TCA_MPLS_ACT_POP:
        proto = nla.get_be16(opts[TCA_MPLS_PROTO]) if TCA_MPLS_PROTO in opts else ETH_P_IP
        return ops.MplsPop(_PROTO_NAMES.get(proto, hex(proto))), cookie
    return None


def first_action_packets(payload: memoryview | None) -> int | None:
    """The packet counter of a filter's first action (TCA_ACT_STATS: the 64-bit count when the
    kernel sends one, else struct gnet_stats_basic's 32-bit one); None when it is not reported."""
    attrs = sorted(nla.iter_attrs(payload), key=lambda item: item[0]) if payload is not None else []
    if not attrs:
        return None
    a = nla.attrs(attrs[0][1])
    if TCA_ACT_STATS not in a:
        return None
    stats = nla.attrs(a[TCA_ACT_STATS])
    if TCA_STATS_PKT64 in stats:
        return int(struct.unpack_from("=Q", stats[TCA_STATS_PKT64])[0])
    if TCA_STATS_BASIC in stats and len(stats[TCA_STATS_BASIC]) >= 12:
        return int(struct.unpack_from("=QI", stats[TCA_STATS_BASIC])[1])
    return None


def _tagged_actions(payload: memoryview | None, require_cookie: bool) -> tuple[list[ops.Action], bytes] | None:
    """A filter's action list and the tag its cookies carry (encode.action_cookies); None when
    an action is of a kind we never make, or (with require_cookie) the list is not ours."""
    actions: list[ops.Action] = []
    cookies: list[bytes] = []
    # By order number alone (stable): two actions of one number, which the kernel never sends,
    # would otherwise compare their payloads (found by tests/unit/test_properties.py).
    attrs = nla.iter_attrs(payload) if payload is not None else ()
    for _order, action in sorted(attrs, key=lambda item: item[0]):
        decoded = _action(action)
        if decoded is None:
            return None
        actions.append(decoded[0])
        cookies.append(decoded[1])
    tag = tag_of(cookies, require_cookie)
    return None if tag is None else (actions, tag)


def tag_of(cookies: list[bytes], require_cookie: bool) -> bytes | None:
    """The tag a filter's action cookies carry, in action order; None when (with
    require_cookie) they are not ours. Ours: the first action's cookie opens with the mark; the
    others carry the rest of the tag (encode.action_cookies) or the mark alone."""
    if require_cookie and (not cookies or not cookies[0].startswith(TC_COOKIE_PREFIX)):
        return None
    if cookies and cookies[0].startswith(TC_COOKIE_PREFIX):
        return cookies[0][len(TC_COOKIE_PREFIX) :] + b"".join(c for c in cookies[1:] if c != TC_COOKIE_PREFIX)
    return b""


@_decoding
def u32(body: memoryview, ifname: Ifname, require_cookie: bool = True) -> ops.Installed | None:
    """A cls_u32 node of ours (hash tables themselves, which dump with a divisor, are not)."""
    ifindex, handle, parent, info = tc_header(body)
    a = nla.attrs(body, nla.TCMSG.size)
    if TCA_KIND not in a or nla.get_str(a[TCA_KIND]) != "u32" or TCA_OPTIONS not in a:
        return None
    o = nla.attrs(a[TCA_OPTIONS])
    if TCA_U32_DIVISOR in o or TCA_U32_SEL not in o or not handle & 0xFFF:
        return None
    tagged = _tagged_actions(o.get(TCA_U32_ACT), require_cookie)
    if tagged is None:
        return None
    protocol = _U32_PROTOCOL_NAMES.get(struct.unpack("!H", struct.pack("=H", info & 0xFFFF))[0])
    if protocol is None:  # not a classifier of ours (they are protocol all, or an earlier ip)
        return None
    sel = o[TCA_U32_SEL]
    nkeys = U32_SEL.unpack_from(sel)[2]
    keys = []
    for i in range(nkeys):
        mask, value, offset, _offmask = U32_KEY.unpack_from(sel, U32_SEL.size + i * U32_KEY.size)
        offset = struct.unpack("=i", struct.pack("!i", offset))[0]  # off is host order, unlike mask and val
        keys.append(ops.U32Key(value, mask, offset))
    obj = ops.U32Filter(
        dev=ifname(ifindex),
        handle=handle,
        keys=tuple(keys),
        actions=tuple(tagged[0]),
        direction=ops.Direction.EGRESS if parent & 0xFFFF == TC_H_MIN_EGRESS else ops.Direction.INGRESS,
        pref=info >> 16,
        tag=tagged[1],
        protocol=protocol,
    )
    return ops.Installed(obj)


_U32_PROTOCOL_NAMES = {number: name for name, number in ops.U32_PROTOCOLS.items()}


@_decoding
def filter_packets(body: memoryview) -> int | None:
    """The packets that went through a flower or u32 filter (RTM_NEWTFILTER of a get or a dump):
    its first action's count, which every packet the filter matches runs through, in software or
    hardware. None without actions."""
    a = nla.attrs(body, nla.TCMSG.size)
    if TCA_KIND not in a or TCA_OPTIONS not in a:
        return None
    acts = {"flower": TCA_FLOWER_ACT, "u32": TCA_U32_ACT}.get(nla.get_str(a[TCA_KIND]))
    o = nla.attrs(a[TCA_OPTIONS])
    if acts is None or acts not in o:
        return None
    return first_action_packets(o[acts])


@_decoding
def tc_filter(body: memoryview, ifname: Ifname) -> ops.Installed | None:
    """One of our filters of a dump, whatever its classifier (flower or u32)."""
    return flower(body, ifname) or u32(body, ifname)


def prefix_text(key: memoryview | bytes, mask: memoryview | bytes | None) -> str:
    raw = bytes(key)
    # IPv4 through inet_ntop (the same text as ipaddress's, several times faster: a restore
    # decodes two per filter); IPv6 through ipaddress, whose text (e.g. of mapped addresses) the
    # rest of the code compares against.
    address = socket.inet_ntop(socket.AF_INET, raw) if len(raw) == 4 else str(ipaddress.ip_address(raw))
    if mask is None:
        return f"{address}/{8 * len(raw)}"
    return f"{address}/{int.from_bytes(bytes(mask), 'big').bit_count()}"


@_decoding
def flower(body: memoryview, ifname: Ifname, require_cookie: bool = True) -> ops.Installed | None:
    """A flower filter whose actions all carry our cookie (act_mpls, act_skbedit and act_gact
    pass only, or it is not ours).
    `require_cookie=False` decodes filters made by others, e.g. by `tc` in the encoder tests."""
    ifindex, handle, parent, info = tc_header(body)
    a = nla.attrs(body, nla.TCMSG.size)
    if handle == 0 or TCA_KIND not in a or nla.get_str(a[TCA_KIND]) != "flower" or TCA_OPTIONS not in a:
        return None
    o = nla.attrs(a[TCA_OPTIONS])
    tagged = _tagged_actions(o.get(TCA_FLOWER_ACT), require_cookie)
    if tagged is None:
        return None
    actions, tag = tagged
    eth_type = nla.get_be16(o[TCA_FLOWER_KEY_ETH_TYPE]) if TCA_FLOWER_KEY_ETH_TYPE in o else 0
    mpls_label = nla.get_u32(o[TCA_FLOWER_KEY_MPLS_LABEL]) if TCA_FLOWER_KEY_MPLS_LABEL in o else None
    version = 6 if eth_type == ETH_P_IPV6 else 4
    ip_proto = ipproto.NAME_OF.get(nla.get_u8(o[TCA_FLOWER_KEY_IP_PROTO])) if TCA_FLOWER_KEY_IP_PROTO in o else None
    prefixes = {
        side: prefix_text(o[key], o.get(mask))
        for (v, side), (key, mask) in ADDR_ATTRS.items()
        if v == version and key in o
    }
    ports = {
        side: nla.get_be16(o[key])
        for (proto, side), (key, _mask) in PORT_ATTRS.items()
        if proto == ip_proto and key in o
    }
    return flower_object(
        ifname(ifindex),
        handle,
        parent,
        info,
        ip_proto=ip_proto,
        mpls_label=mpls_label,
        prefixes=prefixes,
        ports=ports,
        flags=nla.get_u32(o[TCA_FLOWER_FLAGS]) if TCA_FLOWER_FLAGS in o else 0,
        in_hw_count=nla.get_u32(o[TCA_FLOWER_IN_HW_COUNT]) if TCA_FLOWER_IN_HW_COUNT in o else 0,
        actions=tuple(actions),
        tag=tag,
        packets=first_action_packets(o.get(TCA_FLOWER_ACT)),
    )


def flower_object(
    dev: str,
    handle: int,
    parent: int,
    info: int,
    *,
    ip_proto: str | None,
    mpls_label: int | None,
    prefixes: dict[str, str],
    ports: dict[str, int],
    flags: int,
    in_hw_count: int,
    actions: tuple[ops.Action, ...],
    tag: bytes,
    packets: int | None,
) -> ops.Installed:
    """A flower filter of a dump from the values its message holds (`flower`, and
    layouts.FlowerDecoder, which reads the same values faster)."""
    offload = (
        ops.OffloadPolicy.REQUIRED
        if flags & TCA_CLS_FLAGS_SKIP_SW
        else ops.OffloadPolicy.NEVER
        if flags & TCA_CLS_FLAGS_SKIP_HW
        else ops.OffloadPolicy.AUTO
    )
    obj = ops.FlowerFilter(
        dev=dev,
        handle=handle,
        match=ops.FlowerMatch(
            src=prefixes.get("src"),
            dst=prefixes.get("dst"),
            ip_proto=ip_proto,
            src_port=ports.get("src"),
            dst_port=ports.get("dst"),
            mpls_label=mpls_label,
        ),
        actions=actions,
        direction=ops.Direction.EGRESS if parent & 0xFFFF == TC_H_MIN_EGRESS else ops.Direction.INGRESS,
        pref=info >> 16,
        offload=offload,
        tag=tag,
    )
    key = (flags & (TCA_CLS_FLAGS_IN_HW | TCA_CLS_FLAGS_NOT_IN_HW), in_hw_count)
    state = _FILTER_OFFLOAD.get(key)
    if state is None:  # frozen: one object per (flags, count) serves every filter
        state = ops.OffloadState(
            in_hw=bool(flags & TCA_CLS_FLAGS_IN_HW),
            in_hw_count=in_hw_count,
            not_in_hw=bool(flags & TCA_CLS_FLAGS_NOT_IN_HW),
        )
        if len(_FILTER_OFFLOAD) < 1024:
            _FILTER_OFFLOAD[key] = state
    return ops.Installed(obj, state, packets=packets)


_FILTER_OFFLOAD: dict[tuple[int, int], ops.OffloadState] = {}


@_decoding
def table_comment(body: memoryview | bytes) -> str | None:
    """The comment of an NFT_MSG_NEWTABLE (nft keeps it in the table's userdata, libnftnl's
    type-length-value records); None without one."""
    attrs = nla.attrs(body, nla.NFGENMSG.size)
    if NFTA_TABLE_USERDATA not in attrs:
        return None
    udata = bytes(attrs[NFTA_TABLE_USERDATA])
    offset = 0
    while offset + 2 <= len(udata):
        kind, length = udata[offset], udata[offset + 1]
        value = udata[offset + 2 : offset + 2 + length]
        if len(value) < length:
            break
        if kind == NFTNL_UDATA_TABLE_COMMENT:
            return value.split(b"\0", 1)[0].decode()
        offset += 2 + length
    return None


FAST_PATH_SETS = tuple(f"fast{kind}{family}" for kind in ("", "proto", "esp") for family in (4, 6))


@_decoding
def set_elements(body: memoryview) -> list[ops.FastPathElement]:
    """The elements of one NFT_MSG_NEWSETELEM dump message of a fast-path set (the inverse of
    encode.element_key); elements of other sets, or of another key size, are not ours."""
    attrs = nla.attrs(body, nla.NFGENMSG.size)
    name = nla.get_str(attrs[NFTA_SET_ELEM_LIST_SET]) if NFTA_SET_ELEM_LIST_SET in attrs else ""
    if name not in FAST_PATH_SETS or NFTA_SET_ELEM_LIST_ELEMENTS not in attrs:
        return []
    size = 16 if name.endswith("6") else 4
    out = []
    for _kind, element in nla.iter_attrs(attrs[NFTA_SET_ELEM_LIST_ELEMENTS]):
        key = nla.attrs(element).get(NFTA_SET_ELEM_KEY)
        raw = nla.attrs(key).get(NFTA_DATA_VALUE) if key is not None else None
        if raw is None or len(raw) != 2 * size + (4 if name.startswith(("fastproto", "fastesp")) else 8):
            continue
        client = str(ipaddress.ip_address(bytes(raw[:size])))
        vip = str(ipaddress.ip_address(bytes(raw[size : 2 * size])))
        tail = bytes(raw[2 * size :])
        if name.startswith("fastesp"):
            out.append(ops.FastPathElement(client, vip, "esp", spi=struct.unpack("!I", tail)[0]))
            continue
        proto = ipproto.NAME_OF.get(tail[0])
        if proto is None:
            continue
        port = struct.unpack_from("!H", tail, 4)[0] if len(tail) == 8 else None
        out.append(ops.FastPathElement(client, vip, proto, port))
    return out


@_decoding
def counter(body: memoryview) -> tuple[str, int] | None:
    """(name, packets) of one NFT_MSG_NEWOBJ dump message of a named counter of our table (the
    answer to encode.counters_dump; nf_tables_fill_obj_info: NFTA_OBJ_TABLE, NFTA_OBJ_NAME,
    NFTA_OBJ_TYPE big endian, NFTA_OBJ_DATA holding NFTA_COUNTER_PACKETS big endian 64 bits);
    None for another table's object or another type."""
    attrs = nla.attrs(body, nla.NFGENMSG.size)
    if nla.get_str(attrs[NFTA_OBJ_TABLE]) != ops.NFT_TABLE:
        return None
    if struct.unpack_from("!I", attrs[NFTA_OBJ_TYPE])[0] != NFT_OBJECT_COUNTER:
        return None
    packets: int = struct.unpack_from("!Q", nla.attrs(attrs[NFTA_OBJ_DATA])[NFTA_COUNTER_PACKETS])[0]
    return nla.get_str(attrs[NFTA_OBJ_NAME]), packets
