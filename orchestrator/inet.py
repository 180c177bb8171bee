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


def ntop4(packed: bytes) -> str:
    a, b, c, d = packed
    return f"{a}.{b}.{c}.{d}"


def ntop6(packed: bytes) -> str:
    words = _WORDS.unpack(packed)
    best, best_len, run, run_len = -1, 0, -1, 0
    for i, word in enumerate(words):
        if word:
            run = -1
            continue
        if run < 0:
            run, run_len = i, 0
        run_len += 1
        if run_len > best_len:
            best, best_len = run, run_len
    if best_len < 2:
        return ":".join([f"{w:x}" for w in words])
    if best == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
        return ("::" if best_len == 6 else "::ffff:") + ntop4(packed[12:])
    head = ":".join([f"{w:x}" for w in words[:best]])
    tail = ":".join([f"{w:x}" for w in words[best + best_len:]])
    return f"{head}::{tail}"


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
    return 4, ipaddress.IPv4Address(text).packed
