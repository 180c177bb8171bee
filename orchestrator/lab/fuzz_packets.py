"""The lab fuzz's corpus (issue 13, item 6): malformed and mutated first packets towards the VIPs,
a pure function of a seed. No I/O: `corpus(seed, targets)` yields `Mutant`s, raw IP datagrams
(no link layer) each with the generator that made it (`kind`) and what the analyser makes of it
(`outcome`: a `Malformed` reason, or `valid`), so a run knows what the daemon should count.

The generators aim where the kernel lets a packet through to the queue, so the bulk of a corpus
reaches the daemon: the balancer's ruleset queues a packet only when conntrack calls it a new flow
to a service (TCP port 80, UDP port 53, ESP), so the IPv4 header and the transport header the
kernel reads must be sound (header checksum, lengths, a SYN for TCP). What the kernel does not
read on a forwarded packet, the analyser must survive on its own: IPv6 extension header chains and
loops, destination options (Home Address Option), routing headers (type 2), fragment headers,
ESP, TCP options, bytes past the declared end. A smaller share is malformed where the kernel
itself drops it (bad IHL, bad lengths, truncated TCP/UDP, unknown IP version): those measure the
kernel's drops and keep every analyser reason in the corpus.

The source address follows the outcome: a datagram the analyser takes (`valid`) comes from one of
`Targets.session4/6` (few addresses, so the sessions the fuzz makes are few and end), a malformed
one from `Targets.spoofed4/6` (many: the per-source rate limit is not what is measured). A valid
datagram with a Home Address Option or type 2 routing header names one of `Targets.homes`.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.analyze.packet import MAX_EXT_HEADERS, Malformed, analyze
from orchestrator.inet import pton
from orchestrator.ipproto import (
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

__all__ = ["Targets", "Mutant", "KINDS", "VALID", "corpus", "outcomes", "kernel_view"]

VALID = "valid"
TCP_PORT = 80
UDP_PORT = 53
SYN = 0x02
MAX_SIZE = 1500  # the lab links' MTU: every mutant fits one frame


@dataclass(frozen=True)
class Targets:
    """Where the corpus goes and where it comes from (text addresses)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Targets:
        def addresses(key: str) -> tuple[str, ...]:
            return tuple(str(a) for a in data[key])

        return cls(
            str(data["vip4"]),
            str(data["vip6"]),
            addresses("session4"),
            addresses("session6"),
            addresses("spoofed4"),
            addresses("spoofed6"),
            addresses("homes"),
            bool(data.get("esp6", True)),
        )

    vip4: str
    vip6: str
    session4: tuple[str, ...]
    session6: tuple[str, ...]
    spoofed4: tuple[str, ...]
    spoofed6: tuple[str, ...]
    homes: tuple[str, ...]
    esp6: bool = True  # the VIP6 has an ESP service (client-ip key): ESP datagrams are queued


@dataclass(frozen=True, slots=True)
class Mutant:
    kind: str
    data: bytes
    outcome: str  # VALID or a Malformed reason


# ---- building blocks ---------------------------------------------------------------------------

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")


def _csum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(proto: int, payload: bytes, dst: bytes, options: bytes = b"", total: int | None = None) -> bytes:
    """An IPv4 datagram from 0.0.0.0 (the source is set last) with a correct header checksum."""
    hl = 20 + len(options)
    tl = hl + len(payload) if total is None else total
    head = _V4.pack(0x40 | (hl >> 2), 0, tl, 0x1234, 0x4000, 64, proto, 0, bytes(4), dst) + options
    return head[:10] + struct.pack("!H", _csum(head)) + head[12:] + payload


def _ipv6(nxt: int, payload: bytes, dst: bytes, plen: int | None = None) -> bytes:
    return _V6.pack(0x60000000, len(payload) if plen is None else plen, nxt, 64, bytes(16), dst) + payload


def _tcp(rng: random.Random, port: int = TCP_PORT, options: bytes = b"", flags: int = SYN) -> bytes:
    options += b"\x00" * (-len(options) % 4)
    doff = (20 + len(options)) >> 2
    return (
        struct.pack(
            "!HHIIBBHHH", rng.randrange(1024, 65536), port, rng.getrandbits(32), 0, doff << 4, flags, 64240, 0, 0
        )
        + options
    )


