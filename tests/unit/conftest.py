"""The unit tests' one harness: the example configurations, a balancer core glued to the fake
kernel as the daemon glues them (`Node`; `AgentNode` for the server role), and the daemons over the fake provider with a scripted
queue and conntrack socket instead of the kernel's. Test modules import these from here and never
from each other, so a change to the harness is made once."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP

from orchestrator.analyze.packet import source_address
from orchestrator.capture.conntrack import ConntrackListener
from orchestrator.capture.nfqueue import QueuedPacket, Verdict
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.examples import KeyPath, example
from orchestrator.config.load import load_client_config, load_server_config, parse_config
from orchestrator.config.model import BalancerConfig
from orchestrator.config.server_model import ServerConfig
from orchestrator.core.agent import ServerAgent
from orchestrator.core.balancer import Balancer, Commit, Plan, qdiscs
from orchestrator.core.client_agent import ClientAgent
from orchestrator.core.events import (
    Action,
    FirstPacket,
    FlowKey,
    FlowsEnded,
    FlowsStarted,
    FlowTableResync,
    LabelledPacket,
)
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.client import ClientDaemon
from orchestrator.daemon.loop import Capture
from orchestrator.daemon.server import ServerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.lab.bench.hotpath import EventSocket

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
BALANCER_EXAMPLE = TEMPLATES / "balancer.example.yaml"
SERVER_EXAMPLE = TEMPLATES / "server.example.yaml"
CLIENT_EXAMPLE = TEMPLATES / "client.example.yaml"
EXAMPLE = BALANCER_EXAMPLE.read_text()
VIP = "10.0.0.100"
TRANSPORT = {"s1": 101, "s2": 102, "s3": 103}  # the example's servers' transport labels


def config(changes: Mapping[KeyPath, Any] | None = None) -> BalancerConfig:
    """The balancer example with `changes` (key path -> value; orchestrator.config.examples)."""
    cfg = parse_config(example("balancer", changes), "test.yaml")
    assert isinstance(cfg, BalancerConfig)
    return cfg


def syn(src: str, sport: int = 40000, dport: int = 80, dst: str = VIP) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


class Node:
    """The balancer core plus a fake kernel, glued as the daemon glues them."""

    def __init__(self, cfg: BalancerConfig | None = None, now: float = 1000.0) -> None:
        self.core = Balancer(cfg or config(), now)
        self.kernel = FakeProvider(["lan0", "lan1", "fab0"])
        assert all(r.ok for r in self.kernel.apply([ops.Add(q) for q in qdiscs(self.core.config)]))
        # The client LANs are on-link on lan0 (tests add routes through gateways).
        self.kernel.add_ip_route("10.0.0.0/16", "lan0")
        self.kernel.add_ip_route("2001:db8::/32", "lan0")
        self.now = now
        self.seq = 0
        self.plan = Plan()

    def packets(self, *datas: bytes) -> Commit:
        batch = []
        sources = [source_address(data) for data in datas]
        hops = self.kernel.routes_to(s for s in sources if s is not None)
        for data, src in zip(datas, sources):
            self.seq += 1
            batch.append(FirstPacket(0, self.seq, data, "lan0", hops.get(src) if src else None))
        plan = self.core.on_packets(batch, self.now)
        self.plan = plan
        results = self.kernel.apply(plan.ops)
        commit = self.core.commit(plan, results, self.now)
        assert all(r.ok for r in self.kernel.apply(commit.cleanup))
        assert all(r.ok for r in self.kernel.apply(commit.admit))
        return commit

    def labels_of(self, client: str, dport: int = 80, proto: str = "tcp") -> tuple[int, ...]:
        fwd = self.kernel.forward_ip(client, VIP, proto=proto, sport=40000, dport=dport, out_dev="fab0")
        return fwd.labels if fwd else ()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        assert all(r.ok for r in self.kernel.apply(self.core.tick(self.now)))

    def check_liveness(self) -> list[int]:
        """What the daemon's tick does after `tick` (BalancerDaemon.check_liveness): the due
        label-aware sessions' liveness filter counts from the fake kernel; the ids of the
        sessions ended."""
        due = self.core.liveness_due(self.now)
        counts = self.kernel.filter_packets([f for fs in due.values() for f in fs])
        operations, ended = self.core.on_liveness(due, counts, self.now)
        assert all(r.ok for r in self.kernel.apply(operations))
        return [s.id for s in ended]

    def check_embryonic(self) -> list[int]:
        """What the daemon's tick does after `tick` (BalancerDaemon.end_embryonic): the due
        embryonic sessions' filter counts from the fake kernel; the ids of the sessions ended."""
        due = self.core.embryonic_due(self.now)
        counts = self.kernel.filter_packets([f for fs in due.values() for f in fs])
        operations, ended = self.core.on_embryonic(due, counts, self.now)
        assert all(r.ok for r in self.kernel.apply(operations))
        return [s.id for s in ended]


