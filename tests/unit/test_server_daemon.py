"""The server daemon's wiring over the fake provider and a scripted queue: node objects installed
idempotently (and stale ones removed), queued packets turned into labelled packets by their mark,
return routes programmed before the verdicts, sessions logged and answered on the control socket,
and `mplsorch run` exiting with the node's problems."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP
from typer.testing import CliRunner

from orchestrator.capture.nfqueue import NF_ACCEPT, QueuedPacket
from orchestrator.cli import daemon as cli_daemon
from orchestrator.cli.main import app
from orchestrator.config import load_server_config
from orchestrator.config.examples import example
from orchestrator.config.load import ConfigError, parse_config
from orchestrator.config.model import MetricsConfig
from orchestrator.config.server_model import ServerConfig
from orchestrator.core.agent import MARK_TAG
from orchestrator.daemon import node_setup
from orchestrator.daemon.server import ServerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import SERVER_EXAMPLE, VIP, ScriptedQueue, server_daemon

EXAMPLE = SERVER_EXAMPLE
CLIENT = "10.0.1.10"


@pytest.fixture
def kernel() -> FakeProvider:
    return FakeProvider(["eth0"])


@pytest.fixture
def queue(kernel: FakeProvider) -> ScriptedQueue:
    """Records, with each batch of verdicts, whether the client's return route was in the kernel."""
    return ScriptedQueue(observe=lambda: kernel.route_ip(VIP, CLIENT) is not None)


@pytest.fixture
def daemon(kernel: FakeProvider, queue: ScriptedQueue) -> ServerDaemon:
    d = server_daemon(load_server_config(EXAMPLE), kernel, queue)
    d.install_node_objects()
    return d


def syn(packet_id: int, mark: int, src: str = CLIENT) -> QueuedPacket:
    return QueuedPacket(
        8, packet_id, bytes(IP(src=src, dst=VIP) / TCP(sport=40000, dport=80, flags="S")), 1, None, mark
    )


def test_node_objects_are_installed_idempotently_and_stale_ones_removed(
    daemon: ServerDaemon, kernel: FakeProvider
) -> None:
    first = {i.obj for i in kernel.dump()}
    applied: list[ops.Operation] = []
    apply = kernel.apply
    kernel.apply = lambda batch: (applied.extend(batch), apply(batch))[1]  # type: ignore[method-assign]
    daemon.install_node_objects()  # a restart: the same objects, no error, and no change sent
    assert {i.obj for i in kernel.dump()} == first and daemon.op_results["error"] == 0
    assert applied == []
    # One object changed behind the agent's back (a filter's mark): only that one is replaced.
    changed = next(o for o in first if isinstance(o, ops.FlowerFilter))
    kernel.apply([ops.Replace(dataclasses.replace(changed, actions=(ops.SetMark(1),)))])
    applied.clear()
    daemon.install_node_objects()
    assert applied == [ops.Replace(changed)] and {i.obj for i in kernel.dump()} == first
    kernel.apply = apply  # type: ignore[method-assign]
    assert kernel.receive_mpls([1001]).delivered_locally
    # A rule and a termination route the configuration no longer wants go; others' objects stay.
    kernel.apply(
        [
            ops.Add(ops.Rule("10.0.0.99/32", 99, 1000)),
            ops.Add(ops.MplsRoute(2001, "lo")),
            ops.Add(ops.MplsRoute(3001, "eth0", "10.1.1.1")),
        ]
    )
    daemon.install_node_objects()
    left = {i.obj for i in kernel.dump()}
    assert ops.Rule("10.0.0.99/32", 99, 1000) not in left and ops.MplsRoute(2001, "lo") not in left
    assert ops.MplsRoute(3001, "eth0", "10.1.1.1") in left


