"""First-packet analysis and session keys. Packets are built with scapy (a test-only dependency)."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
import scapy.all as scapy_all  # a declared test dependency: missing means broken, not skipped
from scapy.all import (  # noqa: E402
    AH,
    ESP,
    HAO,
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    raw,
)
from scapy.layers.sctp import SCTP  # noqa: E402

from orchestrator.analyze import (  # noqa: E402
    MAX_EXT_HEADERS,
    REASONS,
    Malformed,
    Packet,
    SessionKey,
    SessionKeyKind,
    analyze,
    icmp_error_client,
    icmp_error_session_key,
    session_key,
)

CLIENT4, VIP4 = "192.0.2.10", "10.0.0.100"
COA, HOME, VIP6 = "2001:db8:1:0:211:22ff:fe33:4455", "2001:db8:2::16", "2001:db8::100"
SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


def syn4() -> bytes:
    return raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S", options=SYN_OPTS))


def syn6_hao() -> bytes:
    return raw(
        IPv6(src=COA, dst=VIP6)
        / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOME)])
        / TCP(sport=50000, dport=443, flags="S", options=SYN_OPTS)
    )


def esp6() -> bytes:
    return raw(IPv6(src=COA, dst=VIP6) / ESP(spi=0x218, seq=1, data=b"\x00" * 24))


def pkt(data: bytes, **kw) -> Packet:
    r = analyze(data, **kw)
    assert isinstance(r, Packet), r
    return r


def bad(data: bytes, **kw) -> Malformed:
    r = analyze(data, **kw)
    assert isinstance(r, Malformed), r
    assert r.reason in REASONS and r.reason != "internal", r
    return r


# ---------------------------------------------------------------------------------------------------
# well-formed packets: every field


def test_ipv4_tcp_syn_all_fields() -> None:
    data = syn4()
    assert len(data) == 60
    p = pkt(data)
    assert p == Packet(
        version=4,
        src=CLIENT4,
        dst=VIP4,
        proto=6,
        length=60,
        sport=40000,
        dport=80,
        tcp_flags=0x02,
        home_address=None,
        esp_spi=None,
        fragment=False,
        icmp_type=None,
        icmp_code=None,
        inner=None,
    )
    assert not p.is_icmp_error


def test_ipv4_options_and_trailing_bytes() -> None:
    data = raw(
        IP(src=CLIENT4, dst=VIP4, options=[scapy_all.IPOption_RR(routers=["1.1.1.1", "2.2.2.2"])])
        / UDP(sport=1234, dport=53)
        / b"q"
    )
    assert data[0] & 15 > 5
    p = pkt(data + b"\xff" * 7)  # bytes past the total length are ignored
    assert (p.proto, p.sport, p.dport, p.length) == (17, 1234, 53, len(data))


def test_ipv4_fragments() -> None:
    first = pkt(raw(IP(src=CLIENT4, dst=VIP4, flags="MF") / UDP(sport=7, dport=8) / (b"x" * 40)))
    assert first.fragment and (first.sport, first.dport) == (7, 8)
    later = pkt(raw(IP(src=CLIENT4, dst=VIP4, proto=17, frag=6) / (b"\x00\x07\x00\x08" + b"x" * 40)))
    assert later.fragment and later.proto == 17 and later.sport is None and later.dport is None
    assert later.tcp_flags is None


def test_ipv4_ah_then_tcp() -> None:
    p = pkt(
        raw(
            IP(src=CLIENT4, dst=VIP4)
            / AH(nh=6, payloadlen=4, spi=9, icv=b"\x00" * 12)
            / TCP(sport=1, dport=2, flags="SA")
        )
    )
    assert (p.proto, p.sport, p.dport, p.tcp_flags) == (6, 1, 2, 0x12)


def test_ipv4_esp() -> None:
    p = pkt(raw(IP(src=CLIENT4, dst=VIP4) / ESP(spi=0xDEADBEEF, seq=3, data=b"\x00" * 16)))
    assert (p.proto, p.esp_spi, p.sport, p.dport) == (50, 0xDEADBEEF, None, None)


def test_ipv6_dest_opt_home_address() -> None:
    p = pkt(syn6_hao())
    assert p == Packet(
        version=6,
        src=COA,
        dst=VIP6,
        proto=6,
        length=len(syn6_hao()),
        sport=50000,
        dport=443,
        tcp_flags=0x02,
        home_address=HOME,
        esp_spi=None,
        fragment=False,
        icmp_type=None,
        icmp_code=None,
        inner=None,
    )


def test_ipv6_dest_opt_without_hao_and_with_padding() -> None:
    p = pkt(
        raw(IPv6(src=COA, dst=VIP6) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]) / UDP(sport=9, dport=10))
    )
    assert p.home_address is None and (p.proto, p.sport, p.dport) == (17, 9, 10)
    # Pad1 + PadN + HAO mixed
    p = pkt(
        raw(
            IPv6(src=COA, dst=VIP6)
            / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00\x00"), HAO(hoa=HOME)])
            / UDP(sport=9, dport=10)
        )
    )
    assert p.home_address == HOME


def test_ipv6_full_chain() -> None:
    data = raw(
        IPv6(src=COA, dst=VIP6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=["2001:db8::5"])
        / IPv6ExtHdrFragment(offset=0, m=1, id=77)
        / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOME)])
        / UDP(sport=5, dport=6)
    )
    p = pkt(data)
    assert (p.proto, p.sport, p.dport, p.home_address, p.fragment, p.length) == (17, 5, 6, HOME, True, len(data))


def test_ipv6_atomic_fragment_is_not_a_fragment() -> None:
    p = pkt(raw(IPv6(src=COA, dst=VIP6) / IPv6ExtHdrFragment(offset=0, m=0) / TCP(sport=3, dport=4)))
    assert not p.fragment and (p.sport, p.dport) == (3, 4)


def test_ipv6_non_first_fragment() -> None:
    p = pkt(raw(IPv6(src=COA, dst=VIP6) / IPv6ExtHdrFragment(nh=6, offset=100, m=1) / (b"\x00\x03\x00\x04" * 10)))
    assert p.fragment and p.proto == 6 and p.sport is None and p.dport is None and p.tcp_flags is None


def test_ipv6_ah_esp_spi() -> None:
    p = pkt(
        raw(
            IPv6(src=COA, dst=VIP6)
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOME)])
            / AH(nh=50, payloadlen=4, spi=5, icv=b"\x00" * 12)
            / ESP(spi=0x218, seq=1)
        )
    )
    assert (p.proto, p.esp_spi, p.home_address, p.sport) == (50, 0x218, HOME, None)
    assert pkt(esp6()).esp_spi == 0x218


def test_ipv6_no_next_header() -> None:
    p = pkt(raw(IPv6(src=COA, dst=VIP6, nh=59)))
    assert p.proto == 59 and p.sport is None and p.length == 40


def test_ipv6_type2_routing_header_home_address() -> None:
    p = pkt(
        raw(
            IPv6(src=VIP6, dst=COA)
            / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOME])
            / TCP(sport=443, dport=50000, flags="SA")
        )
    )
    assert p.home_address == HOME and (p.sport, p.dport) == (443, 50000)


def test_sctp_and_udp_ports() -> None:
    p = pkt(raw(IP(src=CLIENT4, dst=VIP4) / SCTP(sport=3868, dport=3869)))
    assert (p.proto, p.sport, p.dport) == (132, 3868, 3869)
    p = pkt(raw(IPv6(src=COA, dst=VIP6) / UDP(sport=4500, dport=4500)))
    assert (p.proto, p.sport, p.dport, p.tcp_flags) == (17, 4500, 4500, None)


def test_icmp_echo_is_not_an_error() -> None:
    p = pkt(raw(IP(src=CLIENT4, dst=VIP4) / ICMP(type=8, code=0, id=1, seq=1)))
    assert (p.proto, p.icmp_type, p.icmp_code, p.inner, p.sport) == (1, 8, 0, None, None)
    assert not p.is_icmp_error
    p = pkt(raw(IPv6(src=COA, dst=VIP6) / ICMPv6EchoRequest()))
    assert (p.proto, p.icmp_type, p.inner) == (58, 128, None)


def _answer4() -> bytes:
    return raw(IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=40000, flags="SA") / (b"x" * 200))


@pytest.mark.parametrize("itype,icode", [(3, 4), (3, 1), (11, 0), (12, 0)])
def test_icmp4_errors_inner(itype: int, icode: int) -> None:
    # RFC 792: IP header + 8 bytes of the original datagram (a truncated copy)
    data = raw(IP(src="198.51.100.1", dst=VIP4) / ICMP(type=itype, code=icode) / _answer4()[:28])
    p = pkt(data)
    assert p.is_icmp_error and (p.icmp_type, p.icmp_code) == (itype, icode)
    inner = p.inner
    assert inner is not None
    assert (inner.src, inner.dst, inner.proto, inner.sport, inner.dport) == (VIP4, CLIENT4, 6, 80, 40000)
    assert inner.tcp_flags is None  # flags are beyond the 8 bytes
    assert inner.length == len(_answer4())
    assert icmp_error_client(p) == CLIENT4


def test_icmp4_error_longer_copy_has_flags() -> None:
    p = pkt(raw(IP(src="198.51.100.1", dst=VIP4) / ICMP(type=3, code=3) / _answer4()[:60]))
    assert p.inner is not None and p.inner.tcp_flags == 0x12


def test_icmp4_error_with_unparsable_inner() -> None:
    p = pkt(raw(IP(src="198.51.100.1", dst=VIP4) / ICMP(type=3, code=3) / (b"\x75" + b"\x00" * 27)))
    assert p.is_icmp_error and p.inner is None and icmp_error_client(p) is None


@pytest.mark.parametrize(
    "layer",
    [
        ICMPv6DestUnreach(code=4),
        ICMPv6PacketTooBig(mtu=1280),
        ICMPv6TimeExceeded(),
        scapy_all.ICMPv6ParamProblem(ptr=6),
    ],
)
def test_icmp6_errors_inner(layer) -> None:
    orig = raw(
        IPv6(src=VIP6, dst=COA)
        / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOME])
        / TCP(sport=443, dport=50000, flags="SA")
        / (b"y" * 2000)
    )
    p = pkt(raw(IPv6(src="2001:db8:ffff::1", dst=VIP6) / layer / orig[:1232]))
    assert p.is_icmp_error and p.icmp_type in (1, 2, 3, 4)
    inner = p.inner
    assert inner is not None
    assert (inner.src, inner.dst, inner.sport, inner.dport, inner.home_address) == (VIP6, COA, 443, 50000, HOME)
    assert inner.length == len(orig)
    assert icmp_error_client(p) == COA


def test_icmp_error_inner_is_not_recursed() -> None:
    innermost = raw(IP(src=VIP4, dst=CLIENT4) / ICMP(type=3) / _answer4()[:28])
    p = pkt(raw(IP(src="198.51.100.1", dst=VIP4) / ICMP(type=11) / innermost))
    assert p.inner is not None and p.inner.icmp_type == 3 and p.inner.inner is None


# ---------------------------------------------------------------------------------------------------
# session keys


def test_session_key_kinds_are_the_designs() -> None:
    assert [k.value for k in SessionKeyKind] == ["client-ip", "five-tuple", "mip6-home-address", "ipv6-iid", "esp-spi"]


def test_session_keys_ipv4() -> None:
    p = pkt(syn4())
    keys = {k: session_key(p, k) for k in SessionKeyKind}
    assert all(isinstance(v, SessionKey) and v.client == CLIENT4 and v.kind is k for k, v in keys.items())
    assert keys[SessionKeyKind.CLIENT_IP].value == CLIENT4
    assert keys[SessionKeyKind.FIVE_TUPLE].value == f"6/{CLIENT4}/40000/{VIP4}/80"
    assert keys[SessionKeyKind.MIP6_HOME_ADDRESS].value == CLIENT4
    assert keys[SessionKeyKind.IPV6_IID].value == CLIENT4
    assert keys[SessionKeyKind.ESP_SPI].value == CLIENT4
    assert session_key(p, "five-tuple") == keys[SessionKeyKind.FIVE_TUPLE]  # plain strings accepted
    with pytest.raises(ValueError):
        session_key(p, "mac-address")


def test_session_keys_ipv6_mobile_node() -> None:
    p = pkt(syn6_hao())
    assert session_key(p, "client-ip") == SessionKey(SessionKeyKind.CLIENT_IP, COA, COA)
    assert session_key(p, "five-tuple").value == f"6/{COA}/50000/{VIP6}/443"
    assert session_key(p, "mip6-home-address") == SessionKey(SessionKeyKind.MIP6_HOME_ADDRESS, HOME, COA)
    assert session_key(p, "ipv6-iid") == SessionKey(SessionKeyKind.IPV6_IID, "iid:0211:22ff:fe33:4455", COA)
    assert session_key(p, "esp-spi").value == COA


def test_mip6_key_same_at_home_and_away() -> None:
    """Source document claim 7: at home (no option) the source address, which is the home address."""
    away = pkt(syn6_hao())
    home = pkt(raw(IPv6(src=HOME, dst=VIP6) / TCP(sport=50001, dport=443, flags="S")))
    assert session_key(away, "mip6-home-address").value == session_key(home, "mip6-home-address").value
    assert session_key(away, "mip6-home-address").client != session_key(home, "mip6-home-address").client


def test_iid_key_same_across_care_of_addresses() -> None:
    a = pkt(raw(IPv6(src="2001:db8:1::211:22ff:fe33:4455", dst=VIP6) / TCP()))
    b = pkt(raw(IPv6(src="2001:db8:7:7:211:22ff:fe33:4455", dst=VIP6) / TCP()))
    assert session_key(a, "ipv6-iid").value == session_key(b, "ipv6-iid").value
    c = pkt(raw(IPv6(src="2001:db8::1", dst=VIP6) / TCP()))
    assert session_key(c, "ipv6-iid").value == "iid:0000:0000:0000:0001"


def test_esp_spi_key() -> None:
    p = pkt(esp6())
    assert session_key(p, "esp-spi") == SessionKey(SessionKeyKind.ESP_SPI, "spi:0x00000218", COA)
    assert session_key(p, "five-tuple").value == f"50/{COA}/-/{VIP6}/-"


def test_five_tuple_without_ports() -> None:
    p = pkt(raw(IP(src=CLIENT4, dst=VIP4) / ICMP()))
    assert session_key(p, "five-tuple").value == f"1/{CLIENT4}/-/{VIP4}/-"


def test_icmp_error_session_key_matches_the_clients_own_key() -> None:
    client_syn = pkt(syn4())
    err = pkt(raw(IP(src="198.51.100.1", dst=VIP4) / ICMP(type=3, code=4) / _answer4()[:28]))
    for kind in SessionKeyKind:
        k = icmp_error_session_key(err, kind)
        assert k is not None and k.client == CLIENT4
        assert k == session_key(client_syn, kind), kind
    assert icmp_error_session_key(client_syn, "client-ip") is None


def test_icmp6_error_session_key_mobile() -> None:
    client_syn = pkt(syn6_hao())
    orig = raw(
        IPv6(src=VIP6, dst=COA)
        / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOME])
        / TCP(sport=443, dport=50000, flags="SA")
    )
    err = pkt(raw(IPv6(src="2001:db8:ffff::1", dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / orig))
    for kind in ("client-ip", "five-tuple", "mip6-home-address", "ipv6-iid"):
        assert icmp_error_session_key(err, kind) == session_key(client_syn, kind), kind
    assert icmp_error_session_key(err, "esp-spi").value == COA  # the SPI of the other direction is useless


# ---------------------------------------------------------------------------------------------------
# malformed input


def test_empty() -> None:
    assert bad(b"").reason == "empty"


@pytest.mark.parametrize("first", [0x00, 0x15, 0x55, 0x75, 0xF5])
def test_bad_version(first: int) -> None:
    assert bad(bytes([first]) + syn4()[1:]).reason == "bad-ip-version"


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ihl_below_5(ihl: int) -> None:
    data = bytearray(syn4())
    data[0] = 0x40 | ihl
    assert bad(bytes(data)).reason == "bad-ihl"


def test_ihl_beyond_data() -> None:
    data = bytearray(syn4()[:24])
    data[0] = 0x4F
    assert bad(bytes(data)).reason == "truncated-ipv4-header"


def test_total_length() -> None:
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=61) / TCP(options=SYN_OPTS))).reason == "bad-total-length"
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=19) / TCP())).reason == "bad-total-length"
    assert bad(raw(IPv6(src=COA, dst=VIP6, plen=21) / TCP())).reason == "bad-total-length"
    # a capture cut by a copy range is accepted with partial=True when the headers are complete
    cut = raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=1, dport=2) / (b"x" * 500))[:40]
    assert bad(cut).reason == "bad-total-length"
    p = pkt(cut, partial=True)
    assert (p.sport, p.dport, p.length) == (1, 2, 540)


def test_truncated_l4_within_declared_length() -> None:
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=30) / TCP())).reason == "truncated-tcp"
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=40) / TCP(options=SYN_OPTS))).reason == "truncated-tcp"
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=27) / UDP())).reason == "truncated-udp"
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=23) / ICMP())).reason == "truncated-icmp"
    assert bad(raw(IP(src=CLIENT4, dst=VIP4, len=30) / SCTP())).reason == "truncated-sctp"
    assert bad(raw(IPv6(src=COA, dst=VIP6, plen=3) / ESP(spi=1))).reason == "truncated-esp"
    assert (
        bad(raw(IPv6(src=COA, dst=VIP6, plen=12) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOME)]) / TCP())).reason
        == "truncated-ext-header"
    )


def test_bad_tcp_offset() -> None:
    assert bad(raw(IP(src=CLIENT4, dst=VIP4) / TCP(dataofs=4))).reason == "bad-tcp-offset"


def test_bad_options() -> None:
    assert bad(raw(IPv6(src=COA, dst=VIP6) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOME, optlen=8)]) / TCP())).reason in (
        "bad-home-address-option",
        "bad-dest-option",
    )
    # option length that overruns its header
    data = bytearray(raw(IPv6(src=COA, dst=VIP6) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]) / UDP()))
    data[40 + 3] = 40  # PadN length
    assert bad(bytes(data)).reason == "bad-dest-option"
    assert (
        bad(raw(IPv6(src=VIP6, dst=COA) / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOME, HOME]) / TCP())).reason
        == "bad-routing-header"
    )


def test_misplaced_hop_by_hop() -> None:
    assert (
        bad(raw(IPv6(src=COA, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / TCP())).reason
        == "misplaced-hop-by-hop"
    )


def _dest_opts_chain(n: int) -> bytes:
    layers = IPv6(src=COA, dst=VIP6)
    for _ in range(n):
        layers = layers / IPv6ExtHdrDestOpt()
    return raw(layers / UDP(sport=1, dport=2))


def test_extension_header_limit() -> None:
    p = pkt(_dest_opts_chain(MAX_EXT_HEADERS))
    assert (p.proto, p.sport) == (17, 1)
    assert bad(_dest_opts_chain(MAX_EXT_HEADERS + 1)).reason == "too-many-ext-headers"


def test_extension_header_self_loop() -> None:
    """A header whose next header names its own type, over and over, to the end of the packet."""
    body = b"\x3c\x00" + b"\x00" * 6  # next header 60, length 0 (8 bytes)
    data = raw(IPv6(src=COA, dst=VIP6, nh=60, plen=len(body) * 100)) + body * 100
    assert bad(data).reason == "too-many-ext-headers"
    short = raw(IPv6(src=COA, dst=VIP6, nh=60, plen=len(body) * 5)) + body * 5
    assert bad(short).reason == "truncated-ext-header"
    ah_loop = b"\x33\x01" + b"\x00" * 10  # AH -> AH, 12 bytes
    assert bad(raw(IPv6(src=COA, dst=VIP6, nh=51, plen=12 * 40)) + ah_loop * 40).reason == "too-many-ext-headers"
    assert (
        bad(raw(IP(src=CLIENT4, dst=VIP4, proto=51, len=20 + 12 * 40)) + ah_loop * 40).reason == "too-many-ext-headers"
    )


@pytest.mark.parametrize("build", [syn4, syn6_hao, esp6], ids=["tcp4-syn", "ipv6-destopt-tcp", "ipv6-esp"])
def test_every_truncation_point(build) -> None:
    data = build()
    full = pkt(data)
    for n in range(len(data)):
        r = analyze(data[:n])
        assert isinstance(r, Malformed), (n, r)
        assert r.reason in REASONS and r.reason != "internal", (n, r)
        # with a copy range: either malformed, or a packet whose fields are all right
        r = analyze(data[:n], partial=True)
        if isinstance(r, Packet):
            assert (r.sport, r.dport, r.tcp_flags, r.home_address, r.esp_spi) == (
                full.sport,
                full.dport,
                full.tcp_flags,
                full.home_address,
                full.esp_spi,
            ), (n, r)
        else:
            assert r.reason in REASONS and r.reason != "internal", (n, r)


def test_truncation_reasons_tcp4() -> None:
    data = syn4()
    assert analyze(data[:0]).reason == "empty"
    assert {analyze(data[:n]).reason for n in range(1, 20)} == {"truncated-ipv4-header"}
    assert {analyze(data[:n]).reason for n in range(20, 60)} == {"bad-total-length"}
    assert {analyze(data[:n], partial=True).reason for n in range(20, 60)} == {"truncated-tcp"}


def test_truncation_reasons_ipv6_destopt() -> None:
    data = syn6_hao()
    assert {analyze(data[:n]).reason for n in range(1, 40)} == {"truncated-ipv6-header"}
    assert {analyze(data[:n]).reason for n in range(40, len(data))} == {"bad-total-length"}
    assert {analyze(data[:n], partial=True).reason for n in range(40, 64)} == {"truncated-ext-header"}
    assert {analyze(data[:n], partial=True).reason for n in range(64, len(data))} == {"truncated-tcp"}


def _corpus() -> list[bytes]:
    return [
        syn4(),
        syn6_hao(),
        esp6(),
        raw(
            IPv6(src=COA, dst=VIP6)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting(addresses=["2001:db8::5"])
            / IPv6ExtHdrFragment(m=1)
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOME)])
            / AH(nh=17, payloadlen=4, icv=b"\x00" * 12)
            / UDP()
        ),
        raw(IP(src="198.51.100.1", dst=VIP4) / ICMP(type=3, code=4) / _answer4()[:60]),
        raw(IPv6(src="2001:db8:ffff::1", dst=VIP6) / ICMPv6PacketTooBig() / syn6_hao()),
    ]


def test_random_bytes_fuzz() -> None:
    rng = random.Random(20240603)
    kinds = {"packet": 0, "malformed": 0}
    for i in range(5000):
        n = rng.randrange(0, 160)
        data = bytearray(rng.randbytes(n))
        if n and i % 2:
            data[0] = (data[0] & 0x0F) | rng.choice((0x40, 0x60))  # get past the version check
        r = analyze(bytes(data))
        assert isinstance(r, (Packet, Malformed)), r
        if isinstance(r, Malformed):
            assert r.reason in REASONS and r.reason != "internal", r
            kinds["malformed"] += 1
        else:
            kinds["packet"] += 1
        analyze(bytes(data), partial=True)
    assert kinds["malformed"] > 0


def test_mutation_fuzz() -> None:
    """Valid packets with a few random bytes changed: reach deep into the parser."""
    rng = random.Random(7)
    corpus = _corpus()
    for i in range(5000):
        data = bytearray(corpus[i % len(corpus)])
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for partial in (False, True):
            r = analyze(bytes(data), partial=partial)
            assert isinstance(r, (Packet, Malformed)), r
            if isinstance(r, Malformed):
                assert r.reason in REASONS and r.reason != "internal", r
            else:
                for port in (r.sport, r.dport):
                    assert port is None or 0 <= port <= 0xFFFF
                for sk in SessionKeyKind:  # any Packet can be keyed
                    session_key(r, sk)
                    icmp_error_session_key(r, sk)


def test_never_raises_on_odd_types() -> None:
    assert isinstance(analyze(bytearray(syn4())), Packet)
    assert isinstance(analyze(memoryview(syn4())), Packet)
    r = analyze(None)  # type: ignore[arg-type]
    assert isinstance(r, Malformed) and r.reason == "internal"


def test_product_code_imports_no_scapy_or_ipaddress() -> None:
    root = Path(__file__).resolve().parents[2] / "orchestrator" / "analyze"
    for f in root.glob("*.py"):
        tree = ast.parse(f.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        assert not names & {"scapy", "ipaddress", "netaddr"}, (f, names)