def clients(n: int, first: int = 1) -> list[str]:
    """`n` distinct client addresses in 10.0.0.0/16, from the `first`-th on."""
    return [f"10.0.{(i >> 8) & 255}.{i & 255}" for i in range(first, first + n)]


def filled(n: int) -> Node:
    """A balancer core with `n` http sessions, one flow each (first packets in batches of 100)."""
    node = Node()
    for batch in range(0, n, 100):
        node.packets(*(syn(c) for c in clients(min(100, n - batch), first=batch + 1)))
    assert len(node.core.table) == n
    return node


def flows_of(node: Node, client: str) -> tuple[FlowKey, ...]:
    session = node.core.table.get("http", client)
    assert session is not None
    return tuple(session.flows)


def conntrack_reading(datagrams: Iterable[bytes]) -> ConntrackListener:
    """A conntrack listener whose socket hands out these datagrams, as the kernel's event socket
    would, then has nothing more (BlockingIOError)."""
    sock = EventSocket()
    sock.datagrams.extend(datagrams)
    listener = ConntrackListener.__new__(ConntrackListener)
    listener._sock, listener._buf = sock, bytearray(1 << 16)  # type: ignore[assignment]
    return listener


class AgentNode:
    """The agent and a fake kernel, wired as the daemon wires them."""

    def __init__(self, kernel: FakeProvider | None = None) -> None:
        self.config = load_server_config(SERVER_EXAMPLE)
        self.agent = ServerAgent(self.config)
        self.kernel = kernel or FakeProvider(["eth0"])
        assert all(r.ok for r in self.kernel.apply([ops.Add(o) for o in self.agent.node_objects()]))
        self.next_id = 0

    def first(self, label: int, data: bytes, now: float = 0.0) -> list[Action]:
        self.next_id += 1
        plan = self.agent.on_packets([LabelledPacket(8, self.next_id, label, data)], now)
        return [v.action for v in self.agent.commit(plan, self.kernel.apply(plan.ops))]

    def answer(self, client: str, vip: str = VIP) -> tuple[int, ...] | None:
        """The label stack an answer from the VIP to `client` leaves with (None: plain IP)."""
        fwd = self.kernel.route_ip(vip, client)
        return None if fwd is None else fwd.labels

    def tick(self, now: float) -> None:
        assert all(r.ok for r in self.kernel.apply(self.agent.tick(now)))


