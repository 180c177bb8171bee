"""What the cluster's shared session table tells a balancer's core (docs/scale.md): a session as
the table holds it, and the events the daemon turns the store's watch into. Pure data; the store's
encoding is orchestrator/cluster/codec.py, the I/O orchestrator/cluster/store.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from orchestrator.dataplane.ops import NextHop

__all__ = ["ClusterSession", "RemoteDelete", "RemotePut"]


@dataclass(frozen=True)
class ClusterSession:
    """One row of the shared table: everything another balancer needs to install the session's
    kernel objects (its C2S filters for every client address, its S2C route) under the same
    server and labels."""

    service: str
    kind: str  # SessionKeyKind's value
    key: str
    clients: tuple[str, ...]
    vip: str
    protocol: str
    port: int | None
    sport: int | None  # the first flow's source port (a five-tuple session's filter matches it)
    server: str
    c2s: int
    owner: str  # the member whose lease holds the key: the balancer that serves the session's flows


@dataclass(frozen=True)
class RemotePut:
    """A session written to the table (by another member, or ours echoed back), with the node's
    own next hop to each of its client addresses (the daemon looks them up)."""

    session: ClusterSession
    hops: Mapping[str, NextHop] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class RemoteDelete:
    """A session's key left the table. `orphaned`: it went with its owner's lease (the member
    died or left), so the session still lives and a surviving balancer adopts it."""

    service: str
    key: str
    owner: str
    orphaned: bool = False
