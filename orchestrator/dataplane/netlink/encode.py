"""Operations -> rtnetlink (and, for fast-path set elements, nf_tables) request bodies. One
function per object kind; each returns (message type, flags, body) so the batching socket can
stamp sequence numbers.

Layouts follow the kernel: af_mpls.c (RTA_DST/RTA_VIA/RTA_NEWDST), lwtunnel MPLS encap
(RTA_ENCAP_TYPE + RTA_ENCAP{MPLS_IPTUNNEL_DST}), nexthop objects (nexthop.c rtm_to_nh_config:
struct nhmsg, NHA_ID/NHA_OIF/NHA_GATEWAY/NHA_ENCAP_TYPE/NHA_ENCAP) and routes to them
(RTA_NH_ID, fib_semantics.c), fib_rules.c, cls_flower.c and act_mpls.c;
set elements nf_tables_api.c (nf_tables_newsetelem/delsetelem, nft_setelem_parse_key), the named
counters' dump nf_tables_api.c (nf_tables_getobj, nf_tables_dump_obj_start: table and type filter).
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from typing import Callable, Sequence

from orchestrator import ipproto
from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import nla
from orchestrator.dataplane.netlink.constants import (
    AF_INET,
    AF_INET6,
    AF_MPLS,
    AF_UNSPEC,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_MPLS_UC,
    FR_ACT_TO_TBL,
    FRA_PRIORITY,
    FRA_PROTOCOL,
    FRA_SRC,
    FRA_TABLE,
    IFA_ADDRESS,
    IFA_LOCAL,
    LWTUNNEL_ENCAP_MPLS,
    MPLS_IPTUNNEL_DST,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFT_MSG_DELSETELEM,
    NFT_MSG_GETOBJ,
    NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE,
    NFT_MSG_NEWSETELEM,
    NFT_OBJECT_COUNTER,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_OBJ_TABLE,
    NFTA_OBJ_TYPE,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_TABLE_NAME,
    NHA_ENCAP,
    NHA_ENCAP_TYPE,
    NHA_GATEWAY,
    NHA_ID,
    NHA_OIF,
    NLA_F_NESTED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    RT_PROTO,
    RT_SCOPE_HOST,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTA_DST,
    RTA_ENCAP,
    RTA_ENCAP_TYPE,
    RTA_GATEWAY,
    RTA_NEWDST,
    RTA_NH_ID,
    RTA_OIF,
    RTA_TABLE,
    RTA_VIA,
    RTM_DELNEXTHOP,
    RTM_DELQDISC,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_DELTFILTER,
    RTM_GETNEXTHOP,
    RTM_GETROUTE,
    RTM_GETTFILTER,
    RTM_NEWADDR,
    RTM_NEWNEXTHOP,
    RTM_NEWQDISC,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTM_NEWTFILTER,
    RTN_UNICAST,
    TC_ACT_OK,
    TC_ACT_PIPE,
    TC_COOKIE_PREFIX,
    TC_H_CLSACT,
    TC_H_MIN_EGRESS,
    TC_H_MIN_INGRESS,
    TC_U32_TERMINAL,
    TCA_ACT_COOKIE,
    TCA_ACT_KIND,
    TCA_ACT_OPTIONS,
    TCA_CLS_FLAGS_SKIP_HW,
    TCA_CLS_FLAGS_SKIP_SW,
    TCA_FLOWER_ACT,
    TCA_FLOWER_FLAGS,
    TCA_FLOWER_KEY_ETH_TYPE,
    TCA_FLOWER_KEY_IP_PROTO,
    TCA_FLOWER_KEY_IPV4_DST,
    TCA_FLOWER_KEY_IPV4_DST_MASK,
    TCA_FLOWER_KEY_IPV4_SRC,
    TCA_FLOWER_KEY_IPV4_SRC_MASK,
    TCA_FLOWER_KEY_IPV6_DST,
    TCA_FLOWER_KEY_IPV6_DST_MASK,
    TCA_FLOWER_KEY_IPV6_SRC,
    TCA_FLOWER_KEY_IPV6_SRC_MASK,
    TCA_FLOWER_KEY_MPLS_LABEL,
    TCA_FLOWER_KEY_SCTP_DST,
    TCA_FLOWER_KEY_SCTP_DST_MASK,
    TCA_FLOWER_KEY_SCTP_SRC,
    TCA_FLOWER_KEY_SCTP_SRC_MASK,
    TCA_FLOWER_KEY_TCP_DST,
    TCA_FLOWER_KEY_TCP_DST_MASK,
    TCA_FLOWER_KEY_TCP_SRC,
    TCA_FLOWER_KEY_TCP_SRC_MASK,
    TCA_FLOWER_KEY_UDP_DST,
    TCA_FLOWER_KEY_UDP_DST_MASK,
    TCA_FLOWER_KEY_UDP_SRC,
    TCA_FLOWER_KEY_UDP_SRC_MASK,
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
    TCA_SKBEDIT_PARMS,
    TCA_U32_ACT,
    TCA_U32_SEL,
)

Ifindex = Callable[[str], int]
Request = tuple[int, int, bytes]

_LABEL = struct.Struct("!I")

ETH_TYPES = {"ip": ETH_P_IP, "ipv6": ETH_P_IPV6, "mpls_uc": ETH_P_MPLS_UC}
# (key, mask) attribute types of the port matches, by protocol and side.
PORT_ATTRS = {
    ("tcp", "src"): (TCA_FLOWER_KEY_TCP_SRC, TCA_FLOWER_KEY_TCP_SRC_MASK),
    ("tcp", "dst"): (TCA_FLOWER_KEY_TCP_DST, TCA_FLOWER_KEY_TCP_DST_MASK),
    ("udp", "src"): (TCA_FLOWER_KEY_UDP_SRC, TCA_FLOWER_KEY_UDP_SRC_MASK),
    ("udp", "dst"): (TCA_FLOWER_KEY_UDP_DST, TCA_FLOWER_KEY_UDP_DST_MASK),
    ("sctp", "src"): (TCA_FLOWER_KEY_SCTP_SRC, TCA_FLOWER_KEY_SCTP_SRC_MASK),
    ("sctp", "dst"): (TCA_FLOWER_KEY_SCTP_DST, TCA_FLOWER_KEY_SCTP_DST_MASK),
}
ADDR_ATTRS = {
    (4, "src"): (TCA_FLOWER_KEY_IPV4_SRC, TCA_FLOWER_KEY_IPV4_SRC_MASK),
    (4, "dst"): (TCA_FLOWER_KEY_IPV4_DST, TCA_FLOWER_KEY_IPV4_DST_MASK),
    (6, "src"): (TCA_FLOWER_KEY_IPV6_SRC, TCA_FLOWER_KEY_IPV6_SRC_MASK),
    (6, "dst"): (TCA_FLOWER_KEY_IPV6_DST, TCA_FLOWER_KEY_IPV6_DST_MASK),
}
_FLAGS = {
    "add": NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
    "replace": NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE,
    "delete": NLM_F_REQUEST,
}


_TWO_LABELS = struct.Struct("!II")
_ATTR_U32 = struct.Struct("=HHI")
_ATTR_HDR = struct.Struct("=HH")
_ATTR_V4 = struct.Struct("=HH4s")
_ATTR_V4_PAIR = struct.Struct("=HH4sHH4s")


def label_stack(labels: tuple[int, ...]) -> bytes:
    """MPLS label stack entries, outermost first, bottom-of-stack bit on the last; TTL and TC 0
    as the kernel demands for RTA_NEWDST and MPLS_IPTUNNEL_DST."""
    if len(labels) == 2:  # the common case: [transport, session]
        return _TWO_LABELS.pack(labels[0] << 12, labels[1] << 12 | 0x100)
    last = len(labels) - 1
    return b"".join(_LABEL.pack(label << 12 | (0x100 if i == last else 0)) for i, label in enumerate(labels))


def _family(version: int) -> int:
    return AF_INET6 if version == 6 else AF_INET


@functools.lru_cache(maxsize=4096)
def _via_attr(address: str) -> bytes:
    version, packed = ops.parse_address(address)
    return nla.attr(RTA_VIA, struct.pack("=H", _family(version)) + packed)


@functools.lru_cache(maxsize=4096)
def _gateway_attr(address: str) -> bytes:
    return nla.attr(RTA_GATEWAY, ops.parse_address(address)[1])


# Constant parts of the messages on the session-setup path, packed once: the encoders below
# only pack what varies (labels, addresses, indexes), which is most of their speed.
_MPLS_ROUTE_HEAD = nla.RTMSG.pack(
    AF_MPLS, 20, 0, 0, RT_TABLE_MAIN, RT_PROTO, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
) + _ATTR_HDR.pack(8, RTA_DST)
_ENCAP_TYPE_MPLS = nla.u16(RTA_ENCAP_TYPE, LWTUNNEL_ENCAP_MPLS)


@functools.cache
def netmask(version: int, plen: int) -> bytes:
    bits = 32 if version == 4 else 128
    return (((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)).to_bytes(bits // 8, "big")


def mpls_route(op: ops.Operation, obj: ops.MplsRoute, ifindex: Ifindex) -> Request:
    body = _MPLS_ROUTE_HEAD + (obj.label << 12 | 0x100).to_bytes(4, "big")
    if isinstance(op, ops.Delete):
        return RTM_DELROUTE, _FLAGS["delete"], body
    body += _ATTR_U32.pack(8, RTA_OIF, ifindex(obj.dev))
    if obj.via:
        body += _via_attr(obj.via)
    if obj.out_labels:
        stack = label_stack(obj.out_labels)
        body += _ATTR_HDR.pack(4 + len(stack), RTA_NEWDST) + stack
    return RTM_NEWROUTE, _FLAGS[op.verb], body


def route_query(address: str) -> Request:
    """RTM_GETROUTE for one address: the route the node's own packets to it take (the resolved
    route, one path of a multipath one). With strict checking the kernel wants every header
    field but the family and a full-length rtm_dst_len at zero. Raises InvalidOperation."""
    version, packed = ops.parse_address(address)
    body = nla.RTMSG.pack(_family(version), 32 if version == 4 else 128, 0, 0, 0, 0, 0, 0, 0)
    return RTM_GETROUTE, NLM_F_REQUEST, body + nla.attr(RTA_DST, packed)


_IPV4_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")  # iproute2's default_scope()


def address_add(address: str, index: int) -> Request:
    """RTM_NEWADDR as `ip address add ADDRESS dev DEV` sends it, so the node gets the address an
    operator's fix by hand would give it: the address in IFA_LOCAL and IFA_ADDRESS (no peer),
    scope host for 127/8 and universe otherwise, exclusive create (an address already there
    answers EEXIST). ADDRESS may carry a prefix length (without: a host prefix); host bits may be
    set, as on any interface address. Raises ValueError for what is not an address."""
    iface = ipaddress.ip_interface(address)
    packed = iface.ip.packed
    scope = RT_SCOPE_HOST if iface.version == 4 and iface.ip in _IPV4_LOOPBACK else RT_SCOPE_UNIVERSE
    body = nla.IFADDRMSG.pack(_family(iface.version), iface.network.prefixlen, 0, scope, index)
    body += nla.attr(IFA_LOCAL, packed) + nla.attr(IFA_ADDRESS, packed)
    return RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, body


def _route_head(dst: str, table_id: int) -> bytes:
    """The rtmsg, RTA_DST and RTA_TABLE of our IPv4/IPv6 routes (encap or to a nexthop object):
    all a delete needs."""
    version, packed, plen = ops.parse_prefix(dst)
    table = table_id if table_id < 256 else 0
    body = nla.RTMSG.pack(_family(version), plen, 0, 0, table, RT_PROTO, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    return body + nla.attr(RTA_DST, packed) + _ATTR_U32.pack(8, RTA_TABLE, table_id)


def encap_route(op: ops.Operation, obj: ops.EncapRoute, ifindex: Ifindex) -> Request:
    body = _route_head(obj.dst, obj.table)
    if isinstance(op, ops.Delete):
        return RTM_DELROUTE, _FLAGS["delete"], body
    body += _ATTR_U32.pack(8, RTA_OIF, ifindex(obj.dev))
    if obj.via:
        body += _gateway_attr(obj.via)
    body += _ENCAP_TYPE_MPLS + _encap_mpls(RTA_ENCAP, obj.labels)
    return RTM_NEWROUTE, _FLAGS[op.verb], body


def _encap_mpls(encap_attr: int, labels: tuple[int, ...]) -> bytes:
    """The nested lwtunnel MPLS encap: {MPLS_IPTUNNEL_DST: the label stack}."""
    stack = label_stack(labels)
    return (
        _ATTR_HDR.pack(8 + len(stack), encap_attr | NLA_F_NESTED)
        + _ATTR_HDR.pack(4 + len(stack), MPLS_IPTUNNEL_DST)
        + stack
    )


_NH_ENCAP_TYPE_MPLS = nla.u16(NHA_ENCAP_TYPE, LWTUNNEL_ENCAP_MPLS)
_NH_DELETE_HEAD = nla.NHMSG.pack(AF_UNSPEC, 0, 0, 0, 0)  # nexthop.c wants protocol, scope, flags 0


def encap_nexthop(op: ops.Operation, obj: ops.EncapNexthop, ifindex: Ifindex) -> Request:
    """RTM_NEWNEXTHOP / RTM_DELNEXTHOP of a nexthop object (nexthop.c rtm_to_nh_config): struct
    nhmsg with the gateway's family and our protocol (scope, resvd and flags must be 0), then
    NHA_ID, NHA_OIF, NHA_GATEWAY (4 or 16 bytes), NHA_ENCAP_TYPE (u16) and NHA_ENCAP. A delete
    names the id alone (nh_valid_get_del_req: protocol 0 in the header)."""
    if isinstance(op, ops.Delete):
        return RTM_DELNEXTHOP, _FLAGS["delete"], _NH_DELETE_HEAD + _ATTR_U32.pack(8, NHA_ID, obj.id)
    version, packed = ops.parse_address(obj.via)
    body = (
        nla.NHMSG.pack(_family(version), 0, RT_PROTO, 0, 0)
        + _ATTR_U32.pack(8, NHA_ID, obj.id)
        + _ATTR_U32.pack(8, NHA_OIF, ifindex(obj.dev))
        + nla.attr(NHA_GATEWAY, packed)
        + _NH_ENCAP_TYPE_MPLS
        + _encap_mpls(NHA_ENCAP, obj.labels)
    )
    return RTM_NEWNEXTHOP, _FLAGS[op.verb], body


def nexthop_route(op: ops.Operation, obj: ops.NexthopRoute, _ifindex: Ifindex) -> Request:
    """A route to a nexthop object: the encap route's header, RTA_DST and RTA_TABLE, then only
    RTA_NH_ID (fib_semantics.c refuses a nexthop id together with a device, gateway or encap).
    Its delete is the encap route's: the kernel deletes the table's route to the prefix."""
    body = _route_head(obj.dst, obj.table)
    if isinstance(op, ops.Delete):
        return RTM_DELROUTE, _FLAGS["delete"], body
    return RTM_NEWROUTE, _FLAGS[op.verb], body + _ATTR_U32.pack(8, RTA_NH_ID, obj.nexthop)


def nexthops_dump() -> tuple[int, bytes]:
    """(message type, body) of RTM_GETNEXTHOP for every nexthop object (sent with NLM_F_DUMP;
    nexthop.c __nh_valid_dump_req wants protocol, scope and flags 0: ours are kept by decoding)."""
    return RTM_GETNEXTHOP, nla.NHMSG.pack(AF_UNSPEC, 0, 0, 0, 0)


def rule(op: ops.Operation, obj: ops.Rule, _ifindex: Ifindex) -> Request:
    version, packed, plen = ops.parse_prefix(obj.src)
    table = obj.table if obj.table < 256 else 0
    body = nla.RTMSG.pack(_family(version), 0, plen, 0, table, 0, 0, FR_ACT_TO_TBL, 0)
    body += (
        nla.attr(FRA_SRC, packed)
        + nla.u32(FRA_PRIORITY, obj.priority)
        + nla.u32(FRA_TABLE, obj.table)
        + nla.u8(FRA_PROTOCOL, RT_PROTO)
    )
    if isinstance(op, ops.Delete):
        return RTM_DELRULE, _FLAGS["delete"], body
    # Rules have no replace in the kernel; EXCL makes an equal rule an EEXIST error.
    return RTM_NEWRULE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, body


def clsact(op: ops.Operation, obj: ops.ClsactQdisc, ifindex: Ifindex) -> Request:
    body = nla.TCMSG.pack(AF_UNSPEC, 0, 0, ifindex(obj.dev), 0xFFFF0000, TC_H_CLSACT, 0)
    body += nla.asciiz(TCA_KIND, "clsact")
    if isinstance(op, ops.Delete):
        return RTM_DELQDISC, _FLAGS["delete"], body
    return RTM_NEWQDISC, _FLAGS[op.verb], body


def filter_parent(direction: ops.Direction) -> int:
    low = TC_H_MIN_EGRESS if direction == ops.Direction.EGRESS else TC_H_MIN_INGRESS
    return (TC_H_CLSACT & 0xFFFF0000) | low


@functools.lru_cache(maxsize=1024)
def _tc_info(pref: int, eth_type: int) -> int:
    """tcm_info of a filter: priority in the upper half, protocol (network order) in the lower."""
    proto: int = struct.unpack("=H", struct.pack("!H", eth_type))[0]
    return pref << 16 | proto


_FLOWER_KIND = nla.asciiz(TCA_KIND, "flower")
_FLOWER_ETH = {4: nla.be16(TCA_FLOWER_KEY_ETH_TYPE, ETH_P_IP), 6: nla.be16(TCA_FLOWER_KEY_ETH_TYPE, ETH_P_IPV6)}
_FLOWER_ETH_MPLS = nla.be16(TCA_FLOWER_KEY_ETH_TYPE, ETH_P_MPLS_UC)
_FLOWER_FLAGS = {
    ops.OffloadPolicy.AUTO: nla.u32(TCA_FLOWER_FLAGS, 0),
    ops.OffloadPolicy.NEVER: nla.u32(TCA_FLOWER_FLAGS, TCA_CLS_FLAGS_SKIP_HW),
    ops.OffloadPolicy.REQUIRED: nla.u32(TCA_FLOWER_FLAGS, TCA_CLS_FLAGS_SKIP_SW),
}
_IP_PROTO_ATTRS = {name: nla.u8(TCA_FLOWER_KEY_IP_PROTO, number) for name, number in ipproto.BY_NAME.items()}


def flower_filter(
    op: ops.Operation, obj: ops.FlowerFilter, ifindex: Ifindex, cookie: bytes = TC_COOKIE_PREFIX
) -> Request:
    m = obj.match
    src = ops.parse_prefix(m.src) if m.src else None
    dst = ops.parse_prefix(m.dst) if m.dst else None
    version = (src or dst or (4,))[0]
    eth_type = ETH_P_MPLS_UC if m.mpls_label is not None else ETH_P_IPV6 if version == 6 else ETH_P_IP
    body = (
        nla.TCMSG.pack(
            AF_UNSPEC, 0, 0, ifindex(obj.dev), obj.handle, filter_parent(obj.direction), _tc_info(obj.pref, eth_type)
        )
        + _FLOWER_KIND
    )
    if isinstance(op, ops.Delete):
        return RTM_DELTFILTER, NLM_F_REQUEST, body
    options = flower_options(obj, cookie, src, dst, version)
    body += _ATTR_HDR.pack(4 + len(options), TCA_OPTIONS | NLA_F_NESTED) + options
    # tc's own semantics: add = create exclusive, replace = create or overwrite this handle.
    flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_EXCL if isinstance(op, ops.Add) else 0)
    return RTM_NEWTFILTER, flags, body


def flower_options(
    obj: ops.FlowerFilter,
    cookie: bytes = TC_COOKIE_PREFIX,
    src: tuple[int, bytes, int] | None = None,
    dst: tuple[int, bytes, int] | None = None,
    version: int = 4,
) -> bytes:
    """The TCA_OPTIONS payload of a flower filter: keys, flags and the act_mpls list (the
    parsed prefixes are passed in by flower_filter, which has them already)."""
    m = obj.match
    if m.mpls_label is not None:
        out = _FLOWER_ETH_MPLS + nla.u32(TCA_FLOWER_KEY_MPLS_LABEL, m.mpls_label)
    else:
        out = _FLOWER_ETH[version]
    if m.ip_proto:
        out += _IP_PROTO_ATTRS[m.ip_proto]
    for side, parsed in (("src", src), ("dst", dst)):
        if parsed:
            v, packed, plen = parsed
            key, mask = ADDR_ATTRS[(v, side)]
            if v == 4:
                out += _ATTR_V4_PAIR.pack(8, key, packed, 8, mask, netmask(4, plen))
            else:
                out += nla.attr(key, packed) + nla.attr(mask, netmask(v, plen))
    for side, port in (("src", m.src_port), ("dst", m.dst_port)):
        if port is not None and m.ip_proto:
            key, mask = PORT_ATTRS[(m.ip_proto, side)]
            out += nla.be16(key, port) + nla.be16(mask, 0xFFFF)
    out += _FLOWER_FLAGS[obj.offload]
    cookies = action_cookies(cookie, obj.tag, len(obj.actions))
    actions = b"".join(
        _action_attr(order, action, cookies[order - 1]) for order, action in enumerate(obj.actions, start=1)
    )
    return out + _ATTR_HDR.pack(4 + len(actions), TCA_FLOWER_ACT | NLA_F_NESTED) + actions


def action_cookies(owner: bytes, tag: bytes, count: int) -> list[bytes]:
    """The cookies of a filter's `count` actions: the first is the ownership mark followed by the
    tag's first bytes, the next ones carry the rest of the tag, 16 bytes each (TC_COOKIE_MAX_SIZE);
    an action left without tag bytes carries the mark alone. decode.flower joins them back."""
    room = ops.TC_COOKIE_MAX_SIZE - len(owner)
    out = [owner + tag[:room]]
    rest = tag[room:]
    for _ in range(count - 1):
        out.append(rest[: ops.TC_COOKIE_MAX_SIZE] or owner)
        rest = rest[ops.TC_COOKIE_MAX_SIZE :]
    return out


def _action_attr(order: int, action: ops.Action, cookie: bytes) -> bytes:
    """The action list entry `order`; a plain push under the bare mark is built from a template
    (label varies); a session's tagged cookies vary per session and are encoded in full."""
    if type(action) is ops.MplsPush and action.ttl == ops.ACT_MPLS_TTL_DEFAULT:
        # The template of its constant attributes (the profile of the first-packet path showed
        # act_mpls encoding first): only the label and the session's cookie vary.
        head, tail = _push_template(order)
        cookie_attr = nla.attr(TCA_ACT_COOKIE, cookie)
        return (
            _ATTR_HDR.pack(len(head) + len(tail) + 12 + len(cookie_attr), order | NLA_F_NESTED)
            + head
            + _ATTR_U32.pack(8, TCA_MPLS_LABEL, action.label)
            + tail
            + cookie_attr
        )
    if isinstance(action, ops.SetMark):
        return nla.nest(order, skbedit_action(action, cookie))
    if isinstance(action, ops.Pass):
        return nla.nest(order, gact_pass(cookie))
    return nla.nest(order, mpls_action(action, cookie))


