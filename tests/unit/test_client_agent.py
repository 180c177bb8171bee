"""The client agent (role: client) against the fake provider's forwarding model: S2C termination,
learning C2S = S2C - 1 from a flow's first labelled answer, the C2S filter in before the verdict,
more flows and ports of a session, session end, a label the balancer changed, restart, reload; the
daemon's wiring (verdicts after the filters, status and sessions, metrics); its configuration."""

from __future__ import annotations

import dataclasses
import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import NF_ACCEPT, QueuedPacket
from orchestrator.cli.asking import status_lines
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.examples import DELETE, example
from orchestrator.config.load import ConfigError, load_client_config, parse_config
from orchestrator.config.model import MetricsConfig
from orchestrator.core.agent import MARK_TAG
from orchestrator.core.client_agent import ClientAgent, State
from orchestrator.core.events import Action, FlowKey, FlowsEnded, FlowTableResync
from orchestrator.daemon import node_setup
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.metrics import make_registry
from tests.unit.conftest import CLIENT_EXAMPLE, VIP, ClientAgentNode, ScriptedQueue, client_daemon

CLIENT = "10.0.2.10"
VIP6 = "fd00:100::100"


def answer(sport: int = 80, dport: int = 40000, src: str = VIP, dst: str = CLIENT, flags: str = "SA") -> bytes:
    """An answer from the VIP's port `sport` to the client's port `dport`."""
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return bytes(ip / TCP(sport=sport, dport=dport, flags=flags))


def client_config(changes: dict[str, object]) -> ClientConfig:
    cfg = parse_config(example("client", changes), "c4.yaml")
    assert isinstance(cfg, ClientConfig)
    return cfg


def test_node_objects_terminate_the_s2c_labels_of_the_range_and_mark_them() -> None:
    node = ClientAgentNode()
    assert node.kernel.receive_mpls([1002]).delivered_locally
    assert node.kernel.receive_mpls([1998]).delivered_locally
    assert node.kernel.mpls_lookup(1001) is None and node.kernel.mpls_lookup(2000) is None  # C2S, outside
    marks = [i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.FlowerFilter)]
    assert len(marks) == 499 and all(f.direction == ops.Direction.INGRESS for f in marks)
    assert marks[0].actions == (ops.SetMark(MARK_TAG | 1002),) and marks[0].match.mpls_label == 1002


def test_the_first_labelled_answer_installs_the_c2s_filter_before_its_verdict() -> None:
    node = ClientAgentNode()
    assert node.labels_of(CLIENT) == ()  # the first packet left unlabelled
    assert node.answer(1002, answer()) == [Action.ACCEPT]
    assert node.labels_of(CLIENT) == (1001,)  # C2S = S2C - 1, on every later packet
    assert node.labels_of(CLIENT, dport=8080) == () and node.labels_of("10.0.2.11") == ()  # other port, client
    [row] = [s.view() for s in node.agent.sessions.values()]
    assert {k: row[k] for k in ("vip", "clients", "ports", "c2s_label", "s2c_label", "state", "flows")} == {
        "vip": VIP,
        "clients": [CLIENT],
        "ports": ["tcp/80"],
        "c2s_label": 1001,
        "s2c_label": 1002,
        "state": "serving",
        "flows": 1,
    }
    assert node.agent.counters["sessions_learned"] == 1


def test_ipv6_sessions_get_their_own_filter_pref() -> None:
    node = ClientAgentNode()
    node.answer(1004, answer(src=VIP6, dst="fd00:2::10"))
    assert node.labels_of("fd00:2::10", vip=VIP6) == (1003,)
    [flt] = [i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.FlowerFilter) and i.obj.pref == 11]
    assert flt.match.dst == "fd00:100::100/128" and flt.direction == ops.Direction.EGRESS


def test_more_flows_and_ports_of_a_session_and_its_end_after_the_last_flow_and_persistence() -> None:
    node = ClientAgentNode()
    node.answer(1002, answer(dport=40000), now=0)
    node.answer(1002, answer(dport=40001), now=1)  # a second connection: no new filter
    node.answer(1002, answer(sport=8080, dport=40002), now=1)  # another port of the service
    filters = [i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.FlowerFilter) and i.obj.pref == 10]
    assert len(filters) == 2 and node.labels_of(CLIENT, dport=8080) == (1001,)
    assert node.agent.sessions[1002].view()["ports"] == ["tcp/80", "tcp/8080"]
    flows = [FlowKey(6, CLIENT, VIP, port, dport) for port, dport in ((40000, 80), (40001, 80), (40002, 8080))]
    node.agent.on_flow_events([FlowsEnded(tuple(flows[:2]))], now=2)
    assert node.agent.sessions[1002].state == State.SERVING
    node.agent.on_flow_events([FlowTableResync(frozenset(), sweep=True)], now=3)
    assert node.agent.sessions[1002].state == State.DRAINING
    node.tick(3 + 29.9)
    assert node.labels_of(CLIENT) == (1001,)
    node.tick(3 + 30)
    assert node.labels_of(CLIENT) == () and node.labels_of(CLIENT, dport=8080) == () and not node.agent.sessions
    assert node.agent.counters["sessions_ended"] == 1


