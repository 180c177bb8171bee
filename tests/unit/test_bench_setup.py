"""`lab bench setup` without a lab: the result (the --json fields of docs/json.md) and its table,
the command line's bounds, and the label range it gives the daemon."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest

from orchestrator.lab.bench.balancer import label_range
from orchestrator.lab.bench.result import Latency, RateRun, SetupResult, build_result, format_table
from orchestrator.lab.bench.setup import BACKLOG, MAX_SAMPLES, MAX_SESSIONS, parse_args

JSON_KEYS = [
    "sessions",
    "samples",
    "sessions_per_s",
    "ipvs_connections_per_s",
    "setup_ratio",
    "added_latency_p50_ms",
    "added_latency_p99_ms",
    "ipvs_added_latency_p50_ms",
    "ipvs_added_latency_p99_ms",
    "latency_p50_ratio",
    "latency_p99_ratio",
    "connect_new_p50_ms",
    "connect_existing_p50_ms",
    "ipvs_connect_new_p50_ms",
    "ipvs_connect_existing_p50_ms",
    "offered_per_s",
    "ipvs_offered_per_s",
    "syn_retransmits",
    "ipvs_syn_retransmits",
]


def _result() -> object:
    ours, theirs = RateRun(2000, 4.0, 1.0), RateRun(2000, 0.5, 0.5)
    our_lat = Latency([(0.030, 0.010)] * 98 + [(0.110, 0.010)] * 2)
    their_lat = Latency([(0.0105, 0.010)] * 98 + [(0.015, 0.010)] * 2)
    return build_result(ours, theirs, our_lat, their_lat)


def test_result_rates_latencies_and_ratios() -> None:
    r = _result()
    d = asdict(r)  # type: ignore[call-overload]
    assert d["sessions_per_s"] == 500 and d["ipvs_connections_per_s"] == 4000
    assert d["setup_ratio"] == 0.125
    assert d["added_latency_p50_ms"] == 20 and d["ipvs_added_latency_p50_ms"] == 0.5
    assert d["latency_p50_ratio"] == 40
    assert d["added_latency_p99_ms"] == 100 and d["ipvs_added_latency_p99_ms"] == 5
    assert d["latency_p99_ratio"] == 20
    assert d["connect_new_p50_ms"] == 30 and d["connect_existing_p50_ms"] == 10
    assert d["offered_per_s"] == 2000 and d["ipvs_offered_per_s"] == 4000
    assert d["sessions"] == 2000 and d["samples"] == 100
    json.dumps(d)  # one JSON object, as --json prints it


def test_a_reference_without_added_latency_gives_no_ratio() -> None:
    ours, theirs = RateRun(10, 1.0, 1.0), RateRun(10, 1.0, 1.0)
    r = build_result(ours, theirs, Latency([(0.02, 0.01)]), Latency([(0.01, 0.011)]))
    assert r.latency_p50_ratio is None and r.ipvs_added_latency_p50_ms == -1.0
    assert "-" in format_table(r).splitlines()[4].split()[-1]


def test_table_shows_both_systems_and_ratios_side_by_side() -> None:
    lines = format_table(_result()).splitlines()  # type: ignore[arg-type]
    assert lines[1].split() == ["balancer", "IPVS", "ratio"]
    assert lines[2].split()[-3:] == ["500", "4000", "0.12"]
    assert lines[4].split()[-3:] == ["20.00", "0.50", "40.00"]
    assert lines[5].split()[-3:] == ["100.00", "5.00", "20.00"]


def test_json_fields_are_the_documented_ones_in_order() -> None:
    assert [f.name for f in fields(SetupResult)] == JSON_KEYS
    assert list(asdict(_result())) == JSON_KEYS  # type: ignore[call-overload]


def test_a_sender_without_time_offers_infinitely() -> None:
    assert RateRun(10, 1.0, 0.0).offered_per_s == float("inf")


def test_command_line_defaults_and_bounds() -> None:
    args = parse_args([])
    assert (args.sessions, args.samples, args.json) == (2000, 100, False)
    args = parse_args(["--sessions", str(MAX_SESSIONS), "--samples", str(MAX_SAMPLES), "--json"])
    assert (args.sessions, args.samples, args.json) == (MAX_SESSIONS, MAX_SAMPLES, True)
    for bad in (["--sessions", "0"], ["--samples", str(MAX_SAMPLES + 1)], ["--sessions", str(MAX_SESSIONS + 1)]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2


def test_backlog_holds_several_bursts() -> None:
    assert BACKLOG == 8000


def test_label_range_has_room_for_every_session_and_the_headroom() -> None:
    from orchestrator.lab.balancer_lab import LABELS

    first, last = label_range(2000, 100)
    assert first == LABELS[0] and last == LABELS[0] + 2 * (2000 + 100 + 256) + 1
    assert label_range(1, 1) == (LABELS[0], LABELS[1])  # never below the harness's own range
