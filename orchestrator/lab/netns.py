"""Build and tear down the netns lab for a Topology with iproute2 and sysctl.

Lab-only code: the product programs the kernel over netlink, but the lab is scaffolding, and plain
`ip` commands keep it close to the hand-verified reference session (docs/design.md). Every
object is recorded in a state file *before* it is created, so a crashed run's leftovers, and only
those, are removed at the next start. A lock file keeps two lab runs apart on one host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from orchestrator import kmod
from orchestrator.lab.topology import SWITCH_NETNS, Segment, Topology

MODULES: tuple[str, ...] = ("mpls_router", "mpls_iptunnel", "act_mpls", "cls_flower", "sch_ingress")
NETNS_DIR = Path("/run/netns")


class LabError(RuntimeError):
    """The lab cannot be built or cleaned: the message says what is missing or what failed."""


class Shell(Protocol):
    def __call__(self, argv: list[str], input: str | None = None) -> str: ...


def run_cmd(argv: list[str], input: str | None = None) -> str:
    """Run one command; raise LabError carrying its stderr when it fails."""
    if os.environ.get("MPLSORCH_LAB_VERBOSE"):
        print("lab$ " + " ".join(argv) + (f" <<{input!r}" if input else ""), file=sys.stderr)
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True)
    except FileNotFoundError:
        raise LabError(f"command not found: {argv[0]}") from None
    if p.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


@dataclass(frozen=True)
class LabPaths:
    """Where the lab keeps its files (overridable for tests)."""

    run_dir: Path = Path("/run/mplsorch-lab")
    etc_netns: Path = Path("/etc/netns")
    lock: Path = Path("/run/mplsorch-lab.lock")

    @property
    def state(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def description(self) -> Path:
        return self.run_dir / "lab.json"


@dataclass
class LabState:
    """What one lab run created (the content of the state file)."""

    netns: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # removed recursively
    rmdir_if_empty: list[str] = field(default_factory=list)  # parents we had to create
    pid: int = field(default_factory=os.getpid)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "pid": self.pid,
                "netns": self.netns,
                "dirs": self.dirs,
                "rmdir_if_empty": self.rmdir_if_empty,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> LabState:
        d = json.loads(text)
        return cls(
            list(d.get("netns", [])), list(d.get("dirs", [])), list(d.get("rmdir_if_empty", [])), int(d.get("pid", 0))
        )


@contextmanager
def lab_lock(paths: LabPaths) -> Iterator[None]:
    """Hold the host-wide lab lock, or fail saying who holds it."""
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            raise LabError(f"another lab run holds {paths.lock} (pid {f.read().strip() or '?'})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_modules(shell: Shell = run_cmd) -> None:
    """modprobe every module the lab and the product need (not those built into the kernel, which
    modprobe cannot know without modules.builtin); name the one that is missing."""
    for mod in MODULES:
        if kmod.builtin(mod):
            continue
        try:
            shell(["modprobe", mod])
        except LabError as e:
            if not Path("/sys/module", mod).exists():
                raise LabError(f"kernel module {mod} is missing: {e}") from None
    if not Path("/proc/sys/net/mpls/platform_labels").exists():
        raise LabError("this kernel has no MPLS routing (/proc/sys/net/mpls/platform_labels is absent)")


def _kill_netns_processes(ns: str, shell: Shell) -> None:
    """Stop processes left inside a lab namespace (daemons CMD started there), else it lingers."""
    try:
        pids = [int(p) for p in shell(["ip", "netns", "pids", ns]).split()]
    except LabError:
        return
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if Path(f"/proc/{p}").exists()]
        pids = alive
        if not pids:
            return


def _under(path: str, roots: list[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in roots)


def remove(state: LabState, paths: LabPaths, shell: Shell = run_cmd) -> list[str]:
    """Remove what `state` records; return the problems met (teardown goes on past each one)."""
    problems: list[str] = []
    for ns in state.netns:
        if (NETNS_DIR / ns).exists():
            _kill_netns_processes(ns, shell)
            try:
                shell(["ip", "netns", "delete", ns])
            except LabError as e:
                problems.append(str(e))
    roots = [paths.run_dir.resolve(), paths.etc_netns.resolve()]
    for d in state.dirs:
        if not _under(d, roots):
            problems.append(f"refused to remove {d}: outside {', '.join(map(str, roots))}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    for d in state.rmdir_if_empty:
        try:
            os.rmdir(d)
        except OSError:
            pass
    if paths.state.exists():
        paths.state.unlink()
    try:
        paths.run_dir.rmdir()
    except OSError:
        pass
    return problems


def cleanup_leftovers(paths: LabPaths, shell: Shell = run_cmd) -> LabState | None:
    """Remove a crashed run's objects, as named by its state file; call with the lock held."""
    if not paths.state.exists():
        try:
            paths.run_dir.rmdir()  # empty: a run that died between mkdir and writing its state
        except OSError:
            pass
        return None
    try:
        state = LabState.from_json(paths.state.read_text())
    except (ValueError, OSError) as e:
        raise LabError(f"unreadable lab state file {paths.state}: {e}; remove it by hand") from None
    problems = remove(state, paths, shell)
    if problems:
        raise LabError("could not remove leftovers of an earlier lab run: " + "; ".join(problems))
    return state


