"""The client agent running in the lab on the label-aware client c4, behind the real balancer and
server agents (ServerLab): `mplsorch run` on c4 with templates/client.example.yaml fitted to it
(its balancer link, the balancer's label range, the lab's VIPs, lab-sized timeouts), and the
balancer configured for it (c4 in clients.label_aware, its link lan1 in
clients.label_aware_interfaces)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.config.examples import example
from orchestrator.lab.balancer_lab import LABELS, START_TIMEOUT
from orchestrator.lab.kit import Lab, daemon_cli, patience

NODE = "c4"


def balancer_changes(lab: Lab) -> dict[str, Any]:
    """The balancer's configuration for the label-aware client: its interface, its prefix."""
    dev = lab.iface("lb", towards=NODE)["dev"]
    return {
        "interfaces.clients": [lab.iface("lb", segment="lan")["dev"], dev],
        "clients.label_aware": [f"{lab.address(NODE)}/32", f"{lab.address(NODE, version=6)}/128"],
        "clients.label_aware_interfaces": [dev],
    }


def client_config(lab: Lab, sock: Path) -> str:
    return example(
        "client",
        {
            "node.control_socket": str(sock),
            "node.setup": "apply",
            "interfaces.balancer": [lab.iface(NODE, towards="lb")["dev"]],
            "labels.range": list(LABELS),
            "vips": list(lab.desc["vips"]),
            "sessions.persistence_timeout": "2s",
        },
    )


class ClientAgentLab:
    """The client agent on c4: its configuration, process, log and control socket."""

    def __init__(self, lab: Lab, node: str = NODE) -> None:
        self.lab = lab
        self.node = node
        self.dir = Path(lab.node(node)["runtime_dir"])
        self.sock = self.dir / "client-agent.sock"
        self.config = self.dir / "client.yaml"
        self.config.write_text(client_config(lab, self.sock))
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.dir / "client-agent.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.lab.netns(self.node),
                    sys.executable,
                    "-m",
                    "orchestrator",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.lab.procs.append(self.proc)

    def start(self) -> None:
        self.spawn()
        self.wait_running()
        # Flows (and with them sessions) end within a test's patience.
        self.lab.sh(
            self.node,
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=3",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close=1",
            "net.netfilter.nf_conntrack_tcp_timeout_fin_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_last_ack=1",
        )

    def wait_running(self) -> None:
        deadline = time.monotonic() + patience(START_TIMEOUT)
        while not self.sock.exists():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the client agent on {self.node} did not start:\n" + self.log()[-3000:])
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: nothing of the agent's cleanup runs; the socket file stays behind."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=patience(15))
        self.sock.unlink(missing_ok=True)

    def log(self) -> str:
        path = self.dir / "client-agent.log"
        return path.read_text() if path.exists() else ""

    def cli(self, *args: str) -> Any:
        return daemon_cli(self.sock, *args, node=self.node)

    def close(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
        self.lab.sh(self.node, "nft", "delete", "table", "inet", "mplsorch", check=False)
        dev = self.lab.iface(self.node, towards="lb")["dev"]
        self.lab.sh(self.node, "tc", "qdisc", "del", "dev", dev, "clsact", check=False)
        self.lab.sh(self.node, "ip", "-f", "mpls", "route", "flush", "proto", "195", check=False)
