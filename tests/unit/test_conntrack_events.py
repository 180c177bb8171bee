"""A ctnetlink destroy message, encoded as the kernel sends it, ends the core's flow."""

from __future__ import annotations

import socket
import struct

from orchestrator.capture import conntrack as ct
from orchestrator.core.events import FlowKey, FlowsEnded
from orchestrator.dataplane.netlink import nla


def destroy_body(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    ip = nla.nest(ct.CTA_TUPLE_IP, nla.attr(ct.CTA_IP_V4_SRC, socket.inet_pton(socket.AF_INET, src)),
                  nla.attr(ct.CTA_IP_V4_DST, socket.inet_pton(socket.AF_INET, dst)))
    l4 = nla.nest(ct.CTA_TUPLE_PROTO, nla.u8(ct.CTA_PROTO_NUM, proto),
                  nla.attr(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
                  nla.attr(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return struct.pack("!BBH", socket.AF_INET, 0, 0) + nla.nest(ct.CTA_TUPLE_ORIG, ip, l4)


def test_destroy_message_parses_into_the_cores_flow_key() -> None:
    flow = ct.parse_flow(memoryview(destroy_body("10.0.1.12", "10.0.0.100", 17, 40000, 53)))
    assert flow == FlowKey(17, "10.0.1.12", "10.0.0.100", 40000, 53)
    assert isinstance(FlowsEnded((flow,)), FlowsEnded)


def test_a_parsed_destroy_ends_a_session_in_the_core() -> None:
    from tests.unit.test_balancer_core import Node
    from scapy.layers.inet import IP, UDP

    node = Node()
    node.packets(bytes(IP(src="10.0.1.12", dst="10.0.0.100") / UDP(sport=40000, dport=53)))
    flow = ct.parse_flow(memoryview(destroy_body("10.0.1.12", "10.0.0.100", 17, 40000, 53)))
    node.core.on_flow_events([FlowsEnded((flow,))], node.now)
    node.advance(31)
    assert len(node.core.table) == 0
