"""The latency samples, run inside the client's namespace by `lab bench setup` (`python -m
orchestrator.lab.bench.connect VIPS PORT WARMUP_SOURCE SOURCES`, VIPS and SOURCES
comma-separated; one VIP per system measured): per source and VIP, a TCP connect() as a new
session and one as an existing session, the VIPs interleaved. Prints one JSON object: pairs
(seconds, new and existing) and retransmits per VIP, failed."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Any

TCP_INFO_LEN, TCPI_TOTAL_RETRANS = 104, 100  # struct tcp_info: tcpi_total_retrans is at byte 100
CONNECT_GAP_S = 0.02  # between connects, so each one meets an idle system


def connect_time(source: str, vip: str, port: int, timeout: float) -> tuple[float, bool]:
    """Seconds for one TCP connect(), and whether the SYN had to be sent again (a lost SYN or
    SYN-ACK costs the initial retransmission timeout, 1 s); the socket is then reset (no FIN
    exchange, no TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.settimeout(timeout)
        sock.bind((source, 0))
        start = time.perf_counter()
        sock.connect((vip, port))
        elapsed = time.perf_counter() - start
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        return elapsed, struct.unpack_from("I", info, TCPI_TOTAL_RETRANS)[0] > 0


def connects(vips: list[str], port: int, sources: list[str], warmup: str, gap: float) -> dict[str, Any]:
    """Per source and per VIP (one system each): connect() as a new session, then again as an
    existing one (a gap before each, so every connect meets an idle system: this is latency,
    not load). The systems are interleaved source by source, the first of them taking turns,
    so a change of the machine's load hits every system alike. `pairs` and `retransmits` are
    per VIP, in the order given."""
    for vip in vips:
        for _ in range(2):  # code paths and caches along the way, not measured
            connect_time(warmup, vip, port, 10)
    pairs: list[list[tuple[float, float]]] = [[] for _ in vips]
    retransmits = [0 for _ in vips]
    failed: list[str] = []
    for turn, source in enumerate(sources):
        for k in range(len(vips)):
            at = (turn + k) % len(vips)
            try:
                time.sleep(gap)
                new, again = connect_time(source, vips[at], port, 10)
                time.sleep(gap)
                old, again_old = connect_time(source, vips[at], port, 10)
                pairs[at].append((new, old))
                retransmits[at] += again + again_old
            except OSError as exc:
                failed.append(f"{source} -> {vips[at]}: {exc}")
    return {"pairs": pairs, "failed": failed, "retransmits": retransmits}


def main(argv: list[str]) -> int:
    vips, port, warmup, sources = argv
    print(json.dumps(connects(vips.split(","), int(port), sources.split(","), warmup, CONNECT_GAP_S)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
