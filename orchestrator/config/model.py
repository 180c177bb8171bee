"""The balancer configuration as frozen dataclasses (parsed and validated by `load.py`; the server
role's configuration is `server.py`).

Every default below is the value `mplsorch config show` prints when a key is absent from the file.
Durations are float seconds; addresses are `ipaddress` objects; label ranges are inclusive
`(first, last)` pairs. `to_dict()` gives back the file format (durations as seconds), so the
output of `config show` is itself a valid configuration.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from orchestrator.analyze.keys import SessionKeyKind  # one definition: the analyzer's
from orchestrator.control_socket import DEFAULT_CONTROL_SOCKET
from orchestrator.dataplane.ops import OffloadPolicy  # one mapping of the words: the dataplane's

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MIN_LABEL = 16  # 0-15 are reserved
MAX_LABEL = 1048575  # 20-bit label space


class _Named(str, Enum):
    """An enum whose value is its spelling in the configuration file."""

    def __str__(self) -> str:
        return self.value


class Role(_Named):
    BALANCER = "balancer"
    SERVER = "server"  # the server agent: `orchestrator/config/server.py`
    CLIENT = "client"  # the client agent of a label-aware client: `orchestrator/config/client.py`


class Setup(_Named):
    """`node.setup`: what the daemon does about a node that is not ready (modules, sysctls, and on
    a server the VIPs on lo)."""

    CHECK = "check"  # refuse to start and name what is not ready
    APPLY = "apply"  # make it ready


class Scheduler(_Named):
    RR = "rr"
    WRR = "wrr"
    LC = "lc"
    WLC = "wlc"
    RESPONSE_TIME = "response-time"
    MAGLEV = "maglev"
    SOURCE_HASH = "source-hash"


class Protocol(_Named):
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"
    ESP = "esp"  # no ports


class LabelAllocation(_Named):
    POOL = "pool"
    SERVER_BLOCKS = "server-blocks"


class RefuseWith(_Named):
    RST = "rst"  # TCP reset (tcp services only)
    ICMP = "icmp"  # ICMP administratively prohibited


class FailPolicy(_Named):
    OPEN = "open"  # bypass: traffic to the VIP is no longer queued
    CLOSED = "closed"  # new sessions are dropped


class RateUnit(_Named):
    SECOND = "second"
    MINUTE = "minute"


class HealthCheckType(_Named):
    TCP = "tcp"  # a TCP connect succeeds
    HTTP = "http"  # an HTTP/1.0 GET answers with an expected status
    UDP = "udp"  # a datagram is answered (with the expected bytes)


class ServerFailure(_Named):
    """What happens to a service's sessions when their server fails its health check."""

    REASSIGN = "reassign"  # the session moves to another server of its pool; its clients stay on it
    RESET = "reset"  # the session ends; its clients' flows are reset and start anew


@dataclass(frozen=True)
class NodeConfig:
    """`node:` this balancer in the fabric."""

    transport_label: int  # required; 16..1048575
    control_socket: str = DEFAULT_CONTROL_SOCKET
    setup: Setup = Setup.CHECK
    control_group: str | None = None  # also this group's members may use the control socket (0660)


@dataclass(frozen=True)
class Interfaces:
    """`interfaces:` `clients`, `fabric` (non-empty, disjoint) and `fabric_next_hop` required;
    `offload` is the tc filters' hardware policy per fabric interface, `auto` where not given."""

    clients: tuple[str, ...]
    fabric: tuple[str, ...]
    fabric_next_hop: IPAddress
    offload: tuple[tuple[str, OffloadPolicy], ...] = ()  # (fabric interface, policy), as given

    def offload_of(self, dev: str) -> OffloadPolicy:
        """The policy of the filters installed on `dev`."""
        return dict(self.offload).get(dev, OffloadPolicy.AUTO)

    def required_offload(self) -> tuple[str, ...]:
        """The fabric interfaces whose filters must be in hardware (skip_sw)."""
        return tuple(dev for dev in self.fabric if self.offload_of(dev) is OffloadPolicy.REQUIRED)


@dataclass(frozen=True)
class ClientsConfig:
    """`clients:` (optional section). A client inside a `label_aware` prefix takes the session's
    labels itself: its answers keep the S2C label (the S2C route swaps instead of popping), and
    its sessions get a C2S label route (C2S -> swap [server transport, C2S] -> fabric) for the
    labelled packets its client agent sends. `label_aware_interfaces`: the client interfaces those
    arrive on, the only client interfaces with MPLS input on."""

    label_aware: tuple[IPNetwork, ...] = ()
    label_aware_interfaces: tuple[str, ...] = ()

    def is_label_aware(self, address: str) -> bool:
        if not self.label_aware:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.label_aware)


@dataclass(frozen=True)
class LabelConfig:
    """`labels:` the session label pool."""

    range: tuple[int, int]  # required; 16 <= first < last <= 1048575
    allocation: LabelAllocation = LabelAllocation.POOL
    hold_down: float = 2.0  # seconds before a released pair is reused

    @property
    def size(self) -> int:
        """Usable labels of the pool: two per (odd C2S, even S2C) pair inside the range."""
        return pair_labels(*self.range)


