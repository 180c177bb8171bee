"""What `lab bench cluster` measured and how it prints it: the new-session rates of one balancer
and of two in cluster mode, etcd's own write counters per session (from its Prometheus text), the
daemons' write counters, and the failover gap of a counted paced UDP stream. Pure, so tested
without a lab (docs/json.md documents the result's keys)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.lab.bench.result import RateRun
from orchestrator.lab.bench.stats import ratio

# etcd's own counters read before and after the cluster's flood (its /metrics endpoint), under
# the result's names: keys put and deleted (inside transactions too), multi-operation
# transactions, Raft proposals committed (each one a log entry every member writes), WAL fsyncs.
ETCD_COUNTERS = {
    "puts": "etcd_mvcc_put_total",
    "deletes": "etcd_mvcc_delete_total",
    "txns": "etcd_mvcc_txn_total",
    "proposals": "etcd_server_proposals_committed_total",
    "fsyncs": "etcd_disk_wal_fsync_duration_seconds_count",
}
DAEMON_COUNTERS = ("cluster_txns", "cluster_rows_written")  # each member's status counters, summed
WINDOW_BEFORE = 5  # datagrams before the kill whose echoes may still have been on their way back


def prometheus_values(text: str, names: set[str]) -> dict[str, float]:
    """The values of the unlabelled samples `names` in a Prometheus text exposition; KeyError
    naming the first one missing."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        if name in names:
            found[name] = float(rest.split()[0])
    missing = sorted(names - found.keys())
    if missing:
        raise KeyError(f"no {missing[0]} in the metrics")
    return found


def etcd_deltas(before: str, after: str) -> dict[str, int]:
    """ETCD_COUNTERS' growth between two /metrics texts, under the result's names."""
    names = set(ETCD_COUNTERS.values())
    a, b = prometheus_values(before, names), prometheus_values(after, names)
    return {key: round(b[name] - a[name]) for key, name in ETCD_COUNTERS.items()}


def longest_run(seqs: list[int]) -> tuple[int, int]:
    """(first, length) of the longest run of consecutive numbers in sorted `seqs`; (-1, 0) for none."""
    best, first, length = (-1, 0), -1, 0
    for i, seq in enumerate(seqs):
        if i and seq == seqs[i - 1] + 1:
            length += 1
        else:
            first, length = seq, 1
        if length > best[1]:
            best = (first, length)
    return best


@dataclass(frozen=True)
class StreamRun:
    """A counted paced UDP stream across the kill of a balancer (orchestrator/lab/traffic.py
    STREAM's figures) and the Unix times of the kill and of the reconvergence's end."""

    interval_s: float
    start: float  # datagram N was due at start + N * interval_s
    sent: int
    missing: list[int]  # sequence numbers never echoed, sorted
    killed_at: float
    moved_at: float


@dataclass(frozen=True)
class Failover:
    """The `failover` object of the result."""

    interval_ms: float
    sent: int
    received: int
    lost: int
    gap_ms: float  # the longest run of lost datagrams x the interval
    kill_to_first_ms: float | None  # from the kill to the due time of the first datagram echoed after that run
    reconverge_ms: float  # from the kill to lb's links down plus the kernels' link event time
    lost_outside_window: int  # lost datagrams due before the kill (less WINDOW_BEFORE) or after the move


def failover(run: StreamRun) -> Failover:
    """The gap is where the stream lost most datagrams in a row; the first datagram after it is
    the first through the surviving balancer (None if the stream never came back). Without any
    loss, the first datagram due after the kill."""
    first, length = longest_run(run.missing)
    missing = set(run.missing)
    kill_seq = (run.killed_at - run.start) / run.interval_s
    if length:
        after = first + length
    else:
        after = max(0, int(kill_seq) + 1)
    while after in missing:
        after += 1
    kill_to_first = (run.start + after * run.interval_s - run.killed_at) * 1000 if after < run.sent else None
    low, high = kill_seq - WINDOW_BEFORE, (run.moved_at - run.start) / run.interval_s + 1
    return Failover(
        interval_ms=round(run.interval_s * 1000, 3),
        sent=run.sent,
        received=run.sent - len(run.missing),
        lost=len(run.missing),
        gap_ms=round(length * run.interval_s * 1000, 1),
        kill_to_first_ms=None if kill_to_first is None else round(kill_to_first, 1),
        reconverge_ms=round((run.moved_at - run.killed_at) * 1000, 1),
        lost_outside_window=sum(1 for seq in run.missing if not low <= seq <= high),
    )


