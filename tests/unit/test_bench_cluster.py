"""`lab bench cluster` without a lab: etcd's Prometheus counters and their growth, the failover
gap from a stream's missing datagrams, the rates and ratios, the table, the configuration both
phases run and the command line's bounds."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from orchestrator.config.load import parse_config
from orchestrator.config.model import BalancerConfig
from orchestrator.lab.balancer_lab import lab_config
from orchestrator.lab.bench.cluster import BLOCK, LEASE_TTL, MAX_SESSIONS, changes, parse_args, single_changes
from orchestrator.lab.bench.cluster_result import (
    ETCD_COUNTERS,
    ClusterResult,
    ClusterRun,
    StreamRun,
    build_cluster_result,
    etcd_deltas,
    failover,
    format_cluster,
    longest_run,
    prometheus_values,
)
from orchestrator.lab.bench.result import RateRun
from orchestrator.lab.cluster_lab import cluster

JSON_KEYS = [
    "sessions",
    "single_sessions_per_s",
    "cluster_sessions_per_s",
    "cluster_converged_per_s",
    "member_sessions_per_s",
    "offered_per_s",
    "ratios",
    "etcd",
    "etcd_per_session",
    "daemon",
    "daemon_per_session",
    "failover",
]
FAILOVER_KEYS = [
    "interval_ms",
    "sent",
    "received",
    "lost",
    "gap_ms",
    "kill_to_first_ms",
    "reconverge_ms",
    "lost_outside_window",
]


def metrics(puts: float, deletes: float, txns: float, proposals: float, fsyncs: float) -> str:
    """A slice of etcd 3.4's /metrics as it prints it: help and type lines, labelled samples
    with the same prefixes, floats in exponent form."""
    return "\n".join(
        [
            "# HELP etcd_mvcc_put_total Total number of puts seen by this member.",
            "# TYPE etcd_mvcc_put_total counter",
            f"etcd_mvcc_put_total {puts}",
            f"etcd_mvcc_delete_total {deletes}",
            'etcd_mvcc_hash_duration_seconds_bucket{le="0.01"} 0',
            f"etcd_mvcc_txn_total {txns}",
            "etcd_debugging_mvcc_txn_total 0",
            f"etcd_server_proposals_committed_total {proposals}",
            "etcd_server_proposals_committed_total_extra 99",
            'etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} 3',
            f"etcd_disk_wal_fsync_duration_seconds_count {fsyncs}",
            "",
        ]
    )


def test_prometheus_values_reads_unlabelled_samples_and_names_a_missing_one() -> None:
    text = metrics(1e4, 0, 157, 2.0e2, 180)
    got = prometheus_values(text, set(ETCD_COUNTERS.values()))
    assert got["etcd_mvcc_put_total"] == 10_000 and got["etcd_server_proposals_committed_total"] == 200
    assert got["etcd_disk_wal_fsync_duration_seconds_count"] == 180
    with pytest.raises(KeyError, match="etcd_mvcc_range_total"):
        prometheus_values(text, {"etcd_mvcc_range_total"})


def test_etcd_deltas_are_the_growth_under_the_results_names() -> None:
    before, after = metrics(12, 1, 3, 20, 21), metrics(10_012, 5, 160, 230, 240)
    assert etcd_deltas(before, after) == {"puts": 10_000, "deletes": 4, "txns": 157, "proposals": 210, "fsyncs": 219}


def test_longest_run() -> None:
    assert longest_run([]) == (-1, 0)
    assert longest_run([7]) == (7, 1)
    assert longest_run([1, 2, 5, 6, 7, 9]) == (5, 3)
    assert longest_run([1, 2, 3, 10, 11, 12]) == (1, 3)  # the first of equal runs


STREAM = StreamRun(
    interval_s=0.01,
    start=1000.0,
    sent=500,
    missing=[3, *range(200, 240), 260],  # a stray loss early, the failover, one late
    killed_at=1001.985,  # datagram 198.5 was due
    moved_at=1002.395,  # datagram 239.5 was due
)


def test_failover_gap_is_the_longest_run_of_lost_datagrams() -> None:
    f = failover(STREAM)
    assert (f.sent, f.received, f.lost) == (500, 458, 42)
    assert f.gap_ms == 400.0  # 40 datagrams x 10 ms
    assert f.kill_to_first_ms == pytest.approx(415.0)  # datagram 240 (echoed) was due 2.40 s in
    assert f.reconverge_ms == pytest.approx(410.0)
    # 3 lies before the kill's window (198.5 - 5); 260 after the move (239.5 + 1)
    assert f.lost_outside_window == 2


def test_failover_without_loss_and_without_recovery() -> None:
    none_lost = failover(replace(STREAM, missing=[]))
    assert none_lost.gap_ms == 0 and none_lost.lost == 0 and none_lost.lost_outside_window == 0
    assert none_lost.kill_to_first_ms == pytest.approx(5.0)  # datagram 199, the first due after the kill
    never_back = failover(replace(STREAM, missing=list(range(200, 500))))
    assert never_back.kill_to_first_ms is None and never_back.gap_ms == 3000.0


RUN = ClusterRun(
    single=RateRun(10_000, 20.0, 2.0),  # 500/s
    members={"lb1": RateRun(5000, 24.0, 1.0), "lb2": RateRun(5000, 25.0, 1.25)},
    cluster_elapsed_s=25.0,  # 400/s
    converged_s=40.0,  # 250/s
    etcd={"puts": 10_040, "deletes": 0, "txns": 160, "proposals": 200, "fsyncs": 210},
    daemon={"cluster_txns": 150, "cluster_rows_written": 10_000},
    stream=STREAM,
)


def test_rates_ratios_and_per_session_figures() -> None:
    r = build_cluster_result(RUN)
    assert (r.sessions, r.single_sessions_per_s, r.cluster_sessions_per_s, r.cluster_converged_per_s) == (
        10_000,
        500.0,
        400.0,
        250.0,
    )
    assert r.ratios == {"cluster_vs_single": 0.8, "converged_vs_single": 0.5}
    assert r.member_sessions_per_s == {"lb1": 208.3, "lb2": 200.0}
    assert r.offered_per_s == {"single": 5000.0, "cluster": 8000.0}  # N over the longer sender's time
    assert r.etcd_per_session == {"puts": 1.004, "deletes": 0.0, "txns": 0.016, "proposals": 0.02, "fsyncs": 0.021}
    assert r.daemon_per_session == {"cluster_txns": 0.015, "cluster_rows_written": 1.0}
    assert r.failover["gap_ms"] == 400.0 and r.failover["lost_outside_window"] == 2
    json.dumps(asdict(r))


def test_the_phases_must_have_flooded_the_same_number() -> None:
    with pytest.raises(ValueError, match="9999"):
        build_cluster_result(replace(RUN, members={"lb1": RateRun(5000, 1, 1), "lb2": RateRun(4999, 1, 1)}))


def test_json_fields_are_the_documented_ones_in_order() -> None:
    assert [f.name for f in fields(ClusterResult)] == JSON_KEYS
    assert list(build_cluster_result(RUN).failover) == FAILOVER_KEYS


def test_table_prints_rates_ratios_writes_and_the_gap() -> None:
    table = format_cluster(build_cluster_result(RUN))
    assert "(a) one balancer, no cluster mode" in table and "500.0" in table
    assert "400.0" in table and "0.80" in table and "b/a" in table
    assert "puts 1.004" in table and "cluster_rows_written 1.000" in table
    assert "failover gap 400 ms" in table and "kill to first datagram through the survivor 415 ms" in table


def test_both_phases_run_the_same_configuration_but_for_cluster() -> None:
    c = changes(10_000)
    first, last = c["labels.range"]
    assert (last - first + 1) // 2 >= 10_000 + 4 * BLOCK  # every session and each member's spare blocks
    assert last < 100_000 and changes(MAX_SESSIONS)["labels.range"][1] < 100_000  # the lab's platform_labels
    assert single_changes(10_000) == {k: v for k, v in c.items() if not str(k).startswith("cluster.")}
    single = parse_config(lab_config(Path("/run/x.sock"), single_changes(10_000)))
    member = parse_config(lab_config(Path("/run/x.sock"), {**cluster("lb1", "10.254.0.2"), **c}))
    assert isinstance(single, BalancerConfig) and isinstance(member, BalancerConfig)
    assert single.cluster is None and member.cluster is not None
    assert (member.cluster.label_block, member.cluster.lease_ttl) == (BLOCK, LEASE_TTL)
    assert single.labels == member.labels and single.services == member.services


def test_command_line_defaults_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args([])
    assert (args.sessions, args.json) == (10_000, False)
    assert parse_args(["--sessions", str(MAX_SESSIONS), "--json"]).json
    for bad in ("1", str(MAX_SESSIONS + 1)):
        with pytest.raises(SystemExit):
            parse_args(["--sessions", bad])
    assert "--sessions 2..30000" in capsys.readouterr().err