def _udp(rng: random.Random, port: int = UDP_PORT, body: bytes = b"fuzz") -> bytes:
    return struct.pack("!HHHH", rng.randrange(1024, 65536), port, 8 + len(body), 0) + body


def _ext(nxt: int, body: bytes) -> bytes:
    """A generic extension header (hop-by-hop, destination options, routing): 8-byte units."""
    body += b"\x01\x00" if (len(body) + 2) % 8 == 6 else b""
    pad = -(len(body) + 2) % 8
    if pad == 1:
        body += b"\x00"
    elif pad:
        body += bytes((1, pad - 2)) + bytes(pad - 2)
    return bytes((nxt, (len(body) + 2) // 8 - 1)) + body


def _pad_options(rng: random.Random) -> bytes:
    """Options every node skips: Pad1, PadN, unknown types with the 'skip' action (00xxxxxx)."""
    out = b""
    for _ in range(rng.randrange(0, 4)):
        t = rng.choice((0, 1, rng.randrange(2, 64)))
        if t == 0:
            out += b"\x00"
        else:
            n = rng.randrange(0, 7)
            out += bytes((t, n)) + rng.randbytes(n)
    return out


def _hao(home: bytes) -> bytes:
    return b"\xc9\x10" + home


def _rh2(nxt: int, home: bytes) -> bytes:
    return bytes((nxt, 2, 2, 1)) + bytes(4) + home


def _rh(nxt: int, rng: random.Random) -> bytes:
    """A routing header of a type other than 2 (the analyser skips it), no segments left."""
    return _ext(nxt, bytes((rng.choice((0, 3, 4, 253)), 0)) + bytes(4 + 8 * rng.randrange(0, 2)))


def _frag(nxt: int) -> bytes:
    return struct.pack("!BBHI", nxt, 0, 0, 0x1234)  # atomic: offset 0, no more fragments


def _ah(nxt: int, rng: random.Random) -> bytes:
    units = rng.choice((2, 4))  # (units + 2) * 4 bytes: IPv6 wants a multiple of 8
    return bytes((nxt, units, 0, 0)) + struct.pack("!II", rng.getrandbits(32), 1) + bytes(4 * units - 4)


def _upper6(rng: random.Random, targets: Targets) -> tuple[int, bytes]:
    """What ends an IPv6 chain: a TCP SYN to port 80, or ESP when the VIP6 has an ESP service."""
    if targets.esp6 and rng.random() < 0.2:
        return IPPROTO_ESP, struct.pack("!II", rng.getrandbits(32), 1) + bytes(16)
    return IPPROTO_TCP, _tcp(rng)


class _Atoms:
    """Extension headers the kernel skips on a forwarded packet, made once per corpus: a chain is
    a random pick of them with their next-header bytes set, which is what lets a corpus of a
    million long chains be made in seconds. Not hop-by-hop (the kernel parses it, and only first)
    and not AH: the lab's kernel queues no IPv6 datagram with AH in its chain (measured: none of
    thousands), so AH has a kind of its own (v6-ah) that measures just that."""

    def __init__(self, rng: random.Random, homes: tuple[bytes, ...], count: int = 512) -> None:
        self.items: list[tuple[int, bytes]] = []  # (its protocol number, its bytes)
        for i in range(count):
            pick = i % 4
            if pick == 0:
                self.items.append((IPPROTO_DSTOPTS, _ext(0, _pad_options(rng))))
            elif pick == 1:
                self.items.append((IPPROTO_ROUTING, _rh(0, rng)))
            elif pick == 2:
                self.items.append((IPPROTO_FRAGMENT, _frag(0)))
            else:
                self.items.append((IPPROTO_DSTOPTS, _ext(0, _pad_options(rng) + _hao(rng.choice(homes)))))
        self.hbh = [_ext(0, _pad_options(rng)) for _ in range(64)]

    def pick(self, rng: random.Random, n: int) -> list[tuple[int, bytes]]:
        return rng.choices(self.items, k=n)


def _chain(layers: list[tuple[int, bytes]], last: tuple[int, bytes]) -> tuple[int, bytes]:
    """Stack headers (protocol, bytes with any first byte) in front of `last`: the first
    header's protocol number and the chain's bytes."""
    nxt, body = last
    parts = [body]
    for proto, hdr in reversed(layers):
        parts.append(bytes((nxt,)) + hdr[1:])
        nxt = proto
    parts.reverse()
    return nxt, b"".join(parts)


# ---- generators: (rng, targets, vip, atoms) -> datagram ---------------------------------------

Gen = Callable[[random.Random, Targets, bytes, _Atoms], bytes]


def _v6_chain_long(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """More extension headers than the analyser walks (too-many-ext-headers)."""
    nxt, body = _chain(atoms.pick(rng, MAX_EXT_HEADERS + 1 + rng.getrandbits(5)), _upper6(rng, t))
    return _ipv6(nxt, body, vip)


def _v6_loop(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """A cycle of the same few headers, repeated (an extension header loop)."""
    cycle = atoms.pick(rng, 1 + rng.getrandbits(1) + rng.getrandbits(1))
    layers = cycle * ((MAX_EXT_HEADERS + 1 + rng.getrandbits(5)) // len(cycle) + 1)
    nxt, body = _chain(layers, _upper6(rng, t))
    return _ipv6(nxt, body, vip)


def _v6_chain_ok(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """Up to MAX_EXT_HEADERS headers the analyser walks: valid (maybe with a home address)."""
    layers = atoms.pick(rng, rng.randrange(0, MAX_EXT_HEADERS))
    if rng.random() < 0.3:
        layers.insert(0, (IPPROTO_HOPOPTS, rng.choice(atoms.hbh)))
    nxt, body = _chain(layers, _upper6(rng, t))
    return _ipv6(nxt, body, vip)


def _v6_misplaced_hbh(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    layers = atoms.pick(rng, 1 + rng.getrandbits(2))
    layers.insert(rng.randrange(1, len(layers) + 1), (IPPROTO_HOPOPTS, rng.choice(atoms.hbh)))
    nxt, body = _chain(layers, _upper6(rng, t))
    return _ipv6(nxt, body, vip)


def _v6_bad_dest_option(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """A destination option whose length runs past its header (or a lone type byte at its end),
    behind 0-3 other headers."""
    up = _upper6(rng, t)
    units = rng.randrange(0, 3)
    size = 8 * (units + 1) - 2  # option bytes in the header
    opts = bytes(rng.getrandbits(1) * rng.getrandbits(2))  # a few Pad1
    room = size - len(opts)
    if rng.random() < 0.2:  # PadN up to the last byte, then a type without a length byte
        fill = room - 1
        opts += (bytes((1, fill - 2)) + bytes(fill - 2) if fill >= 2 else b"\x00" * fill) + b"\xc9"
    else:
        kind = rng.choice((0xC9, 1, 2 + rng.getrandbits(8) % 254))
        opts += bytes((kind, rng.randrange(room - 1, 256))) + bytes(room - 2)
    nxt, body = _chain([*atoms.pick(rng, rng.getrandbits(2)), (IPPROTO_DSTOPTS, bytes((0, units)) + opts)], up)
    return _ipv6(nxt, body, vip)


def _v6_bad_hao(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """A Home Address Option of a length other than 16 that fits its header."""
    olen = rng.choice(_NOT_16)
    hdr = _ext(0, b"\xc9" + bytes((olen,)) + rng.randbytes(olen))
    nxt, body = _chain([*atoms.pick(rng, rng.getrandbits(2)), (IPPROTO_DSTOPTS, hdr)], _upper6(rng, t))
    return _ipv6(nxt, body, vip)


_NOT_16 = tuple(n for n in range(0, 30) if n != 16)


def _v6_bad_rh2(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    units = rng.choice((0, 1, 3, 4, 6))
    hdr = bytes((0, units, 2, rng.getrandbits(8))) + rng.randbytes(4 + 8 * units)
    nxt, body = _chain([*atoms.pick(rng, rng.getrandbits(2)), (IPPROTO_ROUTING, hdr)], _upper6(rng, t))
    return _ipv6(nxt, body, vip)


def _v6_home(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """A valid mobile node's SYN: Home Address Option or type 2 routing header."""
    up = _upper6(rng, t)
    home = pton(rng.choice(t.homes))[1]
    if rng.random() < 0.5:
        return _ipv6(IPPROTO_ROUTING, _rh2(up[0], home) + up[1], vip)
    return _ipv6(IPPROTO_DSTOPTS, _ext(up[0], _pad_options(rng) + _hao(home)) + up[1], vip)


def _v6_tcp_options(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    return _ipv6(IPPROTO_TCP, _tcp(rng, options=_tcp_options(rng)), vip)


def _v6_bad_esp(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """ESP of 0-3 bytes (truncated-esp), directly or behind a few extension headers."""
    nxt, data = _chain(atoms.pick(rng, rng.getrandbits(2)), (IPPROTO_ESP, rng.randbytes(rng.getrandbits(2))))
    return _ipv6(nxt, data, vip)


def _v6_ah(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """AH (RFC 4302) somewhere in a short chain: valid for the analyser."""
    layers = atoms.pick(rng, rng.getrandbits(2))
    layers.insert(rng.randrange(0, len(layers) + 1), (IPPROTO_AH, _ah(0, rng)))
    nxt, body = _chain(layers, _upper6(rng, t))
    return _ipv6(nxt, body, vip)


def _v6_truncated_ext(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """A header whose length runs past the datagram (the kernel finds no transport header)."""
    up = _upper6(rng, t)
    return _ipv6(IPPROTO_DSTOPTS, bytes((up[0], rng.randrange(len(up[1]) // 8 + 1, 256))) + bytes(6) + up[1], vip)


def _tcp_options(rng: random.Random) -> bytes:
    """TCP options as a fuzzer writes them: known kinds with wrong lengths, zero lengths,
    lengths past the header, unknown kinds, random bytes."""
    out = b""
    while len(out) < 36:
        pick = rng.randrange(6)
        if pick == 0:
            out += rng.randbytes(rng.randrange(1, 8))
        elif pick == 1:
            out += bytes((rng.choice((2, 3, 4, 5, 8, 30, 34)), rng.randrange(0, 40)))
        elif pick == 2:
            out += b"\x02\x04\x05\xb4"  # MSS 1460
        elif pick == 3:
            out += b"\x01"
        elif pick == 4:
            out += bytes((rng.randrange(9, 256), 0))
        else:
            break
    return out[:40]


def _v4_tcp_options(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    return _ipv4(IPPROTO_TCP, _tcp(rng, options=_tcp_options(rng)), vip)


def _v4_ip_options(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """IPv4 options the kernel accepts (NOP, End of list), a TCP SYN or UDP after them."""
    opts = b"\x01" * rng.randrange(0, 40)
    opts += b"\x00" * (-len(opts) % 4)
    up = (IPPROTO_TCP, _tcp(rng)) if rng.random() < 0.5 else (IPPROTO_UDP, _udp(rng))
    return _ipv4(up[0], up[1], vip, opts)


def _v4_trailer(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """Bytes past the declared end (the analyser and kernel both stop at the total length)."""
    up = (IPPROTO_TCP, _tcp(rng)) if rng.random() < 0.5 else (IPPROTO_UDP, _udp(rng))
    return _ipv4(up[0], up[1], vip) + rng.randbytes(rng.randrange(1, 40))


def _v4_kernel_drops(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """What never reaches the queue: bad IHL, truncated header, total length past the end,
    wrong version, truncated or bad TCP/UDP headers (the kernel drops them, conntrack calls them
    invalid), no bytes at all, and truncated SCTP, DCCP and ICMP (no service has the protocol)."""
    pick = rng.randrange(12)
    if pick == 8:
        return b""
    if pick >= 9:
        proto = (132, 33, 1)[pick - 9]
        return _ipv4(proto, rng.randbytes(rng.randrange(0, 4 if proto == 1 else 12)), vip)
    if pick == 0:  # IHL < 5
        d = bytearray(_ipv4(IPPROTO_TCP, _tcp(rng), vip))
        d[0] = 0x40 | rng.randrange(0, 5)
        return bytes(d)
    if pick == 1:  # IHL past the buffer
        return bytes((0x4F,)) + rng.randbytes(rng.randrange(19, 58))
    if pick == 2:  # header cut short
        return _ipv4(IPPROTO_TCP, _tcp(rng), vip)[: rng.randrange(1, 20)]
    if pick == 3:  # total length past the end
        seg = _tcp(rng)
        return _ipv4(IPPROTO_TCP, seg, vip, total=20 + len(seg) + rng.randrange(1, 1000))
    if pick == 4:  # total length shorter than the header
        return _ipv4(IPPROTO_TCP, _tcp(rng), vip, total=rng.randrange(0, 20))
    if pick == 5:  # another IP version
        d = bytearray(_ipv4(IPPROTO_UDP, _udp(rng), vip))
        d[0] = (rng.choice((0, 1, 2, 3, 5, 7, 15)) << 4) | 5
        return bytes(d)
    if pick == 6:  # TCP data offset < 5, or a header cut short
        cut = bytearray(_tcp(rng))
        if rng.random() < 0.5:
            cut[12] = rng.randrange(0, 5) << 4
            return _ipv4(IPPROTO_TCP, bytes(cut), vip)
        return _ipv4(IPPROTO_TCP, bytes(cut[: rng.randrange(0, 20)]), vip)
    return _ipv4(IPPROTO_UDP, _udp(rng)[: rng.randrange(0, 8)], vip)  # UDP cut short


def _v6_kernel_drops(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """IPv6 the kernel drops: cut before 40 bytes, payload length past the end."""
    d = _ipv6(IPPROTO_TCP, _tcp(rng), vip)
    if rng.random() < 0.5:
        return d[: rng.randrange(1, 40)]
    return _ipv6(IPPROTO_TCP, d[40:], vip, plen=len(d) - 40 + rng.randrange(1, 1000))


def _v6_havoc(rng: random.Random, t: Targets, vip: bytes, atoms: _Atoms) -> bytes:
    """A valid IPv6 chain with 1-4 bytes after the fixed header overwritten at random."""
    d = bytearray(_v6_chain_ok(rng, t, vip, atoms))
    for _ in range(rng.randrange(1, 5)):
        d[rng.randrange(40, len(d))] = rng.getrandbits(8)
    return bytes(d)


# name -> (weight, IP version, generator). The weights put the bulk where the kernel queues.
_GENERATORS: dict[str, tuple[int, int, Gen]] = {
    "v6-chain-long": (14, 6, _v6_chain_long),
    "v6-ext-loop": (14, 6, _v6_loop),
    "v6-misplaced-hop-by-hop": (10, 6, _v6_misplaced_hbh),
    "v6-bad-dest-option": (12, 6, _v6_bad_dest_option),
    "v6-bad-home-address-option": (12, 6, _v6_bad_hao),
    "v6-bad-routing-header": (10, 6, _v6_bad_rh2),
    "v6-bad-esp": (8, 6, _v6_bad_esp),
    "v6-chain-ok": (3, 6, _v6_chain_ok),
    "v6-home-address": (2, 6, _v6_home),
    "v6-tcp-options": (1, 6, _v6_tcp_options),
    "v6-truncated-ext-header": (1, 6, _v6_truncated_ext),
    "v6-ah": (1, 6, _v6_ah),
    "v6-kernel-drops": (1, 6, _v6_kernel_drops),
    "v4-tcp-options": (2, 4, _v4_tcp_options),
    "v4-ip-options": (2, 4, _v4_ip_options),
    "v4-trailer": (2, 4, _v4_trailer),
    "v4-kernel-drops": (2, 4, _v4_kernel_drops),
    "v6-havoc": (4, 6, _v6_havoc),
}
KINDS: tuple[str, ...] = tuple(_GENERATORS)


_EXT6 = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_AH, 59})


def kernel_view(data: bytes) -> bytes:
    """The datagram as the balancer's queue hands it over: conntrack's IPv6 defragmentation
    (nf_defrag_ipv6) takes a datagram with a fragment header through reassembly, and an atomic
    fragment (offset 0, no more fragments: the only kind in the corpus) comes out whole, its first
    fragment header removed and the header before it pointing past it. Everything else arrives
    as sent.

    The kernel's find_prev_fhdr() (net/ipv6/netfilter/nf_conntrack_reasm.c) keeps the offset of
    that next-header byte in a u8: when the header before the fragment header starts 256 bytes
    or more into the datagram, the byte written is the one at the offset modulo 256 (an address
    byte, the version, ...) and the header keeps pointing at a fragment header that is gone. The
    lab fuzz found it (a care-of address with a fragment header's number in it); this models it,
    so the analyser's outcome here is the daemon's there."""
    if len(data) < 40 or data[0] >> 4 != 6:
        return data
    nxt, prev, off = data[6], 6, 40
    while nxt != IPPROTO_FRAGMENT:  # the kernel's find_prev_fhdr
        if nxt not in _EXT6 or nxt == 59 or off + 2 > len(data):
            return data
        hlen = (data[off + 1] + 2) << 2 if nxt == IPPROTO_AH else (data[off + 1] + 1) << 3
        nxt, prev, off = data[off], off, off + hlen
    if off + 8 > len(data) or struct.unpack_from("!H", data, off + 2)[0] & 0xFFF9:
        return data
    out = bytearray(data[:off] + data[off + 8 :])
    out[prev & 0xFF] = data[off]  # the kernel's u8 offset (see above)
    struct.pack_into("!H", out, 4, struct.unpack_from("!H", data, 4)[0] - 8)
    return bytes(out)


def _set_source(data: bytes, src: bytes) -> bytes:
    """`data` from `src`: the IPv4 header checksum is made again (incrementally irrelevant: the
    source is zero when the checksum was computed, so the sum simply gains the source's words)."""
    if len(src) == 4:
        if len(data) < 20 or data[0] >> 4 != 4:
            return data
        hl = max(20, min((data[0] & 15) << 2, len(data)))
        head = bytearray(data[:hl])
        head[12:16] = src
        if hl % 2 == 0:
            head[10:12] = b"\x00\x00"
            head[10:12] = struct.pack("!H", _csum(bytes(head)))
        return bytes(head) + data[hl:]
    if len(data) < 40:
        return data
    return data[:8] + src + data[24:]


def corpus(seed: int, targets: Targets) -> Iterator[Mutant]:
    """An endless, deterministic stream of mutants for `seed` (take as many as wanted)."""
    rng = random.Random(seed)
    vip4 = pton(targets.vip4)[1]
    vip6 = pton(targets.vip6)[1]
    atoms = _Atoms(rng, tuple(pton(h)[1] for h in targets.homes))
    pools = {
        (4, True): [pton(a)[1] for a in targets.session4],
        (6, True): [pton(a)[1] for a in targets.session6],
        (4, False): [pton(a)[1] for a in targets.spoofed4],
        (6, False): [pton(a)[1] for a in targets.spoofed6],
    }
    gens = [(name, version, gen, vip4 if version == 4 else vip6) for name, (_, version, gen) in _GENERATORS.items()]
    weights = [w for w, _, _ in _GENERATORS.values()]
    while True:
        for name, version, gen, vip in rng.choices(gens, weights, k=1024):
            data = gen(rng, targets, vip, atoms)
            while len(data) > MAX_SIZE:  # a chain longer than the link's MTU: another one
                data = gen(rng, targets, vip, atoms)
            result = analyze(kernel_view(data) if version == 6 else data)
            outcome = result.reason if isinstance(result, Malformed) else VALID
            yield Mutant(name, _set_source(data, rng.choice(pools[(version, outcome == VALID)])), outcome)


def outcomes(seed: int, targets: Targets, n: int) -> dict[str, int]:
    """How many of the first `n` mutants of `seed` have each outcome."""
    counts: dict[str, int] = {}
    for mutant in itertools.islice(corpus(seed, targets), n):
        counts[mutant.outcome] = counts.get(mutant.outcome, 0) + 1
    return counts
