"""The server agent running in the lab, with the real balancer in front of it: the balancer daemon
(BalancerLab, without its hand-made plain-server routes) and `mplsorch run` on every server with
templates/server.example.yaml fitted to that server (transport label, fabric link and next hops,
the balancer's label range as block, lab-sized timeouts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config.examples import KeyPath, example
from orchestrator.lab.balancer_lab import LABELS, START_TIMEOUT, BalancerLab
from orchestrator.lab.kit import Lab, daemon_cli, patience


def server_config(lab: Lab, node: str, sock: Path, changes: Mapping[KeyPath, Any] | None = None) -> str:
    """templates/server.example.yaml fitted to server `node`, then `changes` (key path -> value,
    see orchestrator.config.examples; a VIP is a key with dots: `("vips", "10.0.0.200")`).
    `node.setup` is apply. Sessions end 2 s after their last flow, like the balancer's shortest
    service (dns), so a server never answers under a pair the balancer has handed to another session."""
    fabric = lab.iface(node, towards="p")
    hops = next(p["addresses"] for p in fabric["peers"] if p["node"] == "p")
    return example(
        "server",
        {
            "node.transport_label": lab.node(node)["transport_label"],
            "node.control_socket": str(sock),
            "node.setup": "apply",
            "balancer.transport_label": lab.node("lb")["transport_label"],
            "interfaces.fabric": [fabric["dev"]],
            "interfaces.fabric_next_hop": list(hops),
            "labels.block": list(LABELS),
            "vips": {vip: {"table": 100 + i} for i, vip in enumerate(lab.desc["vips"])},
            "sessions.persistence_timeout": "2s",
            **(changes or {}),
        },
    )


class AgentLab:
    """One server's agent: its configuration, process, log and control socket."""

    def __init__(self, lab: Lab, node: str) -> None:
        self.lab = lab
        self.node = node
        self.dir = Path(lab.node(node)["runtime_dir"])
        self.sock = self.dir / "agent.sock"
        self.config = self.dir / "server.yaml"
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self.running = 0  # `server agent running` lines in the log before the last restart

    def write_config(self, changes: Mapping[KeyPath, Any] | None = None) -> None:
        self.config.write_text(server_config(self.lab, self.node, self.sock, changes))

    def spawn(self) -> None:
        # The log is appended to, so it tells the whole story across restarts.
        with open(self.dir / "agent.log", "ab") as log:
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

    def wait_running(self) -> None:
        deadline = time.monotonic() + patience(START_TIMEOUT)
        while not self.sock.exists():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent on {self.node} did not start:\n" + self.log()[-3000:])
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM, as systemd would; the exit status."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=patience(15))

    def kill(self) -> None:
        """SIGKILL (it cleans nothing up: its return routes, node objects and ruleset stay, and so
        does its control socket's file) and wait for it to be gone."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=patience(15))

    def restart(self) -> None:
        """Start a new agent on the same configuration (after `kill` or `stop`); `wait_restarted`
        returns once it logged that it runs (the socket's file may be the dead agent's)."""
        assert self.proc is not None and self.proc.poll() is not None, "the agent still runs"
        self.running = self.log().count("server agent running")
        self.spawn()

    def wait_restarted(self) -> None:
        deadline = time.monotonic() + patience(60)
        while self.log().count("server agent running") <= self.running:
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent on {self.node} did not restart:\n" + self.log()[-3000:])
            time.sleep(0.1)

    def log(self) -> str:
        path = self.dir / "agent.log"
        return path.read_text() if path.exists() else ""

    def cli(self, *args: str) -> Any:
        """`mplsorch ARGS --json` against this agent's control socket, parsed."""
        return daemon_cli(self.sock, *args, node=self.node)

    def sessions(self) -> list[dict[str, Any]]:
        return self.cli("sessions")

    def reload(self, changes: Mapping[KeyPath, Any] | None = None, text: str | None = None) -> str:
        """Rewrite the configuration (`text`, or `server_config` with `changes`), SIGHUP; the log
        line that answered."""
        if text is None:
            self.write_config(changes)
        else:
            self.config.write_text(text)
        assert self.proc is not None
        marks = ("configuration reloaded", "reload rejected")
        before = sum(self.log().count(m) for m in marks)
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while sum(self.log().count(m) for m in marks) <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer to SIGHUP on {self.node}:\n" + self.log()[-3000:])
            time.sleep(0.2)
        return next(line for line in reversed(self.log().splitlines()) if any(m in line for m in marks))


class ServerLab:
    """The balancer and an agent on every server; `start()` and `close()` like BalancerLab."""

    def __init__(self, lab: Lab, balancer_changes: Mapping[KeyPath, Any] | None = None) -> None:
        self.lab = lab
        self.balancer = BalancerLab(lab, plain_servers=False, changes=balancer_changes)
        self.agents = {node: AgentLab(lab, node) for node in lab.names("server")}

    def start(self) -> None:
        self.balancer.start()
        for agent in self.agents.values():  # all at once: each takes seconds to start in the VM
            agent.spawn()
        for agent in self.agents.values():
            agent.wait_running()
        for node in self.agents:  # UDP flows (and with them sessions) end within a test's patience
            self.lab.sh(node, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=3")

    def close(self) -> None:
        for agent in self.agents.values():
            if agent.proc is not None:
                self.lab.stop(agent.proc)
            self.lab.sh(agent.node, "nft", "delete", "table", "inet", "mplsorch", check=False)
        self.balancer.close()  # removes every object of ours on the servers too
