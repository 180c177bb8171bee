"""What `lab bench setup` measured and how it prints it: the phases' raw figures, the result's
JSON fields (documented in docs/json.md), the ratios, issue 15's goals and the table. Pure, so
tested without a lab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.lab.bench.stats import percentile, ratio

if TYPE_CHECKING:
    from orchestrator.lab.bench.kernel_limit import KernelLimit as KernelLimitRun


@dataclass(frozen=True)
class RateRun:
    """One flood: `count` first packets, pktgen sending for `send_s` in all, the last of them out
    on the fabric `elapsed_s` after the first left the client."""

    count: int
    elapsed_s: float
    send_s: float

    @property
    def per_s(self) -> float:
        return self.count / self.elapsed_s

    @property
    def offered_per_s(self) -> float:
        return self.count / self.send_s if self.send_s > 0 else float("inf")

    @staticmethod
    def total(rounds: list[RateRun]) -> RateRun:
        """Several floods (rounds) as one: their packets over their summed times."""
        return RateRun(sum(r.count for r in rounds), sum(r.elapsed_s for r in rounds), sum(r.send_s for r in rounds))


@dataclass(frozen=True)
class Latency:
    """connect() times (seconds) of (new session, existing session) pairs, per sample, and how
    many of those connects retransmitted their SYN."""

    pairs: list[tuple[float, float]]
    retransmits: int = 0

    @staticmethod
    def pooled(runs: list[Latency]) -> Latency:
        """Every sample of several runs (repeats) as one."""
        return Latency([p for run in runs for p in run.pairs], sum(run.retransmits for run in runs))

    def new_ms(self, q: float) -> float:
        return 1000 * percentile([new for new, _ in self.pairs], q)

    def existing_ms(self, q: float) -> float:
        return 1000 * percentile([old for _, old in self.pairs], q)


GOALS: tuple[tuple[str, str, float], ...] = (
    ("sessions_vs_kernel_limit", ">=", 0.5),
    ("existing_vs_ipvs", ">=", 0.9),
    ("new_p99_vs_ipvs", "<=", 3.0),
    ("existing_p99_vs_ipvs", "<=", 1.2),
)  # issue 15's goals: (ratio, comparison, bound)


def goal_met(value: float | None, comparison: str, bound: float) -> bool | None:
    """Whether a ratio meets its goal; None when there is no ratio (a reference of zero)."""
    if value is None:
        return None
    return value >= bound if comparison == ">=" else value <= bound


@dataclass(frozen=True)
class SetupResult:
    """The --json object, field for field (docs/json.md)."""

    sessions: int
    samples: int  # latency sources per repeat (each opens a new session on both systems)
    repeats: int
    kernel_limit_sessions_per_s: float
    sessions_per_s: float
    ipvs_connections_per_s: float
    existing_session_connections_per_s: float
    added_latency_ms: dict[str, dict[str, float]]  # {new, existing} x {p50, p99}
    ipvs_added_latency_ms: dict[str, dict[str, float]]
    ratios: dict[str, float | None]
    goals: dict[str, dict[str, object]]  # ratio name -> {goal, value, met}
    offered_per_s: dict[str, float]  # pktgen's own rate per flood: sessions, existing, ipvs
    syn_retransmits: dict[str, int]  # balancer, ipvs
    kernel_limit_s: dict[str, float]  # seconds per batch: tc, ip, nft
    # Per repeat: each system's {new, existing} x {p50, p99}, and the p99 ratios.
    latency_repeats: dict[str, list[dict[str, dict[str, float]]]]
    ratio_repeats: dict[str, list[float | None]]
    # The daemon's counters over the latency runs: new sessions and packets that reached it.
    latency_userspace: dict[str, int]
    # The daemon's loop steps over the latency runs: step -> {runs, mean_ms} (where a new
    # session's time goes: its first-packet batch and the batch's parts).
    latency_loop_steps: dict[str, dict[str, float]]
    # (c) and (d) are several floods each (rounds): each round's connections per second.
    rate_rounds: dict[str, list[float]]


def build_result(
    limit: KernelLimitRun,
    ours: RateRun,
    existing_rounds: list[RateRun],
    their_rounds: list[RateRun],
    our_runs: list[Latency],
    their_runs: list[Latency],
    userspace: dict[str, int] | None = None,
    loop_steps: dict[str, dict[str, float]] | None = None,
) -> SetupResult:
    """All phases in one result, rounded as printed (rates to 0.1/s, times and ratios to 0.001).
    The latency figures pool every repeat's samples; `latency_repeats` and `ratio_repeats` give
    each repeat's own, the spread. (c) and (d) pool their rounds' floods (`rate_rounds`: each
    round's own rate)."""
    existing, theirs = RateRun.total(existing_rounds), RateRun.total(their_rounds)

    def opt(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    our_lat, their_lat = Latency.pooled(our_runs), Latency.pooled(their_runs)

    def latency_ms(lat: Latency) -> dict[str, dict[str, float]]:
        return {
            "new": {"p50": round(lat.new_ms(50), 3), "p99": round(lat.new_ms(99), 3)},
            "existing": {"p50": round(lat.existing_ms(50), 3), "p99": round(lat.existing_ms(99), 3)},
        }

    ratios = {
        "sessions_vs_kernel_limit": opt(ratio(ours.per_s, limit.per_s)),
        "existing_vs_ipvs": opt(ratio(existing.per_s, theirs.per_s)),
        "new_p99_vs_ipvs": opt(ratio(our_lat.new_ms(99), their_lat.new_ms(99))),
        "existing_p99_vs_ipvs": opt(ratio(our_lat.existing_ms(99), their_lat.existing_ms(99))),
    }
    goals: dict[str, dict[str, object]] = {
        name: {"goal": f"{comparison} {bound}", "value": ratios[name], "met": goal_met(ratios[name], comparison, bound)}
        for name, comparison, bound in GOALS
    }
    return SetupResult(
        sessions=ours.count,
        samples=len(our_runs[0].pairs) if our_runs else 0,
        repeats=len(our_runs),
        kernel_limit_sessions_per_s=round(limit.per_s, 1),
        sessions_per_s=round(ours.per_s, 1),
        ipvs_connections_per_s=round(theirs.per_s, 1),
        existing_session_connections_per_s=round(existing.per_s, 1),
        added_latency_ms=latency_ms(our_lat),
        ipvs_added_latency_ms=latency_ms(their_lat),
        ratios=ratios,
        goals=goals,
        offered_per_s={
            "sessions": round(ours.offered_per_s, 1),
            "existing": round(existing.offered_per_s, 1),
            "ipvs": round(theirs.offered_per_s, 1),
        },
        syn_retransmits={"balancer": our_lat.retransmits, "ipvs": their_lat.retransmits},
        kernel_limit_s={tool: round(t, 4) for tool, t in limit.seconds.items()},
        latency_repeats={
            "balancer": [latency_ms(run) for run in our_runs],
            "ipvs": [latency_ms(run) for run in their_runs],
        },
        ratio_repeats={
            "new_p99_vs_ipvs": [opt(ratio(a.new_ms(99), b.new_ms(99))) for a, b in zip(our_runs, their_runs)],
            "existing_p99_vs_ipvs": [
                opt(ratio(a.existing_ms(99), b.existing_ms(99))) for a, b in zip(our_runs, their_runs)
            ],
        },
        latency_userspace=dict(userspace or {}),
        latency_loop_steps=dict(loop_steps or {}),
        rate_rounds={
            "existing": [round(r.per_s, 1) for r in existing_rounds],
            "ipvs": [round(r.per_s, 1) for r in their_rounds],
        },
    )


def format_table(r: SetupResult) -> str:
    """The human-readable result: the balancer beside its reference, the ratio, the goal."""

    def num(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    def verdict(name: str) -> str:
        met = r.goals[name]["met"]
        return f"{r.goals[name]['goal']} {'met' if met else 'NOT met' if met is False else '-'}"

    lat, ipvs_lat = r.added_latency_ms, r.ipvs_added_latency_ms
    rows: list[tuple[str, float, float, str, int]] = [
        (
            f"new sessions/s vs kernel limit ({r.sessions})",
            r.sessions_per_s,
            r.kernel_limit_sessions_per_s,
            "sessions_vs_kernel_limit",
            0,
        ),
        (
            "existing-session conns/s vs IPVS new/s",
            r.existing_session_connections_per_s,
            r.ipvs_connections_per_s,
            "existing_vs_ipvs",
            0,
        ),
        (
            f"connect p99 new session, ms ({r.samples}x{r.repeats})",
            lat["new"]["p99"],
            ipvs_lat["new"]["p99"],
            "new_p99_vs_ipvs",
            2,
        ),
        (
            "connect p99 existing session, ms",
            lat["existing"]["p99"],
            ipvs_lat["existing"]["p99"],
            "existing_p99_vs_ipvs",
            2,
        ),
    ]
    lines = [
        "session setup: the balancer against the kernel's limit and IPVS (tunnel mode), same lab, same run",
        f"{'':44}{'balancer':>10}{'reference':>11}{'ratio':>8}  goal",
    ]
    for label, ours, theirs, name, digits in rows:
        lines.append(
            f"{label:44}{num(ours, digits):>10}{num(theirs, digits):>11}{num(r.ratios[name], 2):>8}  {verdict(name)}"
        )
    lines += [
        f"{'  connect p50 new / existing session, ms':44}{lat['new']['p50']:>10.2f}{ipvs_lat['new']['p50']:>11.2f}"
        f"  (IPVS) / {lat['existing']['p50']:.2f} vs {ipvs_lat['existing']['p50']:.2f}",
        "  per round, existing-session conns/s "
        + " ".join(f"{x:.0f}" for x in r.rate_rounds["existing"])
        + ", IPVS new/s "
        + " ".join(f"{x:.0f}" for x in r.rate_rounds["ipvs"]),
        f"  offered by pktgen/s: sessions {r.offered_per_s['sessions']:.0f}, existing "
        f"{r.offered_per_s['existing']:.0f}, IPVS {r.offered_per_s['ipvs']:.0f}",
        "  kernel limit batches, s: " + ", ".join(f"{tool} {t:.2f}" for tool, t in r.kernel_limit_s.items()),
        f"  connects with a SYN retransmit (of {2 * r.samples * r.repeats} each): balancer "
        f"{r.syn_retransmits['balancer']}, IPVS {r.syn_retransmits['ipvs']}",
        "  p99 ratios per repeat (interleaved samples): new "
        + " ".join(num(x, 2) for x in r.ratio_repeats["new_p99_vs_ipvs"])
        + ", existing "
        + " ".join(num(x, 2) for x in r.ratio_repeats["existing_p99_vs_ipvs"]),
    ]
    return "\n".join(lines)