def test_a_marked_first_packet_gets_its_return_route_before_its_verdict(
    daemon: ServerDaemon, kernel: FakeProvider, queue: ScriptedQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mplsorch")
    daemon.decide([syn(1, MARK_TAG | 1001), syn(2, 0x1234, src="10.0.1.11")])
    [(verdicts, route_present)] = queue.sent_batches
    assert route_present  # the verdict went after the route was in the kernel
    assert sorted(v.packet_id for v in verdicts) == [1, 2] and {v.verdict for v in verdicts} == {NF_ACCEPT}
    route = kernel.route_ip(VIP, CLIENT)
    assert route is not None and route.labels == (100, 1002)
    assert daemon.core.counters["unmarked"] == 1
    assert "session learned: 10.0.1.10 -> 10.0.0.100 c2s 1001 s2c 1002" in caplog.messages
    [row] = daemon.handle_request({"cmd": "sessions"})["sessions"]
    assert (row["client"], row["vip"], row["c2s_label"], row["s2c_label"]) == (CLIENT, VIP, 1001, 1002)
    assert row["created"] > 1.6e9  # Unix time
    paged = daemon.handle_request({"cmd": "sessions", "offset": 1, "limit": 5})
    assert paged["sessions"] == [] and paged["total"] == 1  # pages as the balancer's
    status = daemon.handle_request({"cmd": "status"})
    assert (status["role"], status["sessions"], status["vips"]) == ("server", 1, [VIP, "fd00:100::100"])
    assert daemon.handle_request({"cmd": "labels"}) == {"error": "unknown command 'labels'"}


def test_the_label_reused_for_another_client_is_a_new_session(
    daemon: ServerDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mplsorch")
    daemon.decide([syn(1, MARK_TAG | 1001)])
    daemon.decide([syn(2, MARK_TAG | 1001, src="10.0.1.11")])
    assert "session end: 10.0.1.10 -> 10.0.0.100 c2s 1001 s2c 1002 (label reused)" in caplog.messages
    assert "session learned: 10.0.1.11 -> 10.0.0.100 c2s 1001 s2c 1002" in caplog.messages


def test_run_prints_every_problem_and_exits_4_when_the_node_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = [
        node_setup.Problem("VIP 10.0.0.100 is not on lo", node_setup.Fix("address", ("lo", "10.0.0.100/32"))),
        node_setup.Problem("interface eth0 (interfaces.fabric) does not exist", hint="create it"),
    ]

    def not_ready(path: str, config: Any, log_format: str = "text") -> int:
        raise node_setup.NodeNotReady(problems)

    monkeypatch.setattr(cli_daemon, "serve_on_kernel", not_ready)
    result = CliRunner().invoke(app, ["run", "--config", str(EXAMPLE)])
    assert result.exit_code == 4
    assert result.stderr.splitlines() == [
        "mplsorch: node not ready: VIP 10.0.0.100 is not on lo; fix: ip address add 10.0.0.100/32 dev lo",
        "mplsorch: node not ready: interface eth0 (interfaces.fabric) does not exist; fix: create it",
    ]


def test_the_agents_metrics_endpoint_agrees_with_status(kernel: FakeProvider, queue: ScriptedQueue) -> None:
    cfg = dataclasses.replace(load_server_config(EXAMPLE), metrics=MetricsConfig("127.0.0.1", 0))
    d = server_daemon(cfg, kernel, queue)
    d.install_node_objects()
    d.start_metrics()
    try:
        assert d.metrics is not None
        d.decide([syn(1, MARK_TAG | 1001), QueuedPacket(8, 2, b"\x45\x00", 1, None, MARK_TAG | 1003)])
        queue.overruns = 1
        d.on_packets()
        d.tick()
        with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics.port}/metrics", timeout=5) as answer:
            body = answer.read().decode()
    finally:
        d.stop_metrics()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }
    status = d.handle_request({"cmd": "status"})
    assert samples[("mplsorch_sessions", (("state", "serving"),))] == status["sessions"] == 1
    assert samples[("mplsorch_sessions_learned_total", ())] == status["counters"]["sessions_learned"] == 1
    assert samples[("mplsorch_c2s_labels", (("state", "in_use"),))] == 1
    assert samples[("mplsorch_c2s_labels", (("state", "free"),))] == len(cfg.c2s_labels()) - 1
    [reason] = [k.split(":", 1)[1] for k in status["counters"] if k.startswith("malformed:")]
    assert samples[("mplsorch_malformed_packets_total", (("reason", reason),))] == 1
    assert samples[("mplsorch_errors_total", (("error", "queue_overruns"),))] == status["counters"]["queue_overruns"]
    assert samples[("mplsorch_dataplane_operations_total", (("result", "ok"),))] == status["dataplane_ops"]["ok"]
    assert ("mplsorch_label_pairs", (("state", "free"),)) not in samples  # the balancer's family


