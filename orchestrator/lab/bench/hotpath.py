"""The first-packet path's own cost, without a kernel: the balancer daemon's `decide` (analyse,
decide, commit, verdicts) over the fake provider, every operation also encoded as the netlink
provider would send it (only the system calls are missing). Counted load: N first packets, each
from its own client, in batches as NFQUEUE hands them over; sessions per second of CPU.

`--workers W` runs W processes at once, each a worker with its own share of the labels (the
configuration's `nfqueue.workers: W`, core.shards) and its own clients, as the ruleset's hash
would give them: how the pure per-session cost scales over the machine's cores.
`--profile FILE` writes cProfile's stats of one process (workers 1). `--gap SECONDS` sleeps that
long between batches, as first packets arrive in `lab bench setup`'s latency runs (one every
20 ms or so): the CPU per session then includes what the path's code and data cost when they
have left the CPU's caches in between (issue 15: on a shared host several times the
back-to-back cost).

`--flows N` measures instead what a flow of an existing session costs when the kernel's fast
path admitted it (issue 15, `lab bench setup`'s (d)): N new flows of the sessions, each as
conntrack's new-flow event in the kernel's encoding, decoded by the listener in reads of
`--batch` events and adopted by the core; decoding and adoption in microseconds of CPU per flow
(decoding includes the emulated socket's own cost, `socket_us_per_flow`).

    python -m orchestrator.lab.bench.hotpath --sessions 20000 --workers 1
    python -m orchestrator.lab.bench.hotpath --sessions 20000 --workers 2
    python -m orchestrator.lab.bench.hotpath --sessions 300 --batch 1 --gap 0.02
    python -m orchestrator.lab.bench.hotpath --sessions 10000 --flows 30000 --batch 64
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import ipaddress
import json
import multiprocessing
import time
from typing import Any, Callable, Iterable, Sequence

from orchestrator.capture import conntrack
from orchestrator.capture.nfqueue import QueuedPacket, Verdict
from orchestrator.config.examples import KeyPath, example
from orchestrator.config.load import parse_config
from orchestrator.config.model import BalancerConfig
from orchestrator.core.events import FlowKey
from orchestrator.core.shards import Shard
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.loop import Capture
from orchestrator.dataplane import offload, ops
from orchestrator.dataplane.netlink import encode
from orchestrator.dataplane.netlink.constants import IPCTNL_MSG_CT_NEW

VIP = "10.0.0.100"


class EncodingProvider:
    """A kernel that takes every operation: each is encoded as the netlink provider would send
    it, and succeeds (the fake provider's model of the kernel's checks costs more than the
    daemon; the kernel's own cost is what the lab's `bench setup` measures)."""

    def __init__(self) -> None:
        self.links = {"lan0": 2, "lan1": 3, "fab0": 4}
        self.names = {i: n for n, i in self.links.items()}
        self.route_lookups = 0

    def apply(self, operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        for op in operations:
            encode.encode(op, self.ifindex)
        return [ops.OpResult(op) for op in operations]

    def dump(self, elements: bool = True) -> list[ops.Installed]:
        return []

    def dump_elements(self) -> list[ops.Installed]:
        return []

    def offload_counts(self, keep: Callable[[ops.Installed], bool] | None = None) -> dict[str, int]:
        return offload.counts([])

    def supports_nexthops(self) -> bool:
        return True

    def routes_to(self, addresses: Iterable[str]) -> dict[str, ops.NextHop | None]:
        out: dict[str, ops.NextHop | None] = {a: ops.NextHop("lan0") for a in addresses}
        self.route_lookups += len(out)
        return out

    def ifindex(self, name: str) -> int:
        return self.links[name]

    def filter_packets(self, filters: Sequence[ops.FlowerFilter | ops.U32Filter]) -> list[int | None]:
        return [None for _ in filters]  # a kernel that takes every operation and counts nothing

    def addresses(self, dev: str) -> list[str]:
        return []

    def add_address(self, dev: str, address: str) -> None:
        pass

    def ifname(self, index: int) -> str:
        return self.names[index]

    def close(self) -> None:
        pass

    def twin(self) -> EncodingProvider:
        return self


class Queue:
    overruns = 0

    def __init__(self) -> None:
        self.verdicts = 0

    def fileno(self) -> int:
        return -1

    def read_batch(self, limit: int) -> list[QueuedPacket]:
        return []

    def send_verdicts(self, verdicts: Any) -> None:
        self.verdicts += sum(1 for v in verdicts if isinstance(v, Verdict))

    def close(self) -> None:
        pass


def syn(src: str, sport: int) -> bytes:
    """A TCP SYN to the VIP's port 80, built by hand (no scapy in the measured process)."""
    import socket
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    total = 20 + len(tcp)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(VIP))
    return header + tcp


