"""First-packet analysis: raw IP bytes (as NFQUEUE hands them over, no link layer) -> `Packet`.

This is the daemon's hot path: one call per new session, so it uses only `struct` and
`orchestrator.inet` (inet_ntop's text without the socket module), walks the bytes once and
allocates one result object. It never raises: every defect of the input is a `Malformed` whose
`reason` is a short stable token fit for a metric label (see `REASONS`); an exception inside the
parser is a bug and is still turned into
`Malformed("internal", ...)` by a final guard.

Bounds. The upper-layer data of a datagram ends where its IP header says (IPv4 total length,
IPv6 40 + payload length), not where the buffer ends; a buffer shorter than that is
"bad-total-length" unless `partial=True` (use that when the NFQUEUE copy range is smaller than the
packet: then only the headers that are present must be complete). Bytes beyond the declared end
are ignored.

What is parsed:
- IPv4 with options (IHL), fragments (offset > 0: `fragment`, no L4 header, ports None; the
  first fragment of a fragmented datagram also has `fragment=True` but keeps its ports), AH.
- IPv6 extension headers: hop-by-hop (0, only directly after the fixed header), routing (43),
  fragment (44), destination options (60), AH (51, length unit 4 bytes), ESP (50: the chain stops,
  `esp_spi` is its first 4 bytes), no-next-header (59). At most `MAX_EXT_HEADERS` headers.
  The Home Address option (type 201, RFC 6275 6.3) of a destination options header gives
  `home_address`; so does a type 2 routing header (RFC 6275 6.4, on packets *to* a mobile node,
  which is what the inner packet of an ICMPv6 error about such a packet carries).
- L4: TCP (ports, flags), UDP / UDP-Lite, SCTP, DCCP (ports), ICMP / ICMPv6 (type, code; for
  errors the embedded original datagram is parsed leniently into `inner`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from orchestrator.inet import ntop4, ntop6
from orchestrator.ipproto import (
    IPPROTO_AH,
    IPPROTO_DCCP,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
)

__all__ = [
    "Packet",
    "Malformed",
    "analyze",
    "REASONS",
    "MAX_EXT_HEADERS",
    "ICMP4_ERRORS",
    "ICMP6_ERRORS",
]

MAX_EXT_HEADERS = 16

# ICMP error types whose payload is the offending datagram.
ICMP4_ERRORS = frozenset({3, 11, 12})  # dest unreachable (incl. frag needed), time exceeded, param problem
ICMP6_ERRORS = frozenset({1, 2, 3, 4})  # dest unreachable, packet too big, time exceeded, param problem

# Every reason token analyze() can return (stable: used as metric label values).
REASONS = frozenset(
    {
        "empty",
        "bad-ip-version",
        "truncated-ipv4-header",
        "bad-ihl",
        "truncated-ipv6-header",
        "bad-total-length",
        "truncated-ext-header",
        "misplaced-hop-by-hop",
        "too-many-ext-headers",
        "bad-dest-option",
        "bad-home-address-option",
        "bad-routing-header",
        "truncated-esp",
        "truncated-tcp",
        "bad-tcp-offset",
        "truncated-udp",
        "truncated-sctp",
        "truncated-dccp",
        "truncated-icmp",
        "internal",
    }
)

_V4 = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, total length, id, flags/frag, ttl, proto, csum, src, dst
_V6 = struct.Struct("!IHBB16s16s")  # ver/tc/flow, payload length, next header, hop limit, src, dst
_PORTS = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_FRAG6 = struct.Struct("!BBH")  # next header, reserved, offset/flags


@dataclass(frozen=True, slots=True)
class Packet:
    """One analysed IP datagram. Addresses are text (inet_ntop form).

    `proto` is the final upper-layer protocol after extension headers / AH (50 for ESP, 59 for no
    next header, the fragment's next header for a non-first fragment). `length` is the datagram
    length its IP header declares (for `inner` packets that is the original's length, usually more
    than the embedded bytes)."""

    version: int
    src: str
    dst: str
    proto: int
    length: int
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None
    home_address: str | None = None
    esp_spi: int | None = None
    fragment: bool = False
    icmp_type: int | None = None
    icmp_code: int | None = None
    inner: Packet | None = None

    @property
    def is_icmp_error(self) -> bool:
        if self.icmp_type is None:
            return False
        if self.proto == IPPROTO_ICMP:
            return self.icmp_type in ICMP4_ERRORS
        return self.proto == IPPROTO_ICMPV6 and self.icmp_type in ICMP6_ERRORS


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why a buffer is not an analysable IP datagram. `reason` is one of `REASONS`."""

    reason: str
    detail: str = ""


class _Bad(Exception):
    """Internal control flow only: carries a Malformed out of nested parsing."""

    __slots__ = ("reason", "detail")

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def analyze(data: bytes, *, partial: bool = False) -> Packet | Malformed:
    """Analyse one raw IP datagram. Never raises.

    `partial=True` accepts a buffer shorter than the datagram's declared length (a capture cut
    by a copy range): headers that are present must still be complete."""
    try:
        return _parse(data, partial, False)
    except _Bad as e:
        return Malformed(e.reason, e.detail)
    except Exception as e:  # pragma: no cover - a bug, but the hot path must never die of it
        return Malformed("internal", f"internal: {type(e).__name__}: {e}")


def source_address(data: bytes) -> str | None:
    """The source address of a raw IP datagram from its fixed header alone, in the form
    `analyze` gives (`Packet.src`); None when the header is not there. The balancer daemon looks
    up its routes to a batch's clients with it before the core analyses the batch."""
    if len(data) >= 20 and data[0] >> 4 == 4:
        return ntop4(data[12:16])
    if len(data) >= 40 and data[0] >> 4 == 6:
        return ntop6(data[8:24])
    return None


def _parse(data: bytes, partial: bool, lenient: bool) -> Packet:
    """`lenient` is for the datagram embedded in an ICMP error: truncated anywhere after its IP
    header(s); L4 fields are taken as far as they are present."""
    n = len(data)
    if n == 0:
        raise _Bad("empty", "no bytes")
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            raise _Bad("truncated-ipv4-header", f"{n} bytes < 20")
        vihl, _tos, total, _id, frag, _ttl, proto, _csum, s, d = _V4.unpack_from(data)
        hl = (vihl & 15) << 2
        if hl < 20:
            raise _Bad("bad-ihl", f"IHL {hl >> 2} < 5")
        if hl > n:
            raise _Bad("truncated-ipv4-header", f"IHL {hl >> 2} needs {hl} bytes, have {n}")
        if total < hl:
            raise _Bad("bad-total-length", f"total length {total} < header length {hl}")
        if total > n:
            if not (partial or lenient):
                raise _Bad("bad-total-length", f"total length {total} > {n} bytes")
            end = n
        else:
            end = total
        src = ntop4(s)
        dst = ntop4(d)
        off = hl
        length = total
        frag_off = frag & 0x1FFF
        is_frag = bool(frag_off) or bool(frag & 0x2000)
        if frag_off:
            return Packet(4, src, dst, proto, length, fragment=True)
        home = None
        hdrs = 0
        while proto == IPPROTO_AH:
            hdrs += 1
            if hdrs > MAX_EXT_HEADERS:
                raise _Bad("too-many-ext-headers", f"more than {MAX_EXT_HEADERS} headers")
            if off + 2 > end:
                raise _Bad("truncated-ext-header", f"AH at {off} beyond {end}")
            proto = data[off]
            off += (data[off + 1] + 2) << 2
            if off > end:
                raise _Bad("truncated-ext-header", f"AH ends at {off} beyond {end}")
    elif version == 6:
        if n < 40:
            raise _Bad("truncated-ipv6-header", f"{n} bytes < 40")
        _vtf, plen, proto, _hlim, s, d = _V6.unpack_from(data)
        if plen == 0 and proto == IPPROTO_HOPOPTS:
            end = n  # jumbogram (RFC 2675): the real length is in the hop-by-hop option
            length = n
        else:
            length = 40 + plen
            if length > n:
                if not (partial or lenient):
                    raise _Bad("bad-total-length", f"payload length {plen} > {n - 40} bytes")
                end = n
            else:
                end = length
        src = ntop6(s)
        dst = ntop6(d)
        off = 40
        home = None
        is_frag = False
        hdrs = 0
        while True:
            if proto == IPPROTO_DSTOPTS or proto == IPPROTO_HOPOPTS or proto == IPPROTO_ROUTING:
                if proto == IPPROTO_HOPOPTS and off != 40:
                    raise _Bad("misplaced-hop-by-hop", f"hop-by-hop header at offset {off}")
                hdrs += 1
                if hdrs > MAX_EXT_HEADERS:
                    raise _Bad("too-many-ext-headers", f"more than {MAX_EXT_HEADERS} extension headers")
                if off + 2 > end:
                    raise _Bad("truncated-ext-header", f"header {proto} at {off} beyond {end}")
                nxt = data[off]
                hend = off + ((data[off + 1] + 1) << 3)
                if hend > end:
                    raise _Bad("truncated-ext-header", f"header {proto} ends at {hend} beyond {end}")
                if proto == IPPROTO_DSTOPTS:
                    h = _home_address_option(data, off + 2, hend)
                    if h is not None and home is None:
                        home = h
                elif proto == IPPROTO_ROUTING:
                    # type 2 (RFC 6275 6.4): 8 bytes, then exactly one address, the home address
                    if data[off + 2] == 2:
                        if hend - off != 24:
                            raise _Bad("bad-routing-header", f"type 2 routing header of {hend - off} bytes")
                        if home is None:
                            home = ntop6(data[off + 8 : off + 24])
                proto = nxt
                off = hend
            elif proto == IPPROTO_FRAGMENT:
                hdrs += 1
                if hdrs > MAX_EXT_HEADERS:
                    raise _Bad("too-many-ext-headers", f"more than {MAX_EXT_HEADERS} extension headers")
                if off + 8 > end:
                    raise _Bad("truncated-ext-header", f"fragment header at {off} beyond {end}")
                nxt, _r, fo = _FRAG6.unpack_from(data, off)
                proto = nxt
                off += 8
                if fo & 0xFFF8:  # non-first fragment: what follows is payload, not a header
                    return Packet(6, src, dst, proto, length, home_address=home, fragment=True)
                if fo & 1:
                    is_frag = True  # first fragment (an atomic fragment, M=0 offset=0, is not one)
            elif proto == IPPROTO_AH:
                hdrs += 1
                if hdrs > MAX_EXT_HEADERS:
                    raise _Bad("too-many-ext-headers", f"more than {MAX_EXT_HEADERS} extension headers")
                if off + 2 > end:
                    raise _Bad("truncated-ext-header", f"AH at {off} beyond {end}")
                nxt = data[off]
                hend = off + ((data[off + 1] + 2) << 2)
                if hend > end:
                    raise _Bad("truncated-ext-header", f"AH ends at {hend} beyond {end}")
                proto = nxt
                off = hend
            else:
                break
    else:
        raise _Bad("bad-ip-version", f"version {version}")

    # Upper layer at data[off:end].
    avail = end - off
    if proto == IPPROTO_TCP:
        if avail < 20:
            if not lenient:
                raise _Bad("truncated-tcp", f"{avail} bytes < 20")
            sp = dp = fl = None
            if avail >= 4:
                sp, dp = _PORTS.unpack_from(data, off)
            if avail >= 14:
                fl = data[off + 13]
            return Packet(version, src, dst, proto, length, sp, dp, fl, home, fragment=is_frag)
        doff = (data[off + 12] >> 4) << 2
        if doff < 20:
            raise _Bad("bad-tcp-offset", f"data offset {doff >> 2} < 5")
        if doff > avail and not lenient:
            raise _Bad("truncated-tcp", f"TCP header of {doff} bytes, have {avail}")
        sp, dp = _PORTS.unpack_from(data, off)
        return Packet(version, src, dst, proto, length, sp, dp, data[off + 13], home, fragment=is_frag)
    if proto == IPPROTO_UDP or proto == IPPROTO_UDPLITE:
        if avail < 8:
            if not lenient:
                raise _Bad("truncated-udp", f"{avail} bytes < 8")
            if avail < 4:
                return Packet(version, src, dst, proto, length, home_address=home, fragment=is_frag)
        sp, dp = _PORTS.unpack_from(data, off)
        return Packet(version, src, dst, proto, length, sp, dp, None, home, fragment=is_frag)
    if proto == IPPROTO_SCTP or proto == IPPROTO_DCCP:
        if avail < 12:
            if not lenient:
                raise _Bad("truncated-sctp" if proto == IPPROTO_SCTP else "truncated-dccp", f"{avail} bytes < 12")
            if avail < 4:
                return Packet(version, src, dst, proto, length, home_address=home, fragment=is_frag)
        sp, dp = _PORTS.unpack_from(data, off)
        return Packet(version, src, dst, proto, length, sp, dp, None, home, fragment=is_frag)
    if proto == IPPROTO_ESP:
        if avail < 4:
            if not lenient:
                raise _Bad("truncated-esp", f"{avail} bytes < 4")
            return Packet(version, src, dst, proto, length, home_address=home, fragment=is_frag)
        return Packet(
            version,
            src,
            dst,
            proto,
            length,
            home_address=home,
            esp_spi=_U32.unpack_from(data, off)[0],
            fragment=is_frag,
        )
    if (proto == IPPROTO_ICMP and version == 4) or (proto == IPPROTO_ICMPV6 and version == 6):
        if avail < 4:
            if not lenient:
                raise _Bad("truncated-icmp", f"{avail} bytes < 4")
            if avail < 2:
                return Packet(version, src, dst, proto, length, home_address=home, fragment=is_frag)
        itype = data[off]
        icode = data[off + 1]
        inner = None
        if not lenient and avail >= 8 + 20 and itype in (ICMP4_ERRORS if version == 4 else ICMP6_ERRORS):
            # the offending datagram starts after the 8-byte ICMP header; it is truncated by design
            try:
                inner = _parse(data[off + 8 : end], True, True)
            except _Bad:
                inner = None
        return Packet(
            version,
            src,
            dst,
            proto,
            length,
            home_address=home,
            fragment=is_frag,
            icmp_type=itype,
            icmp_code=icode,
            inner=inner,
        )
    return Packet(version, src, dst, proto, length, home_address=home, fragment=is_frag)


def _home_address_option(data: bytes, pos: int, end: int) -> str | None:
    """Walk the TLV options of a destination options header; return the Home Address option's
    address (type 201, length 16) if there is one."""
    home = None
    while pos < end:
        t = data[pos]
        if t == 0:  # Pad1
            pos += 1
            continue
        if pos + 2 > end:
            raise _Bad("bad-dest-option", f"option {t} header overruns the options header")
        olen = data[pos + 1]
        oend = pos + 2 + olen
        if oend > end:
            raise _Bad("bad-dest-option", f"option {t} of {olen} bytes overruns the options header")
        if t == 201:
            if olen != 16:
                raise _Bad("bad-home-address-option", f"home address option of {olen} bytes, not 16")
            if home is None:
                home = ntop6(data[pos + 2 : oend])
        pos = oend
    return home
