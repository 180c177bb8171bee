"""`mplsorch status` reads nftables' counters through an `nft` subprocess the event loop awaits,
so first packets are decided while nft runs. A fake `nft` on PATH stands in for the real one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from orchestrator.capture import nftables
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import balancer_daemon, config

COUNTERS = (
    '{"nftables": [{"metainfo": {"json_schema_version": 1}}, '
    '{"counter": {"family": "inet", "name": "rate_limited", "table": "mplsorch", "packets": 7, "bytes": 420}}]}'
)


def fake_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\n" + script)
    nft.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")


def test_the_loop_runs_on_while_nft_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch, f"sleep 0.5\necho '{COUNTERS}'\n")

    async def scenario() -> tuple[dict[str, int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        counters = await nftables.read_counters()
        task.cancel()
        return counters, ticks

    counters, ticks = asyncio.run(scenario())
    assert counters == {"rate_limited": 7}
    assert ticks >= 10  # the loop kept turning for most of nft's half second


def test_status_over_the_control_socket_carries_the_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch, f"echo '{COUNTERS}'\n")
    daemon = balancer_daemon(config(), FakeProvider(["lan0", "fab0"]))
    status = asyncio.run(daemon.answer({"cmd": "status"}))
    assert status["nft_counters"] == {"rate_limited": 7} and status["role"] == "balancer"
    assert asyncio.run(daemon.answer({"cmd": "labels"})) == daemon.handle_request({"cmd": "labels"})


def test_no_table_yet_is_no_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch, "echo 'Error: No such file or directory' >&2\nexit 1\n")
    assert asyncio.run(nftables.read_counters()) == {}
