"""Benchmark: new sessions per second of the balancer daemon with 1 and with 2 workers
(`nfqueue.workers`), back to back on the same lab, as `lab bench setup` measures its balancer
phase (pktgen's first packets, each from its own source; `bench.balancer.balancer_phase`),
each run with its own flood sources so that no conntrack entry of the run before hides a new
flow. Prints one JSON object: per run the sessions per second and the connect latencies, and
the ratio of 2 workers to 1.

    mplsorch lab run -- python -m orchestrator.lab.bench.workers --sessions 2000 --samples 50

A UML lab has one CPU: there the workers share it with the kernel's work, so the ratio says
what the split costs rather than what a second core gains (docs/lab.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def main(argv: list[str]) -> int:
    from orchestrator.lab.bench import testbed
    from orchestrator.lab.bench.balancer import balancer_phase
    from orchestrator.lab.bench.result import Latency
    from orchestrator.lab.bench.testbed import Testbed, say
    from orchestrator.lab.kit import Lab

    parser = argparse.ArgumentParser(prog="python -m orchestrator.lab.bench.workers")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    octets = [202 + i for i in range(len(args.workers))]  # each run its own sources
    testbed.FLOOD_NETS.update({f"run{i}": octet for i, octet in enumerate(octets)})
    lab = Lab.from_env()
    runs: list[dict[str, Any]] = []
    try:
        bed = Testbed(lab, args.sessions, args.samples)
        bed.prepare_clients()
        for count, octet in zip(args.workers, octets):
            testbed.FLOOD_NETS["balancer"] = octet
            say(f"workers {count}")
            rate, _existing, _ipvs, runs_latency = balancer_phase(bed, {"nfqueue.workers": count} if count > 1 else {})
            latency = Latency.pooled(runs_latency["balancer"])
            runs.append(
                {
                    "workers": count,
                    "sessions": rate.count,
                    "elapsed_s": round(rate.elapsed_s, 3),
                    "sessions_per_s": round(rate.per_s, 1),
                    "new_session_connect_ms": {
                        "p50": round(latency.new_ms(50), 2),
                        "p99": round(latency.new_ms(99), 2),
                    },
                }
            )
    finally:
        lab.close()
    out: dict[str, Any] = {"runs": runs}
    rates = {n: [r["sessions_per_s"] for r in runs if r["workers"] == n] for n in (1, 2)}
    if rates[1] and rates[2]:  # of the means, runs alternated so that a load drift hits both
        out["ratio_2_to_1"] = round((sum(rates[2]) / len(rates[2])) / (sum(rates[1]) / len(rates[1])), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
