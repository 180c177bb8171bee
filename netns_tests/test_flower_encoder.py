"""Our cls_flower encoder (act_mpls, act_skbedit, act_gact pass) against `tc`: the same filter made both ways reads back the
same from the kernel; offload policy and state are what the kernel says."""

from __future__ import annotations

import dataclasses
import errno
from typing import Iterator

import pytest

from netns_tests.harness.reference import balancer_node
from orchestrator.dataplane import ops
from orchestrator.lab.kit import Lab

TC_DEV, OURS_DEV = "tcref0", "ours0"

CASES = [
    (
        [
            "protocol",
            "ip",
            "pref",
            "10",
            "handle",
            "1",
            "flower",
            "src_ip",
            "10.0.1.10",
            "dst_ip",
            "10.0.0.100",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "1001",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "102",
        ],
        ops.FlowerFilter(
            OURS_DEV, 1, ops.FlowerMatch(src="10.0.1.10/32", dst="10.0.0.100/32"), ops.push_stack((102, 1001))
        ),
    ),
    (
        [
            "protocol",
            "ip",
            "pref",
            "11",
            "handle",
            "7",
            "flower",
            "skip_hw",
            "ip_proto",
            "tcp",
            "src_ip",
            "10.0.1.0/24",
            "dst_ip",
            "10.0.0.100",
            "dst_port",
            "80",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "1003",
            "ttl",
            "64",
        ],
        ops.FlowerFilter(
            OURS_DEV,
            7,
            ops.FlowerMatch(src="10.0.1.0/24", dst="10.0.0.100/32", ip_proto="tcp", dst_port=80),
            (ops.MplsPush(1003, ttl=64),),
            pref=11,
            offload=ops.OffloadPolicy.NEVER,
        ),
    ),
    (
        [
            "protocol",
            "ipv6",
            "pref",
            "12",
            "handle",
            "9",
            "flower",
            "ip_proto",
            "udp",
            "src_ip",
            "2001:db8::/64",
            "dst_ip",
            "2001:db8:ff::100",
            "src_port",
            "5000",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "1005",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "103",
        ],
        ops.FlowerFilter(
            OURS_DEV,
            9,
            ops.FlowerMatch(src="2001:db8::/64", dst="2001:db8:ff::100/128", ip_proto="udp", src_port=5000),
            ops.push_stack((103, 1005)),
            pref=12,
        ),
    ),
    (
        [
            "protocol",
            "ip",
            "pref",
            "13",
            "handle",
            "3",
            "flower",
            "dst_ip",
            "10.0.0.0/8",
            "action",
            "mpls",
            "pop",
            "protocol",
            "ipv4",
        ],
        ops.FlowerFilter(OURS_DEV, 3, ops.FlowerMatch(dst="10.0.0.0/8"), (ops.MplsPop("ip"),), pref=13),
    ),
    (
        [
            "protocol",
            "ip",
            "pref",
            "14",
            "handle",
            "5",
            "flower",
            "ip_proto",
            "sctp",
            "dst_ip",
            "10.0.0.100",
            "dst_port",
            "3868",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "1007",
        ],
        ops.FlowerFilter(
            OURS_DEV,
            5,
            ops.FlowerMatch(dst="10.0.0.100/32", ip_proto="sctp", dst_port=3868),
            (ops.MplsPush(1007),),
            pref=14,
        ),
    ),
    (
        [
            "protocol",
            "ipv6",
            "pref",
            "15",
            "handle",
            "6",
            "flower",
            "ip_proto",
            "0x32",
            "dst_ip",
            "2001:db8:ff::100",
            "action",
            "mpls",
            "push",
            "protocol",
            "mpls_uc",
            "label",
            "1009",
        ],
        ops.FlowerFilter(
            OURS_DEV, 6, ops.FlowerMatch(dst="2001:db8:ff::100/128", ip_proto="esp"), (ops.MplsPush(1009),), pref=15
        ),
    ),
    # The server agent's learning filter: an MPLS packet's top label into the packet mark.
    (
        [
            "protocol",
            "mpls_uc",
            "pref",
            "20",
            "handle",
            "1001",
            "flower",
            "mpls_label",
            "1001",
            "action",
            "skbedit",
            "mark",
            "1835009001",
        ],
        ops.FlowerFilter(
            OURS_DEV, 1001, ops.FlowerMatch(mpls_label=1001), (ops.SetMark(0x6D6003E9),), ops.Direction.INGRESS, pref=20
        ),
    ),
    # The balancer's liveness filter of a label-aware session: counts [C2S] and lets it pass.
    (
        [
            "protocol",
            "mpls_uc",
            "pref",
            "21",
            "handle",
            "256256",
            "flower",
            "mpls_label",
            "1001",
            "action",
            "gact",
            "pass",
        ],
        ops.FlowerFilter(
            OURS_DEV, 256256, ops.FlowerMatch(mpls_label=1001), (ops.Pass(),), ops.Direction.INGRESS, pref=21
        ),
    ),
]


