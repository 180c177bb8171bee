"""Experiment: what puts an existing session's connect above IPVS's (issue 15's existing-session
p99). Runs as root inside `mplsorch lab run` on the default lab:

    python -m orchestrator.lab.bench.existing_probe [--samples M] [--blocks B]

The daemon and IPVS (on a VIP of its own, beside it, as in `lab bench setup`) serve the lab; M
aliases of the client open a session on each (one connect each). Then blocks of existing-only
connects (one per alias and system, 20 ms apart, the systems interleaved) alternate between
conditions: the daemon running, the daemon stopped (SIGSTOP: the kernel's fast path needs no
daemon), and the bench's own protocol (a new session's connect, then its existing one). Per
block: both systems' p50/p99 and the daemon's CPU time and context switches per connect. Prints
one JSON object on stdout."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.lab.bench.connect import CONNECT_GAP_S, connect_time

MODULE = "orchestrator.lab.bench.existing_probe"
IDLE_S = 7.0  # an idle block: the daemon's own CPU and wake-ups with no connects


def client(vips: list[str], port: int, sources: list[str], fresh: list[str]) -> dict[str, Any]:
    """Per source, per VIP (the first of them taking turns): with `fresh` (as many as sources),
    a new session's connect from the fresh source first, then the existing one from `source`."""
    times: list[list[float]] = [[] for _ in vips]
    for turn, source in enumerate(sources):
        for k in range(len(vips)):
            at = (turn + k) % len(vips)
            if fresh:
                time.sleep(CONNECT_GAP_S)
                connect_time(fresh[turn], vips[at], port, 10)
            time.sleep(CONNECT_GAP_S)
            times[at].append(connect_time(source, vips[at], port, 10)[0])
    return {"times": times}


def proc_figures(pid: int) -> dict[str, Any]:
    """The daemon's CPU seconds and context switches (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    wakes = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        lines = Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines()
        wakes += sum(int(v.split(":")[1]) for v in lines if v.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
    threads = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
        tstat = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        threads[f"{task}:{name}"] = (int(tstat[11]) + int(tstat[12])) / ticks
    return {"cpu_s": (int(stat[11]) + int(stat[12])) / ticks, "switches": wakes, "threads": threads}


def block_row(
    block: int, cond: str, seconds: float, before: dict[str, Any], after: dict[str, Any], times: list[list[float]]
) -> dict[str, Any]:
    """One block's figures: per system p50/p99/max of its connects (ms), the daemon's CPU and
    context switches over the block (per connect of the daemon's VIP; an idle block: per second)."""
    per = len(times[0]) if times else seconds
    row: dict[str, Any] = {
        "block": block,
        "condition": cond,
        "seconds": round(seconds, 1),
        "per": "connect" if times else "second",
        "daemon_cpu_us_per": round(1e6 * (after["cpu_s"] - before["cpu_s"]) / per, 1),
        "daemon_switches_per": round((after["switches"] - before["switches"]) / per, 2),
        "threads_cpu_s": {k: round(v - before["threads"].get(k, 0), 2) for k, v in after["threads"].items()},
        "load": round(os.getloadavg()[0], 2),
    }
    for name, ts in zip(("balancer", "ipvs"), times):
        row[name] = {
            "p50_ms": round(1e3 * pct(ts, 0.5), 3),
            "p99_ms": round(1e3 * pct(ts, 0.99), 3),
            "max_ms": round(1e3 * max(ts), 3),
        }
    if times:
        row["p99_ratio"] = round(row["balancer"]["p99_ms"] / row["ipvs"]["p99_ms"], 2)
    return row


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "client":
        vip_list, port, sources, new_sources = argv[1:5]
        print(
            json.dumps(
                client(
                    vip_list.split(","),
                    int(port),
                    sources.split(","),
                    new_sources.split(",") if new_sources != "-" else [],
                )
            )
        )
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--conditions", default="running,stopped,new-then-existing")
    args = parser.parse_args(argv)

    from orchestrator.config.load import load_config
    from orchestrator.config.model import BalancerConfig
    from orchestrator.lab.balancer_lab import LABELS, ROOT, BalancerLab
    from orchestrator.lab.bench.balancer import label_range, start_balancer, stop_servers
    from orchestrator.lab.bench.ipvs import Ipvs
    from orchestrator.lab.bench.stats import alias_addresses
    from orchestrator.lab.bench.testbed import ALIAS_NET, IPVS_VIP, TCP_PORT, Testbed, say
    from orchestrator.lab.kit import Lab

    conditions = args.conditions.split(",")
    fresh_needed = args.blocks * conditions.count("new-then-existing")
    lab = Lab.from_env()
    bed = Testbed(lab, 0, args.samples * (1 + fresh_needed))
    bed.prepare_clients()
    aliases = alias_addresses(ALIAS_NET, args.samples * (1 + fresh_needed))
    existing, fresh_pool = aliases[: args.samples], aliases[args.samples :]
    config = load_config(ROOT / "templates" / "balancer.example.yaml")
    assert isinstance(config, BalancerConfig)
    balancer = BalancerLab(lab, bed.balancer, changes={"labels.range": list(label_range(0, len(aliases)))})
    from orchestrator.dataplane import ops

    ipvs = Ipvs(bed, config, IPVS_VIP)
    out: dict[str, Any] = {"blocks": []}
    try:
        start_balancer(balancer)
        stop_servers(lab)
        bed.start_sinks()
        ipvs.start()
        last = label_range(0, len(aliases))[1]
        for server in lab.names("server"):  # termination routes beyond the harness's own range
            lab.provider(server).apply([ops.Add(ops.MplsRoute(label, "lo")) for label in range(LABELS[1], last, 2)])
        pid = int(balancer.cli("status")["pid"])
        vips = [lab.vip, IPVS_VIP]

        def run(sources: list[str], fresh: list[str]) -> list[list[float]]:
            cmd = ["ip", "netns", "exec", lab.netns(bed.client), sys.executable, "-m", MODULE, "client",
                   ",".join(vips), str(TCP_PORT), ",".join(sources), ",".join(fresh) or "-"]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RuntimeError(done.stderr)
            return list(json.loads(done.stdout)["times"])

        say("opening the sessions")
        run(existing, [])
        for block in range(args.blocks):
            for cond in conditions:
                fresh: list[str] = []
                if cond == "new-then-existing":
                    fresh, fresh_pool = fresh_pool[: args.samples], fresh_pool[args.samples :]
                before = proc_figures(pid)
                began = time.monotonic()
                if cond == "stopped":
                    os.kill(pid, signal.SIGSTOP)
                try:
                    times = [] if cond == "idle" else run(existing, fresh)
                    if cond == "idle":
                        time.sleep(IDLE_S)
                finally:
                    if cond == "stopped":
                        os.kill(pid, signal.SIGCONT)
                after = proc_figures(pid)
                out["blocks"].append(block_row(block, cond, time.monotonic() - began, before, after, times))
                say(json.dumps(out["blocks"][-1]))
        out["counters"] = balancer.cli("status")["counters"]
    except Exception:
        print(balancer.log()[-3000:], file=sys.stderr)
        raise
    finally:
        ipvs.close()
        bed.stop_sinks()
        balancer.close()
        lab.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
