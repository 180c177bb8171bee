"""The helpers `lab bench setup` starts with `python -m` (flood's waiting, connect's timing, the
servers' accept sink) and the IPVS services it sets up, on the loopback and the example
configuration: no lab."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.lab.bench import connect, flood, ipvs, sink


def test_wait_for_returns_when_the_count_reaches_its_target() -> None:
    counts = iter(range(100))
    when, seen = flood.wait_for(lambda: next(counts), 5, time.monotonic())
    assert seen == 5 and when <= time.monotonic()


def test_wait_for_gives_up_after_a_stall_with_the_last_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flood, "STALL_S", 0.05)
    start = time.monotonic()
    when, seen = flood.wait_for(lambda: 3, 10, start)
    assert seen == 3 and start <= when < start + 0.05


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts and closes, like the sink."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        port = s.getsockname()[1]

        def serve() -> None:
            while True:
                try:
                    conn, _ = s.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        yield port
        s.shutdown(socket.SHUT_RDWR)


def test_connects_time_a_pair_per_source_and_report_failures(listener: int) -> None:
    out = connect.connects(["127.0.0.1"], listener, ["127.0.0.2", "127.0.0.3", "192.0.2.1"], "127.0.0.1", 0)
    [pairs] = out["pairs"]
    assert len(pairs) == 2 and all(0 < t < 1 for pair in pairs for t in pair)
    assert out["retransmits"] == [0]
    assert len(out["failed"]) == 1 and out["failed"][0].startswith("192.0.2.1 -> 127.0.0.1: ")  # not local
    json.dumps(out)


def test_connects_interleave_the_systems_taking_turns_first(listener: int, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, str]] = []
    real = connect.connect_time

    def timed(source: str, vip: str, port: int, timeout: float) -> tuple[float, bool]:
        order.append((source, vip))
        return real(source, "127.0.0.1", port, timeout)

    monkeypatch.setattr(connect, "connect_time", timed)
    out = connect.connects(["127.0.0.1", "127.0.0.4"], listener, ["127.0.0.2", "127.0.0.3"], "127.0.0.1", 0)
    assert [len(p) for p in out["pairs"]] == [2, 2] and out["retransmits"] == [0, 0]
    measured = [o for o in order if o[0] != "127.0.0.1"]  # after the warm-ups
    assert measured == [
        ("127.0.0.2", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.4"),
        ("127.0.0.2", "127.0.0.4"),
        ("127.0.0.3", "127.0.0.4"),  # the other system first for the next source
        ("127.0.0.3", "127.0.0.4"),
        ("127.0.0.3", "127.0.0.1"),
        ("127.0.0.3", "127.0.0.1"),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accept_queue(port: int) -> int:
    """The connections queued on 127.0.0.1:`port`'s listener (its rx_queue in /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener on 127.0.0.1:{port}")


def test_the_sink_lets_the_kernel_complete_handshakes_and_drains_them_later() -> None:
    """Connects complete while the sink sleeps (no process woken per connection: the timed
    client keeps the CPU), the connections wait in the accept queue until the next drain, and
    the sink never preempts on waking (SCHED_BATCH)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", sink.__name__, "127.0.0.1", str(port), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
        assert os.sched_getscheduler(proc.pid) == os.SCHED_BATCH
        for _ in range(3):
            elapsed, retransmitted = connect.connect_time("127.0.0.1", "127.0.0.1", port, 5)
            assert elapsed < 1 and not retransmitted
        assert accept_queue(port) == 3  # accepted by the kernel, not yet by the sink
        deadline = time.monotonic() + 10
        while accept_queue(port):
            assert time.monotonic() < deadline, "the sink did not drain its queue"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def test_the_helpers_refuse_a_wrong_command_line() -> None:
    for module in (flood, connect, sink):
        with pytest.raises(ValueError):
            module.main(["too", "few"] if module is not sink else ["just-one"])


def test_ipvs_services_follow_the_balancers_configuration() -> None:
    from orchestrator.config.load import load_config
    from orchestrator.config.model import BalancerConfig
    from orchestrator.lab.balancer_lab import ROOT

    config = load_config(ROOT / "templates" / "balancer.example.yaml")
    assert isinstance(config, BalancerConfig)
    commands = ipvs.service_commands(config, "10.0.0.100")
    assert commands[0] == ["-A", "-t", "10.0.0.100:80", "-s", "rr", "-p", "300"]
    assert ["-A", "-u", "10.0.0.100:53", "-s", "wrr", "-p", "300"] in commands
    real = [c for c in commands if c[0] == "-a"]
    assert {c[1] for c in real} == {"-t", "-u"} and all(c[5:7] == ["-i", "-w"] for c in real)
    assert len(real) == 2 * len(config.pool("web").servers)
    assert all("fd00" not in " ".join(c) for c in commands)  # only the VIP it was asked for
    assert ipvs.service_commands(config, "10.9.9.9") == []
    assert set(ipvs.SCHEDULERS) >= {s.scheduler.value for s in config.services}
