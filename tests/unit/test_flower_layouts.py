"""The layout decoder of a dump's flower filters (dataplane/netlink/layouts.py) against
decode.flower, which it must equal bit for bit: C2S filters captured in the kernel lab
(tests/unit/data/restart_filters.json, a restart bench's dump: the chain's header message and 12
filters with their statistics), the same messages with their values changed (decoded by the
layout learnt from the first) and with a header changed (another layout: decoded by
decode.flower). Generated filters and random mutations: test_properties.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import decode, layouts, nla
from orchestrator.dataplane.netlink.constants import TCA_OPTIONS

DUMP = json.loads((Path(__file__).parent / "data" / "restart_filters.json").read_text())
LINKS = {int(k): v for k, v in DUMP["links"].items()}
FILTERS = [bytes.fromhex(h) for h in DUMP["filters"]]


def reference(body: bytes) -> ops.Installed | None:
    return decode.flower(memoryview(body), LINKS.__getitem__)


def test_a_captured_dump_decodes_as_decode_flower_through_one_learnt_layout() -> None:
    flower = layouts.FlowerDecoder()
    got = [flower(memoryview(body), LINKS.__getitem__) for body in FILTERS]
    want = [reference(body) for body in FILTERS]
    assert got == want
    assert [g.packets if g else None for g in got] == [w.packets if w else None for w in want]
    assert got[0] is None and all(isinstance(g.obj, ops.FlowerFilter) for g in got[1:] if g)  # the chain's header
    assert len({w.obj.tag for w in want[1:] if w}) == 12  # 12 sessions' records, each its own
    assert [len(v) for v in flower.layouts.values()] == [1]  # learnt on the first filter, used by 11


def _option_offset(body: bytes, needle: bytes) -> int:
    options = next(bytes(p) for kind, p in nla.iter_attrs(body, nla.TCMSG.size) if kind == TCA_OPTIONS)
    return body.index(options) + options.index(needle)


def test_changed_values_are_read_where_the_layout_says_and_a_changed_header_falls_back() -> None:
    flower = layouts.FlowerDecoder()
    first = FILTERS[1]
    assert flower(memoryview(first), LINKS.__getitem__) == reference(first)
    changed = bytearray(first)
    struct.pack_into("=I", changed, 8, 0x12345)  # the handle (tcmsg)
    src = reference(first).obj.match.src  # type: ignore[union-attr]
    at = _option_offset(first, bytes(map(int, src.split("/")[0].split("."))))
    changed[at : at + 4] = bytes([192, 0, 2, 77])  # the client address
    got = flower(memoryview(bytes(changed)), LINKS.__getitem__)
    assert got == reference(bytes(changed)) and got is not None
    assert got.obj.handle == 0x12345 and got.obj.match.src == "192.0.2.77/32"  # type: ignore[union-attr]
    # A header of another length: the message fits no layout and decode.flower reads it.
    other = bytearray(first)
    at = _option_offset(first, struct.pack("=HH", 5, 9))  # TCA_FLOWER_KEY_IP_PROTO's header
    other[at + 2 : at + 4] = struct.pack("=H", 99)  # an attribute type no decoder reads
    assert flower(memoryview(bytes(other)), LINKS.__getitem__) == reference(bytes(other))
    assert reference(bytes(other)).obj.match.ip_proto is None  # type: ignore[union-attr]