def pair_labels(first: int, last: int) -> int:
    """Labels usable as (odd C2S, C2S + 1) pairs inside [first, last]."""
    start = first if first % 2 else first + 1
    return 0 if start + 1 > last else 2 * ((last - 1 - start) // 2 + 1)


@dataclass(frozen=True)
class RateLimit:
    """`nfqueue.rate_limit:` per-source new sessions (and `nfqueue.global_rate_limit:` all sources
    together), written "N/second" or "N/minute"."""

    count: int = 200
    per: RateUnit = RateUnit.SECOND
    burst: int = 400

    @property
    def per_second(self) -> float:
        return self.count / (60.0 if self.per is RateUnit.MINUTE else 1.0)

    def __str__(self) -> str:
        return f"{self.count}/{self.per.value}"


@dataclass(frozen=True)
class NfqueueConfig:
    """`nfqueue:` (optional section). `rate_limit: null` disables the per-source limit;
    `global_rate_limit` (off by default) caps the first packets queued from all sources together."""

    queues: tuple[int, int] = (0, 0)  # first..last queue number, 0..65535
    batch: int = 64  # packets read per wakeup, >= 1
    rate_limit: RateLimit | None = field(default_factory=RateLimit)
    global_rate_limit: RateLimit | None = None
    workers: int = 1  # worker processes, one queue each (queues holds exactly `workers` then)


@dataclass(frozen=True)
class SessionsConfig:
    """`sessions:` (optional section). `embryonic_timeout`: a TCP session whose client sent
    nothing after its first packet (no handshake completed, e.g. a spoofed SYN) ends this long
    after it started; None (`null`) keeps it until its flows end, as any session."""

    embryonic_timeout: float | None = 30.0


@dataclass(frozen=True)
class Server:
    """One server of a pool (`pools.NAME.servers.NAME`). A server in several pools is one server."""

    name: str
    address: IPAddress  # required
    transport_label: int  # required; unique across servers and node
    weight: int = 1  # >= 0; 0 takes no new sessions
    max_sessions: int | None = None  # None: unlimited; else >= 1
    label_block: tuple[int, int] | None = None  # required with allocation: server-blocks


@dataclass(frozen=True)
class HealthCheck:
    """`pools.NAME.health_check:` (optional; without it a pool's servers are never checked and
    count as healthy). The check goes to each server's `address` on `port`."""

    type: HealthCheckType  # required
    port: int  # required; 1..65535
    interval: float = 2.0  # seconds between checks of one server, > 0
    timeout: float = 1.0  # seconds; > 0 and <= interval
    rise: int = 2  # consecutive successes: down -> up
    fall: int = 3  # consecutive failures: up -> down
    path: str = "/"  # http only
    expect_status: tuple[int, ...] = (200,)  # http only
    host: str | None = None  # http only; None: the server's address
    send: bytes = b""  # udp only; required there
    expect: bytes | None = None  # udp only; None: any answer will do

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type.value,
            "port": self.port,
            "interval": self.interval,
            "timeout": self.timeout,
            "rise": self.rise,
            "fall": self.fall,
        }
        if self.type is HealthCheckType.HTTP:
            d.update(path=self.path, expect_status=list(self.expect_status), host=self.host)
        elif self.type is HealthCheckType.UDP:
            d.update(
                send=self.send.decode("latin-1"), expect=None if self.expect is None else self.expect.decode("latin-1")
            )
        return d


@dataclass(frozen=True)
class Pool:
    name: str
    servers: tuple[Server, ...]  # at least one
    health_check: HealthCheck | None = None

    def server(self, name: str) -> Server:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class Admission:
    """`services.NAME.admission:` (optional)."""

    max_sessions: int | None = None  # None: unlimited; else >= 1
    min_free_labels: int = 16  # < the labels the service can draw on
    refuse_with: RefuseWith = RefuseWith.RST  # default: rst for tcp, icmp otherwise


@dataclass(frozen=True)
class Service:
    name: str
    vip: IPAddress  # required
    protocol: Protocol  # required
    ports: tuple[int, ...]  # required (none for esp); 1..65535
    pool: str  # required; a key of `pools`
    session_key: SessionKeyKind = SessionKeyKind.CLIENT_IP
    persistence_timeout: float = 30.0  # seconds, >= 0
    scheduler: Scheduler = Scheduler.RR
    admission: Admission = field(default_factory=Admission)
    fail_policy: FailPolicy = FailPolicy.OPEN
    on_server_failure: ServerFailure = ServerFailure.REASSIGN