def skbedit_action(action: ops.SetMark, cookie: bytes = TC_COOKIE_PREFIX) -> bytes:
    """act_skbedit setting the packet mark: struct tc_skbedit (tc_gen, TC_ACT_PIPE) and the mark."""
    parms = struct.pack("=IIiii", 0, 0, TC_ACT_PIPE, 0, 0)
    opts = nla.attr(TCA_SKBEDIT_PARMS, parms) + nla.u32(TCA_SKBEDIT_MARK, action.mark)
    return nla.asciiz(TCA_ACT_KIND, "skbedit") + nla.nest(TCA_ACT_OPTIONS, opts) + nla.attr(TCA_ACT_COOKIE, cookie)


def gact_pass(cookie: bytes = TC_COOKIE_PREFIX) -> bytes:
    """act_gact with TC_ACT_OK: struct tc_gact (tc_gen) whose verdict lets the packet go on
    unchanged; the action's statistics count it."""
    parms = struct.pack("=IIiii", 0, 0, TC_ACT_OK, 0, 0)
    return (
        nla.asciiz(TCA_ACT_KIND, "gact")
        + nla.nest(TCA_ACT_OPTIONS, nla.attr(TCA_GACT_PARMS, parms))
        + nla.attr(TCA_ACT_COOKIE, cookie)
    )


