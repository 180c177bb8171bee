"""Two balancers sharing their session table in etcd, on top of the default lab (issue 16,
docs/scale.md): the lab's `lb` runs as member lb1, a second balancer namespace `lb2` joins the
clients' LAN (10.0.1.2) and the fabric router p (its own link, 10.255.1.0/30), and one etcd
member runs in a namespace `etcd` with a link to each balancer (one member rather than three:
CI time on two cores; the design does not depend on the count).

Clients reach the VIP through a client-side router, namespace `ecmp` (10.0.1.254 on the clients'
LAN, a point-to-point link `ecmp0` to each balancer): its route to the VIP is a multipath route
over the balancers, hashed on L3 (fib_multipath_hash_policy 0: one client's flows take one
balancer), ignore_routes_with_linkdown, so a balancer whose link goes down drops out at once.
The fabric's way back is the balancers' anycast transport label: p's label route for it is a
multipath MPLS route to both (`answers_through` forces it to one, as p's hash may choose it); each
balancer also has its own label (cluster.member_label, `MEMBER_LABELS`), which p routes to it
alone: the way a member sends another's answers to it before the session's row arrives (af_mpls skips a next hop whose link is down), and for plain servers
p's route to the clients' LAN likewise. A balancer's next hops go into those routes only once
its daemon said READY=1 on its sd_notify socket (`ReadyWatch`), and out when it dies, as a
routing daemon would announce and withdraw the VIP (`announce`, `withdraw`). `via(client, lb)`
gives the client a source address that the router's own hash sends to that balancer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config.examples import KeyPath
from orchestrator.lab.balancer_lab import START_TIMEOUT, BalancerLab, lab_config
from orchestrator.lab.kit import Lab, daemon_cli, patience
from orchestrator.lab.server_lab import ServerLab

SWITCH = "mplsorch-sw"  # orchestrator/lab/netns.py SWITCH_NETNS: the bridges' namespace
LB2, ETCD, ROUTER = "lb2", "etcd", "ecmp"
LB2_LAN, LB2_FAB, P_FAB2 = "10.0.1.2", "10.255.1.1", "10.255.1.2"
ETCD_LB1, ETCD_LB2 = "10.254.0.2", "10.254.1.2"
ROUTER_LAN = "10.0.1.254"
ECMP_DEV = "ecmp0"  # each balancer's link to the router
# balancer -> (its address on its link to the router, the router's device of that link)
ECMP_HOPS = {"lb": ("10.253.0.1", "to-lb"), LB2: ("10.253.1.1", "to-lb2")}
FABRIC_HOPS = {"lb": ("10.255.0.1", "pl"), LB2: (LB2_FAB, "pl2")}  # p's next hop to each, its device
# After lb's links went down, the time its neighbours' kernels may take to skip its next hops
# (the link watch and the next hops' flags are a work queue's, run late on a loaded UML).
LINK_EVENT = 0.5
LB_LINKS = ("lan0", "lan1", "fab0", "mg0", ECMP_DEV)  # lb's links, down when it fails
TTL = 3
MEMBER_LABELS = {"lb1": 201, "lb2": 202}  # each member's own label, p routes it to that balancer
MEMBER_HOSTS = {"lb1": "lb", "lb2": LB2}


def cluster(name: str, endpoint: str) -> dict[KeyPath, Any]:
    return {
        "cluster": {
            "name": name,
            "endpoints": [f"{endpoint}:2379"],
            "label_block": 64,
            "lease_ttl": TTL,
            "member_label": MEMBER_LABELS[name],
        },
        "services.dns.persistence_timeout": "3600s",
        "interfaces.clients": ["lan0", ECMP_DEV],
        # lb2's own link to p (its forwarding routes' next hop)
        **({"interfaces.fabric_next_hop": P_FAB2} if name == "lb2" else {}),
    }


def ip(*args: str, check: bool = True) -> str:
    """`ip ARGS`, its output; a failure raises with ip's own message."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def in_router(*cmd: str, check: bool = True) -> str:
    """`cmd` in the router's namespace (not a node of the lab's description); its output."""
    return ip("netns", "exec", ROUTER, *cmd, check=check)


