"""The lab side of `lab bench setup` that both phases share: the topology facts, the client's
latency aliases and flood routes, the servers' accept sinks, and the two measurements, each run
by its helper (flood, connect) inside the client's namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.lab.bench import connect, flood, pktgen, sink
from orchestrator.lab.bench.result import Latency, RateRun
from orchestrator.lab.bench.stats import alias_addresses, cpu_times, idle_share, softnet_drops

if TYPE_CHECKING:
    from types import ModuleType

    from orchestrator.lab.kit import Lab

TCP_PORT = 80  # the VIP's HTTP service, where the latency samples connect
FLOOD_NETS = {"balancer": 200, "ipvs": 201}  # second octet of each phase's spoofed sources
FLOOD_ROUTE = "10.200.0.0/13"  # both, and the /16s after them that IPVS's later rounds reach
ALIAS_NET = "10.0.16.0/20"  # the latency samples' client addresses, on c1
IPVS_VIP = "10.0.0.101"  # IPVS's VIP while the daemon serves the lab's: their connects interleaved
SOFTNET = Path("/proc/net/softnet_stat")
PROC_STAT = Path("/proc/stat")
QUIET_IDLE = 0.9  # a flood starts once the lab's CPUs were this idle ...
QUIET_WINDOW_S = 0.5  # ... over this long (the daemon's tick and sampler leave it 96-98 % idle)
QUIET_TIMEOUT_S = 30.0  # and starts anyway after this long (a host shared with other work)

T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress on stderr (stdout is the result)."""
    print(f"bench: {time.monotonic() - T0:7.1f}s {msg}", file=sys.stderr, flush=True)


def helper(lab: Lab, node: str, module: ModuleType, *args: str) -> list[str]:
    """The command that runs a helper module with `python -m` inside `node`'s namespace."""
    return ["ip", "netns", "exec", lab.netns(node), sys.executable, "-m", module.__name__, *args]


def mac(lab: Lab, node: str, dev: str) -> str:
    return str(json.loads(lab.sh(node, "ip", "-j", "link", "show", "dev", dev).stdout)[0]["address"])


def batch(lab: Lab, node: str, lines: list[str]) -> None:
    """Many `ip` commands in one run: hundreds of aliases and neighbours, one process."""
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        lab.sh(node, "ip", "-batch", f.name)
    finally:
        os.unlink(f.name)


def quiesce(timeout: float = QUIET_TIMEOUT_S) -> float:
    """Wait until the lab's CPUs were at least QUIET_IDLE idle over QUIET_WINDOW_S (in the UML
    guest: its one CPU), at most `timeout` (patience); return the seconds waited. Every flood
    starts so: the work an earlier flood left behind (the daemon reading the new-flow events of
    a (d) round's 10,000 fast-path flows goes on for a second or more after its last packet
    left) must not land in the next flood's time, whichever system that flood measures."""
    from orchestrator.lab.kit import patience

    began = time.monotonic()
    deadline = began + patience(timeout)
    before = cpu_times(PROC_STAT.read_text())
    while True:
        time.sleep(QUIET_WINDOW_S)
        now = cpu_times(PROC_STAT.read_text())
        if idle_share(before, now) >= QUIET_IDLE or time.monotonic() > deadline:
            return time.monotonic() - began
        before = now


class NodeProcess:
    """A process parked in a node, so that /proc/PID/net/dev shows that node's links to any
    process (reading it costs the systems under test nothing)."""

    def __init__(self, lab: Lab, node: str) -> None:
        self.lab = lab
        self.proc = lab.spawn(node, "sleep", "100000")
        netns = os.stat(f"/run/netns/{lab.netns(node)}").st_ino
        deadline = time.monotonic() + 30
        while os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino != netns:  # `ip netns exec` not there yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"no process entered {node}'s namespace")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.lab.stop(self.proc)