@functools.lru_cache(maxsize=256)
def _push_template(order: int) -> tuple[bytes, bytes]:
    """A push action's payload before and after its 8-byte label attribute, without the cookie
    attribute that ends it (mpls_action puts it last)."""
    empty_cookie = nla.attr(TCA_ACT_COOKIE, b"")
    whole = mpls_action(ops.MplsPush(0), b"")  # default TTL: no attribute
    assert whole.endswith(empty_cookie)
    whole = whole[: -len(empty_cookie)]
    label_attr = _ATTR_U32.pack(8, TCA_MPLS_LABEL, 0)
    at = whole.index(label_attr)
    return whole[:at], whole[at + len(label_attr) :]


def mpls_action(action: ops.MplsPush | ops.MplsPop, cookie: bytes = TC_COOKIE_PREFIX) -> bytes:
    """One act_mpls action: struct tc_mpls (tc_gen with action TC_ACT_PIPE, then m_action) and
    the label or protocol; the cookie marks it as ours."""
    if isinstance(action, ops.MplsPush):
        parms = struct.pack("=IIiiii", 0, 0, TC_ACT_PIPE, 0, 0, TCA_MPLS_ACT_PUSH)
        opts = (
            nla.attr(TCA_MPLS_PARMS, parms)
            + nla.be16(TCA_MPLS_PROTO, ETH_P_MPLS_UC)
            + nla.u32(TCA_MPLS_LABEL, action.label)
        )
        if action.ttl != ops.ACT_MPLS_TTL_DEFAULT:
            opts += nla.u8(TCA_MPLS_TTL, action.ttl)
    else:
        parms = struct.pack("=IIiiii", 0, 0, TC_ACT_PIPE, 0, 0, TCA_MPLS_ACT_POP)
        opts = nla.attr(TCA_MPLS_PARMS, parms) + nla.be16(TCA_MPLS_PROTO, ETH_TYPES[action.protocol])
    return nla.asciiz(TCA_ACT_KIND, "mpls") + nla.nest(TCA_ACT_OPTIONS, opts) + nla.attr(TCA_ACT_COOKIE, cookie)


