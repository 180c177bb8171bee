"""Benchmark: session setup, the balancer daemon against the kernel's own limit and against Linux
IPVS (tunnel mode) on the same lab, in one run (issue 15's figures and goals):

- (a) the kernel's limit: the same per-session objects the daemon installs, planned by the
  balancer core and fed to `tc -batch`, `ip -f mpls -batch` and `nft -f` in a scratch namespace
  of the lab's kernel (`kernel_limit`), N over their summed time.
- (b) the daemon's new sessions per second, (c) IPVS's new connections per second: N first
  packets (UDP to the VIP's port 53, each from its own spoofed source) sent from c1 by the
  kernel's packet generator (pktgen; a Python sender would be IPVS's bottleneck), in bursts of
  at most 2,000, against the time from the first of them leaving c1 to the N-th leaving the
  balancer node on its fabric link. The balancer accepts a first packet only after its
  session's objects are in the kernel, and IPVS forwards one only after it made the connection,
  so that moment is "N sessions installed". Afterwards the daemon's counters and the kernel's
  filters (or IPVS's connection table) are checked to hold all N.
- (d) new connections per second of clients that have a session: the same N sources again from
  another source port (new flows), admitted by the kernel's fast path; checked to have reached
  the daemon not once.
- (c) and (d) on equal terms: IPVS runs beside the daemon on a VIP of its own from (b)'s check
  on, and their floods alternate round by round, the first of each round alternating too
  (`stats.round_order`), so that neither system gets every first flood after (b) nor a moment
  of the host's load the other escapes (the first (d) round was the slowest in most runs of
  the day when (c) ran minutes later in a phase of its own: docs/lab.md, "The first (d)
  round"); every flood starts on a quiet lab (`testbed.quiesce`), so what one flood left
  behind (the daemon still reading a (d) round's new-flow events) is not timed in the next.
- (e) connect latency: TCP connect() time to VIP:80 of a new session (a fresh source address)
  and of a second connection from the same address right after (the session exists), p50 and
  p99, for both systems.

Runs as root inside `mplsorch lab run` on the default lab (`mplsorch lab bench setup`): this
module is the order of things and the command line; the phases are `kernel_limit` and
`balancer` (with `ipvs` beside it), the shared lab side `testbed`, the helpers run with `python -m` `flood` and
`connect` (in the client's namespace) and `sink` (on the servers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from orchestrator.lab.bench.flood import CHUNK
from orchestrator.lab.bench.result import SetupResult, format_table

if TYPE_CHECKING:
    from orchestrator.lab.kit import Lab

MAX_SESSIONS, MAX_SAMPLES = 40000, 4000
BACKLOG = 4 * CHUNK  # net.core.netdev_max_backlog during the run


def run(lab: Lab, sessions: int, samples: int, repeats: int) -> SetupResult:
    from orchestrator.config.load import load_config
    from orchestrator.config.model import BalancerConfig
    from orchestrator.lab.balancer_lab import ROOT
    from orchestrator.lab.bench.balancer import balancer_phase
    from orchestrator.lab.bench.kernel_limit import measure
    from orchestrator.lab.bench.result import build_result
    from orchestrator.lab.bench.testbed import Testbed, say

    say(f"kernel limit: {sessions} sessions' objects through tc/ip/nft batches")
    limit = measure(sessions)
    say(f"kernel limit: {limit.per_s:.0f} sessions/s ({limit.seconds})")
    bed = Testbed(lab, sessions, samples, repeats)
    bed.prepare_clients()
    say("clients prepared")
    config = load_config(ROOT / "templates" / "balancer.example.yaml")
    assert isinstance(config, BalancerConfig)  # IPVS gets the balancer's services and pools
    with backlog(BACKLOG):
        ours, existing, theirs, latencies = balancer_phase(bed, beside=config)
    return build_result(
        limit, ours, existing, theirs, latencies["balancer"], latencies["ipvs"], bed.userspace, bed.loop_steps
    )


@contextlib.contextmanager
def backlog(packets: int) -> Iterator[None]:
    """Room for a whole burst in the kernel's per-CPU input backlog (global, so restored after):
    the lab's forwarding runs in softirq on pktgen's CPU, and with the default 1,000 packets a
    burst that the kernel cannot forward as fast as pktgen sends it is partly dropped there,
    before IPVS ever sees it. The daemon's queue holds its bursts anyway."""
    knob = Path("/proc/sys/net/core/netdev_max_backlog")
    old = int(knob.read_text())
    knob.write_text(str(max(old, packets)))
    try:
        yield
    finally:
        knob.write_text(str(old))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mplsorch lab bench setup")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS or not 1 <= args.samples * args.repeats <= MAX_SAMPLES:
        parser.error(f"--sessions 1..{MAX_SESSIONS}, --samples x --repeats 1..{MAX_SAMPLES}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from orchestrator.lab.kit import Lab

    lab = Lab.from_env()
    try:
        result = run(lab, args.sessions, args.samples, args.repeats)
    finally:
        lab.close()
    print(json.dumps(asdict(result)) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
