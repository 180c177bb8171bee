"""Issue 15: the cheaper handling of conntrack's new-flow events. The listener's decoding
(`conntrack.event_flow`, layouts learned per message length) tells exactly what `is_tagged` and
`parse_flow` tell, and the core's batch adoption (`Balancer._adopt_started`) leaves exactly the
state that `_adopt` of each flow leaves."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from scapy.layers.inet import IP, UDP

from orchestrator.capture import conntrack as ct
from orchestrator.core.events import FlowKey, FlowsEnded, FlowsStarted
from orchestrator.core.sessions import State
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import nla
from tests.unit.conftest import VIP, Node, conntrack_reading, syn

TAG = ct.CT_TAG | 7
NEW, DELETE = c.IPCTNL_MSG_CT_NEW, c.IPCTNL_MSG_CT_DELETE


def body_of(message: bytes) -> tuple[int, int]:
    """(start, end) of the message's body (nfgenmsg onwards) in `message`."""
    length = struct.unpack_from("=I", message)[0]
    return 16, length


def reference(message: bytes, tagged: bool) -> FlowKey | None:
    """What the listener decoded before: `is_tagged` (new flows), then `parse_flow`."""
    start, end = body_of(message)
    body = memoryview(message)[start:end]
    if tagged and not ct.is_tagged(body):
        return None
    return ct.parse_flow(body)


def outcome(decode: Callable[..., FlowKey | None], *args: object) -> FlowKey | None | type[Exception]:
    try:
        return decode(*args)
    except Exception as exc:
        return type(exc)


def messages() -> list[tuple[bytes, bool]]:
    """Events in the kernel's layouts, tagged and not, and some that are laid out otherwise."""
    flows = [
        FlowKey(6, "10.0.1.10", VIP, 40001, 80),
        FlowKey(17, "10.0.1.11", VIP, 5354, 53),
        FlowKey(17, "192.168.200.254", "10.0.0.101", 65535, 1),
        FlowKey(6, "fd00:1::10", "fd00:100::100", 40001, 80),
        FlowKey(1, "10.0.1.12", VIP, None, None),  # no ports: another tuple layout
    ]
    out: list[tuple[bytes, bool]] = []
    for n, flow in enumerate(flows):
        for kind in (NEW, DELETE):
            for mark in (TAG, 0x5, None):
                out.append((ct.event_message(kind, flow, mark, n), kind == NEW))
    ip = nla.nest(
        ct.CTA_TUPLE_IP,
        nla.attr(c.CTA_IP_V4_SRC, socket.inet_aton("10.0.1.13")),
        nla.attr(c.CTA_IP_V4_DST, socket.inet_aton(VIP)),
    )
    l4 = nla.nest(
        ct.CTA_TUPLE_PROTO,
        nla.u8(c.CTA_PROTO_NUM, 17),
        nla.attr(c.CTA_PROTO_SRC_PORT, struct.pack("!H", 7)),
        nla.attr(c.CTA_PROTO_DST_PORT, struct.pack("!H", 53)),
    )
    mark = nla.attr(ct.CTA_MARK, struct.pack("!I", TAG))
    nfgen = struct.pack("!BBH", socket.AF_INET, 0, 0)
    orig = nla.nest(ct.CTA_TUPLE_ORIG, ip, l4)
    plain = nla.attr(ct.CTA_TUPLE_ORIG, ip + l4)  # the tuple without NLA_F_NESTED
    swapped = nla.nest(ct.CTA_TUPLE_ORIG, nla.nest(ct.CTA_TUPLE_PROTO, l4[4:]), nla.nest(ct.CTA_TUPLE_IP, ip[4:]))
    other = nla.attr(3, struct.pack("!I", 0x188))  # CTA_STATUS
    for body in (
        nfgen + orig + mark,
        nfgen + mark + orig,  # the same length as the one before, laid out otherwise
        nfgen + plain + mark,
        nfgen + swapped + mark,
        nfgen + orig + other,  # no mark
        nfgen + other + mark,  # no tuple
        nfgen + orig + mark[:4],  # a truncated mark
    ):
        for kind in (NEW, DELETE):
            out.append((nla.message(c.NFNL_SUBSYS_CTNETLINK << 8 | kind, 0, 0, body), kind == NEW))
    return out


def test_event_flow_tells_what_is_tagged_and_parse_flow_tell_for_every_layout() -> None:
    cases = messages()
    for _ in range(2):  # the first pass learns the layouts, the second reads by them
        for message, tagged in cases:
            start, end = body_of(message)
            fast = outcome(ct.event_flow, message, start, end, tagged)
            assert fast == outcome(reference, message, tagged), message.hex()
    decoded = [outcome(ct.event_flow, m, *body_of(m), t) for m, t in cases]
    assert struct.error in decoded  # a truncated mark fails as it failed before (a sweep follows)
    assert FlowKey(6, "10.0.1.10", VIP, 40001, 80) in decoded and FlowKey(17, "10.0.1.13", VIP, 7, 53) in decoded
    assert ct._LAYOUTS and any(layout is not None for layout in ct._LAYOUTS.values())