def plan(topo: Topology, paths: LabPaths) -> LabState:
    """Everything build() will create, so it can be recorded before it exists."""
    ns = topo.names() + ([SWITCH_NETNS] if any(s.is_bridge for s in topo.segments) else [])
    dirs = [str(paths.etc_netns / n) for n in topo.names()] + [str(paths.run_dir)]
    parents = [] if paths.etc_netns.exists() else [str(paths.etc_netns)]
    return LabState(ns, dirs, parents)


def switch_ports(topo: Topology) -> dict[tuple[str, str], str]:
    """(segment, node) -> the veth end in the switch namespace, at most 15 characters."""
    names: dict[tuple[str, str], str] = {}
    used: set[str] = set()
    for seg in (s for s in topo.segments if s.is_bridge):
        for m in seg.members:
            name = f"{m.node}-{m.dev}"
            if len(name) > 15 or name in used:
                name = f"swp{len(used)}"
            used.add(name)
            names[seg.name, m.node] = name
    return names


def bridge_names(topo: Topology) -> dict[str, str]:
    """segment -> bridge device name in the switch namespace."""
    out: dict[str, str] = {}
    for i, seg in enumerate(s for s in topo.segments if s.is_bridge):
        name = f"br-{seg.name}"
        out[seg.name] = name if len(name) <= 15 and name not in out.values() else f"br{i}"
    return out


def hosts_file(topo: Topology) -> str:
    """/etc/hosts for every node: NAME is its first address, NAME-DEV each interface's."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", "# mplsorch lab"]
    for node in topo.names():
        for i, (_, m) in enumerate(topo.attachments(node)):
            for addr in m.addresses:
                lines.append(f"{addr}\t{node}-{m.dev}" + (f" {node}" if i == 0 else ""))
    return "\n".join(lines) + "\n"


def _default(addr_version: int) -> str:
    return "0.0.0.0/0" if addr_version == 4 else "::/0"


def _batch(shell: Shell, ns: str, lines: list[str], family: str | None = None) -> None:
    if lines:
        shell(["ip", "-n", ns] + (["-f", family] if family else []) + ["-batch", "-"], "\n".join(lines) + "\n")


def _sysctl(shell: Shell, ns: str, settings: dict[str, str]) -> None:
    if settings:
        shell(["ip", "netns", "exec", ns, "sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in settings.items()])


def _fabric_facing(topo: Topology, node: str) -> list[str]:
    """The node's devices on segments that contain a fabric node (where MPLS input is allowed)."""
    return [
        m.dev
        for seg, m in topo.attachments(node)
        if any(topo.node(o.node).role == "fabric" for o in seg.members if o.node != node)
    ]


def sysctls(topo: Topology, node: str) -> dict[str, str]:
    """The per-node sysctls, as in the reference: MPLS input only on fabric-facing links."""
    role = topo.node(node).role
    devs = [m.dev for _, m in topo.attachments(node)]
    s: dict[str, str] = {}
    if role in ("client", "label-aware-client"):  # the client agent's node setup enables what it needs
        return s
    s["net/mpls/platform_labels"] = str(topo.platform_labels)
    if role in ("balancer", "fabric"):
        s["net/ipv4/ip_forward"] = "1"
        s["net/ipv6/conf/all/forwarding"] = "1"
    mpls_in = devs if role == "fabric" else _fabric_facing(topo, node) + (["lo"] if role == "server" else [])
    for dev in devs + ["lo"]:
        s[f"net/mpls/conf/{dev}/input"] = "1" if dev in mpls_in else "0"
    if role == "server":
        for dev in ["all", "default", "lo"] + devs:
            s[f"net/ipv4/conf/{dev}/rp_filter"] = "0"
    return s