def test_the_server_configuration_takes_a_metrics_endpoint() -> None:
    text = example("server", {"metrics": {"listen": "[::1]:9470"}})
    cfg = parse_config(text, "s1.yaml")
    assert isinstance(cfg, ServerConfig) and cfg.metrics == MetricsConfig("::1", 9470)
    assert cfg.to_dict()["metrics"] == {"listen": "[::1]:9470"} and parse_config(json.dumps(cfg.to_dict())) == cfg
    assert load_server_config(EXAMPLE).metrics is None
    with pytest.raises(ConfigError, match=r"metrics.listen: 'localhost:1' is not an address"):
        parse_config(example("server", {"metrics": {"listen": "localhost:1"}}), "s1.yaml")


def test_a_reload_moves_the_agents_metrics_endpoint(
    kernel: FakeProvider, queue: ScriptedQueue, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start without an endpoint; a reload whose file has one starts it (the ruleset is taken by a
    stand-in nft, the node declared ready)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").write_text("#!/bin/sh\ncat > /dev/null\n")
    (bindir / "nft").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    d = server_daemon(load_server_config(EXAMPLE), kernel, queue)
    d.make_ready = lambda config: None  # type: ignore[method-assign]
    d.install_node_objects()
    path = tmp_path / "s1.yaml"
    # Port 0 is refused by the file format: a free port is found first and written in.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path.write_text(example("server", {"metrics": {"listen": f"127.0.0.1:{port}"}}))
    d.config_path = str(path)
    assert d.metrics is None
    d.do_reload()
    try:
        assert d.metrics is not None and d.metrics.port == port and d.config.metrics is not None
        assert d.core.counters["reloads_rejected"] == 0
    finally:
        d.stop_metrics()


def test_a_kernel_without_nexthop_objects_gets_plain_encap_routes_said_once(
    queue: ScriptedQueue, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start the agent asks the kernel (its nexthop dump says EOPNOTSUPP) and says so once; a
    nexthop refused later as unsupported does the same, and the batch's routes are made plain
    before its verdicts."""
    from orchestrator.daemon import agent as agent_daemon

    caplog.set_level(logging.INFO, "mplsorch")
    monkeypatch.setattr(agent_daemon.nftables, "load", lambda ruleset: None)
    monkeypatch.setattr(ServerDaemon, "make_ready", lambda self, config: None)
    kernel = FakeProvider(["eth0"], nexthops=False)
    started = server_daemon(load_server_config(EXAMPLE), kernel, queue)
    started.setup()
    assert not started.core.nexthops
    started.decide([syn(1, MARK_TAG | 1001)])
    assert [i.obj for i in kernel.dump() if isinstance(i.obj, ops.EncapRoute)] == [
        ops.EncapRoute(f"{CLIENT}/32", (100, 1002), "eth0", "10.1.1.1", 100)
    ]
    # Mid-run (the daemon believed the kernel had them): one batch falls back, verdicts after.
    queue.observe = lambda: kernel.route_ip(VIP, "10.0.1.11") is not None
    running = server_daemon(load_server_config(EXAMPLE), kernel, queue)
    running.decide([syn(2, MARK_TAG | 1003, src="10.0.1.11")])
    running.decide([syn(3, MARK_TAG | 1005, src="10.0.1.12")])
    assert [present for _verdicts, present in queue.sent_batches[-2:]] == [True, True]
    assert kernel.route_ip(VIP, "10.0.1.11").labels == (100, 1004)  # type: ignore[union-attr]
    assert kernel.route_ip(VIP, "10.0.1.12").labels == (100, 1006)  # type: ignore[union-attr]
    warnings = [m for m in caplog.messages if "S2C return routes are plain encap routes" in m]
    assert len(warnings) == 2, warnings  # once per daemon
    assert warnings[0].startswith("the kernel has no nexthop objects")
    assert warnings[1].startswith("a nexthop object was refused as not supported")
    assert running.core.counters["nexthops_unsupported"] == 1
