"""The balancer daemon's memory per session, without a kernel (issue 15: <= 400 B at 500,000).

Drives the daemon's `decide` over the hot path's kernel that takes every operation
(bench.hotpath.EncodingProvider) with N first packets of UDP to the example's `dns` service
(10.0.0.100:53), each from its own source, as `lab bench scale` opens sessions, and prints:

- `tracemalloc_bytes_per_session`: the Python objects the N sessions keep (traced allocations
  after N minus before, over N; a separate run, since tracing costs memory itself);
- `core_tracemalloc_bytes_per_session`: the same of the core alone (Balancer.on_packets and
  commit, every operation accepted, nothing encoded), as tests/unit/test_memory.py bounds it;
- `rss_bytes_per_session`: the process's VmRSS growth over N (what `lab bench scale` measures
  in the lab, minus the kernel dumps the lab's daemon runs in the background);
- `top`: with `--top K`, the K source lines that hold most of the traced growth.

    python -m orchestrator.lab.bench.memory --sessions 100000 [--top 15]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import socket
import struct
import tracemalloc
from pathlib import Path
from typing import Any

from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.config.examples import KeyPath, example
from orchestrator.config.load import parse_config
from orchestrator.config.model import BalancerConfig
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import FirstPacket
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.loop import Capture
from orchestrator.dataplane import ops
from orchestrator.lab.bench.hotpath import VIP, EncodingProvider, Queue

BATCH = 64
FIRST_SOURCE = 0x0A400001  # 10.64.0.1, as lab bench scale's pktgen sources


def datagram(src: int, sport: int = 40000) -> bytes:
    """A UDP datagram to the VIP's port 53, built by hand (no scapy in the measured process)."""
    udp = struct.pack("!HHHH", sport, 53, 8 + 4, 0) + b"\0\0\0\0"
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, struct.pack("!I", src), socket.inet_aton(VIP)
    )
    return header + udp


def changes(sessions: int) -> dict[KeyPath, Any]:
    """The example balancer, holding `sessions` dns sessions for an hour."""
    return {
        "labels.range": [1000, 1000 + 2 * (sessions + 1000) + 1],
        "services.dns.admission.max_sessions": sessions + 16,
        "services.dns.admission.min_free_labels": 1,
        "services.dns.persistence_timeout": "3600s",
        "nfqueue.rate_limit": None,
    }


def daemon(sessions: int) -> tuple[BalancerDaemon, Queue, int]:
    """A balancer daemon for `sessions` dns sessions over a kernel that takes everything."""
    config = parse_config(example("balancer", changes(sessions)), "memory.yaml")
    assert isinstance(config, BalancerConfig)
    kernel = EncodingProvider()
    queue = Queue()
    capture = Capture(queue=lambda first, last: queue, conntrack=lambda: None)  # type: ignore[arg-type,return-value]
    made = BalancerDaemon("memory.yaml", kernel, capture, config)
    made.queue = queue
    return made, queue, kernel.ifindex("lan0")


def fill(made: BalancerDaemon, lan0: int, first: int, count: int) -> None:
    """`count` sessions from sources first, first + 1, ... (packets built batch by batch, so
    that no list of every packet is alive when memory is read)."""
    for start in range(first, first + count, BATCH):
        made.decide(
            [
                QueuedPacket(0, i + 1, datagram(i), lan0, None, 0)
                for i in range(start, min(start + BATCH, first + count))
            ]
        )


def core_bytes_per_session(sessions: int, warmup: int = 1000) -> float:
    """The core alone (Balancer.on_packets and commit, every operation accepted, no encoding):
    traced bytes that `sessions` UDP sessions keep, over `sessions`, after `warmup` sessions
    (interned strings, the label allocator's first pool, the counters)."""
    config = parse_config(example("balancer", changes(sessions + warmup)), "memory.yaml")
    assert isinstance(config, BalancerConfig)
    core = Balancer(config, 0.0)
    hop = ops.NextHop("lan0")

    def fill(first: int, count: int) -> None:
        for start in range(first, first + count, BATCH):
            packets = [
                FirstPacket(0, i, datagram(i), "lan0", hop) for i in range(start, min(start + BATCH, first + count))
            ]
            plan = core.on_packets(packets, 1.0)
            core.commit(plan, [ops.OpResult(op) for op in plan.ops], 1.0)

    fill(FIRST_SOURCE, warmup)
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(FIRST_SOURCE + warmup, sessions)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        if not was_tracing:
            tracemalloc.stop()
    if len(core.table) != sessions + warmup:
        raise RuntimeError(f"{len(core.table)} sessions held of {sessions + warmup}")
    return grown / sessions


def vm_rss() -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert match is not None
    return int(match[1]) * 1024


def measure(sessions: int, trace: bool, top: int = 0) -> dict[str, Any]:
    """Memory growth over `sessions` sessions, after a warm-up of 1,000 (imports, caches)."""
    made, queue, lan0 = daemon(sessions + 1000)
    fill(made, lan0, FIRST_SOURCE, 1000)
    gc.collect()
    out: dict[str, Any] = {"sessions": sessions}
    if trace:
        tracemalloc.start()
        before = tracemalloc.take_snapshot() if top else None
        traced = tracemalloc.get_traced_memory()[0]
    rss = vm_rss()
    fill(made, lan0, FIRST_SOURCE + 1000, sessions)
    gc.collect()
    held = made.core.counters.get("sessions_started", 0)
    if held != sessions + 1000 or len(made.core.table) != sessions + 1000:
        raise RuntimeError(f"{held} sessions started, {len(made.core.table)} held, of {sessions + 1000}")
    if trace:
        out["tracemalloc_bytes_per_session"] = round((tracemalloc.get_traced_memory()[0] - traced) / sessions, 1)
        if top and before is not None:
            stats = tracemalloc.take_snapshot().compare_to(before, "lineno")[:top]
            out["top"] = [
                {"where": str(s.traceback[0]), "bytes_per_session": round(s.size_diff / sessions, 1)} for s in stats
            ]
        tracemalloc.stop()
    else:
        out["rss_bytes_per_session"] = round((vm_rss() - rss) / sessions, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.lab.bench.memory")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--top", type=int, default=0, help="the K lines that allocate most (traced run)")
    parser.add_argument("--trace", action="store_true", help="tracemalloc's figure only (no RSS run)")
    parser.add_argument("--rss", action="store_true", help="the RSS figure only (no traced run)")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"sessions": args.sessions}
    if not args.trace:
        out.update(measure(args.sessions, trace=False))
    if not args.rss:
        out.update(measure(args.sessions, trace=True, top=args.top))
        out["core_tracemalloc_bytes_per_session"] = round(core_bytes_per_session(args.sessions), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