class Testbed:
    """The topology facts both phases need, and the client side they share."""

    def __init__(self, lab: Lab, sessions: int, samples: int, repeats: int = 1) -> None:
        """`samples` latency sources per repeat: each source opens one new session per system."""
        self.lab, self.sessions, self.samples, self.repeats = lab, sessions, samples, repeats
        self.client = lab.names("client")[0]
        self.balancer = lab.names("balancer")[0]
        self.fabric = next(p["node"] for p in lab.iface(self.balancer, segment="core")["peers"])
        client_iface = lab.iface(self.client, towards=self.balancer)
        self.client_dev = client_iface["dev"]
        self.client_subnet = next(s["subnet"] for s in lab.desc["segments"] if s["name"] == client_iface["segment"])
        self.lan_dev = lab.iface(self.balancer, towards=self.client)["dev"]
        self.fab_dev = lab.iface(self.balancer, towards=self.fabric)["dev"]
        self.aliases = alias_addresses(ALIAS_NET, samples * repeats)
        self.userspace: dict[str, int] = {}  # the daemon's counters over the latency runs
        self.loop_steps: dict[str, dict[str, float]] = {}  # its loop's steps over them (step_means)
        self.sinks: list[subprocess.Popen[bytes]] = []

    def prepare_clients(self) -> None:
        """Latency sources: aliases on the client, reachable from the balancer (permanent neighbour
        entries: no ARP inside a measured connect) and from the fabric (servers answer through it).
        Spoofed flood sources must be routed by the balancer and not dropped by its reverse-path
        filter."""
        lab, lb = self.lab, self.balancer
        subprocess.run(["modprobe", "pktgen"], check=True)
        batch(lab, self.client, [f"address add {a}/32 dev {self.client_dev}" for a in self.aliases])
        client_mac = mac(lab, self.client, self.client_dev)
        # The flood's spoofed sources sit behind the client LAN too: the balancer answers (and so
        # opens sessions for) only clients it has a route to.
        batch(
            lab,
            lb,
            [f"route replace {ALIAS_NET} dev {self.lan_dev}"]
            + [f"route replace {FLOOD_ROUTE} dev {self.lan_dev}"]
            + [f"route replace 10.{octet}.0.0/16 dev {self.lan_dev}" for octet in FLOOD_NETS.values()]
            + [f"neigh replace {a} lladdr {client_mac} dev {self.lan_dev} nud permanent" for a in self.aliases],
        )
        lab.sh(self.fabric, "ip", "route", "replace", ALIAS_NET, "via", lab.peer_address(self.fabric, lb))
        lab.sh(lb, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{self.lan_dev}.rp_filter=0")
        lab.sh(self.client, "ping", "-c", "1", "-W", "5", lab.address(lb, towards=self.client))

    def start_sinks(self, vip: str | None = None) -> None:
        """The accept sink on every server's VIP:80 (the lab's VIP by default), ready when it says so."""
        vip = vip or self.lab.vip
        for server in self.lab.names("server"):
            log = Path(self.lab.node(server)["runtime_dir"]) / f"accept-sink-{vip}.log"
            proc = self.lab.spawn(server, sys.executable, "-m", sink.__name__, vip, str(TCP_PORT), log=log)
            self.sinks.append(proc)
            deadline = time.monotonic() + 120
            while b"listening" not in (log.read_bytes() if log.exists() else b""):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"accept sink on {server} did not start: {log.read_text()}")
                time.sleep(0.2)

    def stop_sinks(self) -> None:
        for proc in self.sinks:
            self.lab.stop(proc)
        self.sinks.clear()

    def rate(self, phase: str, sport: int = pktgen.SOURCE_PORT) -> RateRun:
        """Flood from the client (UDP from `sport`); the helper waits until the balancer node has
        sent it all on."""
        return self.flood(phase, FLOOD_NETS[phase], self.sessions, sport=sport)

    def flood(
        self,
        phase: str,
        octet: int,
        count: int,
        offset: int = 0,
        sport: int = pktgen.SOURCE_PORT,
        vip: str | None = None,
    ) -> RateRun:
        """`count` first packets from 10.<octet>.0.1 + `offset` onwards to `vip` (the lab's VIP
        by default), timed until the balancer node has sent them all on to the fabric."""
        lab = self.lab
        watch = NodeProcess(lab, self.balancer)
        waited = quiesce()
        drops_before = softnet_drops(SOFTNET.read_text())
        try:
            cmd = helper(
                lab,
                self.client,
                flood,
                self.client_dev,
                mac(lab, self.balancer, self.lan_dev),
                vip or lab.vip,
                str(octet),
                str(count),
                str(watch.pid),
                self.fab_dev,
                str(sport),
                str(offset),
            )
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900 + count)
        finally:
            watch.close()
        if done.returncode != 0:
            raise RuntimeError(f"flood helper failed: {done.stderr}")
        out = json.loads(done.stdout)
        elapsed = out["reached"] - out["start"]
        say(
            f"{phase}: {out['seen']} of {count} first packets out on the fabric after {elapsed:.3f} s "
            f"(pktgen busy {out['send_s']:.3f} s; the lab quiet after {waited:.1f} s)"
        )
        if out["seen"] < count:
            drops = softnet_drops(SOFTNET.read_text()) - drops_before
            raise RuntimeError(
                f"{phase}: only {out['seen']} of {count} first packets left the "
                f"balancer node ({flood.STALL_S:.0f} s without progress; {drops} dropped "
                f"from the kernel's input backlog)"
            )
        return RateRun(count, elapsed, out["send_s"])

    def latencies(self, phase: str, vips: list[str], repeats: int) -> list[list[Latency]]:
        """Per VIP (a system each), per repeat: the connects of that repeat's share of the
        sources, the VIPs interleaved source by source (connect.connects), one helper run each."""
        lab = self.lab
        share = len(self.aliases) // repeats
        out: list[list[Latency]] = [[] for _ in vips]
        for r in range(repeats):
            sources = self.aliases[r * share : (r + 1) * share]
            cmd = helper(
                lab,
                self.client,
                connect,
                ",".join(vips),
                str(TCP_PORT),
                lab.address(self.client),
                ",".join(sources),
            )
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + 5 * len(vips) * len(sources))
            if done.returncode != 0:
                raise RuntimeError(f"connect helper failed: {done.stderr}")
            got = json.loads(done.stdout)
            if got["failed"]:
                raise RuntimeError(f"{phase}: {len(got['failed'])} connects failed, first: {got['failed'][0]}")
            for k, (pairs, retransmits) in enumerate(zip(got["pairs"], got["retransmits"])):
                out[k].append(Latency([(new, old) for new, old in pairs], retransmits))
            say(
                f"{phase}: repeat {r + 1}/{repeats}: {len(sources)} sources x {len(vips)} systems; "
                f"SYN retransmits {got['retransmits']}"
            )
        return out
