"""`mplsorch lab bench nexthops`: what nexthop objects change for a server agent's S2C return
routes (issue 15, item 4). In a scratch network namespace of the lab's kernel (built by
kernel_limit.build_netns, its link fab0 standing for the server's fabric link), per N:

1. the kernel's own rate: N return routes that share one gateway, `CLIENT/32 encap mpls
   [balancer transport, S2C] via GW dev fab0 table 100`, through one `ip -batch`, against the
   same N routes each to a nexthop object of its own (`nexthop add id ID encap mpls ... via GW
   dev fab0` then `route add CLIENT/32 nhid ID table 100`: two objects per route), in runs of
   CHUNK routes, each less the tool's own start (an empty batch, as kernel_limit does). The kernel compares the lwtunnel
   encap of every IPv4 route that shares the gateway when it inserts one (fib_info hash chain),
   so the plain batch is quadratic in N; a route to a nexthop object is hashed by the id;
2. the agent's programming rate: the server agent's core (orchestrator.core.agent) learns N
   sessions from N synthetic labelled first packets in batches of the example's `nfqueue.batch`,
   and its operations go through the netlink provider as the daemon sends them, with nexthop
   objects and without (plain encap routes), each in a fresh namespace.

Each run repeats (`--repeats`, default 2), plain and nexthop alternating; the rates are of the
fastest repeat, every repeat's time is in the output. Every run checks that the kernel holds N
routes (and N nexthops) afterwards. The rendering is
pure (unit-tested); `measure` runs it. Runs as root inside `mplsorch lab run`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from orchestrator.config.server_model import ServerConfig
from orchestrator.dataplane import records
from orchestrator.lab.bench import kernel_limit

DEV = "fab0"
GATEWAY = "10.255.0.2"  # fab0's peer on kernel_limit's 10.255.0.0/30
TRANSPORT = 100  # the balancer's transport label (the example's)
TABLE = 100
FIRST_C2S = 1001
VIP = "10.0.0.100"
CHUNK = 5000  # routes per `ip -batch` run


def s2c_of(i: int) -> int:
    return FIRST_C2S + 2 * i + 1


def ip_batch(count: int, nexthops: bool) -> list[str]:
    """`ip -batch` input for `count` return routes of distinct clients sharing one gateway: plain
    encap routes, or each a nexthop object (the agent's id for its S2C) and a route to it."""
    out = []
    for i, client in enumerate(kernel_limit.clients(count)):
        s2c = s2c_of(i)
        encap = f"encap mpls {TRANSPORT}/{s2c} via {GATEWAY} dev {DEV}"
        if nexthops:
            nh = records.nexthop_id(s2c, 4)
            out.append(f"nexthop add id {nh} {encap} proto 195")
            out.append(f"route add {client}/32 nhid {nh} table {TABLE} proto 195")
        else:
            out.append(f"route add {client}/32 {encap} table {TABLE} proto 195")
    return out


def held(netns: str) -> dict[str, int]:
    """Routes in the return table and nexthop objects the namespace holds."""

    def count(*cmd: str) -> int:
        text = subprocess.run(["ip", "-n", netns, *cmd], check=True, capture_output=True, text=True).stdout
        return sum(1 for line in text.splitlines() if line.strip())

    return {"routes": count("route", "show", "table", str(TABLE)), "nexthops": count("nexthop", "show")}


def _scratch(tag: str, count: int) -> str:
    netns = f"mplsorch-nh-{tag}-{os.getpid()}"
    kernel_limit.build_netns(netns, platform_labels=FIRST_C2S + 2 * count + 16)
    return netns


def _drop(netns: str) -> None:
    subprocess.run(["ip", "netns", "del", netns], check=False)


def iproute2_seconds(count: int, nexthops: bool) -> float:
    """Seconds of `ip -batch` runs of `count` return routes, CHUNK routes a run (one `ip` of 50,000
    nexthops outgrew the UML guest's host-side mappings and was killed), less `ip`'s own start
    for each run."""
    netns = _scratch("ip", count)
    lines = ip_batch(count, nexthops)
    per_route = 2 if nexthops else 1
    try:
        with tempfile.TemporaryDirectory() as tmp:
            empty = os.path.join(tmp, "empty.batch")
            open(empty, "w").close()
            paths = []
            for at in range(0, len(lines), CHUNK * per_route):
                paths.append(os.path.join(tmp, f"routes-{at}.batch"))
                with open(paths[-1], "w") as f:
                    f.write("\n".join(lines[at : at + CHUNK * per_route]) + "\n")
            command = ["ip", "-n", netns, "-batch"]
            idle = min(kernel_limit._timed(*command, empty) for _ in range(3))
            seconds = sum(max(kernel_limit._timed(*command, path) - idle, 1e-6) for path in paths)
        want = {"routes": count, "nexthops": count if nexthops else 0}
        if held(netns) != want:
            raise RuntimeError(f"ip -batch: the kernel holds {held(netns)}, expected {want}")
    finally:
        _drop(netns)
    return seconds


def agent_config(count: int) -> ServerConfig:
    """The example server configuration with fab0 as its fabric link, GATEWAY as its next hop and
    a block of `count` sessions."""
    from orchestrator.config.examples import DELETE, example
    from orchestrator.config.load import parse_config

    config = parse_config(
        example(
            "server",
            {
                "interfaces.fabric": [DEV],
                "interfaces.fabric_next_hop": [GATEWAY],
                "labels.block": [FIRST_C2S, FIRST_C2S + 2 * count + 1],
                ("vips", "fd00:100::100"): DELETE,  # IPv4 only: no IPv6 next hop here
            },
        ),
        "bench-server.yaml",
    )
    assert isinstance(config, ServerConfig)
    return config


def agent_seconds(count: int, nexthops: bool) -> float:
    """Seconds the server agent's core and the netlink provider take to learn `count` sessions
    from their first packets and install their return routes, batch by batch."""
    from orchestrator.core.agent import ServerAgent
    from orchestrator.core.events import LabelledPacket
    from orchestrator.dataplane.netlink.provider import NetlinkProvider

    config = agent_config(count)
    agent = ServerAgent(config, nexthops=nexthops)
    packets = [
        LabelledPacket(8, i, s2c_of(i) - 1, kernel_limit.udp_packet(client, VIP, 5353, 53))
        for i, client in enumerate(kernel_limit.clients(count))
    ]
    netns = _scratch("agent", count)
    try:
        with NetlinkProvider(netns) as provider:
            provider.ifindex(DEV)  # the link table is read before the clock starts
            batch = config.nfqueue.batch
            start = time.perf_counter()
            for at in range(0, count, batch):
                plan = agent.on_packets(packets[at : at + batch], 1000.0)
                agent.commit(plan, provider.apply(plan.ops))
            seconds = time.perf_counter() - start
        errors = agent.counters["route_errors"]
        want = {"routes": count, "nexthops": count if nexthops else 0}
        if errors or held(netns) != want:
            raise RuntimeError(f"agent: {errors} route errors; the kernel holds {held(netns)}, expected {want}")
    finally:
        _drop(netns)
    return seconds


@dataclass(frozen=True)
class NexthopRun:
    """One N: routes (sessions) per second each way, from the best of the repeats, and nexthops
    over plain; `seconds` holds every repeat's time, in the order run."""

    sessions: int
    repeats: int
    iproute2_plain_routes_per_s: float
    iproute2_nexthop_routes_per_s: float
    iproute2_ratio: float
    agent_plain_sessions_per_s: float
    agent_nexthop_sessions_per_s: float
    agent_ratio: float
    seconds: dict[str, list[float]]


def measure(count: int, repeats: int) -> NexthopRun:
    """Each of the four runs `repeats` times, plain and nexthop alternating, so that a change of
    the machine's load hits both; the rates are of each one's fastest run (what the kernel and
    the agent can do, the least disturbed by other work)."""
    runs = {
        "iproute2_plain": lambda: iproute2_seconds(count, False),
        "iproute2_nexthop": lambda: iproute2_seconds(count, True),
        "agent_plain": lambda: agent_seconds(count, False),
        "agent_nexthop": lambda: agent_seconds(count, True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            seconds[name].append(run())
            print(
                f"bench nexthops: N={count} {name} ({r + 1}/{repeats}): {seconds[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    rate = {name: count / min(s) for name, s in seconds.items()}
    return NexthopRun(
        sessions=count,
        repeats=repeats,
        iproute2_plain_routes_per_s=round(rate["iproute2_plain"], 1),
        iproute2_nexthop_routes_per_s=round(rate["iproute2_nexthop"], 1),
        iproute2_ratio=round(rate["iproute2_nexthop"] / rate["iproute2_plain"], 2),
        agent_plain_sessions_per_s=round(rate["agent_plain"], 1),
        agent_nexthop_sessions_per_s=round(rate["agent_nexthop"], 1),
        agent_ratio=round(rate["agent_nexthop"] / rate["agent_plain"], 2),
        seconds={name: [round(x, 3) for x in s] for name, s in seconds.items()},
    )


def format_runs(runs: list[NexthopRun]) -> str:
    lines = [
        "N       ip -batch plain/s  ip -batch nexthop/s  ratio   agent plain/s  agent nexthop/s  ratio",
    ]
    for r in runs:
        lines.append(
            f"{r.sessions:<7} {r.iproute2_plain_routes_per_s:>17,.1f}  {r.iproute2_nexthop_routes_per_s:>19,.1f}"
            f"  {r.iproute2_ratio:>5.2f}   {r.agent_plain_sessions_per_s:>13,.1f}"
            f"  {r.agent_nexthop_sessions_per_s:>15,.1f}  {r.agent_ratio:>5.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mplsorch lab bench nexthops")
    parser.add_argument("--sessions", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runs = [measure(n, args.repeats) for n in args.sessions]
    print(json.dumps({"runs": [asdict(r) for r in runs]}) if args.json else format_runs(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