def test_a_new_label_for_the_same_packets_replaces_the_old_filter() -> None:
    node = ClientAgentNode()
    node.answer(1002, answer(dport=40000))
    node.answer(1010, answer(dport=40001))  # the balancer gave the client a new session there
    assert node.labels_of(CLIENT) == (1009,)
    assert list(node.agent.sessions) == [1010] and node.agent.counters["label_changed"] == 1
    # A UDP service of the same VIP is a session of its own.
    node.answer(1020, bytes(IP(src=VIP, dst=CLIENT) / UDP(sport=53, dport=5000)))
    assert node.labels_of(CLIENT, dport=53, proto="udp") == (1019,) and node.labels_of(CLIENT) == (1009,)


def test_a_session_whose_answers_stop_ends_a_timeout_after_the_client_sent_in_vain() -> None:
    node = ClientAgentNode()
    node.answer(1002, answer())

    def traffic(sent: int, answered: int) -> None:
        for _ in range(sent):
            assert node.labels_of(CLIENT) == (1001,)  # through the C2S filter, counted
        for _ in range(answered):
            assert node.kernel.receive_mpls([1002], dev="eth0").delivered_locally  # the marking filter counts it

    def sample() -> None:
        assert all(r.ok for r in node.kernel.apply(node.agent.on_counters(node.kernel.dump())))

    sample()
    traffic(3, 3)
    sample()
    sample()  # a request answered, then quiet: nothing stopped
    traffic(2, 0)
    sample()  # sent, no answer yet: not a whole timeout
    assert 1002 in node.agent.sessions
    traffic(1, 0)
    sample()  # still nothing back a timeout after: the balancer's session is gone
    assert 1002 not in node.agent.sessions and node.agent.counters["answers_stopped"] == 1
    assert node.labels_of(CLIENT) == ()  # the client's packets leave as plain IP again
    # A quiet session is never ended by it.
    node.answer(1004, answer(dport=40001))
    for _ in range(5):
        sample()
    assert 1004 in node.agent.sessions


def test_what_is_not_a_labelled_answer_from_a_vip_is_counted_and_still_accepted() -> None:
    node = ClientAgentNode()
    assert node.answer(2002, answer()) == [Action.ACCEPT]  # outside the range
    assert node.answer(1002, answer(src="10.9.9.9")) == [Action.ACCEPT]  # not a VIP
    assert node.answer(1002, b"\x45\x00") == [Action.ACCEPT]
    counters = node.agent.counters
    assert counters["label_outside_range"] == 1 and counters["not_a_vip"] == 1
    assert any(k.startswith("malformed:") for k in counters)
    assert not node.agent.sessions and node.labels_of(CLIENT) == ()


def test_a_failed_filter_is_forgotten_and_tried_again() -> None:
    node = ClientAgentNode()
    node.kernel.apply([ops.Delete(ops.ClsactQdisc("eth0"))])  # the kernel refuses the filter (no qdisc)
    assert node.answer(1002, answer()) == [Action.ACCEPT]
    assert node.agent.counters["filter_errors"] == 1 and not node.agent.sessions[1002].filters
    node.kernel.apply([ops.Add(ops.ClsactQdisc("eth0"))])
    node.answer(1002, answer(dport=40001))
    assert node.labels_of(CLIENT) == (1001,)


def test_a_restart_rebuilds_the_sessions_from_the_filters_alone() -> None:
    node = ClientAgentNode()
    node.answer(1002, answer(dport=40000))
    node.answer(1002, answer(sport=8080, dport=40001))
    node.answer(1004, answer(src=VIP6, dst="fd00:2::10"))
    before = {k: s.view() for k, s in node.agent.sessions.items()}
    # A filter of ours for a VIP no longer configured, and one outside the range, go.
    odd = ops.FlowerFilter(
        "eth0", 2001 << 8, ops.FlowerMatch(CLIENT + "/32", "10.0.0.200/32", "tcp", None, 80), ops.push_stack((2001,))
    )
    node.kernel.apply([ops.Add(odd)])
    fresh = ClientAgent(node.config)
    live = frozenset({FlowKey(6, CLIENT, VIP, 40000, 80)})
    stale = fresh.restore(node.kernel.dump(), live, now=5)
    assert stale == [ops.Delete(odd)]
    keys = ("vip", "clients", "ports", "c2s_label", "s2c_label")
    assert {k: [s.view()[x] for x in keys] for k, s in fresh.sessions.items()} == {
        k: [v[x] for x in keys] for k, v in before.items()
    }
    assert fresh.sessions[1002].state == State.SERVING and fresh.sessions[1004].state == State.DRAINING
    assert fresh.counters["restored_sessions"] == 2
    # The restored agent goes on: a new port gets the next free index under the same C2S.
    node.agent = fresh
    node.answer(1002, answer(sport=8443, dport=40002))
    assert node.labels_of(CLIENT, dport=8443) == (1001,)


