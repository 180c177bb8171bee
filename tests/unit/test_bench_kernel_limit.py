"""`lab bench setup`'s kernel limit without a kernel: the balancer core plans the daemon's own
objects per session, and they become the iproute2 and nft batch lines the lab times."""

from __future__ import annotations

import pytest

from orchestrator.dataplane import ops
from orchestrator.lab.bench import kernel_limit as k


def test_the_core_plans_one_filter_one_label_route_one_fast_path_element_per_session() -> None:
    objects = k.plan_sessions(300)  # more than one planning batch
    assert k.per_session(objects, 300) == {"FastPathElement": 1.0, "FlowerFilter": 1.0, "MplsRoute": 1.0}
    filters = [op.obj for op in objects.operations if isinstance(op.obj, ops.FlowerFilter)]
    assert len({f.match.src for f in filters}) == 300 and {f.match.dst for f in filters} == {"10.0.0.100/32"}
    assert {e.port for e in objects.elements} == {53}


def test_batch_lines_carry_what_the_daemon_encodes() -> None:
    lines = k.batches(k.plan_sessions(2))
    assert {tool: len(text) for tool, text in lines.items()} == {"tc": 2, "ip": 2, "nft": 2}
    tc = lines["tc"][0].split()
    assert tc[:8] == ["filter", "add", "dev", "fab0", "egress", "protocol", "ip", "pref"]
    assert "src_ip" in tc and tc[tc.index("src_ip") + 1] == "10.64.0.1/32" and "dst_port" in tc
    pushes = [tc[i + 4] for i, word in enumerate(tc) if word == "push"]
    c2s = int(pushes[0])
    assert len(pushes) == 2 and c2s % 2 == 1  # C2S innermost first, then the transport label
    assert tc[tc.index("cookie") + 1].startswith(b"mplsorch".hex())  # the ownership mark and tag
    assert lines["ip"][0] == f"route add {c2s + 1} via inet 10.0.1.10 dev lan0"
    assert lines["nft"][0] == "add element inet mplsorch fast4 { 10.64.0.1 . 10.0.0.100 . udp . 53 }"


def test_rendering_refuses_what_it_cannot_write() -> None:
    route = ops.MplsRoute(1002, "fab0", via="10.255.0.2", out_labels=(101, 1001))
    assert k.mpls_route_line(route) == "route add 1002 as 101/1001 via inet 10.255.0.2 dev fab0"
    with pytest.raises(ValueError):
        k.nft_line(ops.FastPathElement("10.0.0.1", "10.0.0.100", "esp", spi=7))
    with pytest.raises(ValueError):
        k.batches(k.SessionObjects(operations=(ops.Delete(route),), elements=()))


def test_the_limit_is_sessions_over_the_summed_batch_times() -> None:
    assert k.KernelLimit(1000, {"tc": 1.0, "ip": 0.25, "nft": 0.75}).per_s == 500