@dataclass(frozen=True)
class ClusterRun:
    """The raw figures of one run."""

    single: RateRun  # N first packets through one balancer without cluster mode
    members: dict[str, RateRun]  # member -> its share of the N, flooded at the same time as the others'
    cluster_elapsed_s: float  # from the first flood's first packet to the last member's last packet out
    converged_s: float  # from the same start to every member holding every session of the flood
    etcd: dict[str, int]  # etcd_deltas over the cluster's flood and convergence
    daemon: dict[str, int]  # DAEMON_COUNTERS' growth, all members together, over the same span
    stream: StreamRun


@dataclass(frozen=True)
class ClusterResult:
    """The --json object, field for field (docs/json.md)."""

    sessions: int
    single_sessions_per_s: float
    cluster_sessions_per_s: float
    cluster_converged_per_s: float
    member_sessions_per_s: dict[str, float]
    offered_per_s: dict[str, float]
    ratios: dict[str, float | None]
    etcd: dict[str, int]
    etcd_per_session: dict[str, float]
    daemon: dict[str, int]
    daemon_per_session: dict[str, float]
    failover: dict[str, float | int | None]


def build_cluster_result(run: ClusterRun) -> ClusterResult:
    """Rates to 0.1/s, ratios and per-session figures to 0.001."""
    n = sum(r.count for r in run.members.values())
    if n != run.single.count:
        raise ValueError(f"the cluster's flood had {n} first packets, the single balancer's {run.single.count}")
    single = run.single.per_s
    cluster = n / run.cluster_elapsed_s
    converged = n / run.converged_s
    send_s = max(r.send_s for r in run.members.values())

    def opt(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    f = failover(run.stream)
    return ClusterResult(
        sessions=n,
        single_sessions_per_s=round(single, 1),
        cluster_sessions_per_s=round(cluster, 1),
        cluster_converged_per_s=round(converged, 1),
        member_sessions_per_s={name: round(r.per_s, 1) for name, r in run.members.items()},
        offered_per_s={
            "single": round(run.single.offered_per_s, 1),
            "cluster": round(n / send_s, 1) if send_s > 0 else float("inf"),
        },
        ratios={
            "cluster_vs_single": opt(ratio(cluster, single)),
            "converged_vs_single": opt(ratio(converged, single)),
        },
        etcd=dict(run.etcd),
        etcd_per_session={k: round(v / n, 3) for k, v in run.etcd.items()},
        daemon=dict(run.daemon),
        daemon_per_session={k: round(v / n, 3) for k, v in run.daemon.items()},
        failover={
            "interval_ms": f.interval_ms,
            "sent": f.sent,
            "received": f.received,
            "lost": f.lost,
            "gap_ms": f.gap_ms,
            "kill_to_first_ms": f.kill_to_first_ms,
            "reconverge_ms": f.reconverge_ms,
            "lost_outside_window": f.lost_outside_window,
        },
    )


def format_cluster(r: ClusterResult) -> str:
    """The human-readable result: two balancers in cluster mode beside one without it, ratios,
    etcd's writes per session, the failover."""

    def num(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    fo = r.failover
    members = ", ".join(f"{name} {rate:.1f}" for name, rate in r.member_sessions_per_s.items())
    lines = [
        f"cluster: {r.sessions} new sessions through one balancer, then through two in cluster mode with etcd "
        "(same lab, same run)",
        f"{'':46}{'sessions/s':>12}{'ratio':>8}",
        f"{'(a) one balancer, no cluster mode':46}{r.single_sessions_per_s:>12.1f}{'1.00':>8}",
        f"{'(b) two balancers, first packets out':46}{r.cluster_sessions_per_s:>12.1f}"
        f"{num(r.ratios['cluster_vs_single']):>8}   b/a",
        f"{'    every session on both members':46}{r.cluster_converged_per_s:>12.1f}"
        f"{num(r.ratios['converged_vs_single']):>8}",
        f"    per member (its share, at the same time): {members}",
        f"    offered by pktgen/s: single {r.offered_per_s['single']:.0f}, cluster {r.offered_per_s['cluster']:.0f}",
        "(c) etcd per session: "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.etcd_per_session.items())
        + "  (counts: "
        + ", ".join(f"{k} {v}" for k, v in r.etcd.items())
        + ")",
        "    daemons per session: " + ", ".join(f"{k} {v:.3f}" for k, v in r.daemon_per_session.items()),
        f"(d) failover gap {num(fo['gap_ms'], 0)} ms (longest run of lost datagrams x {fo['interval_ms']} ms); "
        f"kill to first datagram through the survivor {num(fo['kill_to_first_ms'], 0)} ms; "
        f"lb's next hops skipped after {num(fo['reconverge_ms'], 0)} ms",
        f"    stream: {fo['sent']} sent, {fo['received']} echoed, {fo['lost']} lost "
        f"({fo['lost_outside_window']} outside the failover)",
    ]
    return "\n".join(lines)
