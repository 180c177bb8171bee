"""`lab bench setup` without a lab: the result (the --json fields of docs/json.md) and its table,
the command line's bounds, and the label range it gives the daemon."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from types import SimpleNamespace

import pytest

from orchestrator.lab.bench.balancer import check_latency_path, label_range, step_means
from orchestrator.lab.bench.kernel_limit import KernelLimit
from orchestrator.lab.bench.result import GOALS, Latency, RateRun, SetupResult, build_result, format_table, goal_met
from orchestrator.lab.bench.setup import BACKLOG, MAX_SAMPLES, MAX_SESSIONS, parse_args

JSON_KEYS = [
    "sessions",
    "samples",
    "repeats",
    "kernel_limit_sessions_per_s",
    "sessions_per_s",
    "ipvs_connections_per_s",
    "existing_session_connections_per_s",
    "added_latency_ms",
    "ipvs_added_latency_ms",
    "ratios",
    "goals",
    "offered_per_s",
    "syn_retransmits",
    "kernel_limit_s",
    "latency_repeats",
    "ratio_repeats",
    "latency_userspace",
    "latency_loop_steps",
    "rate_rounds",
]
RATIOS = ["sessions_vs_kernel_limit", "existing_vs_ipvs", "new_p99_vs_ipvs", "existing_p99_vs_ipvs"]


STEPS = {"first-packet batch": {"runs": 100, "mean_ms": 2.5}}


def test_the_loop_steps_of_a_window_are_the_difference_of_two_answers() -> None:
    before = {"tick": {"runs": 5, "seconds": 0.01}, "batch: rtnetlink": {"runs": 10, "seconds": 0.02}}
    after = {
        "tick": {"runs": 5, "seconds": 0.01},  # did not run: left out
        "batch: rtnetlink": {"runs": 14, "seconds": 0.03},
        "batch: verdicts": {"runs": 4, "seconds": 0.002},  # first run in the window
    }
    assert step_means(before, after) == {
        "batch: rtnetlink": {"runs": 4, "mean_ms": 2.5},
        "batch: verdicts": {"runs": 4, "mean_ms": 0.5},
    }


def _result(existing_s: float = 0.5) -> SetupResult:
    limit = KernelLimit(2000, {"tc": 1.0, "ip": 0.5, "nft": 0.5})  # 1,000/s
    ours = RateRun(2000, 4.0, 1.0)
    # (d) and (c) in rounds: pooled, 4,000 connections in 1 s (at the default existing_s)
    existing = [RateRun(1000, existing_s * 0.4, 0.2), RateRun(1000, existing_s * 0.6, 0.3)]
    theirs = [RateRun(1000, 0.2, 0.25), RateRun(1000, 0.3, 0.25)]
    # Two repeats of 50 samples each; pooled they are the 100 samples of the figures.
    our_runs = [
        Latency([(0.030, 0.010)] * 49 + [(0.110, 0.012)], retransmits=1),
        Latency([(0.030, 0.010)] * 49 + [(0.110, 0.012)]),
    ]
    their_runs = [Latency([(0.0105, 0.010)] * 49 + [(0.015, 0.010)])] * 2
    return build_result(limit, ours, existing, theirs, our_runs, their_runs, {"sessions_started": 100}, STEPS)


def test_result_rates_latencies_and_ratios() -> None:
    d = asdict(_result())
    assert d["kernel_limit_sessions_per_s"] == 1000 and d["kernel_limit_s"] == {"tc": 1.0, "ip": 0.5, "nft": 0.5}
    assert d["sessions_per_s"] == 500 and d["ipvs_connections_per_s"] == 4000
    assert d["existing_session_connections_per_s"] == 4000
    assert d["added_latency_ms"] == {"new": {"p50": 30, "p99": 110}, "existing": {"p50": 10, "p99": 12}}
    assert d["ipvs_added_latency_ms"] == {"new": {"p50": 10.5, "p99": 15}, "existing": {"p50": 10, "p99": 10}}
    assert d["ratios"] == {
        "sessions_vs_kernel_limit": 0.5,
        "existing_vs_ipvs": 1.0,
        "new_p99_vs_ipvs": 7.333,
        "existing_p99_vs_ipvs": 1.2,
    }
    assert d["offered_per_s"] == {"sessions": 2000, "existing": 4000, "ipvs": 4000}
    assert d["syn_retransmits"] == {"balancer": 1, "ipvs": 0}
    assert d["sessions"] == 2000 and (d["samples"], d["repeats"]) == (50, 2)
    # Each repeat alone: 50 samples, so its p99 lies between its two slowest.
    per_repeat = d["latency_repeats"]["balancer"]
    assert per_repeat[0] == per_repeat[1] == {"new": {"p50": 30, "p99": 70.8}, "existing": {"p50": 10, "p99": 11.02}}
    theirs = d["latency_repeats"]["ipvs"][0]
    assert d["ratio_repeats"]["new_p99_vs_ipvs"] == [round(70.8 / theirs["new"]["p99"], 3)] * 2
    assert d["ratio_repeats"]["existing_p99_vs_ipvs"] == [round(11.02 / theirs["existing"]["p99"], 3)] * 2
    assert d["latency_userspace"] == {"sessions_started": 100}
    assert d["latency_loop_steps"] == STEPS
    assert d["rate_rounds"] == {"existing": [5000, 3333.3], "ipvs": [5000, 3333.3]}
    json.dumps(d)  # one JSON object, as --json prints it


def test_goals_are_judged_on_their_bounds_inclusive() -> None:
    goals = _result().goals
    assert list(goals) == RATIOS
    assert goals["sessions_vs_kernel_limit"] == {"goal": ">= 0.5", "value": 0.5, "met": True}
    assert goals["existing_vs_ipvs"]["met"] is True
    assert goals["new_p99_vs_ipvs"] == {"goal": "<= 3.0", "value": 7.333, "met": False}
    assert goals["existing_p99_vs_ipvs"]["met"] is True  # 1.2 exactly
    slow = _result(existing_s=0.6).goals["existing_vs_ipvs"]  # 3,333/s against 4,000/s
    assert slow["value"] == 0.833 and slow["met"] is False


def test_goal_met_compares_both_ways_and_has_no_verdict_without_a_ratio() -> None:
    assert goal_met(0.49, ">=", 0.5) is False and goal_met(0.5, ">=", 0.5) is True
    assert goal_met(3.01, "<=", 3.0) is False and goal_met(3.0, "<=", 3.0) is True
    assert goal_met(None, "<=", 3.0) is None
    assert [g[0] for g in GOALS] == RATIOS


def test_a_reference_of_zero_gives_no_ratio_and_no_verdict() -> None:
    limit = KernelLimit(10, {"tc": 1.0})
    lat = Latency([(0.02, 0.01)])
    zero = Latency([(0.0, 0.0)])
    r = build_result(limit, RateRun(10, 1.0, 1.0), [RateRun(10, 1.0, 1.0)], [RateRun(10, 1.0, 1.0)], [lat], [zero])
    assert r.ratios["new_p99_vs_ipvs"] is None and r.goals["new_p99_vs_ipvs"]["met"] is None
    assert "-" in format_table(r)


def test_table_shows_balancer_reference_ratio_and_goal() -> None:
    lines = format_table(_result()).splitlines()
    assert lines[1].split() == ["balancer", "reference", "ratio", "goal"]
    assert lines[2].split()[-6:] == ["500", "1000", "0.50", ">=", "0.5", "met"]
    assert lines[3].split()[-6:] == ["4000", "4000", "1.00", ">=", "0.9", "met"]
    assert lines[4].split()[-7:] == ["110.00", "15.00", "7.33", "<=", "3.0", "NOT", "met"]
    assert lines[5].split()[-6:] == ["12.00", "10.00", "1.20", "<=", "1.2", "met"]


def test_json_fields_are_the_documented_ones_in_order() -> None:
    assert [f.name for f in fields(SetupResult)] == JSON_KEYS
    assert list(asdict(_result())) == JSON_KEYS


def test_a_sender_without_time_offers_infinitely() -> None:
    assert RateRun(10, 1.0, 0.0).offered_per_s == float("inf")


def test_rounds_pool_their_packets_over_their_summed_times() -> None:
    total = RateRun.total([RateRun(100, 1.0, 0.5), RateRun(300, 1.0, 0.5)])
    assert total == RateRun(400, 2.0, 1.0) and total.per_s == 200  # not the mean of 100/s and 300/s


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


def test_the_latency_check_allows_existing_connects_that_came_before_their_element_only() -> None:
    """A new session's element goes in right after its first packet's verdict: an existing
    session's connect that came before it reached the daemon, which counted it `fastpath_late`;
    any other packet of an existing session's connect in userspace fails the check."""
    runs = [Latency([(0.002, 0.0003)] * 3, retransmits=1)]
    bed = SimpleNamespace(userspace={"sessions_started": 4, "packets_userspace": 6, "fastpath_late": 1})
    check_latency_path(bed, runs)  # type: ignore[arg-type]
    bed.userspace["fastpath_late"] = 0
    with pytest.raises(RuntimeError, match="an existing session's connect reached userspace"):
        check_latency_path(bed, runs)  # type: ignore[arg-type]
