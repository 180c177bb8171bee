"""pktgen as the flood drives it: the commands, and their writes one per file write."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.lab.bench import pktgen
from orchestrator.lab.bench.stats import flood_sources


def test_pktgen_commands() -> None:
    setup = dict(pktgen.setup_commands("eth0", "02:00:00:00:00:02", "10.0.0.100"))
    assert setup["kpktgend_0"] == "add_device eth0"  # the later of its two commands
    commands = [c for name, c in pktgen.setup_commands("eth0", "02:00:00:00:00:02", "10.0.0.100") if name == "eth0"]
    assert {"clone_skb 0", "dst 10.0.0.100", "dst_mac 02:00:00:00:00:02", "udp_dst_min 53", "udp_dst_max 53"} <= set(
        commands
    )
    sources = flood_sources(201, 4000)[2000:]
    assert pktgen.burst_commands("eth0", sources) == [
        ("eth0", "count 2000"),
        ("eth0", "src_min 10.201.7.209"),
        ("eth0", "src_max 10.201.15.160"),
    ]


def test_a_burst_is_planned_then_started_and_its_result_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pktgen, "PROC", tmp_path)
    pktgen.start("eth0", ["10.200.0.1", "10.200.0.2"]).join()
    assert (tmp_path / "pgctrl").read_text() == "start\n"
    assert (tmp_path / "eth0").read_text() == "src_max 10.200.0.2\n"  # the last, each its own write
    (tmp_path / "eth0").write_text("Result: OK: 1500(c1000+d500) usec, 2 (60byte,0frags)\n")
    assert pktgen.result("eth0") == (1500, 2)
    pktgen.release()
    assert (tmp_path / "kpktgend_0").read_text() == "rem_device_all\n"
