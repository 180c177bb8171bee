"""Hitless restart of the server agents and the fail policy during a balancer outage (issue 13,
item 1), behind the real balancer, under counted traffic.

The agents: every client runs a paced UDP stream (one datagram every 20 ms, each echoed by its
sequence number) and a paced TCP download across a SIGKILL of every server's agent, a few seconds
down and a restart. While they are down, new flows of the existing sessions are answered under
their sessions' S2C labels (the return routes stay), and a new session's first packets pass the
server's queue unqueued (`bypass`) and, with no return route and no plain-IP way back, are not
answered: counted. After the restart every datagram was echoed, every download is complete, each
agent restored its sessions from its return routes (each to its session's nexthop object) and
conntrack, and no route, nexthop, rule or filter of the servers was deleted, added or replaced
(`ip monitor`, `tc monitor` silent).

The balancer's fail policy: with the daemon down, a `closed` service's first packets are dropped
(the queue rule has no `bypass` and nothing listens), an `open` one's pass unqueued as plain IP;
both counted by the ruleset and seen (or not) on the balancer's fabric link."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.config.examples import KeyPath
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.server_lab import ServerLab
from orchestrator.lab.traffic import (
    CONNECT,
    PROBE,
    last_json,
    nft_counters,
    spawn_download,
    spawn_stream,
    wait,
    wait_running,
)

INTERVAL = 0.02  # the UDP streams' pace: 50 datagrams a second per client
RATE = 100 << 10  # the downloads' pace, bytes a second per client
SIZE = int(patience(6)) << 20  # 6 MiB: about 60 s at RATE, several times the outage and a restart
DOWN = 3.0  # seconds the agents stay down
NEW_CLIENT = "10.0.1.50"  # a second address of c3 without a session: the agents' outage's new client
FAIL_CLIENT = "10.0.1.52"  # another one: the balancer's outage's new client
PROBES = 5  # a new client's first packets (each a new flow) during an outage
# dns sessions stay on the balancer for the whole module; dns is `closed`, http stays `open`.
CHANGES: dict[KeyPath, Any] = {"services.dns.persistence_timeout": "3600s", "services.dns.fail_policy": "closed"}
SESSION = ("client", "vip", "c2s_label", "s2c_label")


@pytest.fixture(scope="module")
def farm(lab: Lab) -> Iterator[ServerLab]:
    f = ServerLab(lab, balancer_changes=CHANGES)
    try:
        f.start()
        yield f
    finally:
        f.close()


def _kernel(lab: Lab, node: str) -> dict[str, list[str]]:
    """A server's objects of the agent as the kernel shows them (no statistics): return routes,
    termination routes, the label-marking filters, the VIP rules."""
    fabric = lab.iface(node, towards="p")["dev"]

    def lines(*cmd: str) -> list[str]:
        return sorted(line for line in lab.sh(node, *cmd).stdout.splitlines() if line.strip())

    return {
        "return_routes": [
            line
            for family in ("-4", "-6")
            for line in lines("ip", family, "-o", "route", "show", "table", "all")
            if "encap mpls" in line
        ],
        "nexthops": lines("ip", "nexthop", "show"),  # the return routes' (one per session)
        "mpls_routes": lines("ip", "-f", "mpls", "route", "show"),
        "filters": lab.sh(node, "tc", "filter", "show", "dev", fabric, "ingress").stdout.splitlines(),
        "rules": lines("ip", "rule", "show") + lines("ip", "-6", "rule", "show"),
    }


def _sessions(farm: ServerLab) -> dict[str, list[tuple[Any, ...]]]:
    """Each agent's sessions (client, VIP, C2S, S2C), sorted."""
    return {node: sorted(tuple(s[k] for k in SESSION) for s in a.sessions()) for node, a in farm.agents.items()}


def _probe(lab: Lab, script: str, src: str, n: int, wait: float) -> int:
    return int(lab.sh("c3", sys.executable, "-c", script, src, lab.vip, str(n), str(wait)).stdout.strip())