def test_a_message_of_a_learned_length_but_other_headers_is_parsed_in_full() -> None:
    flow = FlowKey(17, "10.0.1.11", VIP, 5354, 53)
    known = ct.event_message(NEW, flow, TAG)
    assert ct.event_flow(known, *body_of(known), True) == flow
    # the same length, the mark's type changed into another attribute's: not tagged any more
    mark_at = known.rindex(struct.pack("=HH", 8, ct.CTA_MARK))
    changed = known[:mark_at] + struct.pack("=HH", 8, 9) + known[mark_at + 4 :]
    assert ct.event_flow(changed, *body_of(changed), True) is None
    assert ct.event_flow(changed, *body_of(changed), False) == flow == reference(changed, False)


def test_the_listener_reads_kernel_events_into_runs_in_order() -> None:
    a, b = FlowKey(17, "10.0.1.11", VIP, 5354, 53), FlowKey(6, "fd00:1::10", "fd00:100::100", 40001, 80)
    stranger = FlowKey(17, "10.0.1.99", VIP, 5354, 53)

    listener = conntrack_reading(
        [
            ct.event_message(NEW, a, TAG),
            ct.event_message(NEW, stranger, 0x5) + ct.event_message(NEW, b, TAG),  # two in one datagram
            ct.event_message(DELETE, a, TAG),
            ct.event_message(DELETE, stranger, None),
            ct.event_message(NEW, a, TAG),
        ]
    )
    assert listener.read() == [FlowsStarted((a, b)), FlowsEnded((a, stranger)), FlowsStarted((a,))]


def node_with_sessions() -> Node:
    """Sessions of http (tcp, client-ip), dns (udp, client-ip) and one draining."""
    node = Node()
    node.packets(*(syn(f"10.0.1.{i}") for i in range(10, 14)))
    node.packets(bytes(IP(src="10.0.1.20", dst=VIP) / UDP(sport=5000, dport=53)))
    node.core.on_flow_events([FlowsEnded((FlowKey(6, "10.0.1.13", VIP, 40000, 80),))], node.now)
    return node


def started_flows() -> list[FlowKey]:
    return [
        FlowKey(6, "10.0.1.10", VIP, 40000, 80),  # known: the daemon saw it start
        FlowKey(6, "10.0.1.10", VIP, 40001, 80),
        FlowKey(6, "10.0.1.10", VIP, 40002, 80),
        FlowKey(6, "10.0.1.11", VIP, 40001, 80),
        FlowKey(6, "10.0.1.11", VIP, 40001, 80),  # twice in one batch
        FlowKey(6, "10.0.1.13", VIP, 40001, 80),  # of the draining session
        FlowKey(17, "10.0.1.20", VIP, 5001, 53),
        FlowKey(17, "10.0.1.10", VIP, 5001, 53),  # a client with no dns session
        FlowKey(6, "10.0.1.99", VIP, 40001, 80),  # no session
        FlowKey(6, "10.0.1.12", VIP, 40001, 8080),  # no service
        FlowKey(6, "10.0.1.12", "10.0.0.200", 40001, 80),  # no service
    ]


def state(node: Node) -> tuple[object, ...]:
    rows = sorted(
        (s.id, s.state, s.flows, s.flows_total, s.last_seen, s.ends_at, s.owner, tuple(s.clients))
        for s in node.core.table
    )
    return tuple(rows), sorted(node.core.table.flows(), key=repr), dict(node.core.counters)


def test_the_batch_adoption_leaves_the_state_that_adopting_each_flow_leaves() -> None:
    fast, slow = node_with_sessions(), node_with_sessions()
    assert state(fast) == state(slow)
    assert any(s.state == State.DRAINING for s in fast.core.table)
    for node in (fast, slow):
        node.now += 5
    fast.core.on_flow_events([FlowsStarted(tuple(started_flows()))], fast.now)
    for flow in started_flows():
        slow.core._adopt(flow, slow.now)
    assert state(fast) == state(slow)
    assert fast.core.counters["flows_fast_path"] == 5
    assert all(s.state == State.SERVING for s in fast.core.table)


def test_the_batch_adoption_notes_its_flows_for_a_sweep_under_way() -> None:
    fast, slow = node_with_sessions(), node_with_sessions()
    for node in (fast, slow):
        node.core.sweep_begins()
    fast.core.on_flow_events([FlowsStarted(tuple(started_flows()))], fast.now)
    for flow in started_flows():
        slow.core._adopt(flow, slow.now)
    assert fast.core._sweep_changed == slow.core._sweep_changed
    assert fast.core._sweep_changed is not None and len(fast.core._sweep_changed) == 5
    assert state(fast) == state(slow)
