"""The client role's configuration as frozen dataclasses (the file format of
templates/client.example.yaml; `client.py` parses it). Apart from the parser so that the client
agent's decision core can use it without loading the YAML library.

The client agent runs on a label-aware client host (or a client-side edge router): it terminates
the balancer's S2C labels (S2C -> pop -> lo), learns each session from its first labelled answer
and labels the session's packets towards the balancer with C2S = S2C - 1 (a flower push filter on
the egress of the balancer-facing interface).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.config.model import DEFAULT_CONTROL_SOCKET, IPAddress, MetricsConfig, Role, Setup


@dataclass(frozen=True)
class ClientNode:
    """`node:` this client host."""

    control_socket: str = DEFAULT_CONTROL_SOCKET
    setup: Setup = Setup.CHECK
    control_group: str | None = None  # also this group's members may use the control socket (0660)


@dataclass(frozen=True)
class ClientQueue:
    """`nfqueue:` the queue that receives the first labelled answer of each new flow."""

    queue: int = 9  # 0..65535
    batch: int = 64  # packets read per wakeup, >= 1


@dataclass(frozen=True)
class ClientConfig:
    role: Role
    node: ClientNode
    balancer: tuple[str, ...]  # towards the balancer: MPLS input here; the C2S filters sit on [0]'s egress
    label_range: tuple[int, int]  # the balancer's labels.range: the S2C labels (even) terminated here
    vips: tuple[IPAddress, ...]  # the balancer's VIPs whose answers are learned from
    persistence_timeout: float = 30.0  # seconds a session's C2S filters outlive its last flow
    answer_timeout: float = 10.0  # sent under C2S with no answer under S2C this long: the session ends (0: never)
    nfqueue: ClientQueue = field(default_factory=ClientQueue)
    source: str = field(default="<string>", compare=False)
    metrics: MetricsConfig | None = None

    @property
    def impose_device(self) -> str:
        """The interface whose egress labels the sessions' packets: the first balancer interface."""
        return self.balancer[0]

    def s2c_labels(self) -> range:
        """The S2C labels of the balancer's range: the even labels whose C2S (S2C - 1) is odd and
        inside the range too."""
        first, last = self.label_range
        return range(first + 1 if first % 2 else first + 2, last + 1, 2)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration in the file format (defaults filled in, durations in seconds)."""
        return {
            "role": self.role.value,
            "node": {
                "control_socket": self.node.control_socket,
                "control_group": self.node.control_group,
                "setup": self.node.setup.value,
            },
            "interfaces": {"balancer": list(self.balancer)},
            "labels": {"range": list(self.label_range)},
            "vips": [str(v) for v in self.vips],
            "sessions": {"persistence_timeout": self.persistence_timeout, "answer_timeout": self.answer_timeout},
            "nfqueue": {"queue": self.nfqueue.queue, "batch": self.nfqueue.batch},
            "metrics": None if self.metrics is None else {"listen": self.metrics.listen},
        }
