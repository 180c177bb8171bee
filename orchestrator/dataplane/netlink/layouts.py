"""Fast decoding of the flower filters of a dump, by layout (issue 13: a restart reads 100,000).

The kernel dumps every C2S filter of ours with the same attributes in the same order and of the
same lengths: only their values differ (handle, addresses, labels, cookies, counters). A layout
is what `decode.flower` reads of one message: the position, type and length of every attribute
header it walks, and the values that choose its path (the classifier's and actions' kinds, the
ethertype, the IP protocol, each act_mpls's push). It is learnt from the first message of that
shape by walking it as `decode.flower` does; a later message of the same length has that layout
exactly when its bytes under the layout's mask equal the layout's (one big-integer AND and
compare instead of some 40 attribute headers parsed one by one). The values are then read at
the layout's offsets and built into the object by `decode.flower_object`, as `decode.flower`
builds it; a layout is kept only when its first message gives the same object both ways, and
anything that fits no layout (another kind of action, a pop, a missing attribute) is decoded by
`decode.flower` itself. So the result is `decode.flower`'s, bit for bit (tests/unit checks it
against it over generated filters and a dump captured in the lab).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from orchestrator import ipproto
from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import decode, nla
from orchestrator.dataplane.netlink.constants import (
    ETH_P_IPV6,
    NLA_TYPE_MASK,
    TCA_ACT_COOKIE,
    TCA_ACT_KIND,
    TCA_ACT_OPTIONS,
    TCA_ACT_STATS,
    TCA_FLOWER_ACT,
    TCA_FLOWER_FLAGS,
    TCA_FLOWER_IN_HW_COUNT,
    TCA_FLOWER_KEY_ETH_TYPE,
    TCA_FLOWER_KEY_IP_PROTO,
    TCA_FLOWER_KEY_MPLS_LABEL,
    TCA_KIND,
    TCA_MPLS_ACT_PUSH,
    TCA_MPLS_LABEL,
    TCA_MPLS_PARMS,
    TCA_MPLS_TTL,
    TCA_OPTIONS,
    TCA_STATS_BASIC,
    TCA_STATS_PKT64,
)
from orchestrator.dataplane.netlink.encode import ADDR_ATTRS, PORT_ATTRS

Span = tuple[int, int]  # (offset, end) of a value in the message
_ATTR = struct.Struct("=HH")
_TCMSG_TAIL = struct.Struct("=iIII")  # ifindex, handle, parent, info: after family and padding
_U32 = struct.Struct("=I")
_BE16 = struct.Struct("!H")
MAX_LAYOUTS = 16  # per message length: a dump has a handful (families, services, stats forms)


@dataclass(frozen=True)
class _Action:
    label: int  # offset of TCA_MPLS_LABEL's u32
    ttl: int | None  # offset of TCA_MPLS_TTL's u8
    cookie: Span | None


@dataclass(frozen=True)
class Layout:
    length: int
    mask: int
    bits: int  # the message's bytes under `mask`
    eth_type: int
    ip_proto: str | None
    mpls_label: int | None  # offsets of optional values
    flags: int | None
    in_hw_count: int | None
    prefixes: tuple[tuple[str, Span, Span | None], ...]  # (side, key, mask)
    ports: tuple[tuple[str, int], ...]  # (side, offset of the be16)
    actions: tuple[_Action, ...]
    pkt64: int | None  # the first action's packet counter: 64-bit, or gnet_stats_basic's u32
    basic: int | None

    def decode(self, body: bytes, ifname: decode.Ifname) -> ops.Installed | None:
        ifindex, handle, parent, info = _TCMSG_TAIL.unpack_from(body, 4)
        if handle == 0:
            return None
        u32 = _U32.unpack_from
        prefixes = {
            side: decode.prefix_text(body[k[0] : k[1]], None if m is None else body[m[0] : m[1]])
            for side, k, m in self.prefixes
        }
        ports = {side: _BE16.unpack_from(body, offset)[0] for side, offset in self.ports}
        actions = tuple(
            ops.MplsPush(u32(body, a.label)[0], ttl=ops.ACT_MPLS_TTL_DEFAULT if a.ttl is None else body[a.ttl])
            for a in self.actions
        )
        cookies = [b"" if a.cookie is None else body[a.cookie[0] : a.cookie[1]] for a in self.actions]
        tag = decode.tag_of(cookies, require_cookie=True)
        if tag is None:
            return None
        packets = (
            struct.unpack_from("=Q", body, self.pkt64)[0]
            if self.pkt64 is not None
            else (u32(body, self.basic)[0] if self.basic is not None else None)
        )
        return decode.flower_object(
            ifname(ifindex),
            handle,
            parent,
            info,
            ip_proto=self.ip_proto,
            mpls_label=None if self.mpls_label is None else u32(body, self.mpls_label)[0],
            prefixes=prefixes,
            ports=ports,
            flags=0 if self.flags is None else u32(body, self.flags)[0],
            in_hw_count=0 if self.in_hw_count is None else u32(body, self.in_hw_count)[0],
            actions=actions,
            tag=tag,
            packets=packets,
        )


class _Unfit(Exception):
    """The message is of no layout this module reads (decode.flower decodes it)."""


class _Walk:
    """The mask and fixed bytes of a layout, gathered while walking a message."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.fixed: list[Span] = []

    def attrs(self, start: int, end: int) -> dict[int, Span]:
        """Attributes of [start, end) by type, the last of a type winning (as nla.attrs); every
        header walked is part of the layout."""
        out: dict[int, Span] = {}
        offset = start
        while offset + 4 <= end:
            length, kind = _ATTR.unpack_from(self.body, offset)
            if length < 4:
                break
            self.fixed.append((offset, offset + 4))
            out[kind & NLA_TYPE_MASK] = (offset + 4, min(offset + length, end))
            offset += (length + 3) & ~3
        # What lies past the last header (a cut attribute, padding) changes the walk: fixed too.
        self.fixed.append((offset, end))
        return out

    def value(self, span: Span) -> bytes:
        self.fixed.append(span)
        return self.body[span[0] : span[1]]