def element_key(obj: ops.FastPathElement) -> bytes:
    """The key of a fast-path set element as nf_tables stores a concatenation: each field at the
    start of its own 4-byte slot (NFT_REG32_SIZE), zero padded, in network byte order:
    saddr . daddr . l4proto . dport, saddr . daddr . l4proto, or saddr . daddr . esp spi."""
    key = ops.parse_address(obj.client)[1] + ops.parse_address(obj.vip)[1]
    if obj.spi is not None:
        return key + struct.pack("!I", obj.spi)
    key += struct.pack("!B3x", ipproto.BY_NAME[obj.proto])
    return key if obj.port is None else key + struct.pack("!H2x", obj.port)


def _set_head(set_name: str) -> bytes:
    return (
        nla.NFGENMSG.pack(NFPROTO_INET, 0, 0)
        + nla.asciiz(NFTA_SET_ELEM_LIST_TABLE, ops.NFT_TABLE)
        + nla.asciiz(NFTA_SET_ELEM_LIST_SET, set_name)
    )


def set_element(op: ops.Operation, obj: ops.FastPathElement, _ifindex: Ifindex) -> Request:
    """NFT_MSG_NEWSETELEM / DELSETELEM of one element (one per message, so an error names its
    operation). Add is exclusive (NLM_F_EXCL: an element already there is EEXIST), as every Add;
    Replace is not (an element already there is left as it is: nft_add_set_elem)."""
    return set_elements(op, [obj])


