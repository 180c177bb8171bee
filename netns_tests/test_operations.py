"""Operations on a real kernel: HTTP health checks of the servers' application, a stopped
application marked down (new sessions avoid it; its sessions follow their service's policy and
the clients' next requests succeed), drain and enable, a weight change, flush, and the metrics
endpoint agreeing with `mplsorch status --json`. One balancer daemon for the module; the CLI is
run only where it is the subject (each start of Python costs tens of seconds in the emulated VM),
the rest asks the control socket directly."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from orchestrator.control_socket import request
from orchestrator.dataplane import ops, records
from orchestrator.lab.balancer_lab import CHECK_PORT, BalancerLab
from orchestrator.lab.kit import Lab, patience

CHECK = {"type": "http", "port": CHECK_PORT, "path": "/", "interval": "2s", "timeout": "2s", "rise": 1, "fall": 3}
METRICS = "127.0.0.1:9469"
PATIENCE = patience(40)  # seconds


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(
        lab,
        checked=True,
        changes={
            "pools.web.health_check": CHECK,
            # The IPv6 service resets its sessions when their server fails; http (IPv4) reassigns.
            "services.mobile.on_server_failure": "reset",
            "metrics.listen": METRICS,
        },
    )
    try:
        b.start()
        yield b
    finally:
        b.close()


def ask(balancer: BalancerLab, cmd: str, **args: Any) -> Any:
    answer = request(str(balancer.sock), cmd, timeout=patience(20), **args)
    assert "error" not in answer, answer
    return answer


def servers(balancer: BalancerLab) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in ask(balancer, "servers")["servers"]}


def sessions(balancer: BalancerLab, service: str) -> dict[str, dict[str, Any]]:
    return {s["client"]: s for s in ask(balancer, "sessions")["sessions"] if s["service"] == service}


def wait(what: str, done: Callable[[], Any], balancer: BalancerLab) -> Any:
    deadline = time.monotonic() + PATIENCE
    while not (result := done()):
        assert time.monotonic() < deadline, f"{what}:\n{balancer.log()[-3000:]}"
        time.sleep(1)
    return result


class Aliases:
    """Extra client addresses on c1: each one's first connection is a new session."""

    def __init__(self, lab: Lab) -> None:
        self.lab, self.n, self.dev = lab, 30, lab.iface("c1", towards="lb")["dev"]

    def new(self) -> str:
        self.n += 1
        address = f"10.0.1.{self.n}"
        self.lab.sh("c1", "ip", "addr", "add", f"{address}/24", "dev", self.dev)
        return address

    def curl(self, address: str) -> str:
        out = self.lab.sh(
            "c1",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "10",
            "-w",
            "%{http_code}",
            "--interface",
            address,
            f"http://{self.lab.vip}/",
            check=False,
            timeout=30,
        )
        return out.stdout.strip() or "000"


@pytest.fixture(scope="module")
def aliases(lab: Lab) -> Iterator[Aliases]:
    a = Aliases(lab)
    yield a
    for n in range(31, a.n + 1):
        lab.sh("c1", "ip", "addr", "del", f"10.0.1.{n}/24", "dev", a.dev, check=False)


def new_sessions(balancer: BalancerLab, aliases: Aliases, count: int) -> list[str]:
    """`count` new http sessions; the servers they went to."""
    out = []
    for _ in range(count):
        address = aliases.new()
        assert aliases.curl(address) == "200"
        out.append(sessions(balancer, "http")[address]["server"])
    return out


def test_a_stopped_application_is_marked_down_and_its_sessions_follow_the_policy(
    lab: Lab, balancer: BalancerLab, aliases: Aliases
) -> None:
    wait("every server up", lambda: {r["state"] for r in servers(balancer).values()} == {"up"}, balancer)
    assert all(r["response_time"] is not None and r["checked"] for r in servers(balancer).values())
    clients = lab.names("client")
    assert [balancer.curl(c) for c in clients] == ["200"] * 3
    assert [balancer.curl(c, lab.vip6) for c in clients] == ["200"] * 3
    http, mobile = sessions(balancer, "http"), sessions(balancer, "mobile")
    assert sorted(s["server"] for s in http.values()) == ["s1", "s2", "s3"]  # rr
    victim = sorted(s["server"] for s in mobile.values())[0]  # a server with sessions of both services
    moving = next(s for s in http.values() if s["server"] == victim)
    resetting = [s for s in mobile.values() if s["server"] == victim]

    balancer.stop_app(victim)
    wait(f"{victim} down", lambda: servers(balancer)[victim]["state"] == "down", balancer)
    assert re.search(
        rf"server {victim} down: (connection refused|timeout after 2s) \(pool web, was up\)", balancer.log()
    ), balancer.log()[-3000:]

    # reassign (http): same session, another server, a new pair; the client's next request works.
    moved = wait(
        "the http session moved",
        lambda: (s := sessions(balancer, "http").get(moving["client"])) and s["server"] != victim and s,
        balancer,
    )
    assert moved["id"] == moving["id"] and moved["c2s_label"] != moving["c2s_label"]
    assert (
        f"session {moved['id']} moved: http {moving['client']} -> {moved['server']} c2s {moved['c2s_label']}"
        in balancer.log()
    )
    client = next(c for c in clients if lab.address(c) == moving["client"])
    assert balancer.curl(client) == "200"
    served = (Path(lab.node(moved["server"])["runtime_dir"]) / "http-80.log").read_text()
    assert any(line.startswith(moving["client"] + " ") for line in served.splitlines())
    installed = [i.obj for i in lab.provider("lb").dump()]
    # The old pair's S2C label routes nowhere but to its hold marker while it is held down.
    assert not any(
        isinstance(o, ops.MplsRoute) and o.label == moving["s2c_label"] and not records.is_hold_marker(o)
        for o in installed
    )
    assert any(isinstance(o, ops.MplsRoute) and o.label == moved["s2c_label"] for o in installed)

    # reset (mobile): the session ended, its objects went; the next request opens a new one elsewhere.
    for old in resetting:
        assert (
            f"session {old['id']} end: mobile {old['key']} -> {victim} c2s {old['c2s_label']} "
            f"s2c {old['s2c_label']} (server {victim} down)" in balancer.log()
        )
        client = next(c for c in clients if lab.address(c, version=6) == old["client"])
        assert balancer.curl(client, lab.vip6) == "200"
        again = sessions(balancer, "mobile")[old["client"]]
        assert again["id"] != old["id"] and again["server"] != victim

    # New sessions avoid the server while it is down.
    assert victim not in new_sessions(balancer, aliases, 2)
    assert ask(balancer, "status")["health"]["down"] == 1

    balancer.start_app(victim)
    wait(f"{victim} up", lambda: servers(balancer)[victim]["state"] == "up", balancer)
    assert f"server {victim} up: status 200 (pool web, was down)" in balancer.log()


