"""What `lab bench scale` measured and how it prints it: memory per session, the programming rate
at the reference size and at N, the control socket's answer times, the goals of issue 15 and the
extrapolation to the label space's worth of sessions. Pure, so tested without a lab."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from orchestrator.lab.bench.result import goal_met

TARGET_SESSIONS = 500_000  # issue 15's size; the 2^20 label space holds 524,287 pairs
BYTES_GOAL = 400.0  # daemon memory per session
RATE_GOAL = 0.8  # the rate at N within 20 % of the rate at the reference size
ANSWER_GOAL_S = 1.0  # `status` and a `sessions` page


@dataclass(frozen=True)
class ScaleRun:
    """The raw figures of one run."""

    sessions: int  # N: sessions held when memory and answers were measured
    reference: int  # the smaller size the rate is compared at (10,000)
    probe: int  # new sessions per timed probe
    # New sessions/s of each probe with `reference` (and the probes before it) installed; with N.
    rates_at_reference: list[float]
    rates_at_sessions: list[float]
    rss_before_kb: int  # the daemon's VmRSS with no session
    rss_after_kb: int  # ... with N
    guest_available_before_kb: int  # the guest's MemAvailable with no session
    guest_available_after_kb: int  # ... with N
    guest_total_kb: int
    # Each run, in the order timed: control-socket round trips at N (status, first page, last
    # page), the same through the `mplsorch` command (None: it failed), and `python -c pass`
    # there (what the command cannot go below).
    answer_s: dict[str, list[float]]
    cli_s: dict[str, list[float | None]]
    python_start_s: list[float]
    page: int  # rows per `sessions` page


@dataclass(frozen=True)
class ScaleResult:
    """The --json object, field for field (docs/json.md)."""

    sessions: int
    reference_sessions: int
    probe_sessions: int
    probes: int  # timed probes at each size
    daemon_bytes_per_session: float
    kernel_bytes_per_session: float
    rate_at_reference_per_s: float
    rate_at_sessions_per_s: float
    rate_ratio: float | None
    answer_s: dict[str, float]  # medians of the runs
    cli_s: dict[str, float | None]
    python_start_s: float
    page_rows: int
    goals: dict[str, dict[str, object]]
    extrapolated: dict[str, object]  # to TARGET_SESSIONS: memory, and whether the guest holds it
    answer_runs_s: dict[str, list[float]]  # every run, in the order timed
    cli_runs_s: dict[str, list[float | None]]
    python_start_runs_s: list[float]
    rate_runs_per_s: dict[str, list[float]]  # each probe's rate, in the order timed: "reference", "sessions"


def median(runs: list[float] | list[float | None]) -> float | None:
    """The middle run (of an even number, the slower of the two middle ones); a failed run (None)
    counts as the slowest, and None when the middle one failed."""
    ordered = sorted(runs, key=lambda v: (v is None, v or 0.0))
    return ordered[len(ordered) // 2] if ordered else None


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def build_scale_result(run: ScaleRun) -> ScaleResult:
    """Per-session bytes: the daemon's RSS growth over N; the guest's (kernel objects, conntrack
    entries, page cache the run touched) is the fall of MemAvailable less the daemon's growth."""
    daemon_kb = run.rss_after_kb - run.rss_before_kb
    guest_kb = run.guest_available_before_kb - run.guest_available_after_kb - daemon_kb
    daemon_b = 1024 * daemon_kb / run.sessions
    kernel_b = 1024 * guest_kb / run.sessions
    at_reference = statistics.median(run.rates_at_reference)
    at_sessions = statistics.median(run.rates_at_sessions)
    rate_ratio = at_sessions / at_reference if at_reference > 0 else None
    answer_s = {k: median(v) or 0.0 for k, v in run.answer_s.items()}
    cli_s = {k: median(v) for k, v in run.cli_s.items()}
    slowest = max(answer_s.values())
    cli = list(cli_s.values())
    slowest_cli = None if None in cli or not cli else max(v for v in cli if v is not None)
    goals: dict[str, dict[str, object]] = {
        "daemon_bytes_per_session": {
            "goal": f"<= {BYTES_GOAL:.0f}",
            "value": round(daemon_b, 1),
            "met": goal_met(daemon_b, "<=", BYTES_GOAL),
        },
        "rate_ratio": {
            "goal": f">= {RATE_GOAL}",
            "value": None if rate_ratio is None else round(rate_ratio, 3),
            "met": goal_met(rate_ratio, ">=", RATE_GOAL),
        },
        "answer_s": {"goal": f"< {ANSWER_GOAL_S}", "value": round(slowest, 3), "met": slowest < ANSWER_GOAL_S},
        # The operator's command, its Python start included (one whose median run failed is not met).
        "cli_s": {
            "goal": f"< {ANSWER_GOAL_S}",
            "value": None if slowest_cli is None else round(slowest_cli, 3),
            "met": slowest_cli is not None and slowest_cli < ANSWER_GOAL_S,
        },
    }
    need_kb = (daemon_b + kernel_b) * TARGET_SESSIONS / 1024
    return ScaleResult(
        sessions=run.sessions,
        reference_sessions=run.reference,
        probe_sessions=run.probe,
        probes=len(run.rates_at_reference),
        daemon_bytes_per_session=round(daemon_b, 1),
        kernel_bytes_per_session=round(kernel_b, 1),
        rate_at_reference_per_s=round(at_reference, 1),
        rate_at_sessions_per_s=round(at_sessions, 1),
        rate_ratio=None if rate_ratio is None else round(rate_ratio, 3),
        answer_s={k: round(v, 3) for k, v in answer_s.items()},
        cli_s={k: _rounded(v) for k, v in cli_s.items()},
        python_start_s=round(median(run.python_start_s) or 0.0, 3),
        page_rows=run.page,
        goals=goals,
        extrapolated={
            "measured": run.sessions >= TARGET_SESSIONS,
            "sessions": TARGET_SESSIONS,
            "daemon_mb": round(daemon_b * TARGET_SESSIONS / 2**20, 1),
            "kernel_mb": round(kernel_b * TARGET_SESSIONS / 2**20, 1),
            "guest_available_mb": round(run.guest_available_before_kb / 1024, 1),
            "guest_total_mb": round(run.guest_total_kb / 1024, 1),
            "fits": need_kb < run.guest_available_before_kb,
        },
        answer_runs_s={k: [round(x, 3) for x in v] for k, v in run.answer_s.items()},
        cli_runs_s={k: [_rounded(x) for x in v] for k, v in run.cli_s.items()},
        python_start_runs_s=[round(x, 3) for x in run.python_start_s],
        rate_runs_per_s={
            "reference": [round(x, 1) for x in run.rates_at_reference],
            "sessions": [round(x, 1) for x in run.rates_at_sessions],
        },
    )


