"""The balancer daemon's operations wiring over the fake provider and a scripted queue: health
results through the rise/fall table into the core (logged changes, moved sessions, avoidance
within fall x interval), the control socket's operator commands and the CLI over them (exit 2 for
bad input), the metrics endpoint agreeing with `status`, sd_notify around the loop, JSON logs."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import socket
import tempfile
import urllib.request
from collections.abc import Mapping
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from typer.testing import CliRunner

from orchestrator import control_socket, systemd
from orchestrator.capture.nfqueue import NF_ACCEPT, QueuedPacket, parse_queue_stats
from orchestrator.cli.main import app
from orchestrator.config.examples import KeyPath
from orchestrator.config.model import MetricsConfig
from orchestrator.core.health import HealthState
from orchestrator.daemon import logs, views
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.health import CheckResult
from tests.unit.conftest import BALANCER_EXAMPLE, VIP, ScriptedQueue, balancer_daemon, config

CHECK = {"pools.web.health_check": {"type": "tcp", "port": 80, "interval": "1s", "timeout": "1s", "rise": 1, "fall": 3}}


def make_daemon(changes: Mapping[KeyPath, Any] | None = None) -> BalancerDaemon:
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    return balancer_daemon(config({**CHECK, **(changes or {})}), kernel)


@pytest.fixture
def daemon() -> BalancerDaemon:
    return make_daemon()


def syn(n: int, src: str, sport: int = 40000) -> QueuedPacket:
    return QueuedPacket(0, n, bytes(IP(src=src, dst=VIP) / TCP(sport=sport, dport=80, flags="S")), 0, None, 0)


def fail(d: BalancerDaemon, server: str, times: int, now: float = 100.0) -> None:
    for i in range(times):
        d.on_health_result("web", server, CheckResult(False, None, "connection refused"), now + i)


def servers_of(d: BalancerDaemon) -> dict[str, str]:
    return {s.key.value: s.server for s in d.core.table}


def test_a_server_down_is_logged_avoided_and_its_sessions_move(
    daemon: BalancerDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mplsorch")
    daemon.decide([syn(1, "10.0.1.10"), syn(2, "10.0.1.11"), syn(3, "10.0.1.12")])
    assert servers_of(daemon) == {"10.0.1.10": "s1", "10.0.1.11": "s2", "10.0.1.12": "s3"}
    old = next(s for s in daemon.core.table if s.server == "s2")
    old_c2s = old.c2s
    fail(daemon, "s2", 2)
    assert servers_of(daemon)["10.0.1.11"] == "s2"  # fall 3: not yet
    fail(daemon, "s2", 1, now=102.0)
    assert "server s2 down: connection refused (pool web, was unknown)" in caplog.messages
    moved = next(s for s in daemon.core.table if s.key.value == "10.0.1.11")
    assert moved.server != "s2" and moved.c2s != old_c2s
    assert (
        f"session {moved.id} moved: http 10.0.1.11 -> {moved.server} c2s {moved.c2s} s2c {moved.s2c} "
        f"(was s2 c2s {old_c2s}: server s2 down)" in caplog.messages
    )
    assert isinstance(daemon.provider, FakeProvider)
    fwd = daemon.provider.forward_ip("10.0.1.11", VIP, proto="tcp", sport=1, dport=80, out_dev="fab0")
    assert fwd is not None and fwd.labels == (daemon.core.transport[moved.server], moved.c2s)
    daemon.decide([syn(4, "10.0.1.20"), syn(5, "10.0.1.21"), syn(6, "10.0.1.22")])
    assert "s2" not in {servers_of(daemon)[f"10.0.1.2{i}"] for i in range(3)}
    [row] = [r for r in daemon.handle_request({"cmd": "servers"})["servers"] if r["name"] == "s2"]
    assert (row["state"], row["admin"], row["sessions"], row["reason"]) == ("down", "enabled", 0, "connection refused")
    status = daemon.handle_request({"cmd": "status"})
    assert status["health"] == {"up": 0, "down": 1, "unknown": 2} and status["counters"]["sessions_reassigned"] == 1
    # Up again after `rise` (1) success, with its response time for the response-time scheduler.
    daemon.on_health_result("web", "s2", CheckResult(True, 0.004, "connected"), 110.0)
    assert "server s2 up: connected (pool web, was down)" in caplog.messages
    [row] = [r for r in daemon.handle_request({"cmd": "servers"})["servers"] if r["name"] == "s2"]
    assert (row["state"], row["response_time"]) == ("up", 0.004)


def test_reset_policy_ends_the_sessions_and_logs_their_end(caplog: pytest.LogCaptureFixture) -> None:
    d = make_daemon({"services.http.on_server_failure": "reset"})
    caplog.set_level(logging.INFO, "mplsorch")
    d.decide([syn(1, "10.0.1.10"), syn(2, "10.0.1.11")])
    gone = next(s for s in d.core.table if s.server == "s2")
    fail(d, "s2", 3)
    assert (
        f"session {gone.id} end: http 10.0.1.11 -> s2 c2s {gone.c2s} s2c {gone.s2c} (server s2 down)" in caplog.messages
    )
    assert list(servers_of(d)) == ["10.0.1.10"]


def test_the_health_runner_marks_a_server_down_within_fall_times_interval() -> None:
    d = make_daemon({"pools.web.health_check.interval": "50ms", "pools.web.health_check.timeout": "50ms"})
    d.decide([syn(1, "10.0.1.10"), syn(2, "10.0.1.11")])

    async def checker(check: Any, address: str) -> CheckResult:
        return CheckResult(address != "10.1.1.11", 0.001, "refused" if address == "10.1.1.11" else "ok")

    async def scenario() -> float:
        d.checker = checker
        loop = asyncio.get_running_loop()
        start = loop.time()
        await d.start_tasks()
        while d.health.get("web", "s2").state is not HealthState.DOWN:
            await asyncio.sleep(0.01)
            assert loop.time() - start < 2
        took = loop.time() - start
        await d.stop_tasks()
        return took

    took = asyncio.run(scenario())
    assert took <= 3 * 0.05 + 0.05 + 0.1  # fall x interval (+ the first check's spread and slack)
    assert servers_of(d)["10.0.1.11"] != "s2"


def test_operator_commands_answer_and_bad_input_changes_nothing(daemon: BalancerDaemon) -> None:
    daemon.decide([syn(1, "10.0.1.10"), syn(2, "10.0.1.11"), syn(3, "10.0.1.12")])
    assert daemon.handle_request({"cmd": "drain", "server": "s9"}) == {
        "error": "unknown server 's9'; known: s1, s2, s3",
        "bad_input": True,
    }
    assert daemon.handle_request({"cmd": "weight", "server": "s1", "weight": -2}) == {
        "error": "bad weight -2: an integer >= 0 (0 takes no new sessions)",
        "bad_input": True,
    }
    assert daemon.handle_request({"cmd": "flush", "client": "10.0.1.x"})["bad_input"] is True
    assert len(daemon.core.table) == 3 and not daemon.core.admin.draining
    assert daemon.handle_request({"cmd": "drain", "server": "s1"})["admin"] == "draining"
    daemon.decide([syn(4, "10.0.1.20"), syn(5, "10.0.1.21")])
    assert servers_of(daemon)["10.0.1.20"] != "s1" and servers_of(daemon)["10.0.1.21"] != "s1"
    assert daemon.handle_request({"cmd": "status"})["draining"] == ["s1"]
    assert daemon.handle_request({"cmd": "enable", "server": "s1"})["previous"] == "draining"
    answer = daemon.handle_request({"cmd": "weight", "server": "s3", "weight": 1})
    assert answer["previous"] == 2 and answer["weight"] == 1 and 0 < answer["moved"]["mobile"] < 0.5
    assert answer["moved"].keys() == {"mobile"}  # the maglev service; rr and wrr keep no table
    flushed = daemon.handle_request({"cmd": "flush", "server": "s2"})
    assert flushed["flushed"] == 2 and flushed["errors"] == 0
    assert "s2" not in servers_of(daemon).values()


def test_the_cli_drives_the_commands_and_exits_2_on_bad_input(
    daemon: BalancerDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def counters() -> dict[str, int]:
        return {"rate_limited": 4}

    monkeypatch.setattr(
        control_socket, "request", lambda path, cmd, **args: asyncio.run(daemon.answer({"cmd": cmd, **args}))
    )
    monkeypatch.setattr("orchestrator.capture.nftables.read_counters", counters)
    runner = CliRunner()
    daemon.decide([syn(1, "10.0.1.10")])
    bad = runner.invoke(app, ["servers", "drain", "nope"])
    assert bad.exit_code == 2 and "mplsorch: unknown server 'nope'; known: s1, s2, s3" in bad.stderr
    bad = runner.invoke(app, ["sessions", "flush", "--client", "somewhere"])
    assert bad.exit_code == 2 and "bad client 'somewhere'" in bad.stderr
    assert runner.invoke(app, ["servers", "weight", "s1", "x"]).exit_code == 2  # not a number
    ok = runner.invoke(app, ["servers", "drain", "s2"])
    assert ok.exit_code == 0 and ok.stdout.strip() == "s2: draining (was enabled); its 0 sessions stay until they end"
    rows = json.loads(runner.invoke(app, ["servers", "--json"]).stdout)
    assert [(r["name"], r["pool"], r["address"], r["state"], r["admin"], r["weight"], r["sessions"]) for r in rows] == [
        ("s1", "web", "10.1.1.10", "unknown", "enabled", 1, 1),
        ("s2", "web", "10.1.1.11", "unknown", "draining", 1, 0),
        ("s3", "web", "10.1.2.10", "unknown", "enabled", 2, 0),
    ]
    weight = runner.invoke(app, ["servers", "weight", "s3", "1"])
    assert weight.exit_code == 0 and "s3: weight 1 (was 2); keys moved: mobile " in weight.stdout
    sessions = json.loads(runner.invoke(app, ["sessions", "--json"]).stdout)
    assert [s["client"] for s in sessions] == ["10.0.1.10"]
    flushed = runner.invoke(app, ["sessions", "flush", "--server", "s1", "--json"])
    assert json.loads(flushed.stdout)["flushed"] == 1
    screen = runner.invoke(app, ["status"]).stdout
    assert "servers: 0 up, 0 down, 3 unknown; draining: s2" in screen
    assert "4 rate limited" in screen and "labels: 0 in use, 1 held down" in screen


def test_metrics_agree_with_status(daemon: BalancerDaemon) -> None:
    daemon.config = dataclasses.replace(daemon.config, metrics=MetricsConfig("127.0.0.1", 0))
    daemon.decide([syn(1, "10.0.1.10"), syn(2, "10.0.1.11"), syn(3, "10.0.1.11", 40001)])
    fail(daemon, "s2", 3)  # its session moves: a second batch
    daemon.start_metrics()
    try:
        daemon.tick()
        assert daemon.metrics is not None
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics.port}/metrics", timeout=5).read().decode()
    finally:
        daemon.stop_metrics()
    metrics = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    status = daemon.handle_request({"cmd": "status"})
    assert sum(v for k, v in metrics.items() if k.startswith("mplsorch_sessions{")) == status["sessions"] == 2
    assert metrics["mplsorch_sessions_started_total"] == status["counters"]["sessions_started"] == 2
    for state in ("free", "in_use", "held_down"):
        assert metrics[f'mplsorch_label_pairs{{state="{state}"}}'] == status["labels"][state]
    assert metrics['mplsorch_dataplane_operations_total{result="ok"}'] == status["dataplane_ops"]["ok"]
    assert metrics["mplsorch_dataplane_batch_duration_seconds_count"] >= 2  # one per program() batch
    assert metrics['mplsorch_server_health{pool="web",server="s2",state="down"}'] == 1
    assert metrics['mplsorch_packets_userspace_total{verdict="accept"}'] == 3


class LoopDaemon(BalancerDaemon):
    """Everything but the kernel: scripted sockets that never speak, a reload that only counts."""

    reloads = 0

    def setup(self) -> None:
        self.queue = self.capture.queue(0, 0)
        self.conntrack = self.capture.conntrack()

    def reload(self) -> None:
        self.reloads += 1


def test_sd_notify_ready_watchdog_reloading_stopping() -> None:
    d = balancer_daemon(config(), FakeProvider(["fab0"]), daemon_class=LoopDaemon)
    assert isinstance(d, LoopDaemon)
    with tempfile.TemporaryDirectory() as tmp:
        d.control_socket = os.path.join(tmp, "control.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(os.path.join(tmp, "notify"))
        listener.setblocking(False)
        d.notify = systemd.Notifier({"NOTIFY_SOCKET": os.path.join(tmp, "notify"), "WATCHDOG_USEC": "1000000"})
        got: list[str] = []

        def drain() -> None:
            while True:
                try:
                    got.append(listener.recv(4096).decode())
                except BlockingIOError:
                    return

        async def scenario() -> int:
            task = asyncio.create_task(d.run())
            while not any(m.startswith("READY=1") for m in got):
                await asyncio.sleep(0.05)
                drain()
            assert os.path.exists(d.control_socket)  # READY only once the control socket is up
            await asyncio.sleep(1.2)  # two watchdog intervals (WatchdogSec / 2)
            d.flag("reload")
            await asyncio.sleep(0.3)
            d.flag("stop")
            return await task

        assert asyncio.run(scenario()) == 0
        drain()
        listener.close()
    kinds = [m.split("\n")[0] for m in got]
    assert kinds[0] == "READY=1" and kinds.count("WATCHDOG=1") >= 2
    i = kinds.index("RELOADING=1")
    assert kinds[i + 1 :].index("READY=1") >= 0 and kinds[-1] == "STOPPING=1" and d.reloads == 1
    assert "MONOTONIC_USEC=" in got[i]


def test_the_queue_is_read_in_batches_and_a_failing_batch_lets_its_packets_go_unlabelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(FakeProvider):
        def routes_to(self, addresses: Any) -> dict[str, ops.NextHop | None]:
            raise RuntimeError("a bug")

    queue = ScriptedQueue()
    d = balancer_daemon(config(), Broken(["lan0", "fab0"]), queue)
    queue.script(syn(1, "10.0.1.10"), syn(2, "10.0.1.11"))
    d.on_packets()
    d.on_packets()  # nothing waiting: nothing sent
    assert [(v.packet_id, v.verdict) for v in queue.sent] == [(1, NF_ACCEPT), (2, NF_ACCEPT)]
    assert len(queue.sent_batches) == 1 and d.core.counters["batch_errors"] == 1 and len(d.core.table) == 0
    assert "first-packet batch failed; accepting its 2 packets unlabelled" in caplog.messages


def test_json_logs_give_one_object_per_line_with_the_session_fields(daemon: BalancerDaemon) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("mplsorch")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        daemon.decide([syn(1, "10.0.1.10")])
        [session] = list(daemon.core.table)
        views.log_end(session, "flushed")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    start, end = lines
    assert start["message"] == f"session {session.id} start: http 10.0.1.10 -> s1 c2s {session.c2s} s2c {session.s2c}"
    assert (start["event"], start["level"], start["server"], start["client"]) == (
        "session_start",
        "info",
        "s1",
        "10.0.1.10",
    )
    assert (end["event"], end["reason"], end["session"]) == ("session_end", "flushed", session.id)
    assert isinstance(start["time"], float) and start["ts"].endswith("Z")


def test_run_refuses_an_unknown_log_format() -> None:
    result = CliRunner().invoke(app, ["run", "--config", str(BALANCER_EXAMPLE), "--log-format", "xml"])
    assert result.exit_code == 2 and "--log-format 'xml': one of text, json" in result.stderr


def test_nfqueue_proc_lines_are_parsed() -> None:
    text = "    0   1234     3 2 65535    17     5       99  1\n    1      0     0 2 65535     0     0        0  1\n"
    [q0, q1] = parse_queue_stats(text)
    assert (q0.queue, q0.waiting, q0.queue_dropped, q0.user_dropped) == (0, 3, 17, 5)
    assert views.queue_summary([q0, q1], (1, 1)) == {"bound": 1, "waiting": 0, "queue_dropped": 0, "user_dropped": 0}


def test_a_metrics_port_in_use_is_logged_and_the_daemon_goes_on(
    daemon: BalancerDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon.config = dataclasses.replace(daemon.config, metrics=MetricsConfig("127.0.0.1", port))
        daemon.start_metrics()
    assert daemon.metrics is None
    assert any(m.startswith(f"metrics endpoint 127.0.0.1:{port} not started") for m in caplog.messages)


def test_sessions_come_in_pages_with_the_tables_size(daemon: BalancerDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = [f"10.0.1.{10 + i}" for i in range(5)]
    daemon.decide([syn(i + 1, c) for i, c in enumerate(clients)])
    whole = daemon.handle_request({"cmd": "sessions"})
    assert whole["total"] == 5 and whole["offset"] == 0 and [s["client"] for s in whole["sessions"]] == clients
    page = daemon.handle_request({"cmd": "sessions", "offset": 1, "limit": 2})
    assert page["total"] == 5 and page["offset"] == 1
    assert [s["id"] for s in page["sessions"]] == [s["id"] for s in whole["sessions"][1:3]]  # times move per answer
    assert daemon.handle_request({"cmd": "sessions", "offset": 9, "limit": 2})["sessions"] == []
    for bad in ({"offset": -1}, {"limit": 0}, {"limit": "2"}, {"offset": 1.5}):
        assert daemon.handle_request({"cmd": "sessions", **bad})["bad_input"] is True
    monkeypatch.setattr(
        control_socket, "request", lambda path, cmd, **args: asyncio.run(daemon.answer({"cmd": cmd, **args}))
    )
    runner = CliRunner()
    rows = json.loads(runner.invoke(app, ["sessions", "--json", "--offset", "3", "--limit", "5"]).stdout)
    assert [r["client"] for r in rows] == clients[3:]
    text = runner.invoke(app, ["sessions", "--limit", "2"])
    assert text.exit_code == 0 and text.stdout.splitlines()[-1] == "sessions 1-2 of 5"
    assert runner.invoke(app, ["sessions", "--limit", "0"]).exit_code == 2


def test_a_daemon_that_does_not_answer_in_time_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(path: str, cmd: str, **args: Any) -> dict[str, Any]:
        raise TimeoutError("timed out")

    monkeypatch.setattr(control_socket, "request", slow)
    out = CliRunner().invoke(app, ["status", "--socket", "/run/x.sock"])
    assert out.exit_code == 1
    assert out.stderr.strip() == "mplsorch: the daemon on /run/x.sock did not answer 'status' within 10 s"


def test_refused_packets_are_logged_one_by_one_only_up_to_the_cap_then_counted_in_one_line() -> None:
    """A flood of bad first packets is counted in full by the daemon, not written out in full."""
    throttle = logs.Throttle(per_second=3)
    allowed = [throttle.allow("truncated", 100.0 + i / 100) for i in range(10)]  # 10 within one second
    assert [a for a, _ in allowed] == [True] * 3 + [False] * 7
    assert throttle.allow("other reason", 100.5) == (True, 0)  # each reason has its own cap
    assert throttle.allow("truncated", 101.0) == (True, 7)  # the next second says how many were not
    assert throttle.allow("truncated", 101.1) == (True, 0)
