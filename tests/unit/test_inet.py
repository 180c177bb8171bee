"""orchestrator.inet against the C library it replaces on the core's path: the same text for every
address form inet_ntop has a rule for, and the same verdict on what inet_pton accepts."""

from __future__ import annotations

import random
import socket

import pytest

from orchestrator.inet import ntop, ntop4, ntop6, pton


def _libc_pton(text: str) -> tuple[int, bytes] | None:
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            return version, socket.inet_pton(family, text)
        except OSError:
            continue
    return None


def _words(rnd: random.Random) -> bytes:
    """Mostly zero groups and 0xffff, so zero runs, ties and the IPv4 forms come up often."""
    return b"".join(rnd.choice((0, 0, 0, 1, 0xFFFF, rnd.randrange(1 << 16))).to_bytes(2, "big") for _ in range(8))


@pytest.mark.parametrize(
    "text",
    [
        "::",
        "::1",
        "1::",
        "2001:db8::1",
        "2001:db8:0:1::10",
        "1:0:0:2:0:0:0:3",
        "1:0:0:2:0:0:3:4",
        "1:2:3:4:5:6:7:8",
        "1:0:3:4:5:6:7:8",
        "::ffff:10.0.0.1",
        "::10.0.0.1",
        "::ffff:0:10.0.0.1",
        "::1:0:0:1",
        "fe80::1:2",
        "0:0:1::",
    ],
)
def test_ntop6_is_inet_ntop_on_the_rfc_5952_cases(text: str) -> None:
    packed = socket.inet_pton(socket.AF_INET6, text)
    assert ntop6(packed) == ntop(packed) == socket.inet_ntop(socket.AF_INET6, packed)


def test_ntop_is_inet_ntop_on_random_addresses() -> None:
    rnd = random.Random(5952)
    for _ in range(20000):
        packed = _words(rnd)
        assert ntop(packed) == socket.inet_ntop(socket.AF_INET6, packed), packed.hex()
        v4 = packed[:4]
        assert ntop4(v4) == ntop(v4) == socket.inet_ntop(socket.AF_INET, v4)


def test_ntop_refuses_other_lengths() -> None:
    with pytest.raises(ValueError, match="5 bytes"):
        ntop(b"\x01\x02\x03\x04\x05")


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "01.2.3.4",
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4.",
        " 1.2.3.4",
        "0x1.2.3.4",
        "::1",
        "::ffff:1.2.3.4",
        "::ffff:01.2.3.4",
        "1:2:3:4:5:6:1.2.3.4",
        "ABCD::",
        "1::2::3",
        "1:2:3:4:5:6:7:8:9",
        "::00001",
        "fe80::1%eth0",
        "",
        "example.org",
    ],
)
def test_pton_accepts_what_inet_pton_accepts(text: str) -> None:
    expected = _libc_pton(text)
    if expected is None:
        with pytest.raises(ValueError):
            pton(text)
    else:
        assert pton(text) == expected


def test_pton_reads_back_what_ntop_writes() -> None:
    rnd = random.Random(4291)
    for _ in range(2000):
        packed = _words(rnd)
        assert pton(ntop(packed)) == (6, packed)


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4", "0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3.04", "00.0.0.0", "256.1.1.1", "1234.1.1.1", "1.2.3"]
    + ["1.2.3.4.5", "1..2.3", "", " 1.2.3.4", "1.2.3.4\n", "0x1.2.3.4", "1.2.3.+4", "\u0661.2.3.4", "\u00b2.2.3.4"],
)
def test_pton_reads_ipv4_text_as_ipaddress_does(text: str) -> None:
    """pton's own IPv4 parser (no socket on the core's path) against ipaddress's."""
    import ipaddress

    try:
        want: bytes | None = ipaddress.IPv4Address(text).packed
    except ValueError:
        want = None
    try:
        got: bytes | None = pton(text)[1]
    except ValueError:
        got = None
    assert got == want
