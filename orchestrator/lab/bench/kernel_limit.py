"""The kernel's own limit for `lab bench setup` (figure (a)): how many sessions per second the
kernel accepts when each session's objects come in iproute2's and nft's batches, with no daemon
in the way. The objects are the daemon's own: the balancer core (orchestrator.core.balancer)
plans N sessions of the example configuration's `dns` service (udp/53, client-ip) from N
synthetic first packets, and its operations are written as `tc -batch`, `ip -f mpls -batch` and
`nft -f` input (per session: the C2S flower filter with its two act_mpls pushes and their
cookies, the S2C label route, the fast-path set element; the balancer installs no encap route,
the servers' agents do). The three batches run one after the other in a scratch network
namespace of the lab's kernel with the balancer's two links; the limit is N over their summed
wall time, less each tool's own start (timed on an empty batch). Planning and rendering are pure (unit-tested); `measure` runs them."""

from __future__ import annotations

import ipaddress
import os
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass

from orchestrator.dataplane import ops

VIP = "10.0.0.100"  # the example configuration's IPv4 VIP
DNS_PORT = 53
CLIENT_GATEWAY = "10.0.1.10"  # the S2C routes' next hop: clients behind a router on lan0
CLIENT_BASE = int(ipaddress.IPv4Address("10.64.0.0"))
NFT_TABLE = "inet mplsorch"
NFT_SETS = """table inet mplsorch {
	set fast4 {
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
	}
}
"""


def udp_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A minimal IPv4/UDP first packet (what NFQUEUE would hand the daemon)."""
    udp = struct.pack("!HHHH", sport, dport, 8, 0)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + udp


def clients(count: int) -> list[str]:
    return [str(ipaddress.IPv4Address(CLIENT_BASE + i + 1)) for i in range(count)]


@dataclass(frozen=True)
class SessionObjects:
    """What the daemon installs for N sessions, as the core planned them."""

    operations: tuple[ops.Operation, ...]
    elements: tuple[ops.FastPathElement, ...]


def plan_sessions(count: int) -> SessionObjects:
    """The balancer core's operations for `count` new `dns` sessions of the example
    configuration, one first packet per client, planned in batches as the daemon reads them."""
    from orchestrator.config.examples import example
    from orchestrator.config.load import parse_config
    from orchestrator.config.model import BalancerConfig
    from orchestrator.core.balancer import Balancer
    from orchestrator.core.events import FirstPacket

    first_label = 1000
    config = parse_config(
        example(
            "balancer",
            {
                "labels.range": [first_label, first_label + 2 * count + 1000],
                "services.dns.admission.max_sessions": count + 16,
            },
        ),
        "bench.yaml",
    )
    assert isinstance(config, BalancerConfig)
    core = Balancer(config, 1000.0)
    hop = ops.NextHop("lan0", CLIENT_GATEWAY)
    out: list[ops.Operation] = []
    elements: list[ops.FastPathElement] = []
    batch = 256
    sources = clients(count)
    for start in range(0, count, batch):
        packets = [
            FirstPacket(0, i, udp_packet(src, VIP, 5353, DNS_PORT), "lan0", hop)
            for i, src in enumerate(sources[start : start + batch], start=start)
        ]
        plan = core.on_packets(packets, 1000.0)
        out += plan.ops
        for adds in plan.elements.values():
            elements += [op.obj for op in adds if isinstance(op.obj, ops.FastPathElement)]
    return SessionObjects(operations=tuple(out), elements=tuple(elements))


def tc_line(f: ops.FlowerFilter) -> str:
    """`tc -batch` input for a flower filter with act_mpls pushes and the daemon's cookies."""
    from orchestrator.dataplane.netlink.constants import TC_COOKIE_PREFIX
    from orchestrator.dataplane.netlink.encode import action_cookies

    m = f.match
    keys = [f"ip_proto {m.ip_proto}"] if m.ip_proto else []
    keys += [f"src_ip {m.src}"] if m.src else []
    keys += [f"dst_ip {m.dst}"] if m.dst else []
    keys += [f"src_port {m.src_port}"] if m.src_port is not None else []
    keys += [f"dst_port {m.dst_port}"] if m.dst_port is not None else []
    flags = ["skip_hw"] if f.offload == ops.OffloadPolicy.NEVER else []
    cookies = action_cookies(TC_COOKIE_PREFIX, f.tag, len(f.actions))
    actions = []
    for action, cookie in zip(f.actions, cookies):
        if not isinstance(action, ops.MplsPush):
            raise ValueError(f"no iproute2 form for {action!r}")
        actions.append(f"action mpls push protocol mpls_uc label {action.label} cookie {cookie.hex()}")
    proto = "ipv6" if m.src and ":" in m.src else "ip"
    return (
        f"filter add dev {f.dev} {f.direction.value} protocol {proto} pref {f.pref} handle {f.handle} "
        f"flower {' '.join(keys + flags)} {' '.join(actions)}"
    )


def mpls_route_line(r: ops.MplsRoute) -> str:
    """`ip -f mpls -batch` input for a label route."""
    out = f" as {'/'.join(str(label) for label in r.out_labels)}" if r.out_labels else ""
    via = f" via inet{'6' if r.via and ':' in r.via else ''} {r.via}" if r.via else ""
    return f"route add {r.label}{out}{via} dev {r.dev}"


