"""Sessions of a failed server, as their service's `on_server_failure` says: the plan a failover
produces and the pure steps of a move. `Balancer.on_health` walks its own table and decides;
this module knows nothing of the balancer, so the two do not import each other. The daemon
applies the operations.

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

from orchestrator.dataplane import handles, ops


@dataclass(frozen=True)
class Outcome:
    """What became of one session of a failed server (for the log and the command's answer)."""

    session: int
    service: str
    key: str
    server: str  # the failed server
    c2s: int  # the pair it had
    action: str  # "reassign" | "reset"
    new_server: str | None = None
    new_c2s: int | None = None
    reason: str = ""


@dataclass
class Failover:
    """Operations for the sessions of failed servers, and which slice of them each move needs."""

    ops: list[ops.Operation] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)  # moved session id -> ops slice


def relabelled(
    objects: list[ops.DataplaneObject], old_c2s: int, new_c2s: int, transport: int
) -> list[ops.DataplaneObject]:
    """A session's objects under a new pair and server: each C2S filter keeps its match and the
    index of its handle and pushes [new transport, new C2S]; the S2C route keeps its next hop
    (and its swap for a label-aware client) under the new S2C; a label-aware client's C2S route
    swaps to [new transport, new C2S] under the new C2S, and its liveness filter counts the new
    C2S."""
    labels = {old_c2s: new_c2s, old_c2s + 1: new_c2s + 1}
    out: list[ops.DataplaneObject] = []
    for obj in objects:
        if isinstance(obj, ops.FlowerFilter) and obj.match.mpls_label == old_c2s:  # a liveness filter
            out.append(
                replace(
                    obj,
                    handle=handles.relabel_handle(obj.handle, new_c2s),
                    match=replace(obj.match, mpls_label=new_c2s),
                )
            )
        elif isinstance(obj, ops.FlowerFilter):
            out.append(
                replace(
                    obj,
                    handle=handles.relabel_handle(obj.handle, new_c2s),
                    actions=ops.push_stack((transport, new_c2s)),
                )
            )
        elif isinstance(obj, ops.U32Filter):  # its node names no label: it keeps it
            out.append(replace(obj, actions=ops.push_stack((transport, new_c2s))))
        elif isinstance(obj, ops.MplsRoute) and obj.label == old_c2s:  # a label-aware client's C2S route
            out.append(replace(obj, label=new_c2s, out_labels=(transport, new_c2s)))
        elif isinstance(obj, ops.MplsRoute):
            out.append(
                replace(
                    obj,
                    label=labels.get(obj.label, obj.label),
                    out_labels=tuple(labels.get(label, label) for label in obj.out_labels),
                )
            )
        else:
            out.append(obj)
    return out


def replacement(old: list[ops.DataplaneObject], new: list[ops.DataplaneObject]) -> list[ops.Operation]:
    """One batch from the old objects to the new: filters out before their successors go in,
    routes in before their predecessors go out. Fast-path set elements name only the client and
    the service, so a move keeps them as they are."""
    kept = [o for o in old if isinstance(o, ops.FastPathElement) and o in new]
    old, new = [o for o in old if o not in kept], [o for o in new if o not in kept]

    def filters(objects: list[ops.DataplaneObject]) -> list[ops.DataplaneObject]:
        return [o for o in objects if isinstance(o, (ops.FlowerFilter, ops.U32Filter))]

    def others(objects: list[ops.DataplaneObject]) -> list[ops.DataplaneObject]:
        return [o for o in objects if not isinstance(o, (ops.FlowerFilter, ops.U32Filter))]

    moves: list[ops.Operation] = [ops.Delete(o) for o in filters(old)]
    moves += [ops.Add(o) for o in filters(new)]
    moves += [ops.Add(o) for o in others(new)]
    moves += [ops.Delete(o) for o in reversed(others(old))]
    return moves
