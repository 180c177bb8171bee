"""The reference of `lab bench setup`: Linux IPVS on the balancer node in tunnel mode (the servers
sit behind the fabric in other subnets), with the balancer's pool, weights and schedulers and
persistent services (the analogue of client-ip sessions), on a VIP of its own beside the running
daemon, flooded and sampled in the same minutes as the daemon (bench.balancer)."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from orchestrator.lab.bench.stats import ipvs_connections
from orchestrator.lab.bench.testbed import Testbed, batch

if TYPE_CHECKING:
    from orchestrator.config.model import BalancerConfig
    from orchestrator.lab.kit import Lab

PERSISTENCE_S = 300
SCHEDULERS = {
    "rr": "rr",
    "wrr": "wrr",
    "lc": "lc",
    "wlc": "wlc",
    "maglev": "mh",
    "source-hash": "sh",
    "response-time": "sed",
}  # the balancer's name: IPVS's
MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ipip")


def service_commands(config: BalancerConfig, vip: str, as_vip: str | None = None) -> list[list[str]]:
    """ipvsadm's arguments for the configuration's TCP and UDP services on `vip` (what the
    benchmark sends to), offered on `as_vip` (default `vip`): a persistent virtual service per
    port, its pool's servers as tunnel (-i) real servers with their weights."""
    commands = []
    for svc in config.services:
        if str(svc.vip) != vip or svc.protocol.value not in ("tcp", "udp"):
            continue
        flag = {"tcp": "-t", "udp": "-u"}[svc.protocol.value]
        for port in svc.ports:
            virtual = f"{as_vip or svc.vip}:{port}"
            commands.append(["-A", flag, virtual, "-s", SCHEDULERS[svc.scheduler.value], "-p", str(PERSISTENCE_S)])
            commands += [
                ["-a", flag, virtual, "-r", f"{server.address}:{port}", "-i", "-w", str(server.weight)]
                for server in config.pool(svc.pool).servers
            ]
    return commands


def lab_servers(lab: Lab) -> list[str]:
    return [lab.address(s) for s in lab.names("server")]


class Ipvs:
    """IPVS set up on the lab, and taken down again: on the lab's VIP (the daemon gone), or
    beside the running daemon on a VIP of its own (`vip`: testbed.IPVS_VIP), which the servers
    then carry on lo as well, so that the two systems' connects can be interleaved."""

    def __init__(self, bed: Testbed, config: BalancerConfig, vip: str | None = None) -> None:
        self.bed, self.config = bed, config
        self.lab = bed.lab
        self.vip = vip or self.lab.vip
        self.beside = self.vip != self.lab.vip

    def start(self) -> None:
        lab, lb, bed = self.lab, self.bed.balancer, self.bed
        for module in MODULES:
            subprocess.run(["modprobe", module], check=True)
        fabric_hop = lab.peer_address(lb, bed.fabric)
        # IPVS takes packets to local addresses only; the servers' answers come back through this
        # node from the VIP, now a local address, which fab0 must accept.
        batch(
            lab,
            lb,
            [f"address add {self.vip}/32 dev lo"]
            + [f"route replace {s}/32 via {fabric_hop}" for s in lab_servers(lab)],
        )
        lab.sh(
            lb,
            "sysctl",
            "-qw",
            f"net.ipv4.conf.{bed.fab_dev}.accept_local=1",
            f"net.ipv4.conf.{bed.fab_dev}.rp_filter=0",
        )
        lab.sh(bed.fabric, "ip", "route", "replace", bed.client_subnet, "via", lab.peer_address(bed.fabric, lb))
        for server in lab.names("server"):
            lab.sh(server, "ip", "link", "set", "tunl0", "up")
            lab.sh(server, "sysctl", "-qw", "net.ipv4.conf.tunl0.rp_filter=0", "net.ipv4.conf.all.rp_filter=0")
            if self.beside:
                lab.sh(server, "ip", "address", "add", f"{self.vip}/32", "dev", "lo")
        bed.start_sinks(self.vip)
        for args in service_commands(self.config, lab.vip, self.vip):
            lab.sh(lb, "ipvsadm", *args)

    def connections(self, sources: set[str]) -> int:
        return ipvs_connections(self.lab.sh(self.bed.balancer, "cat", "/proc/net/ip_vs_conn").stdout, sources)

    def close(self) -> None:
        lab, lb, bed = self.lab, self.bed.balancer, self.bed
        bed.stop_sinks()
        lab.sh(lb, "ipvsadm", "-C", check=False)
        lab.sh(lb, "ip", "address", "del", f"{self.vip}/32", "dev", "lo", check=False)
        for s in lab_servers(lab):
            lab.sh(lb, "ip", "route", "del", f"{s}/32", check=False)
        lab.sh(lb, "sysctl", "-qw", f"net.ipv4.conf.{bed.fab_dev}.accept_local=0", check=False)
        if not self.beside:  # beside the daemon, its servers' plain answers still take it
            lab.sh(bed.fabric, "ip", "route", "del", bed.client_subnet, check=False)
        for server in lab.names("server"):
            lab.sh(server, "ip", "link", "set", "tunl0", "down", check=False)
            if self.beside:
                lab.sh(server, "ip", "address", "del", f"{self.vip}/32", "dev", "lo", check=False)