def test_a_reload_ends_the_sessions_of_a_vip_that_left() -> None:
    node = ClientAgentNode()
    node.answer(1002, answer())
    node.answer(1004, answer(src=VIP6, dst="fd00:2::10"))
    ops_ = node.agent.reconfigure(dataclasses.replace(node.config, vips=node.config.vips[1:]))
    assert all(r.ok for r in node.kernel.apply(ops_))
    assert list(node.agent.sessions) == [1004] and node.labels_of(CLIENT) == ()


# ---- the daemon ----------------------------------------------------------------------------------


def queued(packet_id: int, mark: int, data: bytes) -> QueuedPacket:
    return QueuedPacket(9, packet_id, data, 1, None, mark)


def test_the_daemon_sends_verdicts_only_after_the_filter_and_answers_its_socket() -> None:
    kernel = FakeProvider(["eth0"])
    queue = ScriptedQueue(
        observe=lambda: kernel.forward_ip(CLIENT, VIP, "tcp", 40000, 80, out_dev="eth0").labels  # type: ignore[union-attr]
    )
    daemon = client_daemon(load_client_config(CLIENT_EXAMPLE), kernel, queue)
    daemon.install_node_objects()
    daemon.install_node_objects()  # idempotent
    queue.script(queued(1, MARK_TAG | 1002, answer()), queued(2, 0, answer(dport=40001)))
    daemon.on_packets()
    [(verdicts, labels)] = queue.sent_batches
    assert [v.verdict for v in verdicts] == [NF_ACCEPT, NF_ACCEPT] and labels == (1001,)
    assert daemon.core.counters["unmarked"] == 1
    status = daemon.handle_request({"cmd": "status"})
    assert status["role"] == "client" and status["sessions"] == 1 and status["range"] == [1001, 1999]
    assert status["balancer_interfaces"] == ["eth0"]
    [row] = daemon.handle_request({"cmd": "sessions"})["sessions"]
    assert (row["c2s_label"], row["s2c_label"], row["ports"]) == (1001, 1002, ["tcp/80"])
    json.dumps(status)


def test_status_without_json_reads_the_client_keys() -> None:
    kernel = FakeProvider(["eth0"])
    daemon = client_daemon(load_client_config(CLIENT_EXAMPLE), kernel, ScriptedQueue())
    daemon.install_node_objects()
    lines = status_lines({**daemon.handle_request({"cmd": "status"}), "nft_counters": {}})
    assert lines[0].startswith("client  pid ") and "labels: 1001-1999, balancer link eth0, queue 9" in lines


