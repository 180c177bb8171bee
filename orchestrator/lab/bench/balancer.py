"""Phase 1 of `lab bench setup`: the balancer daemon on the lab's balancer node, flooded and
sampled, then checked to hold every flood session in its table and the kernel."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from orchestrator.lab.bench.result import Latency, RateRun
from orchestrator.lab.bench.stats import flood_sources
from orchestrator.lab.bench.testbed import FLOOD_NETS, Testbed, say

EXISTING_SPORT = 5354  # the second flood's source port: new flows, same clients

if TYPE_CHECKING:
    from orchestrator.config.examples import KeyPath
    from orchestrator.lab.balancer_lab import BalancerLab
    from orchestrator.lab.kit import Lab


def label_range(sessions: int, samples: int) -> tuple[int, int]:
    """Labels for every session of the run, with room for the admission headroom."""
    from orchestrator.lab.balancer_lab import LABELS

    last = LABELS[0] + 2 * (sessions + samples + 256) + 1
    return LABELS[0], max(last, LABELS[1])


def balancer_phase(bed: Testbed, changes: dict[KeyPath, Any] | None = None) -> tuple[RateRun, RateRun, Latency]:
    """`changes`: more configuration changes (bench.workers runs it with nfqueue.workers)."""
    from orchestrator.dataplane import ops
    from orchestrator.lab.balancer_lab import LABELS, BalancerLab

    lab = bed.lab
    first, last = label_range(bed.sessions, bed.samples)
    balancer = BalancerLab(
        lab,
        bed.balancer,
        changes={
            "labels.range": [first, last],
            # the flood's sessions live through the whole phase, so the kernel holds them all at the end
            "services.dns.persistence_timeout": "600s",
            **(changes or {}),
        },
    )
    try:
        say("balancer: starting the daemon and the servers")
        start_balancer(balancer)
        stop_servers(lab)
        bed.start_sinks()
        say("balancer: started")
        lab.sh(bed.balancer, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        for server in lab.names("server"):  # termination routes beyond the harness's own range
            results = lab.provider(server).apply(
                [ops.Add(ops.MplsRoute(label, "lo")) for label in range(LABELS[1], last, 2)]
            )
            if not all(r.ok for r in results):
                raise RuntimeError(f"termination routes on {server}: {next(r for r in results if not r.ok)}")
        started = balancer.cli("status")["counters"].get("sessions_started", 0)
        rate = bed.rate("balancer")
        check_balancer(bed, balancer, started)
        say("balancer: checked; new flows of the same clients (the kernel's fast path)")
        counters = balancer.cli("status")["counters"]
        existing = bed.rate("balancer", sport=EXISTING_SPORT)
        check_fast_path(balancer, counters)
        say("balancer: fast path checked; latency")
        latency = bed.latency("balancer")
        say("balancer: latency done; closing")
    except Exception:
        print(balancer.log()[-3000:], file=sys.stderr)
        raise
    finally:
        bed.stop_sinks()
        balancer.close()
    return rate, existing, latency


def check_fast_path(balancer: BalancerLab, before: dict[str, int]) -> None:
    """The second flood (new flows of the flood's clients) opened no session and none of its
    packets reached the daemon: the kernel admitted them all (they were counted out on the
    fabric by the flood helper)."""
    after = balancer.cli("status")["counters"]
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in ("sessions_started", "packets_userspace")}
    if any(grown.values()):
        raise RuntimeError(f"balancer: new flows of existing sessions reached the daemon: {grown}")


def start_balancer(balancer: BalancerLab, attempts: int = 2) -> None:
    """The harness gives the daemon 90 s to come up, which a loaded emulated VM can overrun
    (imports over 9p, nft's module loads): one more try before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            balancer.start()
            return
        except RuntimeError as exc:
            if attempt == attempts or "did not start" not in str(exc):
                raise
            say(f"balancer: the daemon did not start in time (attempt {attempt}), again")
            balancer.close()


def stop_servers(lab: Lab) -> None:
    """Stop what the harness runs on the servers' IPv4 VIP: UDP echo would answer every flood
    packet from Python, competing for the emulated CPUs with what is measured (the answers have
    nowhere to go anyway; the servers' kernels now drop the flood with a rate-limited ICMP port
    unreachable), and HTTP gives way to the accept sink."""
    from orchestrator.lab.balancer_lab import UDP_ECHO

    for proc in lab.procs:
        args = list(proc.args)  # type: ignore[arg-type]
        if UDP_ECHO in args or ("http.server" in args and lab.vip in args):
            lab.stop(proc)


def check_balancer(bed: Testbed, balancer: BalancerLab, started_before: int) -> None:
    """The daemon counted every flood session, and the kernel holds a filter for each."""
    from orchestrator.dataplane import ops

    started = balancer.cli("status")["counters"].get("sessions_started", 0) - started_before
    sources = {f"{s}/32" for s in flood_sources(FLOOD_NETS["balancer"], bed.sessions)}
    filters = [i.obj for i in bed.lab.provider(bed.balancer).dump() if isinstance(i.obj, ops.FlowerFilter)]
    held = sum(f.match.src in sources for f in filters)
    if started < bed.sessions or held < bed.sessions:
        raise RuntimeError(
            f"balancer: {started} sessions started, {held} filters in the kernel, "
            f"{bed.sessions} first packets out on the fabric"
        )