def set_elements(op: ops.Operation, objs: Sequence[ops.FastPathElement]) -> Request:
    """One NFT_MSG_NEWSETELEM / DELSETELEM of several elements of one set, all of `op`'s kind
    (the provider's batches of elements: one message, one acknowledgement, for hundreds)."""
    elements = b"".join(
        nla.nest(NFTA_LIST_ELEM, nla.nest(NFTA_SET_ELEM_KEY, nla.attr(NFTA_DATA_VALUE, element_key(obj))))
        for obj in objs
    )
    body = _set_head(objs[0].set_name) + nla.nest(NFTA_SET_ELEM_LIST_ELEMENTS, elements)
    if isinstance(op, ops.Delete):
        return NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELSETELEM, NLM_F_REQUEST, body
    exclusive = NLM_F_EXCL if isinstance(op, ops.Add) else 0
    return NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | exclusive, body


def table_get(name: str = ops.NFT_TABLE) -> Request:
    """NFT_MSG_GETTABLE of one table of family inet (its answer carries the table's comment)."""
    body = nla.NFGENMSG.pack(NFPROTO_INET, 0, 0) + nla.asciiz(NFTA_TABLE_NAME, name)
    return NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE, NLM_F_REQUEST, body


def set_elements_dump(set_name: str) -> tuple[int, bytes]:
    """(message type, body) of NFT_MSG_GETSETELEM for one of our sets (sent with NLM_F_DUMP)."""
    return NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM, _set_head(set_name)


