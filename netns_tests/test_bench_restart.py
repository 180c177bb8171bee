"""`mplsorch lab bench restart` at a small N, so the benchmark cannot rot: the sessions it
generates are all restored by the restarted daemon, which keeps the ruleset it finds loaded (and
so the fast-path sets' elements), and the live streams lose nothing."""

from __future__ import annotations

from orchestrator.lab.bench import restart
from orchestrator.lab.kit import Lab

SESSIONS = 500


def test_bench_restart_restores_every_generated_session_and_loses_nothing(lab: Lab) -> None:
    result = restart.run(lab, SESSIONS)
    print("\n" + restart.format_result(result))
    assert result.generated == SESSIONS
    assert result.sessions == SESSIONS + result.live_sessions
    assert result.datagrams_sent > 0 and result.datagrams_lost == 0, result
    assert 0 < result.restore_seconds <= result.reconcile_seconds < result.ready_seconds
    assert result.ruleset_kept  # the kernel held the daemon's ruleset: its sets were kept, not emptied
