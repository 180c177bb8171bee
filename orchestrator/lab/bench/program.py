"""Benchmark: install and delete N sessions' kernel objects through the netlink provider, then the
same objects through `ip -batch` / `tc -batch`, in one kernel, in one run; print both rates and
the ratios provider / iproute2. Per session: the S2C label route (pop to the client's next hop),
the C2S label route (swap, for label-aware clients), the C2S flower filter (push [transport, C2S])
and the S2C encap route (as a server holds it). Runs as root in its own network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink.provider import NetlinkProvider

VIP = "10.0.0.100"
CLIENT_NEXT_HOP = "10.0.1.10"
FABRIC_NEXT_HOP = "10.255.0.2"
TRANSPORT_SERVER, TRANSPORT_BALANCER = 102, 100
FIRST_C2S = 1001
RETURN_TABLE = 100
CLIENT_BASE = int(ipaddress.IPv4Address("10.64.0.0"))


@dataclass(frozen=True)
class Session:
    client: str
    c2s: int

    @property
    def s2c(self) -> int:
        return self.c2s + 1


@dataclass(frozen=True)
class BenchResult:
    sessions: int
    objects: int
    provider_install_per_s: float
    provider_delete_per_s: float
    iproute2_install_per_s: float
    iproute2_delete_per_s: float
    install_ratio: float
    delete_ratio: float


def sessions(count: int) -> list[Session]:
    return [Session(str(ipaddress.IPv4Address(CLIENT_BASE + i)), FIRST_C2S + 2 * i) for i in range(count)]


def session_objects(s: Session, handle: int) -> list[ops.DataplaneObject]:
    return [
        ops.FlowerFilter(
            "fab0",
            handle,
            ops.FlowerMatch(src=f"{s.client}/32", dst=f"{VIP}/32"),
            ops.push_stack((TRANSPORT_SERVER, s.c2s)),
        ),
        ops.MplsRoute(s.s2c, "lan0", via=CLIENT_NEXT_HOP),
        ops.MplsRoute(s.c2s, "fab0", via=FABRIC_NEXT_HOP, out_labels=(TRANSPORT_SERVER, s.c2s)),
        ops.EncapRoute(f"{s.client}/32", (TRANSPORT_BALANCER, s.s2c), "fab0", via=FABRIC_NEXT_HOP, table=RETURN_TABLE),
    ]


def iproute2_batches(all_sessions: list[Session]) -> dict[str, list[tuple[list[str], str]]]:
    """The same objects as iproute2 batch input (command prefix, text), for install and delete:
    label routes through `ip -f mpls -batch`, encap routes `ip -batch`, filters `tc -batch`."""
    lines: dict[str, list[list[str]]] = {"install": [[], [], []], "delete": [[], [], []]}
    add, delete = lines["install"], lines["delete"]
    for handle, s in enumerate(all_sessions, start=1):
        add[0].append(f"route add {s.s2c} via inet {CLIENT_NEXT_HOP} dev lan0")
        add[0].append(f"route add {s.c2s} as {TRANSPORT_SERVER}/{s.c2s} via inet {FABRIC_NEXT_HOP} dev fab0")
        add[1].append(
            f"route add {s.client}/32 encap mpls {TRANSPORT_BALANCER}/{s.s2c} "
            f"via {FABRIC_NEXT_HOP} dev fab0 table {RETURN_TABLE}"
        )
        add[2].append(
            f"filter add dev fab0 egress protocol ip pref 10 handle {handle} flower "
            f"src_ip {s.client}/32 dst_ip {VIP}/32 action mpls push protocol mpls_uc "
            f"label {s.c2s} action mpls push protocol mpls_uc label {TRANSPORT_SERVER}"
        )
        delete[0].append(f"route del {s.s2c}")
        delete[0].append(f"route del {s.c2s}")
        delete[1].append(f"route del {s.client}/32 table {RETURN_TABLE}")
        delete[2].append(f"filter del dev fab0 egress protocol ip pref 10 handle {handle} flower")
    tools = (["ip", "-f", "mpls"], ["ip"], ["tc"])
    return {job: [(tool, "\n".join(text) + "\n") for tool, text in zip(tools, parts)] for job, parts in lines.items()}


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def build_netns(name: str, platform_labels: int) -> None:
    """A namespace with the balancer's two links (lan0 to clients, fab0 to the fabric)."""
    for module in ("mpls_router", "mpls_iptunnel", "act_mpls", "cls_flower", "sch_ingress"):
        subprocess.run(["modprobe", module], check=False)
    _sh("ip", "netns", "add", name)
    for cmd in (
        "link set lo up",
        "link add fab0 type veth peer name fabp",
        "link add lan0 type veth peer name lanp",
        "addr add 10.255.0.1/30 dev fab0",
        "addr add 10.0.1.1/24 dev lan0",
        "link set fab0 up",
        "link set fabp up",
        "link set lan0 up",
        "link set lanp up",
    ):
        _sh("ip", "-n", name, *cmd.split())
    _sh("ip", "netns", "exec", name, "sysctl", "-qw", f"net.mpls.platform_labels={platform_labels}")