def test_agents_sigkill_outage_and_restart_lose_nothing(lab: Lab, farm: ServerLab) -> None:
    clients, servers = lab.names("client"), lab.names("server")
    for client in clients:  # an http and a dns session per client
        assert farm.balancer.curl(client) == "200"
        assert farm.balancer.udp(client).startswith("echo ")
    for server in servers:
        with open(Path(lab.node(server)["runtime_dir"]) / "www" / "big.bin", "wb") as f:
            f.truncate(SIZE)
    c3_dev = lab.iface("c3", towards="lb")["dev"]
    lab.sh("c3", "ip", "addr", "add", f"{NEW_CLIENT}/24", "dev", c3_dev)
    procs: list[subprocess.Popen[bytes]] = []
    getters: dict[str, subprocess.Popen[bytes]] = {}
    mon: list[subprocess.Popen[bytes]] = []
    try:
        stop = Path(lab.node("c1")["runtime_dir"]) / "server-restart-stop"
        stop.unlink(missing_ok=True)
        streams: dict[str, Path] = {}
        downloads: dict[str, Path] = {}
        for client in clients:
            run = Path(lab.node(client)["runtime_dir"])
            streams[client] = run / "server-restart-udp.log"
            procs.append(spawn_stream(lab, client, streams[client], stop, patience(120), INTERVAL))
            downloads[client] = run / "server-restart-tcp.log"
            getters[client] = spawn_download(lab, client, downloads[client], RATE)
        wait_running(downloads.values())
        loaded = time.monotonic()
        # The load runs (a session whose first flow had ended was learned again by its stream's
        # first packet): the sessions and the kernel's objects now, and from here on every change
        # the kernel reports on the agents' routes, rules and filters.
        time.sleep(1.0)
        before = _sessions(farm)
        kernel_before = {s: _kernel(lab, s) for s in servers}
        monitors: dict[tuple[str, str], Path] = {}
        for server in servers:
            run = Path(lab.node(server)["runtime_dir"])
            for kind, cmd in (("ip", ("ip", "-o", "monitor", "route", "rule", "nexthop")), ("tc", ("tc", "monitor"))):
                monitors[server, kind] = run / f"server-restart-{kind}-monitor.log"
                mon.append(lab.spawn(server, *cmd, log=monitors[server, kind]))
        time.sleep(0.5)
        counters = {s: nft_counters(lab, s) for s in servers}

        killed, killed_at = time.monotonic(), time.time()
        for agent in farm.agents.values():
            agent.kill()
        # While they are down: new flows of the served clients' sessions ...
        during = {c: farm.balancer.curl(c) for c in clients}
        during_udp = farm.balancer.udp("c2")
        # ... and a new client: the balancer gives it a session, no agent learns it.
        answered = _probe(lab, PROBE, NEW_CLIENT, PROBES, 1.0)
        outage = {s: nft_counters(lab, s) for s in servers}
        time.sleep(max(0.0, killed + DOWN - time.monotonic()))
        restarting = time.monotonic()
        for agent in farm.agents.values():  # all at once: each takes seconds to start in the VM
            agent.restart()
        for agent in farm.agents.values():
            agent.wait_restarted()
        up = time.monotonic()
        assert all(p.poll() is None for p in getters.values()), (
            f"a download ended before the restart ({killed - loaded:.1f} s from its start to the kill, "
            f"{up - killed:.1f} s to the agents' restart): "
            + " | ".join(f"{c}: {downloads[c].read_text()}" for c in clients)
        )
        time.sleep(1.0)
        kernel_after = {s: _kernel(lab, s) for s in servers}
        events = {k: [x for x in p.read_text().splitlines() if x.strip()] for k, p in monitors.items()}
        after = _sessions(farm)
        # The outage's new client: its session is the balancer's; its next new flow teaches the agent.
        answered_after = _probe(lab, PROBE, NEW_CLIENT, 1, patience(5))
        time.sleep(0.5)
        for proc in mon:
            lab.stop(proc)
        seen = {k: [x for x in p.read_text().splitlines() if NEW_CLIENT in x] for k, p in monitors.items()}

        stop.touch()
        for client in clients:
            assert getters[client].wait(timeout=patience(120)) == 0, downloads[client].read_text()
        for proc in procs:
            proc.wait(timeout=patience(30))
        udp = {c: last_json(streams[c]) for c in clients}
        tcp = {c: last_json(downloads[c]) for c in clients}
        queued = sum(outage[s]["queued"] - counters[s]["queued"] for s in servers)
        routes_before = {
            s: sorted(
                re.findall(r"^(\S+)\s+(?:nhid \d+\s+)?encap mpls\s+(\d+)/(\d+)", "\n".join(k["return_routes"]), re.M)
            )
            for s, k in kernel_before.items()
        }
        print(
            "\nserver agents' restart: "
            f"the kill {killed - loaded:.1f} s after the downloads started; agents down {up - killed:.1f} s (kept down {restarting - killed:.1f} s, restart of "
            f"{len(servers)} to running {up - restarting:.1f} s); UDP per client (sent/received/lost, longest "
            "gap between echoes): "
            + ", ".join(f"{c} {u['sent']}/{u['received']}/{u['lost']} {u['max_gap_ms']} ms" for c, u in udp.items())
            + f"; TCP per client (bytes of {SIZE}): "
            + ", ".join(f"{c} {t['bytes']} in {t['seconds']} s" for c, t in tcp.items())
            + "; echo gaps over 100 ms, starting at seconds from the kill: "
            + ", ".join(
                f"{c} " + " ".join(f"{at - killed_at:+.1f}s:{ms}ms" for at, ms in u["long_gaps"])
                for c, u in udp.items()
            )
            + f"; sessions before {before}, after {after}; return routes {routes_before}"
            + f"; while down: served clients' new flows {sum(v == '200' for v in during.values())}/{len(during)} "
            f"http + udp {'ok' if during_udp.startswith('echo ') else 'lost'}, new client's first packets "
            f"{PROBES} sent, {answered} answered; the agents' `queued` counters +{queued} "
            f"(bypass); after the restart the new client's next flow answered {answered_after}/1; "
            f"kernel events during the restart: {sum(len(v) for v in events.values())}"
        )

        assert during == dict.fromkeys(clients, "200"), during
        assert during_udp.startswith("echo "), during_udp
        assert answered == 0
        # Every new flow that reached a server while its agent was down passed its queue rule:
        # the served clients' (3 + 1) and the new client's.
        assert queued == len(clients) + 1 + PROBES, (counters, outage)
        for server in servers:
            agent = farm.agents[server]
            assert f"restored {len(routes_before[server])} sessions from the kernel" in agent.log() or (
                not routes_before[server]
            ), agent.log()[-2000:]
            # One session per return route: (client, S2C) as the kernel held them.
            restored = sorted((s[0], s[3]) for s in after[server])
            assert restored == sorted((r[0].split("/")[0], int(r[2])) for r in routes_before[server]), after
            assert set(after[server]) <= set(before[server]), (before, after)
        assert kernel_after == kernel_before
        assert all(not v for v in events.values()), events
        for client in clients:
            assert udp[client]["lost"] == 0 and udp[client]["sent"] > (DOWN + 2) / INTERVAL, udp[client]
            assert tcp[client]["bytes"] == SIZE, tcp[client]
        assert answered_after == 1
        assert any(seen.values()), "no monitor saw the new client's return route: were they listening?"
    finally:
        for proc in [*procs, *getters.values(), *mon]:
            lab.stop(proc)
        lab.sh("c3", "ip", "addr", "del", f"{NEW_CLIENT}/24", "dev", c3_dev, check=False)


