"""The balancer daemon with `interfaces.offload` over the fake kernel (issue 17): `required` on a
device that cannot offload fails the session loudly (dropped packet, counted, logged with the
kernel's words), on one that can the filter is in hardware; `auto` and `never` stay in software.
`mplsorch routes [--json]` and `status` report what the kernel says; a netlink provider surfaces
the kernel's extack text in the error."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import struct
from collections import deque
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from typer.testing import CliRunner

from orchestrator import control_socket
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.cli.main import app
from orchestrator.config.model import MetricsConfig
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import nla, nlsocket
from orchestrator.dataplane.netlink.provider import NetlinkProvider
from tests.unit.conftest import VIP, balancer_daemon, config


def make(policy: str, capable: bool = False) -> BalancerDaemon:
    kernel = FakeProvider(["lan0", "fab0"], offload_capable={"fab0"} if capable else ())
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    return balancer_daemon(config({"interfaces.offload": {"fab0": policy}}), kernel)


def syn(n: int, src: str) -> QueuedPacket:
    return QueuedPacket(0, n, bytes(IP(src=src, dst=VIP) / TCP(sport=40000, dport=80, flags="S")), 0, None, 0)


def filters(d: BalancerDaemon) -> list[dict[str, Any]]:
    return [r for r in d.handle_request({"cmd": "routes"})["routes"] if r["kind"] == "FlowerFilter"]


def test_required_on_a_device_that_cannot_offload_fails_the_session_loudly(caplog: pytest.LogCaptureFixture) -> None:
    d = make("required")
    with caplog.at_level(logging.ERROR, logger="mplsorch"):
        d.decide([syn(1, "10.0.1.10")])
    assert len(d.core.table) == 0 and filters(d) == []
    status = d.handle_request({"cmd": "status"})
    assert status["counters"]["offload_refused"] == 1 and status["counters"]["sessions_failed"] == 1
    assert status["counters"]["verdict:drop"] == 1
    [record] = [r for r in caplog.records if "skip_sw" in r.getMessage()]
    assert "new session: add filter dev fab0 egress" in record.getMessage()
    assert "offload required (skip_sw) but fab0 cannot offload tc filters" in record.getMessage()
    assert record.fields["event"] == "offload_refused" and record.fields["dev"] == "fab0"  # type: ignore[attr-defined]
    assert record.fields["errno"] == errno.EOPNOTSUPP  # type: ignore[attr-defined]
    # Nothing half-made stays: the session's S2C route was rolled back too.
    assert [i.obj for i in d.provider.dump() if not isinstance(i.obj, ops.ClsactQdisc)] == []


@pytest.mark.parametrize(
    "policy,capable,skip,in_hw",
    [
        ("required", True, " skip_sw ", True),
        ("auto", True, "flower ip_proto", True),
        ("auto", False, "flower ip_proto", False),
        ("never", True, " skip_hw ", False),
    ],
    ids=["required capable", "auto capable", "auto plain", "never"],
)
def test_each_policy_programs_its_flag_and_routes_reports_the_kernels_state(
    policy: str, capable: bool, skip: str, in_hw: bool
) -> None:
    d = make(policy, capable)
    d.decide([syn(1, "10.0.1.10")])
    assert len(d.core.table) == 1 and "offload_refused" not in d.core.counters
    [row] = filters(d)
    assert skip in row["object"] and row["policy"] == policy and row["dev"] == "fab0"
    assert (row["in_hw"], row["in_hw_count"], row["not_in_hw"]) == (in_hw, 1 if in_hw else 0, not in_hw)
    assert row["offload"] == ("in_hw (1)" if in_hw else "not_in_hw")
    status = d.handle_request({"cmd": "status"})
    assert status["offload_age_s"] is None  # no dump yet: status never dumps on the request path
    assert set(status["offload"].values()) == {0}
    d.offload.sample()  # what the background task does (daemon.offload_sampler)
    status = d.handle_request({"cmd": "status"})
    counts = status["offload"]
    assert status["offload_age_s"] is not None and 0 <= status["offload_age_s"] < 5
    # One filter, one S2C label route (never in hardware: no upstream driver offloads label routes).
    assert counts == {"in_hw": int(in_hw), "not_in_hw": 2 - int(in_hw), "trap": 0, "offload_failed": 0}


def test_metrics_count_objects_by_offload_state_and_refusals() -> None:
    d = make("required")
    d.config = __import__("dataclasses").replace(d.config, metrics=MetricsConfig("127.0.0.1", 0))
    d.decide([syn(1, "10.0.1.10"), syn(2, "10.0.1.11")])
    d.publish()
    snapshot = d.snapshot()
    assert snapshot.offload_refused == 2
    assert dict(snapshot.offload) == {"in_hw": 0, "not_in_hw": 0, "trap": 0, "offload_failed": 0}


def test_the_routes_command_prints_a_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    d = make("never")
    d.decide([syn(1, "10.0.1.10")])
    monkeypatch.setattr(
        control_socket, "request", lambda path, cmd, **args: asyncio.run(d.answer({"cmd": cmd, **args}))
    )
    runner = CliRunner()
    rows = json.loads(runner.invoke(app, ["routes", "--json"]).stdout)
    assert {r["kind"] for r in rows} == {"FlowerFilter", "MplsRoute", "ClsactQdisc"}
    assert set(rows[0]) == {
        "object",
        "kind",
        "dev",
        "policy",
        "offload",
        "in_hw",
        "in_hw_count",
        "not_in_hw",
        "trap",
        "offload_failed",
    }
    screen = runner.invoke(app, ["routes"], env={"COLUMNS": "250"})
    assert screen.exit_code == 0, screen.output
    line = next(x for x in screen.stdout.splitlines() if "skip_hw" in x)
    assert "never" in line and "not_in_hw" in line
    assert (
        "offload: 0 in_hw, 0 not_in_hw, 0 trap, 0 offload_failed (no dump yet)" in runner.invoke(app, ["status"]).stdout
    )
    d.offload.sample()  # the background task's dump
    status = runner.invoke(app, ["status"]).stdout
    assert "offload: 0 in_hw, 2 not_in_hw, 0 trap, 0 offload_failed" in status


class RefusingKernel:
    """The kernel side of a netlink socket that refuses every request with EOPNOTSUPP and an
    extack message, as a switchdev driver does for a filter it cannot offload."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.replies: deque[bytes] = deque()

    def setsockopt(self, *args: object) -> None:
        pass

    bind = settimeout = close = setsockopt

    def sendall(self, data: bytes) -> None:
        for kind, flags, seq, body in nla.messages(data):
            tlv = nla.asciiz(c.NLMSGERR_ATTR_MSG, self.text)
            payload = struct.pack("=i", -errno.EOPNOTSUPP) + struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0)
            self.replies.append(nla.message(c.NLMSG_ERROR, 0x100 | 0x200, seq, payload + tlv))

    def recv_into(self, buf: bytearray) -> int:
        data = self.replies.popleft()
        buf[: len(data)] = data
        return len(data)


