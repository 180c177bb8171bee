"""`nfqueue.workers: 2` with the real daemon: the ruleset's hash of the source address spreads the
clients over both workers and keeps each client on one; the workers' label shares never
overlap; the control socket shows the union; a worker killed is started again and restores its
share from the kernel, and a new supervisor restores all.

Traffic: CLIENTS extra addresses on c1, each opening one HTTP connection (service http, tcp/80)
and one UDP exchange (service dns, udp/53) to the VIP, from one process that counts what was
answered. Servers are plain (answers as IP)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.config.load import load_balancer_config
from orchestrator.core import shards
from orchestrator.dataplane import ops
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab, daemon_cli, patience

CLIENTS = [f"10.0.1.{100 + i}" for i in range(24)]
# One process for all clients: per source address, an HTTP GET over TCP and a UDP echo.
TRAFFIC = """
import json, socket, sys
vip, sources = sys.argv[1], json.loads(sys.argv[2])
out = {"http_ok": 0, "udp_ok": 0, "sent": 0}
for src in sources:
    out["sent"] += 1
    try:
        t = socket.create_connection((vip, 80), timeout=10, source_address=(src, 0))
        t.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        if t.recv(100).startswith(b"HTTP/1.0 200"):
            out["http_ok"] += 1
        t.close()
    except OSError:
        pass
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((src, 0))
    u.settimeout(10)
    try:
        u.sendto(b"hello", (vip, 53))
        if u.recvfrom(100)[0] == b"echo hello":
            out["udp_ok"] += 1
    except OSError:
        pass
    u.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab, changes={"nfqueue.workers": 2, "services.dns.persistence_timeout": "3600s"})
    dev = lab.iface("c1", segment="lan")["dev"]
    for address in CLIENTS:
        lab.sh("c1", "ip", "addr", "add", f"{address}/24", "dev", dev)
    try:
        b.start()
        yield b
    finally:
        b.close()
        for address in CLIENTS:
            lab.sh("c1", "ip", "addr", "del", f"{address}/24", "dev", dev, check=False)


def traffic(lab: Lab, sources: list[str]) -> dict[str, int]:
    result = lab.sh("c1", sys.executable, "-c", TRAFFIC, lab.vip, json.dumps(sources), timeout=patience(300))
    counts: dict[str, int] = json.loads(result.stdout)
    return counts


def worker_sessions(balancer: BalancerLab, index: int) -> list[dict[str, Any]]:
    """`sessions --json` of one worker, asked on its own control socket."""
    answer: list[dict[str, Any]] = daemon_cli(Path(shards.worker_socket(str(balancer.sock), index)), "sessions")
    return answer


def wait_for(what: str, check: Any, seconds: float = 60) -> None:
    deadline = time.monotonic() + patience(seconds)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {patience(seconds):.0f} s")
        time.sleep(0.5)


def test_clients_are_spread_over_both_workers_each_on_one(lab: Lab, balancer: BalancerLab) -> None:
    counts = traffic(lab, CLIENTS)
    assert counts == {"http_ok": len(CLIENTS), "udp_ok": len(CLIENTS), "sent": len(CLIENTS)}, balancer.log()[-3000:]

    union = balancer.sessions()
    ours = [s for s in union if s["client"] in CLIENTS]
    assert sorted((s["client"], s["service"]) for s in ours) == sorted(
        (c, svc) for c in CLIENTS for svc in ("http", "dns")
    )
    per_worker = [worker_sessions(balancer, i) for i in range(2)]
    # The union is exactly the workers' sessions, ids unique.
    assert sorted(s["id"] for s in union) == sorted(s["id"] for w in per_worker for s in w)
    assert len({s["id"] for s in union}) == len(union)
    # Spread: both workers have clients; each client (both its sessions) on one worker only.
    clients = [{s["client"] for s in w if s["client"] in CLIENTS} for w in per_worker]
    assert clients[0] and clients[1], clients
    assert not clients[0] & clients[1]
    assert clients[0] | clients[1] == set(CLIENTS)
    # Labels: every C2S distinct, each inside its worker's share.
    config = load_balancer_config(str(balancer.config))
    owner = shards.owner_of_label(config, 2)
    for index, sessions in enumerate(per_worker):
        assert all(owner(s["c2s_label"]) == index for s in sessions), (index, sessions)
    labels = [s["c2s_label"] for s in union]
    assert len(set(labels)) == len(labels)
    # The kernel holds a C2S filter per session; status adds the workers up.
    filters = [i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.FlowerFilter)]
    assert sorted(f.actions[0].label for f in filters if isinstance(f.actions[0], ops.MplsPush)) == sorted(labels)
    status = balancer.cli("status")
    assert status["sessions"] == len(union)
    assert [w["sessions"] for w in status["workers"]] == [len(w) for w in per_worker]
    assert status["labels"]["in_use"] == len(union)
    assert status["queue"]["bound"] == 2


def test_a_killed_worker_restores_its_share(lab: Lab, balancer: BalancerLab) -> None:
    before = balancer.restorable_sessions()
    assert before
    victim = balancer.cli("status")["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    def back() -> bool:
        workers = balancer.cli("status")["workers"]
        return bool(workers[1]["alive"] and workers[1]["restarts"] == 1 and workers[1]["pid"] != victim["pid"])

    wait_for("worker 1 started again", back)
    assert balancer.restorable_sessions() == before
    # Its clients are still served, by their existing sessions (no new one).
    started = balancer.cli("status")["counters"].get("sessions_started", 0)
    counts = traffic(lab, CLIENTS[:8])
    assert counts == {"http_ok": 8, "udp_ok": 8, "sent": 8}
    assert balancer.restorable_sessions() == before
    assert balancer.cli("status")["counters"].get("sessions_started", 0) == started


def test_a_new_supervisor_restores_every_session(lab: Lab, balancer: BalancerLab) -> None:
    before = balancer.restorable_sessions()
    workers = [w["pid"] for w in balancer.cli("status")["workers"]]
    balancer.kill()  # SIGKILL the supervisor: its workers get SIGTERM (PR_SET_PDEATHSIG) and stop

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for("the workers stopped with their supervisor", lambda: all(gone(p) for p in workers))
    balancer.restart()
    assert balancer.restorable_sessions() == before
    counts = traffic(lab, CLIENTS)
    assert counts == {"http_ok": len(CLIENTS), "udp_ok": len(CLIENTS), "sent": len(CLIENTS)}
    assert balancer.restorable_sessions() == before
