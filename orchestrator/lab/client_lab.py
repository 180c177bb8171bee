"""The client agent running in the lab on the label-aware client c4, behind the real balancer and
server agents (ServerLab): `mplsorch run` on c4 with templates/client.example.yaml fitted to it
(its balancer link, the balancer's label range, the lab's VIPs, lab-sized timeouts), the
balancer configured for it (c4 in clients.label_aware, its link lan1 in
clients.label_aware_interfaces), a capture of c4's link that sees labelled and plain packets, and
the balancer's per-session filter counters. The netns test and the demo share it."""

from __future__ import annotations

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
from orchestrator.dataplane import handles
from orchestrator.lab.balancer_lab import LABELS, START_TIMEOUT
from orchestrator.lab.kit import Lab, daemon_cli, patience

NODE = "c4"


def balancer_changes(lab: Lab) -> dict[KeyPath, Any]:
    """The balancer's configuration for the label-aware client: its interface, its prefix."""
    dev = lab.iface("lb", towards=NODE)["dev"]
    return {
        "interfaces.clients": [lab.iface("lb", segment="lan")["dev"], dev],
        "clients.label_aware": [f"{lab.address(NODE)}/32", f"{lab.address(NODE, version=6)}/128"],
        "clients.label_aware_interfaces": [dev],
    }


def client_config(lab: Lab, sock: Path, changes: Mapping[KeyPath, Any] | None = None) -> str:
    """templates/client.example.yaml fitted to c4, then `changes`. Sessions end 2 s after their
    last flow, or 2 s after the client sent in vain, so tests can watch them end."""
    return example(
        "client",
        {
            "node.control_socket": str(sock),
            "node.setup": "apply",
            "interfaces.balancer": [lab.iface(NODE, towards="lb")["dev"]],
            "labels.range": list(LABELS),
            "vips": list(lab.desc["vips"]),
            "sessions.persistence_timeout": "2s",
            "sessions.answer_timeout": "2s",
            **(changes or {}),
        },
    )


class ClientAgentLab:
    """The client agent on c4: its configuration, process, log and control socket."""

    def __init__(self, lab: Lab, node: str = NODE, changes: Mapping[KeyPath, Any] | None = None) -> None:
        self.lab = lab
        self.node = node
        self.dir = Path(lab.node(node)["runtime_dir"])
        self.sock = self.dir / "client-agent.sock"
        self.config = self.dir / "client.yaml"
        self.config.write_text(client_config(lab, self.sock, changes))
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
            "net.netfilter.nf_conntrack_udp_timeout_stream=3",  # a stream's flow, answered both ways
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


class Sniffer:
    """Every packet of c4's link to or from a VIP, labelled or not (tcpdump); with `expression`,
    only those tcpdump's filter expression takes (e.g. one service's, labelled or not:
    `udp port 53 or (mpls and udp port 53)`)."""

    def __init__(self, lab: Lab, name: str, node: str = NODE, expression: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.path = Path(lab.node(node)["runtime_dir"]) / f"{name}.pcap"
        log = self.path.with_suffix(".log")
        dev = lab.iface(node, towards="lb")["dev"]
        self.proc = lab.spawn(
            node, "tcpdump", "--immediate-mode", "-U", "-nn", "-i", dev, "-w", str(self.path), *expression, log=log
        )
        deadline = time.monotonic() + patience(20)
        while b"listening" not in (log.read_bytes() if log.exists() else b""):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"tcpdump on {node}:{dev} did not start")
            time.sleep(0.2)

    def packets(self) -> list[tuple[tuple[int, ...], str, str]]:
        """Stop the capture; (label stack, inner source, inner destination) of every IPv4 and IPv6
        packet with ports."""
        time.sleep(1.0)  # packets just sent may still be on their way through the namespaces
        self.lab.stop(self.proc)
        text = subprocess.run(["tcpdump", "-nn", "-r", str(self.path)], capture_output=True, text=True).stdout
        out = []
        for line in text.splitlines():
            m = re.search(r"IP6? ([0-9a-f:.]+?)\.\d+ > ([0-9a-f:.]+?)\.\d+:", line)
            if m:
                out.append((tuple(int(x) for x in re.findall(r"label (\d+)", line)), m.group(1), m.group(2)))
        return out


def filter_packets(lab: Lab, c2s: int, node: str = "lb", dev: str = "fab0", direction: str = "egress") -> int:
    """Packets the balancer's flower filters of session C2S on `dev` handled (their first
    action's count): on fab0's egress its C2S filters, which label the client's plain packets;
    on a label-aware interface's ingress its liveness filter, which counts the [C2S] packets."""
    out = lab.sh(node, "tc", "-s", "-j", "filter", "show", "dev", dev, direction).stdout
    return sum(
        f["options"]["actions"][0]["stats"]["packets"]
        for f in json.loads(out)
        if "options" in f and "actions" in f["options"] and handles.handle_c2s(f["options"].get("handle", 0)) == c2s
    )


def liveness_packets(lab: Lab, c2s: int) -> int:
    """The [C2S] packets the balancer's liveness filter of session C2S counted on c4's link."""
    return filter_packets(lab, c2s, dev=lab.iface("lb", towards=NODE)["dev"], direction="ingress")
