"""What code running inside the lab (netns tests, the demo) needs of it: its description,
commands in a node, a provider per node, bounded background processes and packet captures."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.dataplane.netlink.provider import NetlinkProvider


def patience(seconds: float) -> float:
    """A wait sized for native speed, stretched tenfold on the vm backend (an emulated CPU runs
    user code about 25x slower): one place for how long the lab's tests wait for anything."""
    return seconds * (10 if os.environ.get("MPLSORCH_LAB_BACKEND") == "vm" else 1)


def daemon_cli_argv(sock: Path, *args: str) -> list[str]:
    """The command line of `daemon_cli`."""
    return [sys.executable, "-m", "orchestrator", *args, "--json", "--socket", str(sock)]


def daemon_cli(sock: Path, *args: str, node: str | None = None, timeout: float = 20) -> Any:
    """`mplsorch ARGS --json --socket SOCK` against a running daemon, as an operator asks it, and
    its parsed JSON: one place for how the lab's balancer and agents are queried. It runs in this
    namespace (the control socket is a file, reachable from any). Raises RuntimeError with the
    CLI's stderr, naming `node` when given, if the command fails."""
    out = subprocess.run(
        daemon_cli_argv(sock, *args),
        capture_output=True,
        text=True,
        timeout=patience(timeout),
    )
    if out.returncode != 0:
        where = f" on {node}" if node else ""
        raise RuntimeError(f"mplsorch {' '.join(args)}{where}: {out.stderr}")
    return json.loads(out.stdout)


@dataclass
class Lab:
    desc: dict[str, Any]
    providers: dict[str, NetlinkProvider] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> Lab:
        return cls(json.loads(Path(os.environ["MPLSORCH_LAB_JSON"]).read_text()))

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.desc["nodes"] if n["name"] == name)

    def names(self, role: str) -> list[str]:
        return [n["name"] for n in self.desc["nodes"] if n["role"] == role]

    def iface(self, node: str, towards: str | None = None, segment: str | None = None) -> dict[str, Any]:
        """The interface of `node` whose segment also holds `towards` (or is `segment`)."""
        for iface in self.node(node)["interfaces"]:
            if segment and iface["segment"] == segment:
                return iface
            if towards and any(p["node"] == towards for p in iface["peers"]):
                return iface
        raise KeyError(f"{node} has no interface towards {towards or segment}")

    def address(self, node: str, towards: str | None = None, version: int = 4) -> str:
        """The node's address (of IP `version`) on its first interface, or the one towards `towards`."""
        iface = self.iface(node, towards) if towards else self.node(node)["interfaces"][0]
        return next(a.split("/")[0] for a in iface["addresses"] if (":" in a) == (version == 6))

    def peer_address(self, node: str, peer: str) -> str:
        """The address of `peer` on the segment it shares with `node`."""
        iface = self.iface(node, towards=peer)
        return next(p["address"] for p in iface["peers"] if p["node"] == peer)

    @property
    def vip(self) -> str:
        return self.desc["vips"][0]

    @property
    def vip6(self) -> str:
        return next(v for v in self.desc["vips"] if ":" in v)

    def netns(self, node: str) -> str:
        return self.node(node)["netns"]

    def sh(self, node: str, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns(node), *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def provider(self, node: str) -> NetlinkProvider:
        if node not in self.providers:
            self.providers[node] = NetlinkProvider(self.netns(node))
        return self.providers[node]

    def spawn(
        self, node: str, *cmd: str, log: Path | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`cmd` in `node`, its output in `log`; `env`: variables added to this process's."""
        out = open(log, "wb") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns(node), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """End a process this lab started (by its own id), at most after a few seconds."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def http_server(self, node: str, address: str, port: int = 80) -> tuple[subprocess.Popen[bytes], Path]:
        root = Path(self.node(node)["runtime_dir"]) / "www"
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text(f"served by {node}\n")
        log = Path(self.node(node)["runtime_dir"]) / f"http-{port}{'-v6' if ':' in address else ''}.log"
        proc = self.spawn(
            node, "python3", "-u", "-m", "http.server", str(port), "--bind", address, "--directory", str(root), log=log
        )
        deadline = time.monotonic() + 30
        while b"Serving HTTP" not in (log.read_bytes() if log.exists() else b""):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"http server on {node} did not start: {log.read_text()}")
            time.sleep(0.2)
        return proc, log

    def curl(self, node: str, url: str, timeout: float = 5) -> str:
        """The HTTP status code, or '000' when no answer came."""
        result = self.sh(
            node,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            str(timeout),
            "-w",
            "%{http_code}",
            url,
            check=False,
            timeout=timeout + 10,
        )
        return result.stdout.strip() or "000"

    def capture(self, node: str, dev: str, name: str) -> Capture:
        path = Path(self.node(node)["runtime_dir"]) / f"{name}.pcap"
        proc = self.spawn(
            node,
            "tcpdump",
            "--immediate-mode",
            "-U",
            "-nn",
            "-i",
            dev,
            "-w",
            str(path),
            "mpls",
            log=path.with_suffix(".log"),
        )
        deadline = time.monotonic() + 20
        while b"listening" not in (path.with_suffix(".log").read_bytes() if path.with_suffix(".log").exists() else b""):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"tcpdump on {node}:{dev} did not start")
            time.sleep(0.2)
        return Capture(self, proc, path)

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)
        for provider in self.providers.values():
            provider.close()


@dataclass
class Capture:
    lab: Lab
    proc: subprocess.Popen[bytes]
    path: Path

    def stacks(self) -> list[tuple[int, ...]]:
        """Stop the capture; the MPLS label stack (outermost first) of every packet seen."""
        time.sleep(1.0)  # packets just sent may still be on their way through the namespaces
        self.lab.stop(self.proc)
        text = subprocess.run(
            ["tcpdump", "-nn", "-r", str(self.path)], capture_output=True, text=True, check=True
        ).stdout
        return [tuple(int(x) for x in re.findall(r"label (\d+)", line)) for line in text.splitlines() if "MPLS" in line]