def _links(topo: Topology, shell: Shell) -> None:
    """Veth pairs for 2-member segments; for bigger ones a bridge plus one veth per member."""
    bridges, ports = bridge_names(topo), switch_ports(topo)
    root: list[str] = []
    sw_pre: list[str] = []
    sw_post: list[str] = []
    for seg in topo.segments:
        if not seg.is_bridge:
            a, b = seg.members
            root.append(f"link add {a.dev} netns {a.node} type veth peer name {b.dev} netns {b.node}")
            continue
        br = bridges[seg.name]
        sw_pre += [f"link add {br} type bridge", f"link set {br} up"]
        for m in seg.members:
            port = ports[seg.name, m.node]
            root.append(f"link add {m.dev} netns {m.node} type veth peer name {port} netns {SWITCH_NETNS}")
            sw_post += [f"link set {port} master {br}", f"link set {port} up"]
    _batch(shell, SWITCH_NETNS, sw_pre)
    shell(["ip", "-batch", "-"], "\n".join(root) + "\n")
    _batch(shell, SWITCH_NETNS, sw_post)


def node_addresses(topo: Topology, node: str) -> list[str]:
    """The node's `ip -batch` lines for its links and addresses (lo up; every address of each
    attachment, IPv6 without DAD; the VIPs on a server's lo)."""
    lines = ["link set lo up"]
    for seg, m in topo.attachments(node):
        for addr in m.addresses:
            nodad = " nodad" if addr.version == 6 else ""
            lines.append(f"addr add {addr}/{seg.prefixlen(addr.version)} dev {m.dev}{nodad}")
        lines.append(f"link set {m.dev} up")
    if topo.node(node).role == "server":
        lines += [f"addr add {v}/{v.max_prefixlen} dev lo" for v in topo.vips]
    return lines


def node_routes(topo: Topology, node: str) -> list[str]:
    """The node's `ip -batch` route lines: derived default routes and VIP routes, then its static routes."""
    n = topo.node(node)
    lines: list[str] = []
    explicit_default = any(r.to == "default" for r in n.routes)
    gw_role = {"client": "balancer", "label-aware-client": "balancer", "server": "fabric"}.get(n.role)
    if gw_role and not explicit_default:
        done: set[int] = set()
        for _, _, gw in topo.neighbours(node, gw_role):
            for addr in gw.addresses:
                if addr.version not in done:
                    done.add(addr.version)
                    lines.append(f"route add {_default(addr.version)} via {addr}")
    if n.role == "balancer":
        for vip in topo.vips:
            hop = next(
                (
                    (mine, o.of_version(vip.version))
                    for _, mine, o in topo.neighbours(node, "fabric")
                    if o.of_version(vip.version) is not None
                ),
                None,
            )
            if hop is None:
                raise LabError(f"balancer {node} has no fabric neighbour of the VIP {vip}'s address family")
            lines.append(f"route add {vip}/{vip.max_prefixlen} via {hop[1]} dev {hop[0].dev}")
    for r in n.routes:
        to = _default(r.via.version) if r.to == "default" else r.to
        lines.append(f"route add {to} via {r.via}" + (f" dev {r.dev}" if r.dev else ""))
    return lines


def transport_routes(topo: Topology, fabric: str) -> list[str]:
    """The fabric's label routes: each transport label is popped towards its node (PHP)."""
    lines = []
    for n in topo.nodes:
        if n.transport_label is None:
            continue
        hop = next(((mine, o) for seg, mine, o in topo.neighbours(fabric, n.role) if o.node == n.name), None)
        if hop is not None:
            family = "inet" if hop[1].address.version == 4 else "inet6"
            lines.append(f"route add {n.transport_label} via {family} {hop[1].address} dev {hop[0].dev}")
    return lines


