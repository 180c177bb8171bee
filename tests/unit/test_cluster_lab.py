"""The cluster lab's end of sd_notify (orchestrator/lab/cluster_lab.py ReadyWatch), against the
daemon's own notifier: the lab announces a balancer only at its READY=1."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.lab.cluster_lab import ReadyWatch
from orchestrator.systemd import Notifier


@pytest.fixture
def proc() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield p
    p.kill()
    p.wait()


def test_wait_ready_returns_at_ready_and_not_before(tmp_path: Path, proc: subprocess.Popen[bytes]) -> None:
    watch = ReadyWatch(tmp_path / "notify")
    notifier = Notifier(watch.env())
    try:
        assert notifier.status("loading the table")
        with pytest.raises(RuntimeError, match="did not say READY=1"):
            watch.wait_ready(proc, "lb1", 1)  # a STATUS alone is not READY
        assert notifier.ready("balancer running: 3 services")
        watch.wait_ready(proc, "lb1", 5)
        assert notifier.ready("a former process")
        watch.forget()  # before a restart: what the old process said does not count
        with pytest.raises(RuntimeError, match="did not say READY=1"):
            watch.wait_ready(proc, "lb1", 1)
    finally:
        watch.close()
    assert not (tmp_path / "notify").exists()


def test_wait_ready_fails_at_once_when_the_daemon_dies(tmp_path: Path) -> None:
    watch = ReadyWatch(tmp_path / "notify")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        with pytest.raises(RuntimeError, match="lb2 did not say READY=1"):
            watch.wait_ready(dead, "lb2", 60)
    finally:
        watch.close()
