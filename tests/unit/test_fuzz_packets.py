"""The lab fuzz's corpus (orchestrator.lab.fuzz_packets) and its sender's frames: deterministic
from a seed, every analyser reason and both key kinds of the example configuration reached, the
outcome each mutant carries is the analyser's on what the kernel hands over, sources follow the
outcome, and the model of the kernel's IPv6 defragmentation (kernel_view) is what the lab showed."""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from pathlib import Path

from scapy.layers.inet import TCP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrRouting

from orchestrator.analyze.keys import SessionKeyKind, session_key
from orchestrator.analyze.packet import REASONS, Malformed, Packet, analyze
from orchestrator.inet import ntop6
from orchestrator.lab import fuzz_send
from orchestrator.lab.fuzz_packets import KINDS, MAX_SIZE, VALID, Mutant, Targets, corpus, kernel_view, outcomes

TARGETS = Targets(
    vip4="10.0.0.100",
    vip6="fd00:100::100",
    session4=("10.0.1.100", "10.0.1.101"),
    session6=("fd00:1::100", "fd00:1::101"),
    spoofed4=("10.0.1.200", "10.0.1.201", "10.0.1.202"),
    spoofed6=("fd00:1::f:1", "fd00:1::f:2", "fd00:1::f:3"),
    homes=("fd00:99::1", "fd00:99::2"),
)
N = 20_000


def _take(seed: int, n: int = N) -> list[Mutant]:
    return list(itertools.islice(corpus(seed, TARGETS), n))


def _src(data: bytes) -> str:
    return ntop6(data[8:24]) if data[0] >> 4 == 6 else ".".join(str(b) for b in data[12:16])


def test_the_corpus_is_a_function_of_its_seed() -> None:
    a, b, c = _take(7, 2000), _take(7, 2000), _take(8, 2000)
    assert a == b
    assert sum(x.data != y.data for x, y in zip(a, c)) > 1900
    assert len({m.data for m in a}) > 1900  # mutants, not copies


def test_every_reason_and_kind_is_reached_and_each_outcome_is_the_analysers() -> None:
    mutants = _take(1)
    seen = Counter(m.outcome for m in mutants)
    assert set(seen) == (REASONS - {"internal"}) | {VALID}  # "internal" is a bug by definition
    assert {m.kind for m in mutants} == set(KINDS)
    for m in mutants:
        result = analyze(kernel_view(m.data))
        assert (result.reason if isinstance(result, Malformed) else VALID) == m.outcome, m
        assert len(m.data) <= MAX_SIZE
    # The bulk is malformed where the kernel lets it through (IPv6 headers it does not read).
    queued_kinds = {"v6-chain-long", "v6-ext-loop", "v6-misplaced-hop-by-hop", "v6-bad-dest-option"}
    queued_kinds |= {"v6-bad-home-address-option", "v6-bad-routing-header", "v6-bad-esp"}
    assert sum(m.kind in queued_kinds for m in mutants) > 0.75 * len(mutants)
    assert outcomes(1, TARGETS, 1000) == Counter(m.outcome for m in mutants[:1000])


def test_valid_mutants_reach_every_key_kind_of_the_example_configuration() -> None:
    """client-ip (IPv4 TCP and UDP, IPv6 ESP) and mip6-home-address: a Home Address Option, a
    type 2 routing header, and the source address when neither is there."""
    keys: Counter[tuple[str, str]] = Counter()
    for m in _take(2):
        if m.outcome != VALID:
            continue
        pkt = analyze(kernel_view(m.data))
        assert isinstance(pkt, Packet)
        if pkt.version == 4:
            keys[("client-ip", {6: "tcp", 17: "udp"}[pkt.proto])] += 1
            assert session_key(pkt, SessionKeyKind.CLIENT_IP).value in TARGETS.session4
        elif pkt.proto == 50:
            keys[("client-ip", "esp")] += 1
        elif pkt.proto == 6:
            value = session_key(pkt, SessionKeyKind.MIP6_HOME_ADDRESS).value
            keys[("mip6-home-address", "source" if pkt.home_address is None else "home")] += 1
            assert value == (pkt.home_address or pkt.src)
            if m.kind == "v6-home-address":
                assert value in TARGETS.homes
    assert set(keys) == {
        ("client-ip", "tcp"),
        ("client-ip", "udp"),
        ("client-ip", "esp"),
        ("mip6-home-address", "home"),
        ("mip6-home-address", "source"),
    }, keys