def test_the_daemon_serves_the_agent_metrics_as_role_client() -> None:
    kernel = FakeProvider(["eth0"])
    cfg = dataclasses.replace(load_client_config(CLIENT_EXAMPLE), metrics=MetricsConfig("127.0.0.1", 0))
    daemon = client_daemon(cfg, kernel, ScriptedQueue())
    daemon.install_node_objects()
    daemon.core.on_packets([], 0)
    daemon.publish()
    text = generate_latest(make_registry(daemon.snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {s.labels["state"]: s.value for s in families["mplsorch_c2s_labels"].samples}
    assert labels == {"in_use": 0, "free": 499}


def test_the_ruleset_queues_only_untagged_labelled_answers_from_the_vips() -> None:
    text = nftables.render_client(load_client_config(CLIENT_EXAMPLE))
    assert 'iif "lo"' in text and "ip saddr { 10.0.0.100 }" in text and "ip6 saddr { fd00:100::100 }" in text
    assert "queue flags bypass to 9" in text and "ct mark & 0xfff00000 != 0x6d600000" in text


# ---- node setup ----------------------------------------------------------------------------------


class System:
    def __init__(self, sysctls: dict[tuple[str, ...], str]) -> None:
        self.sysctls = sysctls

    def sysctl(self, *parts: str) -> str | None:
        return self.sysctls.get(parts)

    def module(self, name: str) -> bool | None:
        return True

    def device_exists(self, dev: str) -> bool:
        return dev in ("eth0", "lan0", "lan1", "fab0")


def test_the_client_node_check_wants_mpls_input_on_the_balancer_link_and_lo() -> None:
    cfg = load_client_config(CLIENT_EXAMPLE)
    ready = {
        ("net", "mpls", "platform_labels"): "100000",
        ("net", "mpls", "conf", "eth0", "input"): "1",
        ("net", "mpls", "conf", "lo", "input"): "1",
    }
    assert node_setup.check_client(cfg, System(ready)) == []  # type: ignore[arg-type]
    problems = node_setup.check_client(cfg, System({**ready, ("net", "mpls", "conf", "eth0", "input"): "0"}))  # type: ignore[arg-type]
    assert [p.fix.command for p in problems if p.fix] == ["sysctl -w net.mpls.conf.eth0.input=1"]
    strict = {**ready, ("net", "ipv4", "conf", "lo", "rp_filter"): "1"}
    assert "rp_filter" in str(node_setup.check_client(cfg, System(strict)))  # type: ignore[arg-type]


# ---- configuration -------------------------------------------------------------------------------


def test_the_example_parses_and_show_round_trips() -> None:
    cfg = load_client_config(CLIENT_EXAMPLE)
    assert (cfg.balancer, cfg.label_range, [str(v) for v in cfg.vips]) == (
        ("eth0",),
        (1001, 1999),
        ["10.0.0.100", "fd00:100::100"],
    )
    assert parse_config(json.dumps(cfg.to_dict())) == dataclasses.replace(cfg, source="<string>")
    assert client_config({"node": DELETE}).node.control_socket == cfg.node.control_socket  # optional


@pytest.mark.parametrize(
    ("changes", "path", "message"),
    [
        ({"labels.range": [1002, 1002]}, "labels.range", "must be < last"),
        ({"labels.range": [1002, 1003]}, "labels.range", "no (odd C2S, even S2C) label pair"),
        ({"vips": []}, "vips", "at least one VIP"),
        ({"vips": ["10.0.0.100", "10.0.0.100"]}, "vips[1]", "listed twice"),
        ({"interfaces.balancer": []}, "interfaces.balancer", "at least one interface"),
        ({"interfaces.balancer": ["eth0"], "interfaces.fabric": ["x"]}, "interfaces.fabric", "unknown key"),
        ({"services": {}}, "services", "a key of role balancer, but this file has role: client"),
        ({"balancer": {}}, "balancer", "a key of role server, but this file has role: client"),
        ({"sessions.persistence_timeout": "soon"}, "sessions.persistence_timeout", "duration"),
        ({"nfqueue.queue": 70000}, "nfqueue.queue", "65535"),
    ],
)
def test_bad_client_files_name_line_key_and_problem(changes: dict[str, object], path: str, message: str) -> None:
    text = example("client", changes)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c4.yaml")
    e = info.value
    assert e.path == path and message in e.message, str(e)
    assert e.line is not None and str(e).startswith(f"c4.yaml:{e.line}: {path}")


def test_the_balancer_takes_label_aware_interfaces_among_its_client_interfaces_only() -> None:
    text = example(
        "balancer", {"interfaces.clients": ["lan0", "lan1"], "clients.label_aware_interfaces": ["lan1", "lan2"]}
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lb.yaml")
    assert info.value.path == "clients.label_aware_interfaces[1]" and "not in interfaces.clients" in info.value.message
    ok = parse_config(
        example("balancer", {"interfaces.clients": ["lan0", "lan1"], "clients.label_aware_interfaces": ["lan1"]})
    )
    assert ok.clients.label_aware_interfaces == ("lan1",)  # type: ignore[union-attr]


def test_the_balancer_node_check_wants_mpls_input_only_on_the_label_aware_client_interfaces() -> None:
    cfg = parse_config(
        example("balancer", {"interfaces.clients": ["lan0", "lan1"], "clients.label_aware_interfaces": ["lan1"]})
    )
    wrong = {("net", "mpls", "conf", "lan0", "input"): "1", ("net", "mpls", "conf", "lan1", "input"): "0"}
    problems = node_setup.check_balancer(cfg, System(wrong))  # type: ignore[arg-type]
    fixes = [p.fix.command for p in problems if p.fix and "conf.lan" in p.fix.command]
    assert fixes == ["sysctl -w net.mpls.conf.lan0.input=0", "sysctl -w net.mpls.conf.lan1.input=1"]
    right = {("net", "mpls", "conf", "lan0", "input"): "0", ("net", "mpls", "conf", "lan1", "input"): "1"}
    assert not [p for p in node_setup.check_balancer(cfg, System(right)) if "conf.lan" in str(p)]  # type: ignore[arg-type]
