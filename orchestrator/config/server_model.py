"""The server role's configuration as frozen dataclasses (the file format of
templates/server.example.yaml; `server.py` parses it). Apart from the parser so that the agent's
decision core can use it without loading the YAML library.

The server agent terminates the C2S session labels of its block (C2S -> pop -> lo) and, for each
session, installs an S2C return route (client -> encap [balancer transport, S2C]) in the return table
of the session's VIP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config.model import DEFAULT_CONTROL_SOCKET, IPAddress, MetricsConfig, Role, Setup

MAX_TABLE = 4294967295  # routing table ids are 32 bits; 0 is "unspecified"
KERNEL_TABLES = {253: "default", 254: "main", 255: "local"}


@dataclass(frozen=True)
class ServerNode:
    """`node:` this server in the fabric."""

    transport_label: int  # required; 16..1048575, outside labels.block
    control_socket: str = DEFAULT_CONTROL_SOCKET
    setup: Setup = Setup.CHECK
    control_group: str | None = None  # also this group's members may use the control socket (0660)


@dataclass(frozen=True)
class Vip:
    """One VIP this server answers from (on lo) and the routing table of its S2C return routes
    (one rule `from VIP lookup TABLE`)."""

    address: IPAddress
    table: int  # 1..4294967295, not 253/254/255, unique


@dataclass(frozen=True)
class ServerQueue:
    """`nfqueue:` the queue that receives the first packet of each labelled session."""

    queue: int = 8  # 0..65535
    batch: int = 64  # packets read per wakeup, >= 1


@dataclass(frozen=True)
class ServerConfig:
    role: Role
    node: ServerNode
    balancer_transport_label: int  # S2C answers go out under this label
    fabric: tuple[str, ...]  # MPLS input allowed here; S2C leaves via [0]
    fabric_next_hops: tuple[IPAddress, ...]  # at most one per address family, in file order
    block: tuple[int, int]  # inclusive [first, last] of the C2S labels
    vips: tuple[Vip, ...]  # at least one, in file order
    persistence_timeout: float = 30.0  # seconds a return route outlives its last flow
    nfqueue: ServerQueue = field(default_factory=ServerQueue)
    source: str = field(default="<string>", compare=False)
    metrics: MetricsConfig | None = None  # the Prometheus endpoint, as the balancer's

    @property
    def return_device(self) -> str:
        """The interface S2C return routes leave through: the first fabric interface."""
        return self.fabric[0]

    def next_hop(self, version: int) -> IPAddress | None:
        """The fabric next hop of address family `version` (4 or 6), None when the file gives none."""
        for hop in self.fabric_next_hops:
            if hop.version == version:
                return hop
        return None

    def vip(self, address: IPAddress | str) -> Vip | None:
        """The VIP entry of `address` (an address or its text; ValueError if the text is no
        address), None when this server does not answer from it."""
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        for v in self.vips:
            if v.address == addr:
                return v
        return None

    def c2s_labels(self) -> range:
        """The C2S labels this server terminates: the odd labels of the block whose S2C (C2S + 1)
        is inside the block too."""
        first, last = self.block
        return range(first if first % 2 else first + 1, last, 2)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration in the file format (defaults filled in, durations in seconds),
        so the output of `config show` is itself a valid configuration."""
        return {
            "role": self.role.value,
            "node": {
                "transport_label": self.node.transport_label,
                "control_socket": self.node.control_socket,
                "control_group": self.node.control_group,
                "setup": self.node.setup.value,
            },
            "balancer": {"transport_label": self.balancer_transport_label},
            "interfaces": {"fabric": list(self.fabric), "fabric_next_hop": [str(h) for h in self.fabric_next_hops]},
            "labels": {"block": list(self.block)},
            "vips": {str(v.address): {"table": v.table} for v in self.vips},
            "sessions": {"persistence_timeout": self.persistence_timeout},
            "nfqueue": {"queue": self.nfqueue.queue, "batch": self.nfqueue.batch},
            "metrics": None if self.metrics is None else {"listen": self.metrics.listen},
        }