DEFAULT_METRICS_LISTEN = "127.0.0.1:9469"


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics:` (optional; no endpoint when absent or null): the Prometheus endpoint."""

    host: str = "127.0.0.1"  # an IP address (IPv6 written [addr]:port)
    port: int = 9469  # 1..65535

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class StoreDown(_Named):
    """`cluster.when_store_down`: what a balancer does with a new session while etcd is
    unreachable (existing sessions keep forwarding either way)."""

    REFUSE = "refuse"  # refused (admission.refuse_with), counted refused:store-down
    LOCAL = "local"  # pairs of a reserved block (claimed while etcd was up), written on return


@dataclass(frozen=True)
class ClusterTls:
    """`cluster.tls`: client certificate and the CA that signed etcd's certificate (files)."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class ClusterConfig:
    """`cluster:` (optional; absent = one balancer, no etcd): several balancers sharing the
    session table in etcd (docs/scale.md)."""

    name: str  # this balancer's member name, unique in the cluster
    endpoints: tuple[tuple[str, int], ...]  # etcd client endpoints (host, port), tried in order
    tls: ClusterTls | None = None
    lease_ttl: int = 10  # seconds: a dead balancer's label blocks and membership go after this
    label_block: int = 256  # label pairs per block a balancer leases
    prefix: str = "/mplsorch/"  # every key of the cluster starts with it
    when_store_down: StoreDown = StoreDown.REFUSE
    # This member's own (unicast) transport label, besides the group's anycast one
    # (node.transport_label): advertised in its member key, so the others route the S2C labels
    # of its blocks to it until a session's row arrives (docs/scale.md). None: not advertised.
    member_label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoints": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints],
            "tls": None if self.tls is None else {"ca": self.tls.ca, "cert": self.tls.cert, "key": self.tls.key},
            "lease_ttl": self.lease_ttl,
            "label_block": self.label_block,
            "prefix": self.prefix,
            "when_store_down": self.when_store_down.value,
            "member_label": self.member_label,
        }


@dataclass(frozen=True)
class BalancerConfig:
    role: Role
    node: NodeConfig
    interfaces: Interfaces
    labels: LabelConfig
    pools: tuple[Pool, ...]
    services: tuple[Service, ...]
    nfqueue: NfqueueConfig = field(default_factory=NfqueueConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    source: str = field(default="<string>", compare=False)
    metrics: MetricsConfig | None = None
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    cluster: ClusterConfig | None = None

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def servers(self) -> tuple[Server, ...]:
        """Every distinct server, in order of first appearance."""
        seen: dict[str, Server] = {}
        for p in self.pools:
            for s in p.servers:
                seen.setdefault(s.name, s)
        return tuple(seen.values())

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration in the file format (defaults filled in, durations in seconds)."""
        nq = self.nfqueue
        return {
            "role": self.role.value,
            "node": {
                "transport_label": self.node.transport_label,
                "control_socket": self.node.control_socket,
                "control_group": self.node.control_group,
                "setup": self.node.setup.value,
            },
            "interfaces": {
                "clients": list(self.interfaces.clients),
                "fabric": list(self.interfaces.fabric),
                "fabric_next_hop": str(self.interfaces.fabric_next_hop),
                "offload": {dev: self.interfaces.offload_of(dev).value for dev in self.interfaces.fabric},
            },
            "clients": {
                "label_aware": [str(net) for net in self.clients.label_aware],
                "label_aware_interfaces": list(self.clients.label_aware_interfaces),
            },
            "labels": {
                "range": list(self.labels.range),
                "allocation": self.labels.allocation.value,
                "hold_down": self.labels.hold_down,
            },
            "nfqueue": {
                "queues": list(nq.queues),
                "batch": nq.batch,
                "workers": nq.workers,
                "rate_limit": _rate_dict(nq.rate_limit),
                "global_rate_limit": _rate_dict(nq.global_rate_limit),
            },
            "sessions": {"embryonic_timeout": self.sessions.embryonic_timeout},
            "pools": {
                p.name: {
                    "servers": {s.name: _server_dict(s) for s in p.servers},
                    "health_check": None if p.health_check is None else p.health_check.to_dict(),
                }
                for p in self.pools
            },
            "services": {s.name: _service_dict(s) for s in self.services},
            "metrics": None if self.metrics is None else {"listen": self.metrics.listen},
            **({} if self.cluster is None else {"cluster": self.cluster.to_dict()}),
        }


def _rate_dict(rate: RateLimit | None) -> dict[str, Any] | None:
    return None if rate is None else {"rate": str(rate), "burst": rate.burst}


def _server_dict(s: Server) -> dict[str, Any]:
    d: dict[str, Any] = {
        "address": str(s.address),
        "transport_label": s.transport_label,
        "weight": s.weight,
        "max_sessions": s.max_sessions,
    }
    if s.label_block is not None:
        d["label_block"] = list(s.label_block)
    return d


def _service_dict(s: Service) -> dict[str, Any]:
    d: dict[str, Any] = {"vip": str(s.vip), "protocol": s.protocol.value}
    if s.protocol is not Protocol.ESP:
        d["ports"] = list(s.ports)
    d.update(
        {
            "pool": s.pool,
            "session_key": s.session_key.value,
            "persistence_timeout": s.persistence_timeout,
            "scheduler": s.scheduler.value,
            "admission": {
                "max_sessions": s.admission.max_sessions,
                "min_free_labels": s.admission.min_free_labels,
                "refuse_with": s.admission.refuse_with.value,
            },
            "fail_policy": s.fail_policy.value,
            "on_server_failure": s.on_server_failure.value,
        }
    )
    return d