def test_drain_keeps_sessions_and_enable_takes_new_ones_again(
    lab: Lab, balancer: BalancerLab, aliases: Aliases
) -> None:
    kept = min(sessions(balancer, "http").values(), key=lambda s: s["id"])
    target = kept["server"]
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "servers", "drain", target, "--socket", str(balancer.sock)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert out.returncode == 0 and out.stdout.startswith(f"{target}: draining (was enabled)"), out
    assert target not in new_sessions(balancer, aliases, 2)
    clients = {lab.address(c): c for c in lab.names("client")}
    status = balancer.curl(clients[kept["client"]]) if kept["client"] in clients else aliases.curl(kept["client"])
    assert status == "200"
    assert sessions(balancer, "http")[kept["client"]]["server"] == target  # kept until it ends
    assert servers(balancer)[target]["admin"] == "draining"
    assert ask(balancer, "enable", server=target)["previous"] == "draining"
    assert sorted(new_sessions(balancer, aliases, 3)) == ["s1", "s2", "s3"]  # rr over all three again


def test_a_weight_change_reports_the_maglev_keys_that_moved(lab: Lab, balancer: BalancerLab) -> None:
    answer = ask(balancer, "weight", server="s3", weight=1)
    assert (answer["weight"], answer["previous"]) == (1, 2)
    assert 0.1 < answer["moved"]["mobile"] < 0.4, answer  # s3's share 1/2 -> 1/3: about 1/6 moves
    assert servers(balancer)["s3"]["weight"] == 1
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "servers", "weight", "s9", "1", "--socket", str(balancer.sock)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert out.returncode == 2 and "unknown server 's9'; known: s1, s2, s3" in out.stderr, out
    back = ask(balancer, "weight", server="s3", weight=2)
    assert back["previous"] == 1 and back["moved"]["mobile"] > 0


def test_flush_ends_a_clients_sessions(lab: Lab, balancer: BalancerLab, aliases: Aliases) -> None:
    address = f"10.0.1.{aliases.n}"  # the last new session's client
    session = sessions(balancer, "http")[address]
    assert ask(balancer, "flush", client=address)["flushed"] == 1
    assert address not in sessions(balancer, "http")
    installed = [i.obj for i in lab.provider("lb").dump()]
    assert not any(isinstance(o, ops.FlowerFilter) and o.handle >> 8 == session["c2s_label"] for o in installed)
    assert f"session {session['id']} end: http {address} -> " in balancer.log()


def scrape(lab: Lab) -> dict[str, float]:
    text = lab.sh("lb", "curl", "-s", "-m", "20", f"http://{METRICS}/metrics").stdout
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_the_metrics_endpoint_agrees_with_status(lab: Lab, balancer: BalancerLab) -> None:
    time.sleep(3)  # hold-downs (1 s) of the flushed pair over: nothing changes while we compare
    for _ in range(3):
        metrics = scrape(lab)
        status = balancer.cli("status")  # the CLI's --json, as an operator would ask
        comparable = {
            "sessions": (sum(v for k, v in metrics.items() if k.startswith("mplsorch_sessions{")), status["sessions"]),
            "started": (metrics["mplsorch_sessions_started_total"], status["counters"]["sessions_started"]),
            "ops_ok": (metrics['mplsorch_dataplane_operations_total{result="ok"}'], status["dataplane_ops"]["ok"]),
            **{
                f"labels_{s}": (metrics[f'mplsorch_label_pairs{{state="{s}"}}'], status["labels"][s])
                for s in ("free", "in_use", "held_down")
            },
        }
        if all(a == b for a, b in comparable.values()):
            break
        time.sleep(2)  # something changed between the two (a short session ended): again
    assert all(a == b for a, b in comparable.values()), comparable
    assert status["sessions"] > 0 and status["health"] == {"up": 3, "down": 0, "unknown": 0}
    assert metrics['mplsorch_server_health{pool="web",server="s1",state="up"}'] == 1
    assert metrics["mplsorch_dataplane_batch_duration_seconds_count"] > 0
    assert {"waiting", "queue_dropped", "user_dropped"} <= set(status["queue"])
