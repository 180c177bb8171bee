"""The balancer phase of `lab bench setup`: the balancer daemon on the lab's balancer node,
flooded and sampled, then checked to hold every flood session in its table and the kernel; IPVS
beside it (bench.ipvs) is flooded and sampled in the same minutes, round by round."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.lab.bench.result import Latency, RateRun
from orchestrator.lab.bench.stats import cpu_seconds, flood_sources, round_order
from orchestrator.lab.bench.testbed import FLOOD_NETS, Testbed, say

EXISTING_SPORT = 5354  # the first (d) round's source port: new flows, same clients (+1 per round)
RATE_ROUNDS = 3  # floods of (c) and of (d) each, interleaved (stats.round_order): one of 10,000 lasts about 1 s
STALLS_SHOWN = 15  # the longest stalls the run prints

if TYPE_CHECKING:
    from orchestrator.config.examples import KeyPath
    from orchestrator.config.model import BalancerConfig
    from orchestrator.lab.balancer_lab import BalancerLab
    from orchestrator.lab.bench.ipvs import Ipvs
    from orchestrator.lab.kit import Lab


def label_range(sessions: int, samples: int) -> tuple[int, int]:
    """`samples`: the latency sources of every repeat (each a new session)."""
    # Labels for every session of the run, with room for the admission headroom.
    from orchestrator.lab.balancer_lab import LABELS

    last = LABELS[0] + 2 * (sessions + samples + 256) + 1
    return LABELS[0], max(last, LABELS[1])


def balancer_phase(
    bed: Testbed, changes: dict[KeyPath, Any] | None = None, beside: BalancerConfig | None = None
) -> tuple[RateRun, list[RateRun], list[RateRun], dict[str, list[Latency]]]:
    """`changes`: more configuration changes (bench.workers runs it with nfqueue.workers).
    Returns (b), the (d) rounds, the (c) rounds and the latency runs. With `beside` (the
    configuration IPVS mirrors), IPVS is set up beside the running daemon on a VIP of its own
    (testbed.IPVS_VIP) once (b) is checked, and both systems are measured in the same minutes:
    the (d) and (c) floods round by round (`stats.round_order`), then the latency runs per
    repeat, their connects interleaved (`ipvs`); without it, the (d) rounds and the daemon's
    latency alone. The daemon's counters over the latency runs go to `bed.userspace`
    (existing sessions' connects must never reach it)."""
    from orchestrator.dataplane import ops
    from orchestrator.lab.balancer_lab import LABELS, BalancerLab
    from orchestrator.lab.bench.ipvs import Ipvs
    from orchestrator.lab.bench.testbed import IPVS_VIP

    lab = bed.lab
    first, last = label_range(bed.sessions, len(bed.aliases))
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
    ipvs = Ipvs(bed, beside, IPVS_VIP) if beside is not None else None
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
        if ipvs is not None:
            say("ipvs: beside the daemon on its own VIP, for (c) and the latency")
            ipvs.start()
        counters = balancer.cli("status")["counters"]
        existing, theirs = rate_rounds(bed, balancer, ipvs)
        check_fast_path(balancer, counters)
        if ipvs is not None:
            check_ipvs(bed, ipvs, len(theirs))
        say("balancer: fast path checked; latency")
        status = balancer.cli("status")
        before, steps_before = status["counters"], status["loop_steps"]
        stalls_before = len(stall_lines(balancer.log()))
        sweeps_before = len(sweep_lines(balancer.log()))
        latencies = latency_runs(bed, ipvs is not None)
        report_stalls(stall_lines(balancer.log())[stalls_before:])
        for line in sweep_lines(balancer.log())[sweeps_before:]:
            say("balancer: " + line.partition("conntrack sweep: ")[2])
        status = balancer.cli("status")
        after = status["counters"]
        say(f"balancer: sweeps over the latency runs: {counted(before, after)}")
        bed.loop_steps = step_means(steps_before, status["loop_steps"])
        batch = {k: v for k, v in bed.loop_steps.items() if k == "first-packet batch" or k.startswith("batch: ")}
        say(f"balancer: the loop's first-packet batches over the latency runs (runs, mean ms): {batch}")
        bed.userspace = {
            k: after.get(k, 0) - before.get(k, 0) for k in ("sessions_started", "packets_userspace", "fastpath_late")
        }
        check_latency_path(bed, latencies["balancer"])
        say(f"balancer: latency done ({bed.userspace}); closing")
    except Exception:
        print(balancer.log()[-3000:], file=sys.stderr)
        raise
    finally:
        if ipvs is not None:
            ipvs.close()
        bed.stop_sinks()
        balancer.close()
    return rate, existing, theirs, latencies


def rate_rounds(bed: Testbed, balancer: BalancerLab, ipvs: Ipvs | None) -> tuple[list[RateRun], list[RateRun]]:
    """The (d) floods (the flood's clients again, each round from a source port of its own) and,
    with `ipvs`, the (c) floods (new clients to IPVS's VIP, each round from N sources of its
    own), in `round_order`. Each round's line on stderr says what the daemon did meanwhile:
    during (d) it reads the new-flow event of each flow the fast path admits; during (c) it has
    nothing to do (IPVS's flows are not ours), so its CPU there is what it takes from IPVS."""
    from orchestrator.lab.bench.testbed import IPVS_VIP

    pid = balancer.cli("status")["pid"]
    cpu_before, began = daemon_cpu(pid), time.monotonic()
    rounds: dict[str, list[RateRun]] = {"existing": [], "ipvs": []}
    n = bed.sessions
    for system, r in round_order(RATE_ROUNDS):
        if system == "ipvs" and ipvs is None:
            continue
        was, cpu_was = balancer.cli("status")["counters"], daemon_cpu(pid)
        if system == "existing":
            run = bed.rate("balancer", sport=EXISTING_SPORT + r)
        else:
            run = bed.flood("ipvs", FLOOD_NETS["ipvs"], n, offset=r * n, vip=IPVS_VIP)
        now, cpu_now = balancer.cli("status")["counters"], daemon_cpu(pid)
        rounds[system].append(run)
        name = "balancer: (d)" if system == "existing" else "ipvs: (c)"
        say(
            f"{name} round {r + 1}: {run.per_s:,.0f}/s; the daemon meanwhile: {round_work(was, now)}, "
            f"CPU {cpu_now - cpu_was:.2f} s"
        )
    existing = rounds["existing"]
    say(
        f"balancer: the daemon's CPU over the rate rounds: {daemon_cpu(pid) - cpu_before:.2f} s in "
        f"{time.monotonic() - began:.2f} s (helpers' starts included; the (d) floods {sum(r.elapsed_s for r in existing):.2f} s): "
        "it reads conntrack's new-flow event of each flow the fast path admits"
    )
    return existing, rounds["ipvs"]


def check_ipvs(bed: Testbed, ipvs: Ipvs, rounds: int) -> None:
    """IPVS's table holds a connection for every source of its floods."""
    n = bed.sessions
    held = ipvs.connections(set(flood_sources(FLOOD_NETS["ipvs"], rounds * n)))
    if held < rounds * n:
        raise RuntimeError(f"ipvs: {held} connections in its table, {rounds * n} packets forwarded")
    say("ipvs: checked")


def latency_runs(bed: Testbed, beside: bool) -> dict[str, list[Latency]]:
    """The latency repeats: the daemon's VIP alone, or (`beside`: IPVS runs on its own VIP) both
    VIPs, their connects interleaved."""
    from orchestrator.lab.bench.testbed import IPVS_VIP

    if not beside:
        return {"balancer": bed.latencies("balancer", [bed.lab.vip], bed.repeats)[0]}
    ours, theirs = bed.latencies("balancer and ipvs", [bed.lab.vip, IPVS_VIP], bed.repeats)
    return {"balancer": ours, "ipvs": theirs}


def daemon_cpu(pid: int) -> float:
    """The daemon's CPU seconds so far (the lab's namespaces share the host's /proc)."""
    return cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def step_means(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The steps that ran between two `status` answers' `loop_steps`: runs and mean ms each."""
    out = {}
    for step, now in after.items():
        was = before.get(step, {"runs": 0, "seconds": 0.0})
        runs = int(now["runs"] - was["runs"])
        if runs:
            out[step] = {"runs": runs, "mean_ms": round((now["seconds"] - was["seconds"]) * 1000 / runs, 3)}
    return out


def stall_lines(daemon_log: str) -> list[str]:
    """The daemon's `loop stall` lines (daemon.stalls)."""
    return [line for line in daemon_log.splitlines() if "loop stall:" in line]


def sweep_lines(daemon_log: str) -> list[str]:
    """The daemon's full conntrack sweeps (flows, dump time, its slices on the loop, resync)."""
    return [line for line in daemon_log.splitlines() if "conntrack sweep: " in line and "live flows" in line]


def round_work(before: dict[str, int], after: dict[str, int]) -> str:
    """What the daemon did over one (d) round: fast-path flows adopted from their events, full
    sweeps and the kernel's expiry passes, resyncs after lost events."""
    keys = ("flows_fast_path", "conntrack_sweeps", "conntrack_expiries", "conntrack_resyncs")
    return ", ".join(f"{k} {after.get(k, 0) - before.get(k, 0)}" for k in keys)


def counted(before: dict[str, int], after: dict[str, int]) -> str:
    """The full sweeps and the kernel's expiry passes between two status answers."""
    return ", ".join(f"{k} {after.get(k, 0) - before.get(k, 0)}" for k in ("conntrack_sweeps", "conntrack_expiries"))


def report_stalls(lines: list[str]) -> None:
    """The loop's stalls during the latency runs, on stderr: where a new session's tail comes
    from. Per cause, the stalls logged and the longest; then the longest lines themselves."""
    parsed = []
    for line in lines:
        text = line.partition("loop stall: ")[2]
        match = re.match(r"(.+?) (\d+) ms;", text)
        if match:
            parsed.append((int(match[2]), match[1], text))
    causes: dict[str, list[int]] = {}
    for ms, cause, _ in parsed:
        causes.setdefault(cause, []).append(ms)
    summary = ", ".join(
        f"{c} {len(v)}x (worst {max(v)} ms)" for c, v in sorted(causes.items(), key=lambda i: -max(i[1]))
    )
    say(f"balancer: {len(lines)} loop stalls logged during the latency runs: {summary or 'none'}")
    for _, _, text in sorted(parsed, reverse=True)[:STALLS_SHOWN]:
        say("  " + text)


def check_latency_path(bed: Testbed, runs: list[Latency]) -> None:
    """Each source's first connect opened a session whose SYN reached the daemon once (twice
    when it was retransmitted); its second connect, an existing session's new flow, must have
    stayed in the kernel (the fast path's set element) unless it came before the element, which
    goes in right after the first packet's verdict: the daemon counts those (`fastpath_late`,
    reported in `latency_userspace`). The client's own address, which warms the path up before
    each run, opens one more session the first time."""
    sources = sum(len(run.pairs) for run in runs)
    started = bed.userspace.get("sessions_started", 0)
    allowed = started + sum(run.retransmits for run in runs) + bed.userspace.get("fastpath_late", 0)
    if not sources <= started <= sources + 1 or bed.userspace.get("packets_userspace", 0) > allowed:
        raise RuntimeError(
            f"balancer: {sources} new-session connects, the daemon counted {bed.userspace}: "
            "an existing session's connect reached userspace"
        )


def check_fast_path(balancer: BalancerLab, before: dict[str, int]) -> None:
    """The (d) floods (new flows of the flood's clients) opened no session and none of its
    packets reached the daemon: the kernel admitted them all (they were counted out on the
    fabric by the flood helper)."""
    after = balancer.cli("status")["counters"]
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in ("sessions_started", "packets_userspace", "fastpath_late")}
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
