"""`lab bench scale` without a lab: memory per session, the rate ratio, the goals, the
extrapolation to 500,000 sessions, the table, and the command line's bounds against the label
space."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace

import pytest

from orchestrator.lab.bench.scale import changes, max_sessions, parse_args
from orchestrator.lab.bench.scale_result import ScaleResult, ScaleRun, build_scale_result, format_scale

JSON_KEYS = [
    "sessions",
    "reference_sessions",
    "probe_sessions",
    "probes",
    "daemon_bytes_per_session",
    "kernel_bytes_per_session",
    "rate_at_reference_per_s",
    "rate_at_sessions_per_s",
    "rate_ratio",
    "answer_s",
    "cli_s",
    "python_start_s",
    "page_rows",
    "goals",
    "extrapolated",
    "answer_runs_s",
    "cli_runs_s",
    "python_start_runs_s",
    "rate_runs_per_s",
]

RUN = ScaleRun(
    sessions=100_000,
    reference=10_000,
    probe=2000,
    rates_at_reference=[1000.0],
    rates_at_sessions=[850.0],
    rss_before_kb=50_000,
    rss_after_kb=50_000 + 195_313,  # 2,000 B per session
    guest_available_before_kb=2_000_000,
    guest_available_after_kb=2_000_000 - 195_313 - 292_969,  # 3,000 B per session besides
    guest_total_kb=3_000_000,
    answer_s={"status": [0.4], "sessions_first_page": [0.05], "sessions_last_page": [0.08]},
    cli_s={"status": [1.9], "sessions_first_page": [1.7], "sessions_last_page": [1.8]},
    python_start_s=[0.5],
    page=1000,
)


def test_memory_per_session_and_the_rate_ratio() -> None:
    r = build_scale_result(RUN)
    assert r.daemon_bytes_per_session == 2000.0 and r.kernel_bytes_per_session == 3000.0
    assert (r.rate_at_reference_per_s, r.rate_at_sessions_per_s, r.rate_ratio) == (1000.0, 850.0, 0.85)
    assert r.answer_s == {"status": 0.4, "sessions_first_page": 0.05, "sessions_last_page": 0.08}
    assert r.page_rows == 1000
    json.dumps(asdict(r))


def test_goals_met_and_not_met() -> None:
    goals = build_scale_result(RUN).goals
    assert goals["daemon_bytes_per_session"] == {"goal": "<= 400", "value": 2000.0, "met": False}
    assert goals["rate_ratio"] == {"goal": ">= 0.8", "value": 0.85, "met": True}
    assert goals["answer_s"] == {"goal": "< 1.0", "value": 0.4, "met": True}
    assert goals["cli_s"] == {"goal": "< 1.0", "value": 1.9, "met": False}
    fast: dict[str, list[float | None]] = {"status": [0.6], "sessions_first_page": [0.7], "sessions_last_page": [0.9]}
    assert build_scale_result(replace(RUN, cli_s=fast)).goals["cli_s"] == {"goal": "< 1.0", "value": 0.9, "met": True}
    failed = build_scale_result(replace(RUN, cli_s={**fast, "status": [None]})).goals["cli_s"]
    assert failed == {"goal": "< 1.0", "value": None, "met": False}
    slow = build_scale_result(replace(RUN, rates_at_sessions=[790.0], answer_s={"status": [1.0]})).goals
    assert slow["rate_ratio"]["met"] is False and slow["answer_s"]["met"] is False
    assert build_scale_result(replace(RUN, rates_at_reference=[0.0])).goals["rate_ratio"]["met"] is None


def test_the_figures_are_the_medians_of_the_runs_and_every_run_is_kept() -> None:
    runs = replace(
        RUN,
        answer_s={"status": [0.03, 0.01, 0.02], "sessions_first_page": [0.2, 0.1, 0.3], "sessions_last_page": [0.1]},
        cli_s={
            "status": [0.5, None, 0.4],  # a failed run counts as the slowest
            "sessions_first_page": [None, 0.7, None],  # the median run failed
            "sessions_last_page": [0.9, 0.6, 1.2, 0.8],  # of an even number: the slower middle one
        },
        python_start_s=[0.3, 0.2, 0.25],
    )
    r = build_scale_result(runs)
    assert r.answer_s == {"status": 0.02, "sessions_first_page": 0.2, "sessions_last_page": 0.1}
    assert r.cli_s == {"status": 0.5, "sessions_first_page": None, "sessions_last_page": 0.9}
    assert r.python_start_s == 0.25 and r.python_start_runs_s == [0.3, 0.2, 0.25]
    assert r.answer_runs_s == runs.answer_s and r.cli_runs_s == runs.cli_s
    assert r.goals["cli_s"] == {"goal": "< 1.0", "value": None, "met": False}
    assert r.goals["answer_s"] == {"goal": "< 1.0", "value": 0.2, "met": True}
    assert "control socket answer, s (median of 3)" in format_scale(r)
    assert "sessions_first_page failed" in format_scale(r)


def test_the_rates_are_the_medians_of_the_probes_and_every_probe_is_kept() -> None:
    """One slow probe (a slow spell of the guest) moves neither rate nor the ratio."""
    r = build_scale_result(
        replace(RUN, rates_at_reference=[1200.0, 900.0, 1000.0], rates_at_sessions=[700.0, 850.0, 1300.0])
    )
    assert (r.rate_at_reference_per_s, r.rate_at_sessions_per_s, r.rate_ratio, r.probes) == (1000.0, 850.0, 0.85, 3)
    assert r.rate_runs_per_s == {"reference": [1200.0, 900.0, 1000.0], "sessions": [700.0, 850.0, 1300.0]}
    assert "(median of 3 probes of 2000: 1200, 900, 1000)" in format_scale(r)
    assert "(700, 850, 1300)" in format_scale(r)


def test_extrapolation_is_labelled_and_judges_the_guests_memory() -> None:
    r = build_scale_result(RUN)
    x = r.extrapolated
    assert x["measured"] is False and x["sessions"] == 500_000
    assert x["daemon_mb"] == pytest.approx(953.7, abs=0.1) and x["kernel_mb"] == pytest.approx(1430.5, abs=0.1)
    assert x["fits"] is False  # 2.4 GB against 1.95 GB available
    assert "EXTRAPOLATED to 500000 sessions (not measured)" in format_scale(r) and "does NOT fit" in format_scale(r)
    big = build_scale_result(replace(RUN, sessions=500_000, guest_available_before_kb=4_000_000))
    assert big.extrapolated["measured"] is True and "EXTRAPOLATED" not in format_scale(big)


def test_json_fields_are_the_documented_ones_in_order() -> None:
    assert [f.name for f in fields(ScaleResult)] == JSON_KEYS
    assert list(asdict(build_scale_result(RUN))) == JSON_KEYS


def test_command_line_defaults_and_the_label_space() -> None:
    args = parse_args([])
    assert (args.sessions, args.reference, args.probe, args.probes, args.json) == (500_000, 10_000, 2000, 3, False)
    assert max_sessions(2000, 1) == max_sessions(2000) + 2 * 2000  # the probes at N take labels beyond N
    first, last = changes(502_000)["labels.range"]
    assert last <= 2**20 - 1 and (last - first + 1) // 2 >= 502_000
    assert max_sessions(2000) >= 500_000
    parse_args(["--sessions", str(max_sessions(2000))])
    for bad in (
        ["--sessions", str(max_sessions(2000) + 1)],
        ["--sessions", "1000", "--reference", "900", "--probe", "200"],
        ["--probe", "0"],
        ["--probes", "0"],
        ["--sessions", "1000", "--reference", "300", "--probe", "250"],  # the reference and its 3 probes exceed N
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
