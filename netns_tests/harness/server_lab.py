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
from pathlib import Path
from typing import Any

from orchestrator.lab.balancer_lab import LABELS, ROOT, START_TIMEOUT, BalancerLab
from orchestrator.lab.kit import Lab, daemon_cli, patience

EXAMPLE_VIPS = '  10.0.0.100: {table: 100}      # not 253, 254, 255: the kernel\'s default, main and local tables\n' \
               '  "fd00:100::100": {table: 101}\n'


def server_config(lab: Lab, node: str, sock: Path, setup: str = "apply", extra_vips: str = "",
                  persistence: str = "2s") -> str:
    """templates/server.example.yaml fitted to server `node`; `extra_vips` are more `vips:` lines.
    Sessions end 2 s after their last flow by default, like the balancer's shortest service (dns),
    so a server never answers under a pair the balancer has handed to another session."""
    text = (ROOT / "templates" / "server.example.yaml").read_text()
    fabric = lab.iface(node, towards="p")
    hops = next(p["addresses"] for p in fabric["peers"] if p["node"] == "p")
    vips = "".join(f'  "{vip}": {{table: {100 + i}}}\n' for i, vip in enumerate(lab.desc["vips"]))
    replace = {
        "transport_label: 101 ": f"transport_label: {lab.node(node)['transport_label']} ",
        "control_socket: /run/mplsorch/mplsorch.sock": f"control_socket: {sock}",
        "setup: check ": f"setup: {setup} ",
        "transport_label: 100 ": f"transport_label: {lab.node('lb')['transport_label']} ",
        "fabric: [eth0] ": f"fabric: [{fabric['dev']}] ",
        'fabric_next_hop: [10.1.1.1, "fd00:11::1"]': "fabric_next_hop: [" + ", ".join(f'"{h}"' for h in hops) + "]",
        "block: [1001, 1999]": f"block: [{LABELS[0]}, {LABELS[1]}]",
        EXAMPLE_VIPS: vips + extra_vips,
        "persistence_timeout: 30s": f"persistence_timeout: {persistence}",
    }
    for old, new in replace.items():
        if old not in text:
            raise KeyError(f"{old!r} is not in the example server configuration")
        text = text.replace(old, new)
    return text


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

    def write_config(self, **kwargs: str) -> None:
        self.config.write_text(server_config(self.lab, self.node, self.sock, **kwargs))

    def spawn(self) -> None:
        # The log is appended to, so it tells the whole story across restarts.
        with open(self.dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.lab.netns(self.node), sys.executable, "-m",
                                          "orchestrator", "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def log(self) -> str:
        path = self.dir / "agent.log"
        return path.read_text() if path.exists() else ""

    def cli(self, *args: str) -> Any:
        """`mplsorch ARGS --json` against this agent's control socket, parsed."""
        return daemon_cli(self.sock, *args, node=self.node)

    def sessions(self) -> list[dict[str, Any]]:
        return self.cli("sessions")

    def reload(self, text: str | None = None, **kwargs: str) -> str:
        """Rewrite the configuration (`text`, or `server_config` with `kwargs`), SIGHUP; the log
        line that answered."""
        if text is None:
            self.write_config(**kwargs)
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

    def __init__(self, lab: Lab, **balancer_changes: str) -> None:
        self.lab = lab
        self.balancer = BalancerLab(lab, plain_servers=False, **balancer_changes)
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