class ClientAgentNode:
    """The client agent and a fake kernel (the client host), wired as the daemon wires them."""

    def __init__(self, cfg: ClientConfig | None = None) -> None:
        self.config = cfg or load_client_config(CLIENT_EXAMPLE)
        self.agent = ClientAgent(self.config)
        self.kernel = FakeProvider(["eth0"])
        assert all(r.ok for r in self.kernel.apply([ops.Add(o) for o in self.agent.node_objects()]))
        self.next_id = 0

    def answer(self, s2c: int, data: bytes, now: float = 0.0) -> list[Action]:
        """A flow's first labelled answer, queued under S2C: the verdicts."""
        self.next_id += 1
        plan = self.agent.on_packets([LabelledPacket(9, self.next_id, s2c, data)], now)
        return [v.action for v in self.agent.commit(plan, self.kernel.apply(plan.ops))]

    def labels_of(self, client: str, dport: int = 80, vip: str = VIP, proto: str = "tcp") -> tuple[int, ...]:
        """The labels the client's packet to the VIP leaves the balancer link with (() plain IP)."""
        fwd = self.kernel.forward_ip(client, vip, proto=proto, sport=40000, dport=dport, out_dev="eth0")
        return fwd.labels if fwd else ()

    def tick(self, now: float) -> None:
        assert all(r.ok for r in self.kernel.apply(self.agent.tick(now)))


class _Pipe:
    """A file descriptor the loop can watch that never becomes readable: a pipe, made only when
    the loop asks for it (most tests call the daemon's hooks directly), no socket."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None

    def fileno(self) -> int:
        if self._fds is None:
            self._fds = os.pipe()
        return self._fds[0]

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


class ScriptedQueue(_Pipe):
    """The daemon's NFQUEUE socket: hands out the batches given to `script`, records each batch of
    verdicts sent and what `observe` said at that moment (e.g. whether the kernel held a route
    yet: verdicts must go only after the objects they wait for)."""

    def __init__(self, observe: Callable[[], object] = lambda: None) -> None:
        super().__init__()
        self.observe = observe
        self.overruns = 0  # set by a test: ENOBUFS the kernel reported
        self.batches: list[list[QueuedPacket]] = []
        self.sent_batches: list[tuple[list[Verdict], object]] = []

    def script(self, *packets: QueuedPacket) -> None:
        self.batches.append(list(packets))

    def read_batch(self, limit: int) -> list[QueuedPacket]:
        """The next scripted batch, at most `limit` of it (the rest waits for the next read)."""
        if not self.batches:
            return []
        batch = self.batches.pop(0)
        if len(batch) > limit:
            self.batches.insert(0, batch[limit:])
        return batch[:limit]

    def send_verdicts(self, verdicts: Iterable[Verdict]) -> None:
        self.sent_batches.append((list(verdicts), self.observe()))

    @property
    def sent(self) -> list[Verdict]:
        """Every verdict sent, in order."""
        return [v for batch, _ in self.sent_batches for v in batch]


class ScriptedConntrack(_Pipe):
    """The daemon's conntrack socket: scripted events, a scripted live flow table."""

    def __init__(self, live: Iterable[FlowKey] = ()) -> None:
        super().__init__()
        self.live = frozenset(live)
        self.expiries = 0  # the kernel's expiry passes asked for (ConntrackListener.expire)
        self.events: list[FlowsStarted | FlowsEnded | FlowTableResync] = []

    def read(self) -> list[FlowsStarted | FlowsEnded | FlowTableResync]:
        events, self.events = self.events, []
        return events

    def sweep(self) -> FlowTableResync:
        return FlowTableResync(self.live, sweep=True)

    def expire(self) -> None:
        self.expiries += 1

    def dump(self) -> frozenset[FlowKey]:
        return self.live

    def start_dump(self) -> ScriptedDump:
        return ScriptedDump(self.live)


