"""`lab bench scale` at a tiny size in the lab, so the benchmark cannot rot: the run itself
fails unless every first packet left the balancer node, the daemon counted and holds every
session and the last `sessions` page holds what it should; here its JSON keeps the documented
keys, says it extrapolated, and its goals follow from its figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.lab.kit import Lab, patience

SESSIONS, REFERENCE, PROBE = 700, 200, 100


def test_scale_bench_holds_its_sessions_and_reports_per_session_figures(lab: Lab) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.lab.bench.scale",
            "--sessions",
            str(SESSIONS),
            "--reference",
            str(REFERENCE),
            "--probe",
            str(PROBE),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=patience(600),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout)
    assert (out["sessions"], out["reference_sessions"], out["probe_sessions"]) == (SESSIONS, REFERENCE, PROBE)
    assert out["rate_at_reference_per_s"] > 0 and out["rate_at_sessions_per_s"] > 0
    runs = out["rate_runs_per_s"]
    assert out["probes"] == len(runs["reference"]) == len(runs["sessions"]) == 3
    assert out["rate_at_reference_per_s"] == sorted(runs["reference"])[1]
    assert out["rate_at_sessions_per_s"] == sorted(runs["sessions"])[1]
    ratio = out["rate_at_sessions_per_s"] / out["rate_at_reference_per_s"]
    assert out["rate_ratio"] == pytest.approx(ratio, rel=0.01)
    assert out["daemon_bytes_per_session"] > 0  # 700 sessions grew the daemon
    assert set(out["answer_s"]) == set(out["cli_s"]) == {"status", "sessions_first_page", "sessions_last_page"}
    assert all(t > 0 for t in out["answer_s"].values())
    goals = out["goals"]
    assert goals["daemon_bytes_per_session"]["met"] is (out["daemon_bytes_per_session"] <= 400)
    assert goals["rate_ratio"]["met"] is (out["rate_ratio"] >= 0.8)
    assert goals["answer_s"]["met"] is (max(out["answer_s"].values()) < 1.0)
    assert out["extrapolated"]["measured"] is False and out["extrapolated"]["sessions"] == 500_000
