"""A ctnetlink destroy message, encoded as the kernel sends it, ends the core's flow."""

from __future__ import annotations

import socket
import struct
import time

from orchestrator.capture import conntrack as ct
from orchestrator.core.events import FlowKey, FlowsEnded, FlowTableResync
from orchestrator.daemon import loop
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.dataplane.netlink import nla
from tests.unit.conftest import Node, ScriptedConntrack, balancer_daemon, config


def destroy_body(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    ip = nla.nest(
        ct.CTA_TUPLE_IP,
        nla.attr(ct.CTA_IP_V4_SRC, socket.inet_pton(socket.AF_INET, src)),
        nla.attr(ct.CTA_IP_V4_DST, socket.inet_pton(socket.AF_INET, dst)),
    )
    l4 = nla.nest(
        ct.CTA_TUPLE_PROTO,
        nla.u8(ct.CTA_PROTO_NUM, proto),
        nla.attr(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
        nla.attr(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dport)),
    )
    return struct.pack("!BBH", socket.AF_INET, 0, 0) + nla.nest(ct.CTA_TUPLE_ORIG, ip, l4)


def test_destroy_message_parses_into_the_cores_flow_key() -> None:
    flow = ct.parse_flow(memoryview(destroy_body("10.0.1.12", "10.0.0.100", 17, 40000, 53)))
    assert flow == FlowKey(17, "10.0.1.12", "10.0.0.100", 40000, 53)
    assert isinstance(FlowsEnded((flow,)), FlowsEnded)


def test_a_parsed_destroy_ends_a_session_in_the_core() -> None:
    from scapy.layers.inet import IP, UDP

    node = Node()
    node.packets(bytes(IP(src="10.0.1.12", dst="10.0.0.100") / UDP(sport=40000, dport=53)))
    flow = ct.parse_flow(memoryview(destroy_body("10.0.1.12", "10.0.0.100", 17, 40000, 53)))
    node.core.on_flow_events([FlowsEnded((flow,))], node.now)
    node.advance(31)
    assert len(node.core.table) == 0


def test_dumps_ask_the_kernel_only_for_the_flows_our_rulesets_tag() -> None:
    from pathlib import Path

    from orchestrator.capture import nftables
    from orchestrator.config import load_balancer_config, load_server_config

    a = nla.attrs(ct.mark_filter())
    mark, mask = (struct.unpack("!I", a[k])[0] for k in (ct.CTA_MARK, ct.CTA_MARK_MASK))
    assert mark & mask == mark == ct.CT_TAG
    templates = Path(__file__).resolve().parents[2] / "templates"
    rulesets = (
        nftables.render(load_balancer_config(templates / "balancer.example.yaml")),
        nftables.render_server(load_server_config(templates / "server.example.yaml")),
    )
    for ruleset in rulesets:
        queue_rules = [line for line in ruleset.splitlines() if " queue " in line]
        assert queue_rules
        # (mark & keep) | tag: the tag in the bits the dump filters on, an operator's other bits kept
        keep = ~mask & 0xFFFFFFFF
        assert all(f"ct mark set ct mark and {keep:#010x} or {mark:#010x} " in line for line in queue_rules), ruleset


def test_a_sweep_ends_the_flows_conntrack_no_longer_holds_and_keeps_the_others() -> None:
    from scapy.layers.inet import IP, UDP

    from orchestrator.core.events import FlowTableResync
    from orchestrator.core.sessions import State

    node = Node()
    gone, alive = FlowKey(17, "10.0.1.12", "10.0.0.100", 40000, 53), FlowKey(17, "10.0.1.11", "10.0.0.100", 40001, 53)
    for f in (gone, alive):
        node.packets(bytes(IP(src=f.src, dst=f.dst) / UDP(sport=f.sport, dport=f.dport)))
    node.core.on_flow_events([FlowTableResync(frozenset({alive}), sweep=True)], node.now)
    assert node.core.table.by_flow(gone) is None and node.core.table.by_flow(alive) is not None
    states = {s.key.client: s.state for s in node.core.table}
    assert states == {"10.0.1.12": State.DRAINING, "10.0.1.11": State.SERVING}
    assert node.core.counters["conntrack_sweeps"] == 1 and node.core.counters["conntrack_resyncs"] == 0


def test_the_daemon_sweeps_after_reading_pending_events_and_on_a_timer() -> None:
    calls: list[str] = []

    class Listener(ScriptedConntrack):
        def read(self) -> list[FlowsEnded | FlowTableResync]:
            calls.append("read")
            return super().read()

        def sweep(self) -> FlowTableResync:
            calls.append("sweep")
            return super().sweep()

    d = balancer_daemon(config(), FakeProvider(["fab0"]))
    d.conntrack = listener = Listener()
    d.sweep()
    listener.close()
    assert calls == ["read", "sweep"] and d.core.counters["conntrack_sweeps"] == 1
    assert loop.SWEEP - 1 < d.next_sweep - time.monotonic() <= loop.SWEEP