class ScriptedDump:
    """A dump of a scripted table, read as capture.conntrack.FlowDump is: `per_step` flows a
    step, "wait" (`fileno` readable at once) every other step when `waits`; steps noted in
    `trace`; from step `fail_at` on, the kernel's error (OSError)."""

    def __init__(
        self,
        live: Iterable[FlowKey],
        per_step: int = 100,
        waits: bool = False,
        trace: list[str] | None = None,
        fail_at: int | None = None,
    ) -> None:
        self._rest = list(live)
        self.trace, self.fail_at = trace, fail_at
        self._read: set[FlowKey] = set()
        self.per_step, self.waits = per_step, waits
        self.steps = 0
        self.closed = False
        self._ready, self._other = socket.socketpair()
        self._other.send(b"!")  # always readable

    @property
    def live(self) -> frozenset[FlowKey]:
        return frozenset(self._read)

    def fileno(self) -> int:
        return self._ready.fileno()

    def step(self) -> str:
        self.steps += 1
        if self.trace is not None:
            self.trace.append("dump")
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise OSError(16, "conntrack dump: Device or resource busy")
        if self.waits and self.steps % 2:
            return "wait"
        taken, self._rest = self._rest[: self.per_step], self._rest[self.per_step :]
        self._read.update(taken)
        return "more" if self._rest else "done"

    def close(self) -> None:
        self.closed = True
        self._ready.close()
        self._other.close()


def scripted_capture(queue: ScriptedQueue, conntrack: ScriptedConntrack | None = None) -> Capture:
    """Openers that hand the daemon these scripted sockets instead of the kernel's."""
    flows = conntrack if conntrack is not None else ScriptedConntrack()
    return Capture(queue=lambda first, last: queue, conntrack=lambda: flows)


def balancer_daemon(
    cfg: BalancerConfig,
    kernel: FakeProvider,
    queue: ScriptedQueue | None = None,
    daemon_class: type[BalancerDaemon] = BalancerDaemon,
) -> BalancerDaemon:
    """A balancer daemon over the fake kernel, its queue already open (as after setup)."""
    queue = queue if queue is not None else ScriptedQueue()
    daemon = daemon_class(str(BALANCER_EXAMPLE), kernel, scripted_capture(queue), cfg)
    daemon.queue = queue
    return daemon


def server_daemon(cfg: ServerConfig, kernel: FakeProvider, queue: ScriptedQueue) -> ServerDaemon:
    """A server daemon over the fake kernel, its queue already open (as after setup)."""
    daemon = ServerDaemon(str(SERVER_EXAMPLE), kernel, scripted_capture(queue), cfg)
    daemon.queue = queue
    return daemon


def client_daemon(cfg: ClientConfig, kernel: FakeProvider, queue: ScriptedQueue) -> ClientDaemon:
    """A client agent daemon over the fake kernel, its queue already open (as after setup)."""
    daemon = ClientDaemon(str(CLIENT_EXAMPLE), kernel, scripted_capture(queue), cfg)
    daemon.queue = queue
    return daemon


class EtcdServer:
    """One etcd member on loopback with random ports in a temporary directory (the cluster
    tests' store), stopped and started again on the same ports and data by the tests."""

    def __init__(self, binary: str, data: Path, tls: dict[str, Path] | None = None) -> None:
        """`tls`: ca, cert, key (etcd's), client-cert, client-key files: etcd serves https and
        asks clients for a certificate signed by the CA."""
        import socket

        self.binary, self.data, self.tls = binary, data, tls
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        self.port, self.peer_port = ports
        self.proc: Any = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess
        import time

        scheme = "https" if self.tls else "http"
        client, peer = f"{scheme}://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        tls = (
            [
                f"--cert-file={self.tls['cert']}",
                f"--key-file={self.tls['key']}",
                f"--trusted-ca-file={self.tls['ca']}",
                "--client-cert-auth",
            ]
            if self.tls
            else []
        )
        self.proc = subprocess.Popen(
            [
                self.binary,
                *tls,
                "--name=t",
                f"--data-dir={self.data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=t={peer}",
                "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.data.parent / "etcd.log").open("ab"),
        )
        # Ready when /health says so (a leader elected), not when the port opens.
        import json
        import ssl
        import urllib.request

        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls["ca"]))
            context.load_cert_chain(str(self.tls["client-cert"]), str(self.tls["client-key"]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1, context=context) as answer:
                    if json.loads(answer.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