def counters_dump() -> tuple[int, bytes]:
    """(message type, body) of NFT_MSG_GETOBJ for the named counters of our table (sent with
    NLM_F_DUMP): the kernel keeps to family inet (nfgen_family), to the table NFTA_OBJ_TABLE
    names and to objects of type NFTA_OBJ_TYPE (big endian), so the answer never grows with the
    sets' elements."""
    return NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETOBJ, (
        nla.NFGENMSG.pack(NFPROTO_INET, 0, 0)
        + nla.asciiz(NFTA_OBJ_TABLE, ops.NFT_TABLE)
        + nla.attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
    )


_U32_KIND = nla.asciiz(TCA_KIND, "u32")
U32_SEL = struct.Struct("=BBBxHHhhI")  # struct tc_u32_sel: flags offshift nkeys, offmask off offoff hoff hmask
U32_KEY = struct.Struct("!IIii")  # struct tc_u32_key: mask and val (network order), off, offmask


def u32_filter(op: ops.Operation, obj: ops.U32Filter, ifindex: Ifindex, cookie: bytes = TC_COOKIE_PREFIX) -> Request:
    """A cls_u32 node: one terminal selector of fixed-offset keys and the act_mpls list, under its
    full handle (htid:hash:node), so the kernel puts it in that hash table at that node."""
    body = (
        nla.TCMSG.pack(
            AF_UNSPEC,
            0,
            0,
            ifindex(obj.dev),
            obj.handle,
            filter_parent(obj.direction),
            _tc_info(obj.pref, ops.U32_PROTOCOLS[obj.protocol]),
        )
        + _U32_KIND
    )
    if isinstance(op, ops.Delete):
        return RTM_DELTFILTER, NLM_F_REQUEST, body
    sel = U32_SEL.pack(TC_U32_TERMINAL, 0, len(obj.keys), 0, 0, 0, 0, 0) + b"".join(
        struct.pack("!II", k.mask, k.value) + struct.pack("=ii", k.offset, 0) for k in obj.keys
    )
    cookies = action_cookies(cookie, obj.tag, len(obj.actions))
    actions = b"".join(
        _action_attr(order, action, cookies[order - 1]) for order, action in enumerate(obj.actions, start=1)
    )
    options = nla.attr(TCA_U32_SEL, sel) + _ATTR_HDR.pack(4 + len(actions), TCA_U32_ACT | NLA_F_NESTED) + actions
    body += _ATTR_HDR.pack(4 + len(options), TCA_OPTIONS | NLA_F_NESTED) + options
    flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_EXCL if isinstance(op, ops.Add) else 0)
    return RTM_NEWTFILTER, flags, body


ENCODERS: dict[type, Callable[..., Request]] = {
    ops.MplsRoute: mpls_route,
    ops.EncapRoute: encap_route,
    ops.EncapNexthop: encap_nexthop,
    ops.NexthopRoute: nexthop_route,
    ops.Rule: rule,
    ops.ClsactQdisc: clsact,
    ops.FlowerFilter: flower_filter,
    ops.FastPathElement: set_element,
    ops.U32Filter: u32_filter,
}


def filter_get(obj: ops.FlowerFilter | ops.U32Filter, ifindex: Ifindex) -> Request:
    """RTM_GETTFILTER of one filter of ours: its device, direction, priority, protocol, handle
    and kind, as its delete names it (the answer carries its actions' statistics)."""
    _kind, flags, body = ENCODERS[type(obj)](ops.Delete(obj), obj, ifindex)
    return RTM_GETTFILTER, flags, body


def encode(op: ops.Operation, ifindex: Ifindex) -> Request:
    """The request for one operation. Raises InvalidOperation/ValueError for what cannot be
    encoded and KeyError naming a device that does not exist."""
    ops.validate(op)
    return ENCODERS[type(op.obj)](op, op.obj, ifindex)
