"""Hitless restart of the balancer (issue 13, item 1) under counted traffic: every client runs a
paced UDP stream (one datagram every 20 ms, each echoed by its sequence number) and a paced TCP
download across a SIGKILL of the daemon, a few seconds down and a restart. While it is down a
served client's new connections are admitted by the kernel's fast path and a new client's first
packets meet the service's fail policy (`open`: past the queue unqueued, counted by the ruleset).
After the restart: every datagram echoed, every download complete, the same sessions (ids,
labels, servers), and no kernel object of a live session deleted, added or replaced."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.config.examples import KeyPath
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.traffic import (
    PROBE,
    last_json,
    nft_counters,
    spawn_download,
    spawn_stream,
    wait_running,
)

INTERVAL = 0.02  # the UDP streams' pace: 50 datagrams a second per client
RATE = 100 << 10  # the downloads' pace, bytes a second per client
SIZE = int(patience(3)) << 20  # 3 MiB: about 30 s at RATE, several times the outage and a restart
DOWN = 3.0  # seconds the daemon stays down
NEW_CLIENT = "10.0.1.50"  # a second address of c3 that has no session: the outage's new client
PROBES = 5  # the new client's first packets (UDP, each a new flow) while the daemon is down
RESTORED = ("id", "service", "key", "key_kind", "client", "vip", "protocol", "port", "server", "c2s_label", "s2c_label")
CHANGES: dict[KeyPath, Any] = {"services.dns.persistence_timeout": "3600s"}  # no dns session ends during the test


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab, changes=CHANGES)
    try:
        b.start()
        yield b
    finally:
        b.close()


def _restored_view(balancer: BalancerLab) -> list[dict[str, Any]]:
    return sorted(({k: s[k] for k in RESTORED} for s in balancer.sessions()), key=lambda s: s["id"])


def _kernel(lab: Lab) -> dict[str, str]:
    """The balancer's session objects as the kernel shows them (no statistics): C2S filters, S2C
    label routes, the fast-path sets."""
    sets = lab.sh("lb", "nft", "list", "set", "inet", "mplsorch", "fast4").stdout
    return {
        "filters": lab.sh("lb", "tc", "filter", "show", "dev", "fab0", "egress").stdout,
        "mpls_routes": lab.sh("lb", "ip", "-f", "mpls", "route", "show").stdout,
        "fast4": "\n".join(sorted(re.findall(r"\d+\.\d+\.\d+\.\d+ \. \d+\.\d+\.\d+\.\d+ \. \w+ \. \d+", sets))),
    }


def test_sigkill_outage_and_restart_lose_nothing(lab: Lab, balancer: BalancerLab) -> None:
    clients = lab.names("client")
    for client in clients:  # an http and a dns session per client
        assert balancer.curl(client) == "200"
        assert balancer.udp(client).startswith("echo ")
    before = _restored_view(balancer)
    assert len(before) == 2 * len(clients), before
    for server in lab.names("server"):
        with open(Path(lab.node(server)["runtime_dir"]) / "www" / "big.bin", "wb") as f:
            f.truncate(SIZE)
    c3_dev = lab.iface("c3", towards="lb")["dev"]
    lab.sh("c3", "ip", "addr", "add", f"{NEW_CLIENT}/24", "dev", c3_dev)
    procs: list[subprocess.Popen[bytes]] = []
    getters: dict[str, subprocess.Popen[bytes]] = {}
    try:
        # The load: per client a UDP stream and a download, new flows of its sessions (fast path).
        stop = Path(lab.node("lb")["runtime_dir"]) / "hitless-stop"
        stop.unlink(missing_ok=True)
        streams: dict[str, Path] = {}
        downloads: dict[str, Path] = {}
        for client in clients:
            run = Path(lab.node(client)["runtime_dir"])
            streams[client] = run / "hitless-udp.log"
            procs.append(spawn_stream(lab, client, streams[client], stop, patience(120), INTERVAL))
            downloads[client] = run / "hitless-tcp.log"
            getters[client] = spawn_download(lab, client, downloads[client], RATE)
        wait_running(downloads.values())
        time.sleep(1.0)
        kernel_before = _kernel(lab)
        # Every change the kernel reports on the balancer's routes and filters from here on.
        monitors = {
            "ip": Path(lab.node("lb")["runtime_dir"]) / "hitless-ip-monitor.log",
            "tc": Path(lab.node("lb")["runtime_dir"]) / "hitless-tc-monitor.log",
        }
        mon = [
            lab.spawn("lb", "ip", "-o", "monitor", "route", "rule", log=monitors["ip"]),
            lab.spawn("lb", "tc", "monitor", log=monitors["tc"]),
        ]
        time.sleep(0.5)
        counters = nft_counters(lab)

        killed, killed_at = time.monotonic(), time.time()
        balancer.kill()
        # While it is down: served clients' new connections through the fast path...
        during = {c: balancer.curl(c) for c in clients}
        during_udp = balancer.udp("c2")
        # ... and a new client's first packets meet fail_policy open: counted, never queued.
        answered = int(lab.sh("c3", sys.executable, "-c", PROBE, NEW_CLIENT, lab.vip, str(PROBES)).stdout.strip())
        fabric_route = lab.sh("p", "ip", "route", "get", lab.vip, check=False)
        outage_counters = nft_counters(lab)
        time.sleep(max(0.0, killed + DOWN - time.monotonic()))
        restarting = time.monotonic()
        balancer.restart()
        up = time.monotonic()
        assert all(p.poll() is None for p in getters.values()), "a download ended before the restart: " + " | ".join(
            f"{c}: {downloads[c].read_text()}" for c in clients
        )
        time.sleep(1.0)
        kernel_after = _kernel(lab)
        after = _restored_view(balancer)
        events = {k: [line for line in p.read_text().splitlines() if line.strip()] for k, p in monitors.items()}

        stop.touch()
        for client in clients:
            assert getters[client].wait(timeout=patience(120)) == 0, downloads[client].read_text()
        for proc in procs:
            proc.wait(timeout=patience(30))
        udp = {c: last_json(streams[c]) for c in clients}
        tcp = {c: last_json(downloads[c]) for c in clients}

        # After the restart the new client gets a session of its own, queued as usual (and the
        # monitors, still running, see its objects come: they were listening).
        new_client = lab.sh(
            "c3",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "5",
            "-w",
            "%{http_code}",
            "--interface",
            NEW_CLIENT,
            f"http://{lab.vip}/",
            check=False,
        ).stdout.strip()
        sessions = balancer.sessions()
        time.sleep(0.5)
        for proc in mon:
            lab.stop(proc)
        seen = {k: [line for line in p.read_text().splitlines() if NEW_CLIENT in line] for k, p in monitors.items()}

        fast = outage_counters["fastpath_http"] - counters["fastpath_http"]
        fast_dns = outage_counters["fastpath_dns"] - counters["fastpath_dns"]
        queued = outage_counters["queued_dns"] - counters["queued_dns"]
        print(
            "\nhitless restart: "
            f"daemon down {up - killed:.1f} s (kept down {restarting - killed:.1f} s, restart to running "
            f"{up - restarting:.1f} s); UDP per client (sent/received/lost, longest gap between echoes): "
            + ", ".join(f"{c} {u['sent']}/{u['received']}/{u['lost']} {u['max_gap_ms']} ms" for c, u in udp.items())
            + "; TCP per client (bytes of "
            + f"{SIZE}): "
            + ", ".join(f"{c} {t['bytes']} in {t['seconds']} s" for c, t in tcp.items())
            + "; echo gaps over 100 ms, starting at seconds from the kill: "
            + ", ".join(
                f"{c} " + " ".join(f"{at - killed_at:+.1f}s:{ms}ms" for at, ms in u["long_gaps"])
                for c, u in udp.items()
            )
            + f"; restored {len(after)} sessions"
            + f"; while down: new connections of served clients {sum(v == '200' for v in during.values())}/"
            f"{len(during)} http + udp {'ok' if during_udp.startswith('echo ') else 'lost'} "
            f"(fast-path counters +{fast} http, +{fast_dns} dns), new client's first packets "
            f"{PROBES} sent, {queued} past the queue unqueued (queued_dns), {answered} answered "
            f"(the fabric's route to the VIP: {(fabric_route.stdout or fabric_route.stderr).strip() or '-'}); "
            f"kernel events during the restart: ip {len(events['ip'])}, tc {len(events['tc'])}; "
            f"new client after the restart: {new_client}"
        )

        assert during == dict.fromkeys(clients, "200"), during
        assert during_udp.startswith("echo "), during_udp
        assert fast >= len(clients) and fast_dns >= 1, (counters, outage_counters)
        assert queued == PROBES, (counters, outage_counters)
        assert f"restored {len(before)} sessions from the kernel" in balancer.log(), balancer.log()[-2000:]
        assert after == before
        assert kernel_after == kernel_before
        assert events == {"ip": [], "tc": []}, events
        for client in clients:
            assert udp[client]["lost"] == 0 and udp[client]["sent"] > (DOWN + 2) / INTERVAL, udp[client]
            assert tcp[client]["bytes"] == SIZE, tcp[client]
        assert new_client == "200"
        assert seen["tc"], "the tc monitor saw no filter of the new client's session: was it listening?"
        assert any(s["client"] == NEW_CLIENT for s in sessions)
        assert min(s["id"] for s in sessions if s["client"] == NEW_CLIENT) > max(s["id"] for s in before)
    finally:
        for proc in [*procs, *getters.values()]:
            lab.stop(proc)
        lab.sh("c3", "ip", "addr", "del", f"{NEW_CLIENT}/24", "dev", c3_dev, check=False)
