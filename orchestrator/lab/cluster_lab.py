"""Two balancers sharing their session table in etcd, on top of the default lab (issue 16,
docs/scale.md): the lab's `lb` runs as member lb1, a second balancer namespace `lb2` joins the
clients' LAN (10.0.1.2) and the fabric router p (its own link, 10.255.1.0/30), and one etcd
member runs in a namespace `etcd` with a link to each balancer (one member rather than three:
CI time on two cores; the design does not depend on the count). The fabric routes the clients'
LAN back through lb (plain servers answer as IP). Clients choose their balancer by their route to
the VIP; after a failure the test moves the clients' and the fabric's routes, as ECMP and a
routing protocol would (the lab's UML kernel has no IP multipath)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config.examples import KeyPath
from orchestrator.lab.balancer_lab import START_TIMEOUT, BalancerLab, lab_config
from orchestrator.lab.kit import Lab, daemon_cli, patience

SWITCH = "mplsorch-sw"  # orchestrator/lab/netns.py SWITCH_NETNS: the bridges' namespace
LB2, ETCD = "lb2", "etcd"
LB2_LAN, LB2_FAB, P_FAB2 = "10.0.1.2", "10.255.1.1", "10.255.1.2"
ETCD_LB1, ETCD_LB2 = "10.254.0.2", "10.254.1.2"
TTL = 3


def cluster(name: str, endpoint: str) -> dict[KeyPath, Any]:
    return {
        "cluster": {"name": name, "endpoints": [f"{endpoint}:2379"], "label_block": 64, "lease_ttl": TTL},
        "services.dns.persistence_timeout": "3600s",
    }


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class ClusterLab:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = Path(lab.node("lb")["runtime_dir"]) / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lb1 = BalancerLab(lab, changes=cluster("lb1", ETCD_LB1))
        self.sock2 = self.dir / "lb2.sock"
        self.config2 = self.dir / "lb2.yaml"
        self.config2.write_text(lab_config(self.sock2, cluster("lb2", ETCD_LB2)))
        self.lb2: subprocess.Popen[bytes] | None = None
        self.etcd: subprocess.Popen[bytes] | None = None
        self.netns: list[str] = []

    # -- the extra namespaces ---------------------------------------------------------------------
    def _wire(self) -> None:
        for ns in (LB2, ETCD):
            ip("netns", "add", ns)
            self.netns.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "lan0", "netns", LB2, "type", "veth", "peer", "name", "lb2-lan0", "netns", SWITCH)
        ip("-n", SWITCH, "link", "set", "lb2-lan0", "master", "br-lan", "up")
        ip("link", "add", "fab0", "netns", LB2, "type", "veth", "peer", "name", "pl2", "netns", "p")
        ip("link", "add", "mg0", "netns", "lb", "type", "veth", "peer", "name", "e1", "netns", ETCD)
        ip("link", "add", "mg0", "netns", LB2, "type", "veth", "peer", "name", "e2", "netns", ETCD)
        for ns, dev, addr in (
            (LB2, "lan0", f"{LB2_LAN}/24"),
            (LB2, "fab0", f"{LB2_FAB}/30"),
            ("p", "pl2", f"{P_FAB2}/30"),
            ("lb", "mg0", "10.254.0.1/30"),
            (ETCD, "e1", f"{ETCD_LB1}/30"),
            (LB2, "mg0", "10.254.1.1/30"),
            (ETCD, "e2", f"{ETCD_LB2}/30"),
        ):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", LB2, "route", "add", f"{self.lab.vip}/32", "via", P_FAB2, "dev", "fab0")
        self.lab.sh(
            "p", "sysctl", "-qw", "net.mpls.conf.pl2.input=1", "net.ipv4.conf.all.ignore_routes_with_linkdown=1"
        )

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
        )
        deadline = time.monotonic() + patience(START_TIMEOUT)
        while "balancer running" not in self.log2():
            if self.lb2.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lb2 did not start:\n" + self.log2())
            time.sleep(0.2)

    def start(self) -> None:
        self._wire()
        self.start_etcd(fresh=True)
        self.lb1.start()
        self._spawn_lb2()

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

    def via(self, client: str, balancer: str) -> None:
        """The client's route to the VIP through `balancer` (lb or lb2)."""
        gw = self.lab.address("lb", towards=client) if balancer == "lb" else LB2_LAN
        self.lab.sh(client, "ip", "route", "replace", f"{self.lab.vip}/32", "via", gw)

    def close(self) -> None:
        if self.lb2 is not None and self.lb2.poll() is None:
            self.lb2.terminate()
            try:
                self.lb2.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.lb2.kill()
                self.lb2.wait()
        try:
            self.lb1.close()
        finally:
            if self.etcd is not None:
                self.etcd.kill()
                self.etcd.wait()
            for client in self.lab.names("client"):
                self.lab.sh(client, "ip", "route", "del", f"{self.lab.vip}/32", check=False)
            for ns in self.netns:
                subprocess.run(["ip", "netns", "delete", ns], check=False)
            self.lab.sh("p", "ip", "link", "del", "pl2", check=False)
            self.lab.sh("lb", "ip", "link", "del", "mg0", check=False)
            for dev in ("lan0", "fab0"):
                self.lab.sh("lb", "ip", "link", "set", dev, "up", check=False)

    # -- for `lab bench cluster` (orchestrator/lab/bench/cluster.py) --------------------------------
    def configure(self, changes: Mapping[KeyPath, Any]) -> None:
        """Both members' configurations with `changes` on top of the cluster's (before `start`)."""
        self.lb1 = BalancerLab(self.lab, changes={**cluster("lb1", ETCD_LB1), **changes})
        self.config2.write_text(lab_config(self.sock2, {**cluster("lb2", ETCD_LB2), **changes}))

    def request2(self, cmd: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
        """lb2's control socket asked directly (no `mplsorch` process: cheap enough to poll)."""
        from orchestrator.daemon.control import request

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

    def fail_lb1(self, clients: Sequence[str]) -> tuple[float, float]:
        """lb's death and the reconvergence, as the failover test makes them: its daemon
        SIGKILLed, its links down (waited for), then `clients`' way to the VIP and the fabric's
        way back to the clients' LAN moved to lb2 (what ECMP and routing would do; each `ip` a
        process, started together). The Unix times of the kill and of the routes moved."""
        assert self.lb1.proc is not None
        os.kill(self.lb1.proc.pid, signal.SIGKILL)
        killed = time.time()
        downs = [subprocess.Popen(["ip", "-n", "lb", "link", "set", dev, "down"]) for dev in ("lan0", "fab0", "mg0")]
        if not all(p.wait(timeout=patience(30)) == 0 for p in downs):
            raise RuntimeError("lb's links did not go down")
        moves = [
            subprocess.Popen(["ip", "-n", c, "route", "replace", f"{self.lab.vip}/32", "via", LB2_LAN]) for c in clients
        ]
        moves.append(subprocess.Popen(["ip", "-n", "p", "route", "replace", "10.0.1.0/24", "via", LB2_FAB]))
        if not all(m.wait(timeout=patience(30)) == 0 for m in moves):
            raise RuntimeError("the routes did not move to lb2")
        moved = time.time()
        self.lb1.proc.wait(timeout=patience(15))
        return killed, moved