def _plain_flows(lab: Lab, pcap: Path) -> dict[str, set[str]]:
    """The plain-IP flows of a capture by protocol: {"tcp": {"src.port > dst.port", ...}, "udp": ...}."""
    text = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, check=True).stdout
    flows: dict[str, set[str]] = {"tcp": set(), "udp": set()}
    for line in text.splitlines():
        m = re.search(r" IP (\S+ > \S+): (Flags|UDP)", line)
        if m:
            flows["tcp" if m.group(2) == "Flags" else "udp"].add(m.group(1))
    return flows


def test_fail_policy_closed_drops_and_open_passes_new_sessions_while_the_balancer_is_down(
    lab: Lab, farm: ServerLab
) -> None:
    c3_dev = lab.iface("c3", towards="lb")["dev"]
    lab.sh("c3", "ip", "addr", "add", f"{FAIL_CLIENT}/24", "dev", c3_dev)
    fabric = lab.iface("lb", towards="p")["dev"]
    run = Path(lab.node("lb")["runtime_dir"])
    pcap = run / "fail-policy.pcap"
    dump = lab.spawn(
        "lb",
        "tcpdump",
        "--immediate-mode",
        "-U",
        "-nn",
        "-i",
        fabric,
        "-w",
        str(pcap),
        f"ip and src host {FAIL_CLIENT}",
        log=pcap.with_suffix(".log"),
    )
    try:
        wait("tcpdump", lambda: "listening" in pcap.with_suffix(".log").read_text(), 20)
        counters = nft_counters(lab, "lb")
        farm.balancer.kill()
        served_udp = farm.balancer.udp("c1")  # a served client's new flow: the fast path, whatever the policy
        udp_answered = _probe(lab, PROBE, FAIL_CLIENT, PROBES, 1.0)  # dns: closed
        tcp_accepted = _probe(lab, CONNECT, FAIL_CLIENT, PROBES, 0.5)  # http: open
        outage = nft_counters(lab, "lb")
        farm.balancer.restart()
        answered_after = _probe(lab, PROBE, FAIL_CLIENT, 1, patience(5))
        time.sleep(1.0)
        lab.stop(dump)
        flows = _plain_flows(lab, pcap)
        queued = {s: outage[f"queued_{s}"] - counters[f"queued_{s}"] for s in ("dns", "http")}
        print(
            f"\nfail policy while the balancer is down: dns (closed) {PROBES} first packets sent, "
            f"queued_dns +{queued['dns']}, {len(flows['udp'])} of them on the fabric as plain IP, "
            f"{udp_answered} answered; http (open) {PROBES} SYNs sent, queued_http +{queued['http']}, "
            f"{len(flows['tcp'])} on the fabric as plain IP, {tcp_accepted} connected; a served client's "
            f"new UDP flow: {served_udp!r}; after the restart the new client's next dns flow "
            f"answered {answered_after}/1"
        )
        assert served_udp.startswith("echo "), served_udp
        assert queued == {"dns": PROBES, "http": PROBES}, (counters, outage)
        assert udp_answered == 0 and not flows["udp"], flows  # closed: dropped at the queue
        assert len(flows["tcp"]) == PROBES, flows  # open: past the queue, on as plain IP
        assert tcp_accepted == 0  # (the fabric has no plain-IP way back from the servers)
        assert answered_after == 1
    finally:
        lab.stop(dump)
        lab.sh("c3", "ip", "addr", "del", f"{FAIL_CLIENT}/24", "dev", c3_dev, check=False)