def daemon_with_sessions(
    index: int,
    workers: int,
    sessions: int,
    batch: int,
    profiler: cProfile.Profile | None = None,
    gap: float = 0.0,
) -> tuple[BalancerDaemon, Queue, float, float]:
    """A worker's daemon over the encoding kernel that made `sessions` sessions (tcp/80) from as
    many first packets, fed in batches of `batch`; with the CPU and wall time they took."""
    changes: dict[KeyPath, Any] = {
        "labels.range": [1000, 1000 + 2 * (sessions + 1000) * workers + 1],
        "services.http.admission.min_free_labels": 1,
        "nfqueue.workers": workers,
        "nfqueue.queues": [0, workers - 1],
        "nfqueue.rate_limit": None,
    }
    config = parse_config(example("balancer", changes), "hotpath.yaml")
    assert isinstance(config, BalancerConfig)
    kernel = EncodingProvider()
    queue = Queue()
    capture = Capture(queue=lambda first, last: queue, conntrack=lambda: None)  # type: ignore[arg-type,return-value]
    shard = Shard(index, workers) if workers > 1 else None
    daemon = BalancerDaemon("hotpath.yaml", kernel, capture, config, shard=shard)
    daemon.queue = queue
    lan0 = kernel.ifindex("lan0")
    packets = [
        QueuedPacket(index, i + 1, syn(client(index, sessions, i), 40000), lan0, None, 0) for i in range(sessions)
    ]
    started = time.process_time()
    wall = time.perf_counter()
    if profiler:
        profiler.enable()
    for start in range(0, sessions, batch):
        if gap:
            time.sleep(gap)
        daemon.decide(packets[start : start + batch])
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    elapsed = time.perf_counter() - wall
    made = daemon.core.counters.get("sessions_started", 0)
    if made != sessions or queue.verdicts != sessions:
        raise RuntimeError(f"worker {index}: {made} sessions, {queue.verdicts} verdicts of {sessions}")
    return daemon, queue, cpu, elapsed


def client(index: int, sessions: int, i: int) -> str:
    """The address of worker `index`'s i-th client."""
    return str(ipaddress.ip_address(int(ipaddress.ip_address("10.64.0.0")) + index * sessions + i))


def worker_run(
    index: int, workers: int, sessions: int, batch: int, profile: str | None, gap: float = 0.0
) -> dict[str, float]:
    profiler = cProfile.Profile() if profile else None
    daemon, _queue, cpu, elapsed = daemon_with_sessions(index, workers, sessions, batch, profiler, gap)
    if profiler and profile:
        profiler.dump_stats(profile)
    made = daemon.core.counters["sessions_started"]
    return {"sessions": made, "cpu_s": cpu, "wall_s": elapsed, "cpu_us_per_session": cpu / made * 1e6}


class EventSocket:
    """The conntrack event socket: one datagram per event, as the kernel multicasts them."""

    def __init__(self) -> None:
        self.datagrams: collections.deque[bytes] = collections.deque()

    def recv_into(self, buf: bytearray) -> int:
        if not self.datagrams:
            raise BlockingIOError
        data = self.datagrams.popleft()
        buf[: len(data)] = data
        return len(data)


