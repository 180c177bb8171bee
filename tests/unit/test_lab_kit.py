"""daemon_cli: how the lab's balancer and agents are asked, shared by BalancerLab.cli and AgentLab.cli."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.lab import kit


def scripted(monkeypatch: pytest.MonkeyPatch, returncode: int, stdout: str = "", stderr: str = "") -> list[Any]:
    calls: list[Any] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    monkeypatch.setattr(kit.subprocess, "run", run)
    return calls


def test_asks_the_daemons_socket_for_json_and_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = scripted(monkeypatch, 0, '{"counters": {"sessions_started": 3}}')
    assert kit.daemon_cli(Path("/run/x/agent.sock"), "status") == {"counters": {"sessions_started": 3}}
    [(argv, kwargs)] = calls
    assert argv == [sys.executable, "-m", "orchestrator", "status", "--json", "--socket", "/run/x/agent.sock"]
    assert kwargs["timeout"] == 20 and kwargs["capture_output"] and kwargs["text"]


@pytest.mark.parametrize(
    "node, words",
    [
        (None, "mplsorch servers drain s1: no such server\n"),
        ("s1", "mplsorch servers drain s1 on s1: no such server\n"),
    ],
)
def test_a_failing_command_raises_with_its_stderr(
    monkeypatch: pytest.MonkeyPatch, node: str | None, words: str
) -> None:
    scripted(monkeypatch, 2, stderr="no such server\n")
    with pytest.raises(RuntimeError) as raised:
        kit.daemon_cli(Path("/s"), "servers", "drain", "s1", node=node)
    assert str(raised.value) == words


def test_patience_is_native_except_on_the_emulated_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLSORCH_LAB_BACKEND", "uml")
    assert kit.patience(30) == 30
    monkeypatch.setenv("MPLSORCH_LAB_BACKEND", "vm")
    assert kit.patience(30) == 300
