"""The balancer daemon running in the lab, for the demo, tests and benchmarks: its configuration
(the example config with lab-sized labels and timeouts), plain servers (termination routes,
HTTP and UDP echo on the VIP), the daemon process and its control socket."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config.examples import KeyPath, example
from orchestrator.config.load import load_balancer_config
from orchestrator.core.balancer import qdiscs
from orchestrator.dataplane import ops
from orchestrator.lab.kit import Lab, daemon_cli, patience

ROOT = Path(__file__).resolve().parents[2]
LABELS = (1001, 1999)
CHECK_PORT = 8080  # with `checked`: the servers' application on their own address, for health checks
# Seconds a daemon may take to answer on its control socket: Python's start alone takes 20-45 s
# in the emulated VM, several times that when other VMs share the host's CPUs.
START_TIMEOUT = 30
UDP_ECHO = (
    "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))\n"
    "while True:\n d,a=s.recvfrom(2048); s.sendto(b'echo '+d, a)"
)
UDP_ASK = (
    "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5);"
    "s.sendto(b'hello', (sys.argv[1], 53)); print(s.recvfrom(100)[0].decode())"
)


# The lab's changes to templates/balancer.example.yaml (key paths of orchestrator.config.examples).
LAB_CHANGES: dict[KeyPath, Any] = {
    "labels.range": list(LABELS),
    # http and mobile sessions outlive a whole test run however slow the emulated VM is; dns
    # sessions end soon after their flow, so tests can watch a session end.
    "services.http.persistence_timeout": "3600s",
    "services.mobile.persistence_timeout": "3600s",
    "services.dns.persistence_timeout": "2s",
    "labels.hold_down": "1s",
    "node.setup": "apply",  # the lab proves apply: conntrack's checksum check goes
}


def lab_config(sock: Path, changes: Mapping[KeyPath, Any] | None = None) -> str:
    """templates/balancer.example.yaml fitted to the lab (LAB_CHANGES, the control socket `sock`),
    then `changes` (key path -> value, `DELETE` removes; see orchestrator.config.examples)."""
    return example("balancer", {**LAB_CHANGES, "node.control_socket": str(sock), **(changes or {})})


# What a restart gives back of each session: all of `sessions --json` but the times, the flow
# counts and the state, which start again from the restart and conntrack's dump.
RESTORED = (
    "id",
    "client",
    "clients",
    "key",
    "key_kind",
    "service",
    "vip",
    "protocol",
    "port",
    "server",
    "c2s_label",
    "s2c_label",
)


class BalancerLab:
    """Set up with `start()`, torn down with `close()`: everything it made is removed."""

    def __init__(
        self,
        lab: Lab,
        node: str = "lb",
        plain_servers: bool = True,
        checked: bool = False,
        changes: Mapping[KeyPath, Any] | None = None,
    ) -> None:
        """`plain_servers=False`: the servers run the agent (lab/server_lab.py), which installs the
        termination routes itself and answers under S2C labels, so neither the hand-made
        termination routes nor the fabric's plain-IP way back to the clients are set up.
        `checked=True`: each server's application also serves HTTP on its own address, port
        CHECK_PORT, where health checks reach it, and the balancer gets routes to the servers.
        `changes`: to the lab's configuration (`lab_config`)."""
        self.lab = lab
        self.node = node
        self.plain_servers = plain_servers
        self.checked = checked
        self.apps: dict[str, list[subprocess.Popen[bytes]]] = {}  # server -> its application's processes
        self.dir = Path(lab.node(node)["runtime_dir"])
        self.sock = self.dir / "mplsorch.sock"
        self.config = self.dir / "balancer.yaml"
        self.config.write_text(lab_config(self.sock, changes))
        self.proc: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.flows = 0  # new flows started through curl()/udp()
        self.env: dict[str, str] = {}  # added to the daemon's environment (e.g. NOTIFY_SOCKET)

    def start(self) -> None:
        lab = self.lab
        for server in lab.names("server"):
            results = lab.provider(server).apply(
                [ops.Add(ops.MplsRoute(label, "lo")) for label in range(LABELS[0], LABELS[1], 2) if self.plain_servers]
            )
            if not all(r.ok for r in results):
                raise RuntimeError(f"termination routes on {server}: {next(r for r in results if not r.ok)}")
            self.start_app(server)
        # Plain servers answer as IP: the fabric routes the client LAN back through the balancer.
        for net, gw in self._client_lan_routes() if self.plain_servers else []:
            lab.sh("p", "ip", "route", "replace", net, "via", gw)
        for net in self._server_nets() if self.checked else []:
            lab.sh(self.node, "ip", "route", "replace", net, "via", lab.peer_address(self.node, "p"))
        self.proc = self._spawn()
        deadline = time.monotonic() + patience(START_TIMEOUT)
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the balancer did not start:\n" + self.log())
            time.sleep(0.2)
        # Short conntrack timeouts, so flows (and then sessions) end within a test's patience.
        lab.sh(
            self.node,
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=3",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close=1",
            "net.netfilter.nf_conntrack_tcp_timeout_fin_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_last_ack=1",
        )

    def start_app(self, server: str) -> None:
        """The server's application: HTTP on both VIPs (and on its own address when checked), UDP echo."""
        lab = self.lab
        procs = [lab.http_server(server, lab.vip)[0], lab.http_server(server, lab.vip6)[0]]
        if self.checked:
            procs.append(lab.http_server(server, lab.address(server), CHECK_PORT)[0])
        procs.append(lab.spawn(server, sys.executable, "-c", UDP_ECHO, lab.vip))
        self.apps[server] = procs
        self._procs += procs

    def stop_app(self, server: str) -> None:
        for proc in self.apps.pop(server, []):
            self.lab.stop(proc)

    def _server_nets(self) -> list[str]:
        """The servers' IPv4 subnets: health checks go to the servers' own addresses."""
        return sorted(
            {
                str(ipaddress.ip_interface(a).network)
                for server in self.lab.names("server")
                for a in self.lab.iface(server, towards="p")["addresses"]
                if ":" not in a
            }
        )

    def _client_lan_routes(self) -> list[tuple[str, str]]:
        """(client LAN, balancer's fabric address) per address family: the fabric's way back."""
        lan = self.lab.iface(self.node, segment="lan")["addresses"]
        fab = self.lab.iface(self.node, towards="p")["addresses"]
        return [
            (str(ipaddress.ip_interface(a).network), next(g.split("/")[0] for g in fab if (":" in g) == (":" in a)))
            for a in lan
        ]

    def log(self) -> str:
        path = self.dir / "daemon.log"
        return path.read_text() if path.exists() else ""

    def logged(self, event: str, service: str, key: str, at_least: int = 1) -> list[dict[str, Any]]:
        """The sessions of `service` and `key` the daemon logged as `event` ("start", "end"):
        id, server and labels, once there are `at_least` of them (or after patience(5) s). The
        log outlives short sessions, and it is instant where a CLI call is not; but the daemon
        writes a session's start line after its batch's bookkeeping, which comes after the first
        packet's verdict and the loop's step aside (design.md), so the client's answer may come
        back before the line."""
        pattern = re.compile(rf"session (\d+) {event}: {service} {re.escape(key)} -> (\S+) c2s (\d+) s2c (\d+)")
        deadline = time.monotonic() + patience(5)
        while True:
            found = [
                {"id": int(m[1]), "server": m[2], "c2s_label": int(m[3]), "s2c_label": int(m[4])}
                for m in pattern.finditer(self.log())
            ]
            if len(found) >= at_least or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def cli(self, *args: str) -> Any:
        """`mplsorch ARGS --json` against the balancer's control socket, parsed."""
        return daemon_cli(self.sock, *args)

    def sessions(self) -> list[dict[str, Any]]:
        return self.cli("sessions")

    def curl(self, client: str, vip: str | None = None) -> str:
        """One new TCP flow from `client` through the VIP (the lab's first unless given); its HTTP status."""
        self.flows += 1
        vip = vip or self.lab.vip
        return self.lab.curl(client, f"http://[{vip}]/" if ":" in vip else f"http://{vip}/")

    def udp(self, client: str) -> str:
        """One new UDP flow from `client` to the VIP's port 53; the answer ('' if none)."""
        self.flows += 1
        return self.lab.sh(client, sys.executable, "-c", UDP_ASK, self.lab.vip, check=False).stdout.strip()

    def kernel_packets(self) -> int:
        """Packets our C2S filters labelled in the kernel (the first action's counter)."""
        out = self.lab.sh(self.node, "tc", "-s", "-j", "filter", "show", "dev", "fab0", "egress").stdout
        return sum(
            a["stats"]["packets"]
            for f in json.loads(out)
            if "options" in f
            for a in f["options"].get("actions", [])
            if a.get("order") == 1
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        # MPLSORCH_LAB_PROFILE=FILE: the daemon runs under cProfile, whose stats go to FILE when it
        # stops (SIGTERM); how the first-packet path was profiled (docs/lab.md).
        profile = os.environ.get("MPLSORCH_LAB_PROFILE")
        return self.lab.spawn(
            self.node,
            sys.executable,
            "-X",
            "faulthandler",  # a fatal signal (SIGSEGV, SIGABRT) leaves the threads' tracebacks in the log
            *(("-m", "cProfile", "-o", profile) if profile else ()),
            "-m",
            "orchestrator",
            "run",
            "--config",
            str(self.config),
            log=self.dir / "daemon.log",
            env=self.env,
        )

    def restorable_sessions(self) -> list[dict[str, Any]]:
        """`mplsorch sessions --json` as far as a restart must give it back (RESTORED), by id."""
        return sorted(({k: s[k] for k in RESTORED} for s in self.sessions()), key=lambda s: s["id"])

    def kill(self) -> None:
        """SIGKILL the daemon (it cleans nothing up) and wait for it to be gone; its log is kept as
        daemon-killed.log. Its sessions' kernel objects stay and keep forwarding."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=patience(15))
        (self.dir / "daemon.log").rename(self.dir / "daemon-killed.log")

    def restart(self, timeout: float = patience(60)) -> None:
        """Start a new daemon on the same configuration (after `kill`) and return once it runs
        (within `timeout` seconds)."""
        assert self.proc is not None and self.proc.poll() is not None, "the daemon still runs"
        self.proc = self._spawn()
        deadline = time.monotonic() + timeout
        while "balancer running" not in self.log():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def kill_and_restart(self) -> None:
        """`kill`, then `restart` at once."""
        self.kill()
        self.restart()

    def reload(self, changes: Mapping[KeyPath, Any] | None = None) -> None:
        """Rewrite the configuration (the lab's plus `changes`, as in `lab_config`) and SIGHUP the daemon."""
        self.config.write_text(lab_config(self.sock, changes))
        assert self.proc is not None
        before = self.log().count("configuration reloaded") + self.log().count("reload rejected")
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while self.log().count("configuration reloaded") + self.log().count("reload rejected") <= before:
            if time.monotonic() > deadline:
                raise RuntimeError("no answer to SIGHUP:\n" + self.log())
            time.sleep(0.2)

    def close(self) -> None:
        lab = self.lab
        for proc in [*self._procs, *([self.proc] if self.proc else [])]:
            lab.stop(proc)
        lb = lab.provider(self.node)
        # The fast-path sets' elements go with the table, below.
        lb.apply(
            [ops.Delete(i.obj) for i in reversed(lb.dump(elements=False)) if not isinstance(i.obj, ops.ClsactQdisc)]
        )
        # The daemon made the clsact qdiscs (a dump shows one only while it holds our filters):
        # fab0's, and those of the label-aware client interfaces.
        lb.apply([ops.Delete(q) for q in qdiscs(load_balancer_config(str(self.config)))])
        lab.sh(self.node, "nft", "delete", "table", "inet", "mplsorch", check=False)
        for net, _ in self._client_lan_routes() if self.plain_servers else []:
            lab.sh("p", "ip", "route", "del", net, check=False)
        for net in self._server_nets() if self.checked else []:
            lab.sh(self.node, "ip", "route", "del", net, check=False)
        for server in lab.names("server"):
            provider = lab.provider(server)
            provider.apply([ops.Delete(i.obj) for i in provider.dump()])