def _phase(name: str, seconds: float, count: int) -> float:
    """Progress on stderr: which phase took how long (stdout stays the result)."""
    print(f"bench: {name}: {count} objects in {seconds:.2f} s ({count / seconds:.0f}/s)", file=sys.stderr)
    return seconds


def _timed_iproute2(netns: str, batches: list[tuple[list[str], str]]) -> float:
    """Wall time of the batch runs (each file is written before the clock starts)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, (tool, text) in enumerate(batches):
            path = os.path.join(tmp, f"{i}.batch")
            with open(path, "w") as f:
                f.write(text)
            runs.append([tool[0], "-n", netns, *tool[1:], "-batch", path])
        start = time.perf_counter()
        for cmd in runs:
            step = time.perf_counter()
            _sh(*cmd)
            print(f"bench:   {' '.join(cmd[:4])}: {time.perf_counter() - step:.2f} s", file=sys.stderr)
        return time.perf_counter() - start


def _timed_apply(provider: NetlinkProvider, operations: list[ops.Operation]) -> float:
    start = time.perf_counter()
    results = provider.apply(operations)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} operations failed, first: {failed[0]}")
    return elapsed


def run(count: int) -> BenchResult:
    netns = f"mplsorch-bench-{os.getpid()}"
    all_sessions = sessions(count)
    per_session = [session_objects(s, handle) for handle, s in enumerate(all_sessions, start=1)]
    # Grouped by kind in the order of the iproute2 runs (label routes, encap routes, filters),
    # so the two sides program the same objects in the same order.
    objects = [objs[i] for i in (1, 2, 3, 0) for objs in per_session]
    build_netns(netns, platform_labels=FIRST_C2S + 2 * count + 16)
    try:
        with NetlinkProvider(netns) as provider:
            setup = provider.apply([ops.Add(ops.ClsactQdisc("fab0"))])
            assert setup[0].ok, setup[0]
            provider.ifindex("fab0")  # the link table is read before the clock starts
            n = len(objects)
            t_install = _phase("provider install", _timed_apply(provider, [ops.Add(o) for o in objects]), n)
            start = time.perf_counter()
            installed = len(provider.dump())
            _phase("provider dump", time.perf_counter() - start, installed)
            if installed != len(objects) + 1:  # + the clsact qdisc
                raise RuntimeError(f"dump shows {installed - 1} objects, expected {len(objects)}")
            t_delete = _phase("provider delete", _timed_apply(provider, [ops.Delete(o) for o in objects]), n)
            if len(provider.dump()) != 0:
                raise RuntimeError("objects left after delete")
            batches = iproute2_batches(all_sessions)
            t_ip_install = _phase("iproute2 install", _timed_iproute2(netns, batches["install"]), n)
            t_ip_delete = _phase("iproute2 delete", _timed_iproute2(netns, batches["delete"]), n)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return BenchResult(
        sessions=count,
        objects=n,
        provider_install_per_s=n / t_install,
        provider_delete_per_s=n / t_delete,
        iproute2_install_per_s=n / t_ip_install,
        iproute2_delete_per_s=n / t_ip_delete,
        install_ratio=t_ip_install / t_install,
        delete_ratio=t_ip_delete / t_delete,
    )


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mplsorch lab bench program")
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.sessions)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"sessions {result.sessions}, objects {result.objects} "
            f"(per session: 2 label routes, 1 flower filter, 1 encap route)"
        )
        print(f"{'':10}{'provider/s':>14}{'iproute2/s':>14}{'ratio':>8}")
        print(
            f"{'install':10}{result.provider_install_per_s:14.0f}"
            f"{result.iproute2_install_per_s:14.0f}{result.install_ratio:8.2f}"
        )
        print(
            f"{'delete':10}{result.provider_delete_per_s:14.0f}"
            f"{result.iproute2_delete_per_s:14.0f}{result.delete_ratio:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
