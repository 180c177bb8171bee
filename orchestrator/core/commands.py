"""The operator's commands on the balancer core: drain, enable, weight, flush. Pure: each checks
its arguments before it changes anything (BadCommand names what is wrong), then returns what it
did and the operations to apply."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from orchestrator.core.balancer import Balancer
from orchestrator.core.schedulers import Maglev
from orchestrator.core.servers import AdminState, BadCommand, check_server, check_weight
from orchestrator.core.sessions import Session
from orchestrator.dataplane.ops import Operation


@dataclass(frozen=True)
class WeightChange:
    server: str
    weight: int
    previous: int
    moved: dict[str, float]  # maglev service -> share of its lookup table now on another server

    def to_dict(self) -> dict[str, object]:
        return {
            "server": self.server,
            "weight": self.weight,
            "previous": self.previous,
            "moved": {k: round(v, 6) for k, v in self.moved.items()},
        }


@dataclass
class Flush:
    ended: list[Session] = field(default_factory=list)
    ops: list[Operation] = field(default_factory=list)


def set_admin(core: Balancer, server: object, state: AdminState) -> dict[str, object]:
    """drain: no new sessions, its sessions stay until they end; enable: new sessions again."""
    name = check_server(server, core.servers)
    previous = core.set_admin(name, state)
    return {"server": name, "admin": str(state), "previous": str(previous), "sessions": core.session_count(server=name)}


def set_weight(core: Balancer, server: object, weight: object, now: float) -> WeightChange:
    """A server's weight in every pool it is in. Each maglev service of those pools rebuilds its
    table now, and the share of entries that changed owner is reported: the keys that moved."""
    name = check_server(server, core.servers)
    value = check_weight(weight)
    previous = core.weight(name)
    affected = [svc for svc in core.config.services if any(s.name == name for s in core.pools[svc.pool].servers)]
    before: dict[str, tuple[str, ...]] = {}
    for svc in affected:
        sched = core.scheduler(svc.name)
        if isinstance(sched, Maglev):
            if not sched.size:  # never built: build it as it stood, to compare with
                sched.rebuild(core.server_states(svc, now))
            before[svc.name] = sched.table
    core.set_weight(name, value)
    moved: dict[str, float] = {}
    for svc in affected:
        sched = core.scheduler(svc.name)
        if isinstance(sched, Maglev):
            sched.rebuild(core.server_states(svc, now))
            moved[svc.name] = moved_share(before[svc.name], sched.table)
    return WeightChange(name, value, previous, moved)


def moved_share(before: tuple[str, ...], after: tuple[str, ...]) -> float:
    """The share of lookup entries whose server changed (tables of one size: maglev keeps its
    size for a pool, see Balancer.configure)."""
    if not before and not after:
        return 0.0
    if len(before) != len(after):
        return 1.0
    return sum(a != b for a, b in zip(before, after)) / len(after)


def flush(core: Balancer, now: float, server: object = None, client: object = None) -> Flush:
    """End the sessions on `server` and/or of `client` (all of them when neither is given)."""
    name = check_server(server, core.servers) if server is not None else None
    address = _address(client) if client is not None else None
    out = Flush()
    for session in core.sessions():
        if name is not None and session.server != name:
            continue
        if address is not None and address not in session.clients and session.key.client != address:
            continue
        out.ended.append(session)
        out.ops += core.end(session, now, "flushed")
    return out


def _address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise BadCommand(f"bad client {value!r}: an IP address") from None
