"""The latency samples, run inside the client's namespace by `lab bench setup` (`python -m
orchestrator.lab.bench.connect VIPS PORT WARMUP_SOURCE SOURCES`, VIPS and SOURCES
comma-separated; one VIP per system measured): per source and VIP, a TCP connect() as a new
session and LATER more as an existing session, the VIPs interleaved. Prints one JSON object:
per VIP the new connects' seconds (`new`, one per source), the existing ones' (`existing`,
LATER per source) and the SYN retransmits; `failed`."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Any

TCP_INFO_LEN, TCPI_TOTAL_RETRANS = 104, 100  # struct tcp_info: tcpi_total_retrans is at byte 100
CONNECT_GAP_S = 0.02  # between connects, so each one meets an idle system
# Later connections per session and system: the existing session's p99 is the p99 of a rarer
# event than the new one's (its p50 is a fifth as long, and the same few slow moments of the
# guest make its tail), so it takes more samples to hold still. With one per source its p99
# ratio moved between 0.79 and 1.36 from run to run of the same code, while in one run, halves
# of it alternating source by source agreed within 0.04 (docs/lab.md, "The existing session's samples").
LATER = 3


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


def connects(
    vips: list[str], port: int, sources: list[str], warmup: str, gap: float, later: int = LATER
) -> dict[str, Any]:
    """Per source and per VIP (one system each): connect() as a new session, then `later` times
    again as an existing one (a gap before each, so every connect meets an idle system: this is
    latency, not load). The systems are interleaved source by source, the first of them taking
    turns, so a change of the machine's load hits every system alike. `new`, `existing` and
    `retransmits` are per VIP, in the order given; a source whose connects failed adds nothing."""
    for vip in vips:
        for _ in range(2):  # code paths and caches along the way, not measured
            connect_time(warmup, vip, port, 10)
    new: list[list[float]] = [[] for _ in vips]
    existing: list[list[float]] = [[] for _ in vips]
    retransmits = [0 for _ in vips]
    failed: list[str] = []
    for turn, source in enumerate(sources):
        for k in range(len(vips)):
            at = (turn + k) % len(vips)
            try:
                times = []
                for _ in range(1 + later):
                    time.sleep(gap)
                    took, again = connect_time(source, vips[at], port, 10)
                    times.append(took)
                    retransmits[at] += again
            except OSError as exc:
                failed.append(f"{source} -> {vips[at]}: {exc}")
                continue
            new[at].append(times[0])
            existing[at].extend(times[1:])
    return {"new": new, "existing": existing, "failed": failed, "retransmits": retransmits}


def main(argv: list[str]) -> int:
    vips, port, warmup, sources = argv
    print(json.dumps(connects(vips.split(","), int(port), sources.split(","), warmup, CONNECT_GAP_S)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
