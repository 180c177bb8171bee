"""What the balancer daemon shows of its core: `mplsorch servers` rows, the status screen's
server and queue summaries, the metrics snapshot, and the log lines of session starts, ends and
moves. Plain functions of the core's state, so the control socket, the metrics and the log say
the same thing."""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterable

from orchestrator.capture.nfqueue import QueueStats
from orchestrator.core.balancer import Balancer
from orchestrator.core.failover import Outcome
from orchestrator.core.health import HealthTable
from orchestrator.core.sessions import Session
from orchestrator.daemon.logs import fields
from orchestrator.metrics import HistogramSnapshot, MetricsSnapshot, snapshot_from

log = logging.getLogger("mplsorch")


def server_rows(core: Balancer, health: HealthTable) -> list[dict[str, Any]]:
    """One row per server of each pool (a server in two pools is checked, and listed, per pool):
    the documented rows of `mplsorch servers --json`."""
    rows = []
    for pool in core.config.pools:
        services = [svc.name for svc in core.config.services if svc.pool == pool.name]
        for s in pool.servers:
            h = health.get(pool.name, s.name)
            rows.append(
                {
                    "name": s.name,
                    "pool": pool.name,
                    "address": str(s.address),
                    "state": str(core.health.state(pool.name, s.name)),
                    "admin": str(core.admin.state(s.name)),
                    "weight": core.weight(s.name),
                    "configured_weight": s.weight,
                    "sessions": sum(core.table.count(server=s.name, service=svc) for svc in services),
                    "response_time": None if h.response_time is None else round(h.response_time, 6),
                    "checked": pool.health_check is not None,
                    "reason": h.last_reason or None,
                }
            )
    return rows


def server_summary(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`status --json`'s `health` (rows by state) and `draining` (server names)."""
    rows = list(rows)
    states = collections.Counter(r["state"] for r in rows)
    return {
        "health": {state: states.get(state, 0) for state in ("up", "down", "unknown")},
        "draining": sorted({r["name"] for r in rows if r["admin"] == "draining"}),
    }


def queue_summary(stats: Iterable[QueueStats], queues: tuple[int, int]) -> dict[str, int]:
    """Our queues' counters added up: packets waiting, dropped when a queue was full, dropped
    when the daemon's socket buffer was full."""
    ours = [q for q in stats if queues[0] <= q.queue <= queues[1]]
    return {
        "bound": len(ours),
        "waiting": sum(q.waiting for q in ours),
        "queue_dropped": sum(q.queue_dropped for q in ours),
        "user_dropped": sum(q.user_dropped for q in ours),
    }


def metrics_snapshot(
    core: Balancer,
    now: float,
    op_results: dict[str, int],
    batch: HistogramSnapshot,
    offload: dict[str, int] | None = None,
) -> MetricsSnapshot:
    """The same counts `status --json` shows, taken at one moment; `offload`: our kernel
    objects by offload state (dataplane.offload.counts of a recent dump)."""
    health = [
        (pool.name, s.name, str(core.health.state(pool.name, s.name)))
        for pool in core.config.pools
        for s in pool.servers
    ]
    return snapshot_from(
        core.counters, core.sessions_by_state(), core.labels.stats(now).to_dict(), op_results, batch, health, offload
    )


def describe(s: Session) -> str:
    return f"{s.service} {s.key.value} -> {s.server} c2s {s.c2s} s2c {s.s2c}"


def _session_fields(s: Session, event: str) -> dict[str, Any]:
    return fields(
        event=event,
        session=s.id,
        service=s.service,
        key=s.key.value,
        client=s.key.client,
        server=s.server,
        c2s=s.c2s,
        s2c=s.s2c,
    )


def log_start(s: Session) -> None:
    log.info("session %d start: %s", s.id, describe(s), extra=_session_fields(s, "session_start"))


def log_rekeyed(s: Session) -> None:
    """A mobile client's new care-of address: the same session, server and labels."""
    extra = _session_fields(s, "session_rekeyed")
    extra["fields"]["new_client"] = s.clients[-1]
    log.info("session %d rekeyed: %s client %s", s.id, describe(s), s.clients[-1], extra=extra)


def log_end(s: Session, reason: str) -> None:
    extra = _session_fields(s, "session_end")
    extra["fields"]["reason"] = reason
    log.info("session %d end: %s (%s)", s.id, describe(s), reason, extra=extra)


def log_moved(o: Outcome, s: Session) -> None:
    extra = _session_fields(s, "session_moved")
    extra["fields"].update(old_server=o.server, old_c2s=o.c2s, reason=o.reason)
    log.info("session %d moved: %s (was %s c2s %d: %s)", s.id, describe(s), o.server, o.c2s, o.reason, extra=extra)