def format_scale(r: ScaleResult) -> str:
    def verdict(name: str) -> str:
        g = r.goals[name]
        return f"goal {g['goal']}: {'met' if g['met'] else 'NOT met' if g['met'] is False else '-'}"

    x = r.extrapolated
    ratio = "-" if r.rate_ratio is None else f"{r.rate_ratio:.2f}"
    lines = [
        f"scale: {r.sessions} concurrent sessions in the balancer daemon (lab)",
        f"  daemon memory per session      {r.daemon_bytes_per_session:10.0f} B   {verdict('daemon_bytes_per_session')}",
        f"  guest (kernel) per session     {r.kernel_bytes_per_session:10.0f} B",
        f"  new sessions/s at {r.reference_sessions:>7}       {r.rate_at_reference_per_s:10.1f}     "
        f"(median of {r.probes} probes of {r.probe_sessions}: {', '.join(f'{x:.0f}' for x in r.rate_runs_per_s['reference'])})",
        f"  new sessions/s at {r.sessions:>7}       {r.rate_at_sessions_per_s:10.1f}     ratio {ratio}   "
        f"{verdict('rate_ratio')}   ({', '.join(f'{x:.0f}' for x in r.rate_runs_per_s['sessions'])})",
        f"  control socket answer, s (median of {len(r.python_start_runs_s)}) "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.answer_s.items())
        + f"   {verdict('answer_s')}",
        "  through the mplsorch command, s  "
        + ", ".join(f"{k} {'failed' if v is None else f'{v:.3f}'}" for k, v in r.cli_s.items())
        + f"   {verdict('cli_s')}",
        f"  python -c pass there, s        {r.python_start_s:10.3f}",
    ]
    if not x["measured"]:
        lines.append(
            f"  EXTRAPOLATED to {x['sessions']} sessions (not measured): daemon {x['daemon_mb']} MB, "
            f"kernel {x['kernel_mb']} MB, guest had {x['guest_available_mb']} MB available of "
            f"{x['guest_total_mb']} MB: {'fits' if x['fits'] else 'does NOT fit'}"
        )
    return "\n".join(lines)
