"""The flood, run inside the client's namespace by `lab bench setup` (`python -m
orchestrator.lab.bench.flood DEV DST_MAC VIP SECOND_OCTET COUNT PID COUNTER_DEV [SPORT [OFFSET
[START_AT]]]`): COUNT first packets (UDP from port SPORT, 5353 by default) from consecutive spoofed
sources 10.SECOND_OCTET.0.1 + OFFSET onwards, not before the monotonic time START_AT (several
floods started together: the clock is the kernel's, the same in every process), timed from the first one
leaving DEV to COUNT more packets out of COUNTER_DEV in the namespace of process PID (the
balancer node's fabric link). Prints one JSON object: start, send_s, reached, seen."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from orchestrator.lab.bench import pktgen
from orchestrator.lab.bench.stats import chunks, flood_sources, tx_packets

STALL_S = 30.0  # this long without a packet out on the fabric ends a flood
CHUNK = 2000  # first packets per burst: well within the daemon's NFQUEUE (4096 packets, 8 MiB)


def wait_for(count: Callable[[], int], target: int, since: float) -> tuple[float, int]:
    """(when count reached target, count); if it stalls first, (its last change, count). Polls
    at 0.5 % of the time since `since` (1 to 20 ms): precise enough, and cheap for the CPUs the
    systems under test need."""
    last, changed = count(), time.monotonic()
    while True:
        now, seen = time.monotonic(), count()
        if seen != last:
            last, changed = seen, now
        if seen >= target:
            return now, seen
        if now - changed > STALL_S:
            return changed, seen
        time.sleep(min(max((now - since) / 200, 0.001), 0.02))


def flood(
    dev: str,
    dst_mac: str,
    vip: str,
    second_octet: int,
    count: int,
    out: Callable[[], int],
    sport: int = pktgen.SOURCE_PORT,
    offset: int = 0,
    start_at: float = 0.0,
) -> dict[str, float]:
    """Send `count` first packets from consecutive sources with pktgen, in bursts the daemon's
    queue can hold, each once the previous one is through; return the time the first packet left
    this node and the time `out` (packets out of the balancer node) had grown by `count`."""
    sources = flood_sources(second_octet, count, offset)
    pktgen.configure(dev, dst_mac, vip, sport)
    time.sleep(max(0.0, start_at - time.monotonic()))
    net_dev = Path("/proc/self/net/dev")

    def sent() -> int:
        return tx_packets(net_dev.read_text(), dev)

    out_base = out()
    first_sent: float | None = None
    busy_us, reached, seen = 0, 0.0, 0
    for first, length in chunks(count, CHUNK):
        sent_base = sent()
        runner = pktgen.start(dev, sources[first : first + length])
        if first_sent is None:

            def sent_now(base: int = sent_base) -> int:
                return sent() - base

            first_sent, _ = wait_for(sent_now, 1, time.monotonic())
        runner.join()
        usec, done = pktgen.result(dev)
        if done != length:
            raise RuntimeError(f"pktgen sent {done} of {length} packets")
        busy_us += usec
        reached, seen = wait_for(lambda: out() - out_base, first + length, first_sent)
        if seen < first + length:
            break
    pktgen.release()
    return {"start": first_sent or 0.0, "send_s": busy_us / 1e6, "reached": reached, "seen": seen}


def main(argv: list[str]) -> int:
    if not 7 <= len(argv) <= 10:
        raise ValueError("usage: DEV DST_MAC VIP SECOND_OCTET COUNT PID COUNTER_DEV [SPORT [OFFSET [START_AT]]]")
    dev, dst_mac, vip, octet, count, pid, counter_dev = argv[:7]
    sport = int(argv[7]) if len(argv) > 7 else pktgen.SOURCE_PORT
    offset = int(argv[8]) if len(argv) > 8 else 0
    start_at = float(argv[9]) if len(argv) > 9 else 0.0
    counters = Path(f"/proc/{pid}/net/dev")
    print(
        json.dumps(
            flood(
                dev,
                dst_mac,
                vip,
                int(octet),
                int(count),
                lambda: tx_packets(counters.read_text(), counter_dev),
                sport,
                offset,
                start_at,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
