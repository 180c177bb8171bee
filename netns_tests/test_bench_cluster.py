"""`mplsorch lab bench cluster` at a small N, so the benchmark cannot rot: the run itself fails
unless each daemon counted its share of the first packets and both members hold every session;
here its result has every documented key with figures that follow from what was counted."""

from __future__ import annotations

from dataclasses import asdict

from orchestrator.lab.bench import cluster
from orchestrator.lab.bench.cluster_result import build_cluster_result, format_cluster
from orchestrator.lab.kit import Lab

SESSIONS = 600


def test_bench_cluster_measures_both_rates_etcds_writes_and_the_failover_gap(lab: Lab) -> None:
    run = cluster.run(lab, SESSIONS)
    result = build_cluster_result(run)
    print("\n" + format_cluster(result))
    r = asdict(result)
    assert r["sessions"] == SESSIONS and sum(m.count for m in run.members.values()) == SESSIONS
    assert r["single_sessions_per_s"] > 0 and r["cluster_sessions_per_s"] > 0
    # every member held every session only after the last first packet was out
    assert 0 < r["cluster_converged_per_s"] <= r["cluster_sessions_per_s"]
    # the ratio of the unrounded rates: within rounding of the printed ones' (0.457 against 0.458 once)
    assert abs(r["ratios"]["cluster_vs_single"] - r["cluster_sessions_per_s"] / r["single_sessions_per_s"]) < 0.001
    # etcd saw every session's key put (a row per session, some written again on a takeover or a
    # race), in far fewer transactions: one per first-packet batch
    assert SESSIONS <= r["etcd"]["puts"] <= 3 * SESSIONS, r["etcd"]
    assert 0 < r["etcd"]["txns"] < SESSIONS and 0 < r["etcd"]["proposals"]
    # the daemons' own counts agree: every row written once by its owner
    assert r["daemon"]["cluster_rows_written"] >= SESSIONS and 0 < r["daemon"]["cluster_txns"] < SESSIONS
    fo = r["failover"]
    assert fo["sent"] > 200 and fo["received"] == fo["sent"] - fo["lost"]
    assert fo["lost_outside_window"] == 0, fo  # every loss lies between the kill and the routes moved
    assert 0 < fo["gap_ms"] <= fo["lost"] * fo["interval_ms"]
    assert fo["gap_ms"] < 15_000 and fo["reconverge_ms"] < 15_000
    assert fo["kill_to_first_ms"] is not None and 0 < fo["kill_to_first_ms"] < fo["reconverge_ms"] + 1000
