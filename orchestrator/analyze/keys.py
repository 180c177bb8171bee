"""Session keys: which client a first packet belongs to, per the service's key kind (docs/design.md, Sessions).

A `SessionKey` is (kind, value, client). `value` is what the session table is looked up by;
`client` is always the packet's source address, the address the session's return path (S2C route)
and C2S filter are built for. For a mobile IPv6 node away from home the two differ: value is the
home address, client the current care-of address, so a new care-of address finds the old session
(same value) and the daemon re-keys its return path to the new `client`.

Values of the kinds that fall back to the source address (mip6-home-address, ipv6-iid for IPv4,
esp-spi) are plain addresses in that case, so a mobile node at home (source = home address, no
Home Address option) and away (option = home address) get the same key, as the source document
requires (its claim 7). The other values carry a prefix ("iid:", "spi:") that no address has.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from orchestrator.inet import pton
from orchestrator.ipproto import IPPROTO_ESP

from .packet import Packet

__all__ = [
    "SessionKeyKind",
    "SessionKey",
    "key_value",
    "session_key",
    "ipv6_iid",
    "icmp_error_client",
    "icmp_error_session_key",
]


class SessionKeyKind(enum.StrEnum):
    CLIENT_IP = "client-ip"
    FIVE_TUPLE = "five-tuple"
    MIP6_HOME_ADDRESS = "mip6-home-address"
    IPV6_IID = "ipv6-iid"
    ESP_SPI = "esp-spi"


@dataclass(frozen=True, slots=True)
class SessionKey:
    kind: SessionKeyKind
    value: str
    client: str


def _port(p: int | None) -> str:
    return "-" if p is None else str(p)


@functools.lru_cache(maxsize=4096)
def _iid(addr: str) -> str:
    """'iid:xxxx:xxxx:xxxx:xxxx' (zero-padded lower-case hex) for an IPv6 text address. Cached:
    parsing the text costs microseconds, and a client's next flow asks again."""
    b = pton(addr)[1]
    h = b[8:16].hex()
    return f"iid:{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}"


def ipv6_iid(addr: str) -> str:
    """The ipv6-iid key value of an IPv6 address (what `session_key` gives its packets)."""
    return _iid(addr)


def _value(
    kind: SessionKeyKind,
    version: int,
    proto: int,
    src: str,
    sport: int | None,
    dst: str,
    dport: int | None,
    home: str | None,
    spi: int | None,
) -> str:
    if kind is SessionKeyKind.CLIENT_IP:
        return src
    if kind is SessionKeyKind.FIVE_TUPLE:
        return f"{proto}/{src}/{_port(sport)}/{dst}/{_port(dport)}"
    if kind is SessionKeyKind.MIP6_HOME_ADDRESS:
        return home if home is not None else src
    if kind is SessionKeyKind.IPV6_IID:
        return _iid(src) if version == 6 else src
    if kind is SessionKeyKind.ESP_SPI:
        return f"spi:0x{spi:08x}" if (proto == IPPROTO_ESP and spi is not None) else src
    raise ValueError(f"unknown session key kind {kind!r}")  # pragma: no cover - StrEnum is closed


def key_value(
    kind: SessionKeyKind | str,
    version: int,
    proto: int,
    src: str,
    sport: int | None,
    dst: str,
    dport: int | None,
    home: str | None = None,
    spi: int | None = None,
) -> str:
    """The table key of the given parts, exactly as `session_key` derives it from a packet: a
    restart rebuilds a session's key from its filter's match and record with it."""
    return _value(SessionKeyKind(kind), version, proto, src, sport, dst, dport, home, spi)


def session_key(pkt: Packet, kind: SessionKeyKind | str) -> SessionKey:
    """The session key of a packet a client sent towards a VIP.

    - client-ip: the source address.
    - five-tuple: "proto/src/sport/dst/dport"; a missing port (ICMP, ESP, non-first fragment) is "-".
    - mip6-home-address: the Home Address destination option if present, else the source address.
    - ipv6-iid: "iid:xxxx:xxxx:xxxx:xxxx", the lower 64 bits of the IPv6 source; IPv4: the source.
    - esp-spi: "spi:0x%08x" of the ESP header when the packet is ESP, else the source address.

    This keys the packet as it is; for an ICMP error about a session use `icmp_error_session_key`.
    Raises ValueError for an unknown kind string (configuration error, not a packet error)."""
    k = SessionKeyKind(kind)
    return SessionKey(
        k,
        _value(k, pkt.version, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.home_address, pkt.esp_spi),
        pkt.src,
    )


def icmp_error_client(pkt: Packet) -> str | None:
    """The client address an ICMP/ICMPv6 error packet is about, or None if it is not an error or
    its embedded datagram could not be parsed.

    Reasoning: an ICMP error arriving at the balancer from the client side is addressed to the VIP
    and was generated (by the client or by a router on the way to it: so the outer source is NOT
    necessarily the client) about a datagram the VIP sent towards the client, i.e. a server's
    answer. That embedded datagram's source is the VIP and its destination the client, so the
    client is the inner destination, and the inner (sport, dport) are the service port and the
    client's port, reversed with respect to the session's client->VIP direction."""
    if not pkt.is_icmp_error or pkt.inner is None:
        return None
    return pkt.inner.dst


def icmp_error_session_key(pkt: Packet, kind: SessionKeyKind | str) -> SessionKey | None:
    """The key of the session an ICMP error is about: the embedded (VIP -> client) datagram reversed,
    so it equals `session_key` of the client's own packets for client-ip, five-tuple and ipv6-iid
    (and for mip6-home-address when the embedded datagram carries a type 2 routing header with the
    home address, or the node is at home). For esp-spi it cannot: the embedded SPI belongs to the
    other direction's security association, so the value is the client address (the fallback key);
    the daemon should look such a session up by client address instead. `client` is the inner
    destination. None when `pkt` is not an ICMP error with a parsable embedded datagram."""
    inner = pkt.inner
    if inner is None or not pkt.is_icmp_error:
        return None
    k = SessionKeyKind(kind)
    return SessionKey(
        k,
        _value(k, inner.version, inner.proto, inner.dst, inner.dport, inner.src, inner.sport, inner.home_address, None),
        inner.dst,
    )