def nft_line(e: ops.FastPathElement) -> str:
    """`nft -f` input for a fast-path set element."""
    if e.spi is not None or e.port is None:
        raise ValueError(f"the bench plans port-keyed elements only, not {e!r}")
    return f"add element {NFT_TABLE} {e.set_name} {{ {e.client} . {e.vip} . {e.proto} . {e.port} }}"


def batches(objects: SessionObjects) -> dict[str, list[str]]:
    """The batch inputs, by tool: `tc`, `ip` (label routes), `nft`."""
    out: dict[str, list[str]] = {"tc": [], "ip": [], "nft": []}
    for op in objects.operations:
        obj = op.obj
        if not isinstance(op, (ops.Add, ops.Replace)):
            raise ValueError(f"unexpected operation {op!r}")
        if isinstance(obj, ops.FlowerFilter):
            out["tc"].append(tc_line(obj))
        elif isinstance(obj, ops.MplsRoute):
            out["ip"].append(mpls_route_line(obj))
        else:
            raise ValueError(f"no batch form for {obj!r}")
    out["nft"] = [nft_line(e) for e in objects.elements]
    return out


def per_session(objects: SessionObjects, count: int) -> dict[str, float]:
    """Objects per session by kind (a check that the plan is what the docs say)."""
    kinds: dict[str, int] = {}
    objs: list[object] = [op.obj for op in objects.operations]
    for obj in objs + list(objects.elements):
        kinds[type(obj).__name__] = kinds.get(type(obj).__name__, 0) + 1
    return {k: v / count for k, v in sorted(kinds.items())}


@dataclass(frozen=True)
class KernelLimit:
    sessions: int
    seconds: dict[str, float]  # per tool

    @property
    def per_s(self) -> float:
        return self.sessions / sum(self.seconds.values())


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _timed(*cmd: str) -> float:
    start = time.perf_counter()
    _sh(*cmd)
    return time.perf_counter() - start


def build_netns(name: str, platform_labels: int) -> None:
    """A namespace with the balancer's links (lan0 to the clients, fab0 to the fabric), fab0's
    clsact qdisc and the ruleset's fast-path set."""
    for module in ("mpls_router", "mpls_iptunnel", "act_mpls", "cls_flower", "sch_ingress"):
        subprocess.run(["modprobe", module], check=False, capture_output=True)
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
    _sh("tc", "-n", name, "qdisc", "add", "dev", "fab0", "clsact")
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(NFT_SETS)
        f.flush()
        _sh("ip", "netns", "exec", name, "nft", "-f", f.name)


def measure(count: int) -> KernelLimit:
    """Plan `count` sessions, then time their batches in a scratch namespace (files written
    before each clock starts); checks the kernel holds every object afterwards."""
    objects = plan_sessions(count)
    lines = batches(objects)
    if not all(len(lines[tool]) == count for tool in lines):
        raise RuntimeError(f"planned {per_session(objects, count)} objects per session, expected 1 of each")
    netns = f"mplsorch-limit-{os.getpid()}"
    labels = [op.obj.label for op in objects.operations if isinstance(op.obj, ops.MplsRoute)]
    build_netns(netns, platform_labels=max(labels) + 16)
    seconds: dict[str, float] = {}
    commands = {
        "tc": ["tc", "-n", netns, "-batch"],
        "ip": ["ip", "-n", netns, "-f", "mpls", "-batch"],
        "nft": ["ip", "netns", "exec", netns, "nft", "-f"],
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            empty = os.path.join(tmp, "empty.batch")
            open(empty, "w").close()
            for tool, text in lines.items():
                path = os.path.join(tmp, f"{tool}.batch")
                with open(path, "w") as f:
                    f.write("\n".join(text) + "\n")
                # The tool's own start (an empty batch, best of three) is not the kernel's time.
                idle = min(_timed(*commands[tool], empty) for _ in range(3))
                seconds[tool] = max(_timed(*commands[tool], path) - idle, 1e-6)
        held = count_objects(netns)
        if held != {"tc": count, "ip": count, "nft": count}:
            raise RuntimeError(f"kernel limit: the kernel holds {held}, {count} of each expected")
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return KernelLimit(count, seconds)


def count_objects(netns: str) -> dict[str, int]:
    """Filters on fab0, label routes, fast-path elements the namespace holds."""
    filters = subprocess.run(
        ["tc", "-n", netns, "filter", "show", "dev", "fab0", "egress"], check=True, capture_output=True, text=True
    ).stdout
    routes = subprocess.run(
        ["ip", "-n", netns, "-f", "mpls", "route", "show"], check=True, capture_output=True, text=True
    ).stdout
    elements = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "set", "inet", "mplsorch", "fast4"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    import json

    sets = [item["set"] for item in json.loads(elements)["nftables"] if "set" in item]
    return {
        "tc": sum(1 for line in filters.splitlines() if " handle " in line and "flower" in line),
        "ip": sum(1 for line in routes.splitlines() if line.strip()),
        "nft": len(sets[0].get("elem", [])) if sets else 0,
    }