def learn(body: bytes) -> Layout:
    """The layout of a flower filter message as `decode.flower` reads it; _Unfit if it is not of
    the shape this module decodes (every action an act_mpls push)."""
    w = _Walk(body)
    top = w.attrs(nla.TCMSG.size, len(body))
    if TCA_KIND not in top or TCA_OPTIONS not in top or w.value(top[TCA_KIND]).split(b"\0", 1)[0] != b"flower":
        raise _Unfit
    o = w.attrs(*top[TCA_OPTIONS])
    if TCA_FLOWER_ACT not in o:
        raise _Unfit
    eth_type = _BE16.unpack(w.value(o[TCA_FLOWER_KEY_ETH_TYPE]))[0] if TCA_FLOWER_KEY_ETH_TYPE in o else 0
    ip_proto = None
    if TCA_FLOWER_KEY_IP_PROTO in o:
        raw = w.value(o[TCA_FLOWER_KEY_IP_PROTO])
        ip_proto = ipproto.NAME_OF.get(raw[0]) if raw else None
        if not raw:
            raise _Unfit
    version = 6 if eth_type == ETH_P_IPV6 else 4
    prefixes = tuple(
        (side, o[key], o.get(mask)) for (v, side), (key, mask) in ADDR_ATTRS.items() if v == version and key in o
    )
    ports = tuple(
        (side, _fixed_size(o[key], 2))
        for (proto, side), (key, _m) in PORT_ATTRS.items()
        if proto == ip_proto and key in o
    )
    listed = w.attrs(*o[TCA_FLOWER_ACT])
    # decode.flower sorts the actions by order number, stable: the walk's dict keeps the last of
    # a number, so two of one number (which the kernel never sends) are left to decode.flower.
    orders = _orders(body, *o[TCA_FLOWER_ACT])
    if len(orders) != len(set(orders)) or not orders:
        raise _Unfit
    actions = []
    pkt64 = basic = None
    for n, order in enumerate(sorted(orders)):
        a = w.attrs(*listed[order])
        if TCA_ACT_KIND not in a or TCA_ACT_OPTIONS not in a:
            raise _Unfit
        if w.value(a[TCA_ACT_KIND]).split(b"\0", 1)[0] != b"mpls":
            raise _Unfit
        opts = w.attrs(*a[TCA_ACT_OPTIONS])
        if TCA_MPLS_PARMS not in opts or TCA_MPLS_LABEL not in opts:
            raise _Unfit
        parms = opts[TCA_MPLS_PARMS]
        if parms[1] - parms[0] < 24 or struct.unpack_from("=i", w.value((parms[0] + 20, parms[0] + 24)))[0] != (
            TCA_MPLS_ACT_PUSH
        ):
            raise _Unfit
        ttl = opts.get(TCA_MPLS_TTL)
        actions.append(
            _Action(
                label=_fixed_size(opts[TCA_MPLS_LABEL], 4),
                ttl=None if ttl is None else _fixed_size(ttl, 1, at_least=True),
                cookie=a.get(TCA_ACT_COOKIE),
            )
        )
        if n == 0 and TCA_ACT_STATS in a:
            stats = w.attrs(*a[TCA_ACT_STATS])
            if TCA_STATS_PKT64 in stats:
                pkt64 = _fixed_size(stats[TCA_STATS_PKT64], 8, at_least=True)
            elif TCA_STATS_BASIC in stats and stats[TCA_STATS_BASIC][1] - stats[TCA_STATS_BASIC][0] >= 12:
                basic = stats[TCA_STATS_BASIC][0] + 8
    mask = bits = 0
    for start, end in w.fixed:
        if end > start:
            ones = (1 << (8 * (end - start))) - 1
            mask |= ones << (8 * start)
    bits = int.from_bytes(body, "little") & mask
    return Layout(
        length=len(body),
        mask=mask,
        bits=bits,
        eth_type=eth_type,
        ip_proto=ip_proto,
        mpls_label=_fixed_size(o[TCA_FLOWER_KEY_MPLS_LABEL], 4) if TCA_FLOWER_KEY_MPLS_LABEL in o else None,
        flags=_fixed_size(o[TCA_FLOWER_FLAGS], 4) if TCA_FLOWER_FLAGS in o else None,
        in_hw_count=_fixed_size(o[TCA_FLOWER_IN_HW_COUNT], 4) if TCA_FLOWER_IN_HW_COUNT in o else None,
        prefixes=prefixes,
        ports=ports,
        actions=tuple(actions),
        pkt64=pkt64,
        basic=basic,
    )


