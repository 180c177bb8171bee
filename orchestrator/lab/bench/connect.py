"""The latency samples, run inside the client's namespace by `lab bench setup` (`python -m
orchestrator.lab.bench.connect VIP PORT WARMUP_SOURCE SOURCES`, SOURCES comma-separated): per
source, a TCP connect() as a new session and one as an existing session. Prints one JSON object:
pairs (seconds, new and existing), failed, retransmits."""

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


def connects(vip: str, port: int, sources: list[str], warmup: str, gap: float) -> dict[str, Any]:
    """Per source: connect() as a new session, then again as an existing one (a gap before each,
    so every connect meets an idle system: this is latency, not load)."""
    for _ in range(2):  # code paths and caches along the way, not measured
        connect_time(warmup, vip, port, 10)
    pairs: list[tuple[float, float]] = []
    failed: list[str] = []
    retransmits = 0
    for source in sources:
        try:
            time.sleep(gap)
            new, again = connect_time(source, vip, port, 10)
            time.sleep(gap)
            old, again_old = connect_time(source, vip, port, 10)
            pairs.append((new, old))
            retransmits += again + again_old
        except OSError as exc:
            failed.append(f"{source}: {exc}")
    return {"pairs": pairs, "failed": failed, "retransmits": retransmits}


def main(argv: list[str]) -> int:
    vip, port, warmup, sources = argv
    print(json.dumps(connects(vip, int(port), sources.split(","), warmup, CONNECT_GAP_S)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