@pytest.fixture(scope="module")
def devices(lab: Lab) -> Iterator[str]:
    lb = balancer_node(lab)
    for dev in (TC_DEV, OURS_DEV):
        lab.sh(lb, "ip", "link", "add", dev, "type", "dummy")
        lab.sh(lb, "ip", "link", "set", dev, "up")
        lab.sh(lb, "tc", "qdisc", "add", "dev", dev, "clsact")
    yield lb
    for dev in (TC_DEV, OURS_DEV):
        lab.sh(lb, "ip", "link", "del", dev, check=False)


@pytest.mark.parametrize(
    "tc_args, ours",
    CASES,
    ids=["reference", "tcp-port-ttl", "ipv6-udp", "pop", "sctp-port", "ipv6-esp", "mpls-label-mark", "liveness-pass"],
)
def test_same_filter_reads_back_the_same(lab: Lab, devices: str, tc_args: list[str], ours: ops.FlowerFilter) -> None:
    lb = devices
    lab.sh(lb, "tc", "filter", "add", "dev", TC_DEV, str(ours.direction), *tc_args)
    results = lab.provider(lb).apply([ops.Add(ours)])
    assert results[0].ok, str(results[0])
    theirs = [
        i.obj
        for i in lab.provider(lb).dump_filters(TC_DEV, ours.direction, ours_only=False)
        if i.obj.handle == ours.handle and i.obj.pref == ours.pref
    ]
    mine = [
        i.obj
        for i in lab.provider(lb).dump_filters(OURS_DEV, ours.direction)
        if i.obj.handle == ours.handle and i.obj.pref == ours.pref
    ]
    assert mine == [ours]
    assert theirs == [dataclasses.replace(ours, dev=TC_DEV)]
    # tc's own reading of our filter matches its reading of its own, line for line.
    show = ["tc", "filter", "show", "dev"]
    tail = [str(ours.direction), "pref", str(ours.pref)]
    ours_text = lab.sh(lb, *show, OURS_DEV, *tail).stdout
    tc_text = lab.sh(lb, *show, TC_DEV, *tail).stdout

    def normal(text: str) -> list[str]:
        return [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith(("index", "cookie"))
        ]

    assert normal(ours_text) == normal(tc_text)


def test_filters_made_by_tc_are_not_ours(lab: Lab, devices: str) -> None:
    assert all(i.obj.dev != TC_DEV for i in lab.provider(devices).dump())


def test_offload_state_and_required_policy(lab: Lab, devices: str) -> None:
    lb = devices
    state = {i.obj.handle: i.offload for i in lab.provider(lb).dump_filters(OURS_DEV)}
    assert state[1] == ops.OffloadState(not_in_hw=True) and state[1].describe() == "not_in_hw"
    required = ops.FlowerFilter(
        OURS_DEV,
        42,
        ops.FlowerMatch(src="10.9.9.9/32"),
        ops.push_stack((5,)),
        pref=14,
        offload=ops.OffloadPolicy.REQUIRED,
    )
    result = lab.provider(lb).apply([ops.Add(required)])[0]
    assert not result.ok and result.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    assert f"offload required but device {OURS_DEV} cannot offload" in result.error
    assert all(i.obj.handle != 42 for i in lab.provider(lb).dump_filters(OURS_DEV))
