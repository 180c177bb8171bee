"""What `lab bench setup` measured and how it prints it: the two phases' raw figures, the
result's JSON fields (documented in docs/json.md) and the table. Pure, so tested without a lab."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.lab.bench.stats import percentile, ratio


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


@dataclass(frozen=True)
class Latency:
    """connect() times (seconds) of (new session, existing session) pairs, per sample, and how
    many of those connects retransmitted their SYN."""

    pairs: list[tuple[float, float]]
    retransmits: int = 0

    def added_ms(self, q: float) -> float:
        return 1000 * percentile([new - old for new, old in self.pairs], q)

    def new_ms(self, q: float) -> float:
        return 1000 * percentile([new for new, _ in self.pairs], q)

    def existing_ms(self, q: float) -> float:
        return 1000 * percentile([old for _, old in self.pairs], q)


@dataclass(frozen=True)
class SetupResult:
    """The --json object, field for field (docs/json.md)."""

    sessions: int
    samples: int
    sessions_per_s: float
    ipvs_connections_per_s: float
    setup_ratio: float | None
    added_latency_p50_ms: float
    added_latency_p99_ms: float
    ipvs_added_latency_p50_ms: float
    ipvs_added_latency_p99_ms: float
    latency_p50_ratio: float | None
    latency_p99_ratio: float | None
    connect_new_p50_ms: float
    connect_existing_p50_ms: float
    ipvs_connect_new_p50_ms: float
    ipvs_connect_existing_p50_ms: float
    offered_per_s: float
    ipvs_offered_per_s: float
    syn_retransmits: int
    ipvs_syn_retransmits: int


def build_result(ours: RateRun, theirs: RateRun, our_lat: Latency, their_lat: Latency) -> SetupResult:
    """Both phases in one result, rounded as printed (rates to 0.1/s, times and ratios to 0.001)."""

    def r3(x: float) -> float:
        return round(x, 3)

    def opt(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    added = {q: (our_lat.added_ms(q), their_lat.added_ms(q)) for q in (50, 99)}
    return SetupResult(
        sessions=ours.count,
        samples=len(our_lat.pairs),
        sessions_per_s=round(ours.per_s, 1),
        ipvs_connections_per_s=round(theirs.per_s, 1),
        setup_ratio=opt(ratio(ours.per_s, theirs.per_s)),
        added_latency_p50_ms=r3(added[50][0]),
        added_latency_p99_ms=r3(added[99][0]),
        ipvs_added_latency_p50_ms=r3(added[50][1]),
        ipvs_added_latency_p99_ms=r3(added[99][1]),
        latency_p50_ratio=opt(ratio(*added[50])),
        latency_p99_ratio=opt(ratio(*added[99])),
        connect_new_p50_ms=r3(our_lat.new_ms(50)),
        connect_existing_p50_ms=r3(our_lat.existing_ms(50)),
        ipvs_connect_new_p50_ms=r3(their_lat.new_ms(50)),
        ipvs_connect_existing_p50_ms=r3(their_lat.existing_ms(50)),
        offered_per_s=round(ours.offered_per_s, 1),
        ipvs_offered_per_s=round(theirs.offered_per_s, 1),
        syn_retransmits=our_lat.retransmits,
        ipvs_syn_retransmits=their_lat.retransmits,
    )


def format_table(r: SetupResult) -> str:
    """The human-readable result: both systems side by side, ratio = balancer / IPVS."""

    def num(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    rows: list[tuple[str, float, float, float | None, int]] = [
        (f"new sessions/s ({r.sessions} first packets)", r.sessions_per_s, r.ipvs_connections_per_s, r.setup_ratio, 0),
        ("  offered by the sender/s", r.offered_per_s, r.ipvs_offered_per_s, None, 0),
        (
            f"added latency p50, ms ({r.samples} samples)",
            r.added_latency_p50_ms,
            r.ipvs_added_latency_p50_ms,
            r.latency_p50_ratio,
            2,
        ),
        ("added latency p99, ms", r.added_latency_p99_ms, r.ipvs_added_latency_p99_ms, r.latency_p99_ratio, 2),
        ("  connect p50, new session, ms", r.connect_new_p50_ms, r.ipvs_connect_new_p50_ms, None, 2),
        ("  connect p50, existing session, ms", r.connect_existing_p50_ms, r.ipvs_connect_existing_p50_ms, None, 2),
        (f"  connects with a SYN retransmit (of {2 * r.samples})", r.syn_retransmits, r.ipvs_syn_retransmits, None, 0),
    ]
    lines = [
        "session setup: the balancer against IPVS (tunnel mode), same lab, same run",
        f"{'':40}{'balancer':>12}{'IPVS':>12}{'ratio':>8}",
    ]
    for label, ours, theirs, rat, digits in rows:
        lines.append(f"{label:40}{num(ours, digits):>12}{num(theirs, digits):>12}{num(rat, 2):>8}")
    return "\n".join(lines)
