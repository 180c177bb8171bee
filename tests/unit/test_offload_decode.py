"""What the kernel says of our objects' offload, decoded from dumps captured in the kernel lab
(tests/unit/data/offload_dump.json: a netdevsim port's filters and our routes) and from the same
messages with the flags a switchdev driver would set (in_hw with its count, a route's offload,
trap and offload-failed flags): `mplsorch routes` must report each exactly as the kernel says."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from orchestrator.dataplane import offload, ops
from orchestrator.dataplane.netlink import decode, nla
from orchestrator.dataplane.netlink.constants import (
    RTM_F_OFFLOAD,
    RTM_F_OFFLOAD_FAILED,
    RTM_F_TRAP,
    RTNH_F_OFFLOAD,
    RTNH_F_TRAP,
    TCA_CLS_FLAGS_IN_HW,
    TCA_CLS_FLAGS_NOT_IN_HW,
    TCA_CLS_FLAGS_SKIP_HW,
    TCA_CLS_FLAGS_SKIP_SW,
    TCA_FLOWER_FLAGS,
    TCA_FLOWER_IN_HW_COUNT,
    TCA_OPTIONS,
)

DUMP = json.loads((Path(__file__).parent / "data" / "offload_dump.json").read_text())
LINKS = {int(k): v for k, v in DUMP["links"].items()}
FILTERS = [bytes.fromhex(h) for h in DUMP["filters"]]
ROUTES = [bytes.fromhex(h) for h in DUMP["routes"]]
RTM_FLAGS_AT = 8  # struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, then flags


def _flower(body: bytes) -> ops.Installed | None:
    return decode.flower(memoryview(body), LINKS.__getitem__, require_cookie=False)


def _route(body: bytes) -> ops.Installed | None:
    return decode.route(memoryview(body), LINKS.__getitem__)


def _option_offset(body: bytes, kind: int) -> int:
    """Where the u32 value of flower option `kind` sits inside a captured RTM_NEWTFILTER."""
    for attr, payload in nla.iter_attrs(body, nla.TCMSG.size):
        if attr == TCA_OPTIONS:
            options = bytes(payload)
            if kind in nla.attrs(options):
                return body.index(options) + options.index(struct.pack("=HH", 8, kind)) + 4
    raise AssertionError(f"option {kind} not in the captured filter")


def _with_filter_flags(body: bytes, flags: int, in_hw_count: int) -> bytes:
    out = bytearray(body)
    struct.pack_into("=I", out, _option_offset(body, TCA_FLOWER_FLAGS), flags)
    struct.pack_into("=I", out, _option_offset(body, TCA_FLOWER_IN_HW_COUNT), in_hw_count)
    return bytes(out)


def _with_route_flags(body: bytes, flags: int) -> bytes:
    out = bytearray(body)
    struct.pack_into("=I", out, RTM_FLAGS_AT, flags)
    return bytes(out)


def _captured_filters() -> dict[int, bytes]:
    return {i.obj.handle: body for body in FILTERS if (i := _flower(body)) is not None}


def test_the_captured_netdevsim_filters_are_not_in_hw_as_the_kernel_said() -> None:
    filters = _captured_filters()
    assert sorted(filters) == [1, 2]  # 3 (skip_sw) was refused: the kernel keeps no such filter
    auto, never = _flower(filters[1]), _flower(filters[2])
    assert auto is not None and never is not None
    assert auto.obj.offload is ops.OffloadPolicy.AUTO and never.obj.offload is ops.OffloadPolicy.NEVER
    for item in (auto, never):
        assert item.offload == ops.OffloadState(not_in_hw=True)
        assert offload.row(item)["offload"] == "not_in_hw" and offload.row(item)["dev"] == "nsim0"
    assert offload.row(never)["policy"] == "never" and " skip_hw " in never.obj.describe()


@pytest.mark.parametrize(
    "flags,count,policy,state",
    [
        (TCA_CLS_FLAGS_IN_HW, 1, ops.OffloadPolicy.AUTO, ops.OffloadState(in_hw=True, in_hw_count=1)),
        (TCA_CLS_FLAGS_IN_HW, 2, ops.OffloadPolicy.AUTO, ops.OffloadState(in_hw=True, in_hw_count=2)),
        (
            TCA_CLS_FLAGS_SKIP_SW | TCA_CLS_FLAGS_IN_HW,
            1,
            ops.OffloadPolicy.REQUIRED,
            ops.OffloadState(in_hw=True, in_hw_count=1),
        ),
        (TCA_CLS_FLAGS_SKIP_HW | TCA_CLS_FLAGS_NOT_IN_HW, 0, ops.OffloadPolicy.NEVER, ops.OffloadState(not_in_hw=True)),
        (TCA_CLS_FLAGS_NOT_IN_HW, 0, ops.OffloadPolicy.AUTO, ops.OffloadState(not_in_hw=True)),
    ],
    ids=["in_hw", "in_hw on two devices", "skip_sw in_hw", "skip_hw", "not_in_hw"],
)
def test_each_filter_flag_is_decoded(
    flags: int, count: int, policy: ops.OffloadPolicy, state: ops.OffloadState
) -> None:
    item = _flower(_with_filter_flags(_captured_filters()[1], flags, count))
    assert item is not None and item.obj.offload is policy and item.offload == state
    row = offload.row(item)
    assert (row["in_hw"], row["in_hw_count"], row["not_in_hw"]) == (state.in_hw, count, state.not_in_hw)
    assert row["policy"] == policy.value
    assert row["offload"] == (f"in_hw ({count})" if state.in_hw else "not_in_hw")


def _captured_routes() -> dict[type, bytes]:
    return {type(i.obj): body for body in ROUTES if (i := _route(body)) is not None}


def test_the_captured_routes_say_nothing_of_hardware() -> None:
    routes = _captured_routes()
    assert set(routes) == {ops.MplsRoute, ops.EncapRoute}
    for body in routes.values():
        item = _route(body)
        assert item is not None and item.offload == ops.OffloadState()
        assert offload.row(item)["offload"] == "not_in_hw" and offload.row(item)["policy"] is None


@pytest.mark.parametrize("kind", [ops.MplsRoute, ops.EncapRoute])
@pytest.mark.parametrize(
    "flags,state,word",
    [
        (RTM_F_OFFLOAD, ops.OffloadState(in_hw=True), "in_hw"),
        (RTNH_F_OFFLOAD, ops.OffloadState(in_hw=True), "in_hw"),
        (RTM_F_TRAP, ops.OffloadState(trap=True), "trap"),
        (RTNH_F_TRAP, ops.OffloadState(trap=True), "trap"),
        (RTM_F_OFFLOAD_FAILED, ops.OffloadState(failed=True), "offload_failed"),
        (RTM_F_OFFLOAD | RTM_F_OFFLOAD_FAILED, ops.OffloadState(in_hw=True, failed=True), "offload_failed"),
    ],
    ids=["RTM_F_OFFLOAD", "RTNH_F_OFFLOAD", "RTM_F_TRAP", "RTNH_F_TRAP", "RTM_F_OFFLOAD_FAILED", "offload+failed"],
)
def test_each_route_flag_is_decoded(kind: type, flags: int, state: ops.OffloadState, word: str) -> None:
    item = _route(_with_route_flags(_captured_routes()[kind], flags))
    assert item is not None and isinstance(item.obj, kind) and item.offload == state
    row = offload.row(item)
    assert row["offload"] == word
    assert (row["in_hw"], row["trap"], row["offload_failed"]) == (state.in_hw, state.trap, state.failed)


def test_status_counts_every_filter_and_route_by_state_and_never_a_qdisc() -> None:
    filters, routes = _captured_filters(), _captured_routes()
    items = [
        _flower(_with_filter_flags(filters[1], TCA_CLS_FLAGS_IN_HW, 1)),
        _flower(filters[2]),
        _route(_with_route_flags(routes[ops.MplsRoute], RTNH_F_TRAP)),
        _route(_with_route_flags(routes[ops.EncapRoute], RTM_F_OFFLOAD_FAILED)),
        ops.Installed(ops.ClsactQdisc("nsim0")),
    ]
    assert offload.counts(i for i in items if i is not None) == {
        "in_hw": 1,
        "not_in_hw": 1,
        "trap": 1,
        "offload_failed": 1,
    }
    assert offload.row(items[-1])["offload"] is None  # a qdisc has no offload state


def test_the_first_actions_packet_counter_is_decoded() -> None:
    """The lab-captured filters carry their actions' statistics: nothing went through them."""
    for body in _captured_filters().values():
        item = _flower(body)
        assert item is not None and item.packets == 0
