"""`lab bench restart`'s pure parts: the synthetic first packets, the label range, the log lines
it reads, and the generated sessions, which a fresh core restores exactly from the kernel."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from orchestrator.analyze.packet import Packet, analyze
from orchestrator.core.balancer import Balancer
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.lab.bench import restart
from tests.unit.conftest import VIP, config


def test_synthetic_first_packets_are_distinct_udp_to_the_vip() -> None:
    addresses = restart.clients(3)
    assert addresses == ["10.64.0.0", "10.64.0.1", "10.64.0.2"]
    info = analyze(restart.udp_packet(addresses[1], VIP, 40000, 53))
    assert isinstance(info, Packet)
    assert (info.src, info.dst, info.proto, info.sport, info.dport) == ("10.64.0.1", VIP, 17, 40000, 53)
    assert [len(c) for c in restart.chunks(restart.clients(5), 2)] == [2, 2, 1]


def test_the_label_range_holds_the_sessions_and_the_spare_pairs() -> None:
    first, last = restart.label_range(100000)
    assert first % 2 == 1 and last % 2 == 0
    assert (last - first + 1) // 2 == 100000 + restart.SPARE_PAIRS
    config({"labels.range": [first, last]})  # the configuration accepts it


def test_the_log_lines_are_read_back() -> None:
    log = (
        "2026-11-30 05:00:00,000 mplsorch INFO restored 100003 sessions from the kernel in 2.50 s "
        "(dumps 1.50 s, table and stale objects 1.00 s)\n"
        "2026-11-30 05:00:01,000 mplsorch INFO reconciled with the kernel in 3.10 s "
        "(restore 2.50 s, ruleset and fast-path sets 0.60 s)\n"
    )
    assert restart.parse_log(log) == (100003, 3.10, 2.50, 1.50)
    with pytest.raises(ValueError):
        restart.parse_log("balancer running")


def test_generated_sessions_are_installed_and_restored_exactly() -> None:
    cfg = config({"labels.range": restart.label_range(50), "services.dns.persistence_timeout": "3600s"})
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    hop = ops.NextHop("lan0", "10.0.1.10")
    restart.generate(cfg, kernel, VIP, hop, 50)
    fresh = Balancer(cfg, 0.0)
    assert fresh.restore(kernel.dump(), frozenset(), 0.0) == []  # nothing stale
    assert len(fresh.table) == 50
    assert {s.key.value for s in fresh.table} == set(restart.clients(50))
    assert len({s.c2s for s in fresh.table}) == 50 and {s.service for s in fresh.table} == {"dns"}
    # A second run goes on from what the kernel holds: no label taken twice.
    restart.generate(cfg, kernel, "10.0.0.100", hop, 0)
    with pytest.raises(RuntimeError):  # the same clients again: no new session for them
        restart.generate(cfg, kernel, VIP, hop, 10)


def test_the_result_prints_and_its_json_keys_are_the_documented_ones() -> None:
    result = restart.RestartResult(100003, 100000, 40.0, 3.1, 2.5, 1.5, 9.0, 3, 1500, 0, 2800, 2400, 350, True)
    text = restart.format_result(result)
    assert (
        "reconcile (daemon)       3.10 s (restore 2.50 s, of which dumps 1.50 s)" in text
        and "1500 datagrams sent, 0 lost" in text
        and "ruleset and sets         kept (the kernel held them)" in text
    )
    keys = set(json.loads(json.dumps(asdict(result))))
    documented = open("docs/json.md").read()
    assert all(f"`{k}`" in documented for k in keys), keys