def flows_run(sessions: int, flows: int, batch: int, profile: str | None) -> dict[str, float]:
    """`flows` new flows of existing sessions (tcp/80, round robin over the sessions, each from
    a source port of its own), as the kernel's fast path admits them: conntrack's new-flow
    event of each, encoded as the kernel sends it, read by the listener in reads of `batch`
    events (what one wake-up of the loop finds queued) and handed to the core as the daemon
    does. Times the decoding and the adoption apart (CPU of this process, per flow)."""
    daemon, _queue, _cpu, _elapsed = daemon_with_sessions(0, 1, sessions, 64)
    core = daemon.core
    keys = [FlowKey(6, client(0, sessions, i % sessions), VIP, 40001 + i // sessions, 80) for i in range(flows)]
    datagrams = [conntrack.event_message(IPCTNL_MSG_CT_NEW, k, conntrack.CT_TAG | 1, n) for n, k in enumerate(keys)]
    sock = EventSocket()
    listener = conntrack.ConntrackListener.__new__(conntrack.ConntrackListener)
    listener._sock, listener._buf, listener.resyncs = sock, bytearray(1 << 18), 0  # type: ignore[assignment]
    before = core.counters.get("flows_fast_path", 0)
    profiler = cProfile.Profile() if profile else None
    decode = adopt = 0
    now = time.monotonic()
    if profiler:
        profiler.enable()
    for start in range(0, flows, batch):
        sock.datagrams.extend(datagrams[start : start + batch])
        t0 = time.process_time_ns()
        events = listener.read()
        t1 = time.process_time_ns()
        core.on_flow_events(events, now)
        t2 = time.process_time_ns()
        decode += t1 - t0
        adopt += t2 - t1
    if profiler and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    # What the emulated socket itself costs (the kernel's recv in the daemon), inside decode_us
    drain = bytearray(1 << 18)
    t0 = time.process_time_ns()
    for start in range(0, flows, batch):
        sock.datagrams.extend(datagrams[start : start + batch])
        while sock.datagrams:
            sock.recv_into(drain)
    socket_ns = time.process_time_ns() - t0
    adopted = core.counters.get("flows_fast_path", 0) - before
    held = sum(len(s.flows) for s in core.table)
    if adopted != flows or held != sessions + flows:
        raise RuntimeError(f"{adopted} flows adopted of {flows}; the sessions hold {held} flows")
    return {
        "sessions": sessions,
        "flows": flows,
        "batch": batch,
        "decode_us_per_flow": round(decode / flows / 1000, 2),
        "adopt_us_per_flow": round(adopt / flows / 1000, 2),
        "us_per_flow": round((decode + adopt) / flows / 1000, 2),
        "socket_us_per_flow": round(socket_ns / flows / 1000, 2),
    }


def _run(args: tuple[int, int, int, int, str | None, float]) -> dict[str, float]:
    return worker_run(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.lab.bench.hotpath")
    parser.add_argument("--sessions", type=int, default=20000, help="sessions per worker")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--gap", type=float, default=0.0, help="seconds of sleep between batches")
    parser.add_argument("--flows", type=int, default=0, help="new flows of the sessions through the fast path")
    args = parser.parse_args(argv)
    if args.flows:
        print(json.dumps(flows_run(args.sessions, args.flows, args.batch, args.profile)))
        return 0
    jobs = [(i, args.workers, args.sessions, args.batch, args.profile, args.gap) for i in range(args.workers)]
    wall = time.perf_counter()
    if args.workers == 1:
        results = [_run(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(_run, jobs)
    total = time.perf_counter() - wall
    sessions = sum(r["sessions"] for r in results)
    slowest = max(r["wall_s"] for r in results)
    print(
        json.dumps(
            {
                "workers": args.workers,
                "gap_s": args.gap,
                "sessions": sessions,
                "sessions_per_s": round(sessions / slowest),
                "per_worker": [{k: round(v, 3) for k, v in r.items()} for r in results],
                "wall_s_with_start": round(total, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