def test_sources_follow_the_outcome() -> None:
    """Valid mutants come from the few session addresses (their sessions are few and end),
    malformed ones from the spoofed pool; what has no source field keeps none."""
    for m in _take(3, 5000):
        if len(m.data) < 20 or m.data[0] >> 4 not in (4, 6) or (m.data[0] >> 4 == 6 and len(m.data) < 40):
            continue
        v6 = m.data[0] >> 4 == 6
        pool = (TARGETS.session6 if v6 else TARGETS.session4) if m.outcome == VALID else None
        spoofed = TARGETS.spoofed6 if v6 else TARGETS.spoofed4
        if pool is not None:
            assert _src(m.data) in pool, m
        elif v6 or m.data[0] & 15 >= 5:
            assert _src(m.data) in spoofed, m


def test_ipv4_mutants_that_the_kernel_takes_have_a_good_header_checksum() -> None:
    for m in _take(4, 5000):
        if m.kind in ("v4-tcp-options", "v4-ip-options", "v4-trailer"):
            hl = (m.data[0] & 15) * 4
            words = struct.unpack(f"!{hl // 2}H", m.data[:hl])
            total = sum(words)
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            assert total == 0xFFFF, m


def test_kernel_view_removes_an_atomic_fragment_header() -> None:
    pkt = bytes(
        IPv6(src="fd00:1::5", dst="fd00:100::100")
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(offset=0, m=0, id=7)
        / TCP(dport=80, flags="S")
    )
    seen = kernel_view(pkt)
    assert seen == bytes(IPv6(src="fd00:1::5", dst="fd00:100::100") / IPv6ExtHdrDestOpt() / TCP(dport=80, flags="S"))
    # Not a fragment at all, or a real fragment (the kernel waits for the rest): as sent.
    plain = bytes(IPv6(src="fd00:1::5", dst="fd00:100::100") / TCP(dport=80))
    assert kernel_view(plain) == plain
    real = bytes(IPv6(dst="fd00:100::100") / IPv6ExtHdrFragment(offset=0, m=1) / TCP(dport=80))
    assert kernel_view(real) == real


def test_kernel_view_keeps_the_kernels_u8_offset_of_the_header_before_the_fragment_header() -> None:
    """The kernel's find_prev_fhdr() keeps the offset of the next-header byte before the fragment
    header in a u8: below 256 the byte is set right; at 288 it lands at 288 % 256 = 32, in the
    destination address, and the header at 288 keeps pointing at a fragment header that is gone.
    That is how the lab fuzz's daemon saw addresses with 0x2c in them."""

    def dest() -> IPv6ExtHdrDestOpt:
        return IPv6ExtHdrDestOpt(options=[HAO(hoa="fd00:99::1")])  # 24 bytes

    near = bytes(IPv6(dst="fd00:100::100") / dest() / IPv6ExtHdrFragment(offset=0, m=0) / TCP(dport=80, flags="S"))
    assert kernel_view(near)[40] == 6  # the destination options header now points at TCP
    far = bytes(
        IPv6(src="fd00:1::101", dst="fd00:100::100")
        / dest()
        / dest()  # 40..88
        / IPv6ExtHdrRouting(type=0, addresses=["::1"] * 12)  # 88..288
        / dest()  # 288..312: the header before the fragment header
        / IPv6ExtHdrFragment(offset=0, m=0)
        / TCP(dport=80, flags="S")
    )
    assert far[288] == 44 and far[32] == 0
    seen = kernel_view(far)
    assert len(seen) == len(far) - 8
    assert seen[288] == 44 and seen[32] == 6  # TCP's number landed in the destination address
    assert seen[:32] == far[:4] + struct.pack("!H", len(far) - 48) + far[6:32]


def test_the_senders_frames_rotate_spoofed_sources_and_carry_the_right_ethertype() -> None:
    spec = {
        "seed": 5,
        "distinct": 500,
        "dst_mac": "02:00:00:00:00:01",
        "src_mac": "02:00:00:00:00:02",
        "targets": {**TARGETS.__dict__},
    }
    frames, kinds, outs, rotate = fuzz_send.build(spec)
    assert len(frames) == len(kinds) == len(outs) == len(rotate) == 500
    assert outs == [m.outcome for m in _take(5, 500)]
    for frame, out, rot in zip(frames, outs, rotate):
        assert frame[:12] == bytes.fromhex("020000000001020000000002")
        version = frame[14] >> 4 if len(frame) > 14 else None
        assert frame[12:14] == (b"\x86\xdd" if version == 6 else b"\x08\x00")
        assert rot == (version == 6 and out != VALID and len(frame) >= 54)


def test_the_sender_paces_by_the_depth_of_all_queues(tmp_path: Path) -> None:
    """/proc/PID/net/netfilter/nfnetlink_queue: the third column of each queue, added up; a
    daemon gone (no file) is no depth."""
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("    0  12345   700 2 65535     0     0  9000  1\n    1 -4000   123 2 65535     0     0  8000  1\n")
    assert fuzz_send.queue_depth(proc) == 823
    assert fuzz_send.queue_depth(tmp_path / "gone") == 0
