"""sd_notify over a real unix datagram socket (path and abstract), and the watchdog interval."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.systemd import Notifier, watchdog_timeout


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def test_ready_status_watchdog_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("balancer running: 3 services")
    assert sock.recv(4096) == b"READY=1\nSTATUS=balancer running: 3 services"
    assert n.status("reconciling\n200 sessions")
    assert sock.recv(4096) == b"STATUS=reconciling 200 sessions"  # one datagram, one field
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping() and sock.recv(4096) == b"STOPPING=1"
    assert n.reloading()
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1" and second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_abstract_socket() -> None:
    name = f"mplsorch-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.ready() is False and n.watchdog() is False and n.watchdog_interval() is None
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled and n.ready() is False
    assert "sd_notify READY failed" in caplog.text


def test_watchdog_interval_is_half_the_timeout(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier(env).watchdog_interval() == 15.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval() is None  # meant for another process
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None  # nowhere to send it


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "x"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "77"}, None),
    ],
)
def test_watchdog_timeout(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_timeout(env, pid=42) == expected
    assert watchdog_timeout({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, pid=42) == 2.0