def _orders(body: bytes, start: int, end: int) -> list[int]:
    out = []
    offset = start
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(body, offset)
        if length < 4:
            break
        out.append(kind & NLA_TYPE_MASK)
        offset += (length + 3) & ~3
    return out


def _fixed_size(span: Span, size: int, at_least: bool = False) -> int:
    """The offset of a value of `size` bytes (at least `size` with `at_least`); _Unfit for a
    value of another size, which decode.flower reads differently or refuses."""
    length = span[1] - span[0]
    if length < size or (length != size and not at_least):
        raise _Unfit
    return span[0]


class FlowerDecoder:
    """`decode.flower` over the messages of a dump, through the layouts learnt on the way."""

    def __init__(self) -> None:
        self.layouts: dict[int, list[Layout]] = {}
        self.unfit: dict[int, int] = {}  # length -> messages of no layout (not learnt again forever)

    def __call__(self, body: memoryview | bytes, ifname: decode.Ifname) -> ops.Installed | None:
        raw = bytes(body)
        known = self.layouts.get(len(raw))
        if known:
            value = int.from_bytes(raw, "little")
            for layout in known:
                if value & layout.mask == layout.bits:
                    return layout.decode(raw, ifname)
        reference = decode.flower(memoryview(body), ifname)
        if reference is not None and len(known or ()) < MAX_LAYOUTS and self.unfit.get(len(raw), 0) < MAX_LAYOUTS:
            try:
                layout = learn(raw)
                fits = layout.decode(raw, ifname) == reference
            except (_Unfit, struct.error, IndexError, ValueError, decode.DecodeError):
                fits = False
                fits = fits and layout.decode(raw, ifname).packets == reference.packets  # type: ignore[union-attr]
            if fits:
                self.layouts.setdefault(len(raw), []).append(layout)
            else:
                self.unfit[len(raw)] = self.unfit.get(len(raw), 0) + 1
        return reference