def check_free(state: LabState) -> None:
    """Refuse to start when a name we would create exists but is not ours (no state file names it)."""
    for ns in state.netns:
        if (NETNS_DIR / ns).exists():
            raise LabError(
                f"network namespace {ns} already exists and no lab state file names it; "
                f"delete it (`ip netns delete {ns}`) if it is a lab leftover"
            )
    for d in state.dirs:
        if Path(d).exists():
            raise LabError(f"{d} already exists and no lab state file names it; remove it if it is a lab leftover")


def build(
    topo: Topology,
    paths: LabPaths,
    state: LabState,
    shell: Shell = run_cmd,
    progress: Callable[[str], None] = lambda _msg: None,
) -> None:
    """Create the lab planned in `state` (after check_free, with the lock held); on failure the
    caller removes `state`. The state file is written before anything else is created."""
    paths.run_dir.mkdir(parents=True, exist_ok=False)
    paths.state.write_text(state.to_json())
    progress(f"creating {len(state.netns)} network namespaces")
    hosts = hosts_file(topo)
    for name in topo.names():
        etc = paths.etc_netns / name
        try:
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(hosts)
        except OSError as e:
            raise LabError(
                f"cannot create {etc} ({e.strerror}); /etc must be writable "
                "(in the VM it is an overlay: vng --overlay-rwdir /etc)"
            ) from None
        (paths.run_dir / name).mkdir()
    for ns in state.netns:
        shell(["ip", "netns", "add", ns])
    if SWITCH_NETNS in state.netns:
        _batch(shell, SWITCH_NETNS, ["link set lo up"])
    progress("creating links")
    _links(topo, shell)
    progress("addresses, sysctls and routes")
    for node in topo.names():
        _batch(shell, node, node_addresses(topo, node))
    for node in topo.names():
        _sysctl(shell, node, sysctls(topo, node))
    for node in topo.names():
        _batch(shell, node, node_routes(topo, node))
    for fabric in topo.names("fabric"):
        _batch(shell, fabric, transport_routes(topo, fabric), family="mpls")


def describe(topo: Topology, paths: LabPaths, vm: bool, backend: str | None = None) -> dict[str, Any]:
    """The lab description given to CMD (the MPLSORCH_LAB_JSON file); its format is documented."""

    def peers(seg: Segment, node: str) -> list[dict[str, Any]]:
        return [
            {"node": o.node, "dev": o.dev, "address": str(o.address), "addresses": [str(a) for a in o.addresses]}
            for o in seg.members
            if o.node != node
        ]

    bridges = bridge_names(topo)
    nodes = []
    for n in topo.nodes:
        ifaces = []
        for seg, m in topo.attachments(n.name):
            p = peers(seg, n.name)
            ifaces.append(
                {
                    "dev": m.dev,
                    "address": str(m.address),
                    "prefix": seg.subnet.prefixlen,
                    "addresses": [f"{a}/{seg.prefixlen(a.version)}" for a in m.addresses],
                    "segment": seg.name,
                    "peer": p[0]["node"] if len(p) == 1 else None,
                    "peers": p,
                }
            )
        nodes.append(
            {
                "name": n.name,
                "role": n.role,
                "netns": n.name,
                "transport_label": n.transport_label,
                "interfaces": ifaces,
                "runtime_dir": str(paths.run_dir / n.name),
                "etc_dir": str(paths.etc_netns / n.name),
                "routes": [{"to": r.to, "via": str(r.via), "dev": r.dev} for r in n.routes],
            }
        )
    segments = [
        {
            "name": s.name,
            "subnet": str(s.subnet),
            "subnets": [str(n) for n in s.subnets],
            "kind": "bridge" if s.is_bridge else "veth",
            "bridge": bridges.get(s.name),
            "switch_netns": SWITCH_NETNS if s.is_bridge else None,
            "members": [
                {"node": m.node, "dev": m.dev, "address": str(m.address), "addresses": [str(a) for a in m.addresses]}
                for m in s.members
            ],
        }
        for s in topo.segments
    ]
    return {
        "version": 1,
        "source": topo.source,
        "platform_labels": topo.platform_labels,
        "vm": vm,
        "backend": backend,
        "nodes": nodes,
        "segments": segments,
        "vips": [str(v) for v in topo.vips],
    }
