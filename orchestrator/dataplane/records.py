"""What the balancer's kernel objects carry so that a restart rebuilds every session exactly: the
one encoding of the session record of a C2S filter and of the hold-down marker of a label pair.

The kernel is the source of truth after a restart (docs/design.md, Restore). A filter's match
says the client address, the VIP, the protocol and the port(s); its handle the C2S label
(dataplane/handles.py); its pushed transport label the server. What it cannot say is stored in
the filter itself as a `SessionRecord`, packed into `FlowerFilter.tag` (`U32Filter.tag` for an
ESP session's u32 node, whose keys hold client, VIP and SPI), which the netlink provider spreads
over its actions' TC cookies (TCA_ACT_COOKIE, at most 16 bytes each, kept by
the kernel with the action and returned by every dump; see encode.flower_options):

    action 1 (push C2S)        cookie = b"mplsorch" + tag[0:8]    (the ownership mark first)
    action 2 (push transport)  cookie = tag[8:24]

    tag[0]     format version (1)
    tag[1]     key kind (KIND_CODES) | 0x80 when the key material below is present
    tag[2:4]   the destination port of the session's first packet (its `port`), 0 for none
    tag[4:8]   session id, u32 big endian
    tag[8:24]  key material, by kind:
                 mip6-home-address  the home address (16 bytes): the key of every IPv6 session,
                                    at home or away (all its care-of filters carry it)
                 esp-spi            the SPI (u32 big endian) and 12 zero bytes, when the key is one
                 others             16 zero bytes (flag clear): client-ip, five-tuple and
                                    ipv6-iid are rebuilt from the match (the IID is the lower
                                    64 bits of the filter's source address)

A label pair in hold-down keeps its S2C label routed as `S2C dev lo` (pop, local delivery, see
`hold_marker`): no session's S2C route has that form (they always name a next hop), so a
restart finds the pair held down and restarts its hold-down timer. The marker is deleted when
the hold-down ends (or replaced by the S2C route of the session that gets the pair).

A server agent's S2C return route points at a nexthop object (ops.EncapNexthop) whose id says
the session's S2C label and the family of its gateway (`nexthop_id`):

    id = 0x6D600000 | 0x100000 (IPv6 gateway) | S2C        (S2C < 2^20)

so the ids of ours lie in 0x6D600000..0x6D7FFFFF (the high 11 bits 0x6D6 >> 1, "m`" as in the
agents' packet marks) and a restart finds the same id for the same session: one nexthop per
(S2C, family), made and deleted with the route that uses it. Nexthops carry route protocol 195
too; those of ours outside the range, or used by no route, are deleted at restore.

In a cluster, the S2C labels of another member's label block that have no session here are
routed to that member until a session's row arrives (`forward_route`): `S2C as OWNER/S2C via
FABRIC_NEXT_HOP dev FABRIC`, OWNER that member's own label (cluster.member_label). No other route
of ours swaps an even label to two labels whose inner one is the label itself (a session's S2C
route pops, or swaps to S2C alone; a C2S route is at an odd label), so a restart recognises them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from orchestrator.dataplane import ops

__all__ = [
    "KIND_CODES",
    "NEXTHOP_IDS",
    "SessionRecord",
    "TAG_SIZE",
    "forward_route",
    "hold_marker",
    "is_forward_route",
    "is_hold_marker",
    "nexthop_id",
    "nexthop_label",
    "pack",
    "unpack",
]

VERSION = 1
TAG_SIZE = 24
_HEAD = struct.Struct("!BBHI")
KIND_CODES = {"client-ip": 1, "five-tuple": 2, "mip6-home-address": 3, "ipv6-iid": 4, "esp-spi": 5}
_KINDS = {code: kind for kind, code in KIND_CODES.items()}
_MATERIAL = 0x80


@dataclass(frozen=True)
class SessionRecord:
    """What a C2S filter carries beyond its match: the session's id and key kind, and the key
    material the match cannot hold (a mobile node's home address, an ESP SPI)."""

    session_id: int
    kind: str
    port: int | None = None
    home: str | None = None
    spi: int | None = None


def pack(record: SessionRecord) -> bytes:
    """The tag of a session's C2S filters (TAG_SIZE bytes). ValueError for what does not fit."""
    if not 0 <= record.session_id < 1 << 32:
        raise ValueError(f"session id {record.session_id} does not fit 32 bits")
    if record.port is not None and not 0 < record.port < 1 << 16:
        raise ValueError(f"port {record.port} out of range")
    if record.kind not in KIND_CODES:
        raise ValueError(f"unknown key kind {record.kind!r}")
    material, flags = bytes(16), 0
    if record.home is not None:
        material, flags = ipaddress.IPv6Address(record.home).packed, _MATERIAL
    elif record.spi is not None:
        material, flags = struct.pack("!I", record.spi) + bytes(12), _MATERIAL
    return _HEAD.pack(VERSION, KIND_CODES[record.kind] | flags, record.port or 0, record.session_id) + material


def unpack(tag: bytes) -> SessionRecord | None:
    """The record a filter's tag holds; None for a filter without one (or of another format),
    which restore treats as a legacy filter keyed by its source address."""
    if len(tag) != TAG_SIZE:
        return None
    version, code, port, session_id = _HEAD.unpack_from(tag)
    flags, kind = code & _MATERIAL, _KINDS.get(code & ~_MATERIAL)
    if version != VERSION or kind is None:
        return None
    material = tag[_HEAD.size :]
    home = spi = None
    if flags & _MATERIAL:
        if kind == "mip6-home-address":
            home = str(ipaddress.IPv6Address(material))
        elif kind == "esp-spi":
            spi = struct.unpack_from("!I", material)[0]
    return SessionRecord(session_id, kind, port or None, home, spi)


def hold_marker(s2c: int) -> ops.MplsRoute:
    """The route that says in the kernel that the pair of `s2c` is held down."""
    return ops.MplsRoute(s2c, "lo")


def is_hold_marker(route: ops.MplsRoute) -> bool:
    return route.dev == "lo" and route.via is None and not route.out_labels


def forward_route(s2c: int, owner_label: int, dev: str, via: str) -> ops.MplsRoute:
    """The route that sends answers under `s2c` (a pair of another member's block, no session
    here yet) to the member holding the block, under its own label."""
    return ops.MplsRoute(s2c, dev, via=via, out_labels=(owner_label, s2c))


def is_forward_route(route: ops.MplsRoute) -> bool:
    return (
        route.label % 2 == 0
        and route.via is not None
        and len(route.out_labels) == 2
        and route.out_labels[1] == route.label
    )


NEXTHOP_ID_BASE = 0x6D600000
NEXTHOP_IDS = range(NEXTHOP_ID_BASE, NEXTHOP_ID_BASE + (2 << 20))  # ours: both families' S2C labels
_NEXTHOP_V6 = 1 << 20


def nexthop_id(s2c: int, family: int) -> int:
    """The id of the nexthop object of the return route under `s2c` with a gateway of `family`
    (4 or 6). ValueError for a label that is not one."""
    if not 0 <= s2c <= ops.MPLS_LABEL_MAX:
        raise ValueError(f"{s2c} is not an MPLS label")
    return NEXTHOP_ID_BASE | (_NEXTHOP_V6 if family == 6 else 0) | s2c


def nexthop_label(nexthop: int) -> tuple[int, int] | None:
    """(S2C, family) of a nexthop id of ours, None for an id outside our range."""
    if nexthop not in NEXTHOP_IDS:
        return None
    return nexthop & ops.MPLS_LABEL_MAX, 6 if nexthop & _NEXTHOP_V6 else 4