def test_the_netlink_provider_puts_the_drivers_extack_text_in_the_error() -> None:
    text = "netdevsim: only offload of BPF classifiers supported"
    provider = NetlinkProvider(sock=nlsocket.NetlinkSocket(sock=RefusingKernel(text)), links={"nsim0": 7})  # type: ignore[arg-type]
    flt = ops.FlowerFilter(
        "nsim0", 1, ops.FlowerMatch(src="10.0.1.10/32"), ops.push_stack((103, 1001)), offload=ops.OffloadPolicy.REQUIRED
    )
    [result] = provider.apply([ops.Add(flt)])
    assert result.errno == errno.EOPNOTSUPP
    assert result.error == f"offload required but device nsim0 cannot offload this filter: {text} (EOPNOTSUPP)"


def test_an_invalid_required_filter_is_not_counted_as_a_hardware_refusal() -> None:
    """EINVAL before the kernel (a label out of range) is a bug, not the hardware saying no."""
    d = make("required", capable=True)
    bad = ops.FlowerFilter(
        "fab0", 1, ops.FlowerMatch(src="10.0.1.10/32"), (ops.MplsPush(1 << 20),), offload=ops.OffloadPolicy.REQUIRED
    )
    [result] = d.program([ops.Add(bad)], "test")
    assert result.errno == errno.EINVAL and "offload_refused" not in d.core.counters
