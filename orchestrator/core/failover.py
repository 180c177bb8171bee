"""Sessions of a failed server, as their service's `on_server_failure` says. Pure: it builds
operations and changes the session table; the daemon applies the operations.

`reassign`: the session gets another server of its pool and a new label pair; its objects are
replaced in one batch: the old C2S filters are deleted before the new ones are added (cls_flower
keeps one filter per match, so the new one cannot go in beside the old), then the new S2C route
goes in and the old one out. Between the two only the rest of the batch runs, and no first packet
is decided meanwhile (the loop runs one thing at a time), so the client's next connection meets
the new filter. The old pair goes to hold-down, as every released pair does.

`reset`: the session ends; its objects are deleted. The client's next connection opens a new
session on a server that is up.

A session that cannot be reassigned (no other server available, or no label pair for it) is
reset: staying on a server that is down serves nobody.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from orchestrator.config.model import ServerFailure
from orchestrator.core.sessions import Session
from orchestrator.dataplane import ops

if TYPE_CHECKING:
    from orchestrator.core.balancer import Balancer


@dataclass(frozen=True)
class Outcome:
    """What became of one session of a failed server (for the log and the command's answer)."""

    session: int
    service: str
    key: str
    server: str                  # the failed server
    c2s: int                     # the pair it had
    action: str                  # "reassign" | "reset"
    new_server: str | None = None
    new_c2s: int | None = None
    reason: str = ""


@dataclass
class Failover:
    """Operations for the sessions of failed servers, and which slice of them each move needs."""

    ops: list[ops.Operation] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)  # moved session id -> ops slice


def relabelled(objects: list[ops.DataplaneObject], old_c2s: int, new_c2s: int,
               transport: int) -> list[ops.DataplaneObject]:
    """A session's objects under a new pair and server: each C2S filter keeps its match and the
    low byte of its handle and pushes [new transport, new C2S]; the S2C route keeps its next hop
    (and its swap for a label-aware client) under the new S2C."""
    labels = {old_c2s: new_c2s, old_c2s + 1: new_c2s + 1}
    out: list[ops.DataplaneObject] = []
    for obj in objects:
        if isinstance(obj, ops.FlowerFilter):
            out.append(replace(obj, handle=new_c2s << 8 | obj.handle & 0xFF,
                               actions=ops.push_stack((transport, new_c2s))))
        elif isinstance(obj, ops.MplsRoute):
            out.append(replace(obj, label=labels.get(obj.label, obj.label),
                               out_labels=tuple(labels.get(label, label) for label in obj.out_labels)))
        else:
            out.append(obj)
    return out


def replacement(old: list[ops.DataplaneObject], new: list[ops.DataplaneObject]) -> list[ops.Operation]:
    """One batch from the old objects to the new: filters out before their successors go in,
    routes in before their predecessors go out."""
    def filters(objects: list[ops.DataplaneObject]) -> list[ops.DataplaneObject]:
        return [o for o in objects if isinstance(o, ops.FlowerFilter)]

    def others(objects: list[ops.DataplaneObject]) -> list[ops.DataplaneObject]:
        return [o for o in objects if not isinstance(o, ops.FlowerFilter)]

    return ([ops.Delete(o) for o in filters(old)] + [ops.Add(o) for o in filters(new)]
            + [ops.Add(o) for o in others(new)] + [ops.Delete(o) for o in reversed(others(old))])


def fail_over(core: Balancer, pool: str, server: str, now: float, plan: Failover) -> None:
    """Every session on `server` of a service of `pool` follows its service's policy."""
    for session in core.table:
        svc = core.service_of(session)
        if svc is None or svc.pool != pool or session.server != server:
            continue
        reason = f"server {server} down"
        if svc.on_server_failure is ServerFailure.REASSIGN:
            target = core.pick(svc, session.key.value, now)
            c2s = core.labels.allocate(target, now) if target is not None else None
            if target is not None and c2s is not None:
                _move(core, session, target, c2s, now, plan, reason)
                continue
            reason += ": no other server available" if target is None else f": no label pair for {target}"
        plan.outcomes.append(Outcome(session.id, session.service, session.key.value, server, session.c2s,
                                     "reset", reason=reason))
        plan.ops += core.end(session, now, "server down")


def _move(core: Balancer, session: Session, target: str, c2s: int, now: float, plan: Failover,
          reason: str) -> None:
    old_server, old_c2s, old = session.server, session.c2s, list(session.objects)
    new = relabelled(old, old_c2s, c2s, core.transport[target])
    core.labels.release(old_c2s, now)
    core.table.reassign(session, target, c2s)
    session.objects = new
    start = len(plan.ops)
    plan.ops += replacement(old, new)
    plan.groups[session.id] = (start, len(plan.ops))
    core.counters["sessions_reassigned"] += 1
    plan.outcomes.append(Outcome(session.id, session.service, session.key.value, old_server, old_c2s,
                                 "reassign", target, c2s, reason))
