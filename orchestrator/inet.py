"""IP addresses between packed bytes and text, in the form glibc's inet_ntop/inet_pton use, without
the socket module: the pure decision core (and the packet analyser it calls) must not load it.

`ntop4`/`ntop6` give exactly inet_ntop's text (RFC 5952: lower-case hex, the longest run of two or
more zero groups, the first of equal runs, as `::`; `::a.b.c.d` and `::ffff:a.b.c.d` for the
IPv4-compatible and IPv4-mapped forms), so session keys and kernel object names do not depend on
which of the two wrote them. `pton` accepts what inet_pton accepts (no zone index, no leading
zeros in IPv4 octets).
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["ntop", "ntop4", "ntop6", "pton"]

_WORDS = struct.Struct("!8H")
_HEX_GROUPS = ":%x:%x:%x:%x:%x:%x:%x:%x:"  # framed by colons, so every group is ":g:"
# The zero runs that `::` may stand for, longest first: str.find gives the first of the longest.
_ZERO_RUNS = tuple((n, ":" + ":".join(["0"] * n) + ":") for n in range(8, 1, -1))


def ntop4(packed: bytes) -> str:
    a, b, c, d = packed
    return f"{a}.{b}.{c}.{d}"


# Recent IPv6 texts: a first packet's destination is one of a few VIPs and its source often a
# client seen before. Bounded: emptied when full.
_RECENT: dict[bytes, str] = {}
_RECENT_MAX = 4096


def ntop6(packed: bytes) -> str:
    """String operations in C rather than a loop over the groups: this is on the first-packet path."""
    text = _RECENT.get(packed)
    if text is None:
        text = _ntop6(packed)
        if len(_RECENT) >= _RECENT_MAX:
            _RECENT.clear()
        _RECENT[bytes(packed)] = text
    return text


def _ntop6(packed: bytes) -> str:
    text = _HEX_GROUPS % _WORDS.unpack(packed)
    for length, zeros in _ZERO_RUNS:  # noqa: B007 (the run found is used after the loop)
        at = text.find(zeros)
        if at >= 0:
            break
    else:
        return text[1:-1]
    if at == 0 and (length == 6 or (length == 5 and packed[10:12] == b"\xff\xff")):
        return ("::" if length == 6 else "::ffff:") + ntop4(packed[12:])
    return text[1:at] + "::" + text[at + len(zeros) : -1] if at else "::" + text[len(zeros) : -1]


def ntop(packed: bytes) -> str:
    """4 bytes: IPv4; 16 bytes: IPv6; any other length is a ValueError."""
    if len(packed) == 4:
        return ntop4(packed)
    if len(packed) == 16:
        return ntop6(packed)
    raise ValueError(f"{len(packed)} bytes are no IP address")


def pton(text: str) -> tuple[int, bytes]:
    """(4 or 6, packed bytes) of an address in text; ValueError for anything else."""
    if not isinstance(text, str) or "%" in text:
        raise ValueError(f"{text!r} is not an IP address")
    if ":" in text:  # only IPv6 text has one
        return 6, ipaddress.IPv6Address(text).packed
    # Four ASCII decimal octets of at most 3 digits, no leading zero, each below 256: what
    # ipaddress.IPv4Address reads, several times faster (a restore parses one per session).
    octets = text.split(".")
    if len(octets) == 4 and all(
        o.isascii() and o.isdigit() and len(o) <= 3 and (o[0] != "0" or len(o) == 1) for o in octets
    ):
        values = [int(o) for o in octets]
        if max(values) <= 255:
            return 4, bytes(values)
    raise ValueError(f"{text!r} is not an IPv4 address")