class ReadyWatch:
    """The service manager's end of sd_notify(3) for one daemon: a datagram socket that the
    daemon's $NOTIFY_SOCKET names. `wait_ready` returns at its READY=1, the moment systemd's
    Type=notify unit becomes active: what the lab's announcement keys on."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def forget(self) -> None:
        """Drop what a former process sent (before a restart)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def wait_ready(self, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if proc.poll() is not None or left <= 0:
                raise RuntimeError(f"{what} did not say READY=1")
            self.sock.settimeout(min(left, 0.5))
            try:
                fields = self.sock.recv(4096).decode(errors="replace").split("\n")
            except TimeoutError:
                continue
            if "READY=1" in fields:
                return

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class ClusterLab:
    """`agents=True`: the servers run the server agent (orchestrator/lab/server_lab.py), whose
    S2C answers go under the balancers' anycast transport label; else plain servers answering
    as IP."""

    def __init__(self, lab: Lab, agents: bool = False) -> None:
        self.lab = lab
        self.dir = Path(lab.node("lb")["runtime_dir"]) / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.servers = ServerLab(lab, balancer_changes=cluster("lb1", ETCD_LB1)) if agents else None
        self.lb1 = self.servers.balancer if self.servers else BalancerLab(lab, changes=cluster("lb1", ETCD_LB1))
        self.sock2 = self.dir / "lb2.sock"
        self.config2 = self.dir / "lb2.yaml"
        self.config2.write_text(lab_config(self.sock2, cluster("lb2", ETCD_LB2)))
        self.lb2: subprocess.Popen[bytes] | None = None
        self.etcd: subprocess.Popen[bytes] | None = None
        self.netns: list[str] = []
        self.ready = {"lb": ReadyWatch(self.dir / "notify-lb1"), LB2: ReadyWatch(self.dir / "notify-lb2")}
        self.announced: list[str] = []  # balancers whose next hops are in the router's and p's routes
        self.answers: str | None = None  # `answers_through`: p's anycast route to this balancer only
        self.sources: dict[str, str] = {}  # client -> the source address `via` gave it
        self.added: list[tuple[str, str]] = []  # (client, address) added by `via`

    # -- the extra namespaces ---------------------------------------------------------------------
    def _wire(self) -> None:
        for ns in (LB2, ETCD, ROUTER):
            ip("netns", "add", ns)
            self.netns.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "lan0", "netns", LB2, "type", "veth", "peer", "name", "lb2-lan0", "netns", SWITCH)
        ip("link", "add", "lan0", "netns", ROUTER, "type", "veth", "peer", "name", "ecmp-lan0", "netns", SWITCH)
        for port in ("lb2-lan0", "ecmp-lan0"):
            ip("-n", SWITCH, "link", "set", port, "master", "br-lan", "up")
        ip("link", "add", "fab0", "netns", LB2, "type", "veth", "peer", "name", "pl2", "netns", "p")
        ip("link", "add", "mg0", "netns", "lb", "type", "veth", "peer", "name", "e1", "netns", ETCD)
        ip("link", "add", "mg0", "netns", LB2, "type", "veth", "peer", "name", "e2", "netns", ETCD)
        for balancer, (_, dev) in ECMP_HOPS.items():
            ip("link", "add", ECMP_DEV, "netns", balancer, "type", "veth", "peer", "name", dev, "netns", ROUTER)
        for ns, dev, addr in (
            (LB2, "lan0", f"{LB2_LAN}/24"),
            (LB2, "fab0", f"{LB2_FAB}/30"),
            ("p", "pl2", f"{P_FAB2}/30"),
            ("lb", "mg0", "10.254.0.1/30"),
            (ETCD, "e1", f"{ETCD_LB1}/30"),
            (LB2, "mg0", "10.254.1.1/30"),
            (ETCD, "e2", f"{ETCD_LB2}/30"),
            (ROUTER, "lan0", f"{ROUTER_LAN}/24"),
            ("lb", ECMP_DEV, f"{ECMP_HOPS['lb'][0]}/30"),
            (ROUTER, ECMP_HOPS["lb"][1], "10.253.0.2/30"),
            (LB2, ECMP_DEV, f"{ECMP_HOPS[LB2][0]}/30"),
            (ROUTER, ECMP_HOPS[LB2][1], "10.253.1.2/30"),
        ):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", LB2, "route", "add", f"{self.lab.vip}/32", "via", P_FAB2, "dev", "fab0")
        self.lab.sh(
            "p", "sysctl", "-qw", "net.mpls.conf.pl2.input=1", "net.ipv4.conf.all.ignore_routes_with_linkdown=1"
        )
        for member, label in MEMBER_LABELS.items():  # each member's own label: to it alone, popped
            hop, dev = FABRIC_HOPS[MEMBER_HOSTS[member]]
            self.lab.sh("p", "ip", "-f", "mpls", "route", "replace", str(label), "via", "inet", hop, "dev", dev)
        # The router: forwarding, L3 hashing (one client, one balancer), a next hop whose link is
        # down is no next hop.
        ip(
            "netns", "exec", ROUTER, "sysctl", "-qw", "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=0", "net.ipv4.conf.all.ignore_routes_with_linkdown=1",
        )  # fmt: skip
        # The balancers see clients of the LAN arrive on their router link (loose reverse path);
        # lb keeps its IPv6 addresses across its links' failure, so its routes can come back.
        for ns in ("lb", LB2):
            ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{ECMP_DEV}.rp_filter=2")
        self.lab.sh("lb", "sysctl", "-qw", "net.ipv6.conf.all.keep_addr_on_down=1")

    # -- the announcement: what a routing daemon would do on READY and on death ----------------------
    def _routes(self) -> None:
        """The router's route to the VIP and p's anycast label route (and, for plain servers, its
        route to the clients' LAN) over the announced balancers."""
        vip = f"{self.lab.vip}/32"
        label = str(self.lab.node("lb")["transport_label"])
        if not self.announced:
            in_router("ip", "route", "del", vip, check=False)
            return
        ecmp = [w for b in self.announced for w in ("nexthop", "via", ECMP_HOPS[b][0], "dev", ECMP_HOPS[b][1])]
        fabric = [(FABRIC_HOPS[b][0], FABRIC_HOPS[b][1]) for b in self.announced]
        in_router("ip", "route", "replace", vip, *ecmp)
        answers = fabric if self.answers is None else [FABRIC_HOPS[self.answers]]
        mpls = [w for a, dev in answers for w in ("nexthop", "via", "inet", a, "dev", dev)]
        self.lab.sh("p", "ip", "-f", "mpls", "route", "replace", label, *mpls)
        if self.servers is None:  # plain servers answer as IP
            lan = [w for a, dev in fabric for w in ("nexthop", "via", a, "dev", dev)]
            self.lab.sh("p", "ip", "route", "replace", "10.0.1.0/24", *lan)

    def answers_through(self, balancer: str | None) -> None:
        """p's anycast label route to `balancer` alone (the choice its hash may make for a
        flow), whichever balancer made the session; None: over the announced ones again."""
        self.answers = balancer
        self._routes()

    def delay_store(self, balancer: str, ms: int) -> None:
        """etcd's packets to `balancer` (lb or lb2) held `ms` milliseconds (netem on etcd's link
        to it; 0: no more): its watch learns every row that much later, while its requests (its
        lease's keep-alive) reach etcd at once. Kept well under the store's 2 s call timeout."""
        dev = {"lb": "e1", LB2: "e2"}[balancer]
        if ms:
            ip("netns", "exec", ETCD, "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{ms}ms")
        else:
            ip("netns", "exec", ETCD, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def announce(self, balancer: str) -> None:
        """`balancer` (lb or lb2) said READY: its next hops go in."""
        if balancer not in self.announced:
            self.announced = sorted([*self.announced, balancer])
            self._routes()

    def withdraw(self, balancer: str) -> None:
        """`balancer`'s next hops go out (its daemon died, or it is drained)."""
        if balancer in self.announced:
            self.announced = [b for b in self.announced if b != balancer]
            self._routes()

    def start_etcd(self, fresh: bool = False) -> None:
        """etcd in its namespace (`fresh`: on an empty data directory, else on the one it had)."""
        data = self.dir / "etcd-data"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        urls = f"http://{ETCD_LB1}:2379,http://{ETCD_LB2}:2379"
        self.etcd = subprocess.Popen(
            [
                "ip", "netns", "exec", ETCD, "etcd", "--name=lab", f"--data-dir={data}",
                f"--listen-client-urls={urls}", f"--advertise-client-urls={urls}",
                "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=lab=http://127.0.0.1:2380", "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "etcd.log").open("ab"),
            start_new_session=True,
        )  # fmt: skip

    def _spawn_lb2(self) -> None:
        log = (self.dir / "lb2.log").open("wb")
        self.lb2 = subprocess.Popen(
            ["ip", "netns", "exec", LB2, sys.executable, "-m", "orchestrator", "run", "--config", str(self.config2)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.ready[LB2].env()},
        )
        deadline = time.monotonic() + patience(START_TIMEOUT)
        while "balancer running" not in self.log2():
            if self.lb2.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lb2 did not start:\n" + self.log2())
            time.sleep(0.2)

    def start(self) -> None:
        self._wire()
        self.start_etcd(fresh=True)
        self.lb1.env.update(self.ready["lb"].env())  # here: lb1 may have been replaced since __init__
        if self.servers is not None:
            self.servers.start()
        else:
            self.lb1.start()
        assert self.lb1.proc is not None
        self.ready["lb"].wait_ready(self.lb1.proc, "lb1", patience(START_TIMEOUT))
        self.announce("lb")
        self._spawn_lb2()
        assert self.lb2 is not None
        self.ready[LB2].wait_ready(self.lb2, "lb2", patience(START_TIMEOUT))
        self.announce(LB2)

    def stop_etcd(self) -> None:
        assert self.etcd is not None
        self.etcd.kill()
        self.etcd.wait()
        self.etcd = None

    def log2(self) -> str:
        path = self.dir / "lb2.log"
        return path.read_text() if path.exists() else ""

    def cli2(self, *args: str) -> Any:
        return daemon_cli(self.sock2, *args, node=LB2)

    # -- clients -----------------------------------------------------------------------------------
    def balancer_of(self, source: str) -> str:
        """The balancer (lb or lb2) the router's multipath route sends a client address to: the
        kernel's own hash (`ip route get ... iif`, the input path's selection)."""
        out = in_router("ip", "route", "get", self.lab.vip, "from", source, "iif", "lan0")
        dev = out.split(" dev ", 1)[1].split()[0]
        return next(b for b, (_, d) in ECMP_HOPS.items() if d == dev)

    def via(self, client: str, balancer: str) -> None:
        """The client's route to the VIP through the router, from a source address of the client's
        that the router's hash sends to `balancer` (lb or lb2): its own address if it does, else
        the first of a few extra addresses that does. Both must be announced. The address is
        `source(client)`: a client-ip session's key."""
        assert len(self.announced) == 2, self.announced
        index = self.lab.names("client").index(client)
        own = self.lab.address(client)
        candidates = [own] + [f"10.0.1.{100 + 10 * n + index}" for n in range(15)]
        source = next((a for a in candidates if self.balancer_of(a) == balancer), None)
        assert source is not None, f"no address of {client} hashes to {balancer}"
        if source != own and (client, source) not in self.added:
            self.lab.sh(client, "ip", "addr", "add", f"{source}/32", "dev", "eth0")
            self.added.append((client, source))
        self.lab.sh(client, "ip", "route", "replace", f"{self.lab.vip}/32", "via", ROUTER_LAN, "src", source)
        self.sources[client] = source

    def source(self, client: str) -> str:
        """The client's address towards the VIP (given by `via`)."""
        return self.sources.get(client) or self.lab.address(client)

    # -- lb's failure and rejoin -------------------------------------------------------------------
    def fail_lb1(self) -> tuple[float, float]:
        """SIGKILL lb's daemon and set all its links down at once (each `ip` is a process start,
        slow on a loaded UML). Its next hops stay in the router's and p's routes until `withdraw`
        (a routing protocol notices a death only after its hold time): the kernels skip them for
        their links' being down (`dead_hops`). The Unix times of the kill and of the links' being
        down."""
        assert self.lb1.proc is not None
        killed = time.time()
        os.kill(self.lb1.proc.pid, signal.SIGKILL)
        downs = [subprocess.Popen(["ip", "-n", "lb", "link", "set", dev, "down"]) for dev in LB_LINKS]
        assert all(d.wait(timeout=patience(30)) == 0 for d in downs)
        down = time.time()
        self.lb1.proc.wait(timeout=patience(15))
        return killed, down

    def dead_hops(self) -> dict[str, list[str]]:
        """The balancers whose next hops the kernel flags dead or linkdown (skipped), in the
        router's route to the VIP and in p's route for the anycast label."""
        label = str(self.lab.node("lb")["transport_label"])
        shown = {
            "router": (in_router("ip", "route", "show", f"{self.lab.vip}/32"), ECMP_HOPS),
            "p": (self.lab.sh("p", "ip", "-f", "mpls", "route", "show", label).stdout, FABRIC_HOPS),
        }
        out: dict[str, list[str]] = {}
        for where, (text, hops) in shown.items():
            dead = [
                line.split(" dev ", 1)[1].split()[0]
                for line in text.splitlines()
                if " dev " in line and ("linkdown" in line.split() or "dead" in line.split())
            ]
            out[where] = sorted(b for b, (_, dev) in hops.items() if dev in dead)
        return out

    def rejoin_lb1(self) -> float:
        """lb's links up (and the routes their failure flushed), its daemon started again on the
        same configuration; once it says READY its next hops are announced. The Unix time of the
        announcement."""
        for dev in LB_LINKS:
            self.lab.sh("lb", "ip", "link", "set", dev, "up")
        self.lab.sh("lb", "ip", "route", "replace", f"{self.lab.vip}/32", "via", "10.255.0.2", "dev", "fab0")
        self.lab.sh("lb", "ip", "-6", "route", "replace", f"{self.lab.vip6}/128", "via", "fd00:ff::2", "dev", "fab0")
        self.ready["lb"].forget()
        (self.lb1.dir / "daemon.log").replace(self.lb1.dir / "daemon-killed.log")
        self.lb1.restart()
        assert self.lb1.proc is not None
        self.ready["lb"].wait_ready(self.lb1.proc, "lb1", patience(START_TIMEOUT))
        self.announce("lb")
        return time.time()

    def close(self) -> None:
        if self.lb2 is not None and self.lb2.poll() is None:
            self.lb2.terminate()
            try:
                self.lb2.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.lb2.kill()
                self.lb2.wait()
        try:
            if self.servers is not None:
                self.servers.close()
            else:
                self.lb1.close()
        finally:
            if self.etcd is not None:
                self.etcd.kill()
                self.etcd.wait()
            for client in self.lab.names("client"):
                self.lab.sh(client, "ip", "route", "del", f"{self.lab.vip}/32", check=False)
            for client, address in self.added:
                self.lab.sh(client, "ip", "addr", "del", f"{address}/32", "dev", "eth0", check=False)
            for watch in self.ready.values():
                watch.close()
            for ns in self.netns:
                subprocess.run(["ip", "netns", "delete", ns], check=False)
            for own in MEMBER_LABELS.values():
                self.lab.sh("p", "ip", "-f", "mpls", "route", "del", str(own), check=False)
            self.lab.sh("p", "ip", "link", "del", "pl2", check=False)
            self.lab.sh("lb", "ip", "link", "del", "mg0", check=False)
            self.lab.sh("lb", "ip", "link", "del", ECMP_DEV, check=False)
            self.lab.sh("lb", "sysctl", "-qw", "net.ipv6.conf.all.keep_addr_on_down=0", check=False)
            label, (hop, dev) = str(self.lab.node("lb")["transport_label"]), FABRIC_HOPS["lb"]
            self.lab.sh("p", "ip", "-f", "mpls", "route", "replace", label, "via", "inet", hop, "dev", dev, check=False)
            for dev in ("lan0", "lan1", "fab0"):
                self.lab.sh("lb", "ip", "link", "set", dev, "up", check=False)

    # -- for `lab bench cluster` (orchestrator/lab/bench/cluster.py) --------------------------------
    def configure(self, changes: Mapping[KeyPath, Any]) -> None:
        """Both members' configurations with `changes` on top of the cluster's (before `start`)."""
        self.lb1 = BalancerLab(self.lab, changes={**cluster("lb1", ETCD_LB1), **changes})
        self.config2.write_text(lab_config(self.sock2, {**cluster("lb2", ETCD_LB2), **changes}))

    def request2(self, cmd: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
        """lb2's control socket asked directly (no `mplsorch` process: cheap enough to poll)."""
        from orchestrator.control_socket import request

        return request(str(self.sock2), cmd, timeout=patience(timeout), **args)

    def etcd_metrics(self) -> str:
        """etcd's Prometheus text (its /metrics endpoint), read inside its own namespace."""
        out = subprocess.run(
            ["ip", "netns", "exec", ETCD, "curl", "-sf", "-m", "10", f"http://{ETCD_LB1}:2379/metrics"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def flood_port(self) -> tuple[str, str, str]:
        """(namespace, LAN device, fabric device) of lb2, where a flood enters and leaves it."""
        return LB2, "lan0", "fab0"
