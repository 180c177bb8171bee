"""S2C label routes towards the client's next hop: the core pops (or, for label-aware clients,
swaps) towards the gateway of an off-link client and the client itself on-link, drops the first
packet of a client it has no route to; the `clients.label_aware` key; the netlink provider's
batched route lookup (RTM_GETROUTE, one sendmsg, answers matched by sequence); the daemon's
glue (one lookup per batch)."""

from __future__ import annotations

import json
import random
import socket
import struct
from collections import deque
from collections.abc import Mapping
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt

from orchestrator.analyze.packet import source_address
from orchestrator.capture.nfqueue import NF_ACCEPT, NF_DROP, QueuedPacket
from orchestrator.config import ConfigError, load_balancer_config, parse_config
from orchestrator.config.examples import DELETE, KeyPath, example
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import Action, FlowTableResync
from orchestrator.core.health import HealthEvent, HealthState, HealthView
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import decode, encode, nla, nlsocket
from orchestrator.dataplane.netlink.provider import NetlinkProvider
from tests.unit.conftest import BALANCER_EXAMPLE, EXAMPLE, TRANSPORT, Node, ScriptedQueue, balancer_daemon, config, syn

GATEWAY = "10.0.1.10"  # a client-side router on lan1
FAR = "10.0.9.1"  # a client behind it
AWARE = {"clients.label_aware": ["10.0.9.0/24", "10.0.1.11"]}


def s2c_route(node: Node, client: str) -> ops.MplsRoute:
    session = next(s for s in node.core.table if client in s.clients)
    route = node.kernel.mpls_lookup(session.s2c)
    assert route is not None and route in session.objects
    return route


def far_node(changes: Mapping[KeyPath, Any] | None = None) -> Node:
    node = Node(config(changes))
    node.kernel.add_ip_route("10.0.9.0/24", "lan1", via=GATEWAY)
    return node


# ---- the core ------------------------------------------------------------------------------------


def test_an_off_link_client_is_answered_through_the_gateway_on_the_routes_device() -> None:
    node = far_node()
    commit = node.packets(syn(FAR))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT]
    [session] = list(node.core.table)
    assert s2c_route(node, FAR) == ops.MplsRoute(session.s2c, "lan1", via=GATEWAY)
    back = node.kernel.receive_mpls([session.s2c])  # popped, to the gateway, out of lan1
    assert back is not None and (back.labels, back.via, back.dev) == ((), GATEWAY, "lan1")
    assert node.labels_of(FAR) == (TRANSPORT[session.server], session.c2s)


def test_an_on_link_client_is_answered_directly_on_the_routes_device() -> None:
    node = Node()
    node.kernel.add_ip_route("10.0.7.0/24", "lan1")  # on-link on lan1, whatever the packet's indev
    node.packets(syn("10.0.1.12"), syn("10.0.7.5"))
    assert s2c_route(node, "10.0.1.12").via == "10.0.1.12" and s2c_route(node, "10.0.1.12").dev == "lan0"
    route = s2c_route(node, "10.0.7.5")
    assert (route.dev, route.via, route.out_labels) == ("lan1", "10.0.7.5", ())
    # One lookup per batch, for all of its clients.
    assert node.kernel.route_queries == [("10.0.1.12", "10.0.7.5")]


def test_label_aware_clients_get_the_s2c_label_swapped_not_popped() -> None:
    node = far_node(AWARE)
    node.packets(syn(FAR), syn("10.0.1.11"), syn("10.0.1.12"))
    for client, via, dev in ((FAR, GATEWAY, "lan1"), ("10.0.1.11", "10.0.1.11", "lan0")):
        route = s2c_route(node, client)
        assert route.out_labels == (route.label,), route
        back = node.kernel.receive_mpls([route.label])  # leaves with the S2C label still on
        assert back is not None and (back.labels, back.via, back.dev) == ((route.label,), via, dev)
    plain = s2c_route(node, "10.0.1.12")  # not in a label-aware prefix: popped
    assert plain.out_labels == () and node.kernel.receive_mpls([plain.label]).labels == ()


def test_a_label_aware_clients_session_gets_a_c2s_label_route_into_the_fabric() -> None:
    node = far_node(AWARE)
    node.packets(syn("10.0.1.11"), syn("10.0.1.12"))
    aware = next(s for s in node.core.table if s.key.value == "10.0.1.11")
    plain = next(s for s in node.core.table if s.key.value == "10.0.1.12")
    # The client agent's [C2S] leaves into the fabric as the filter's packets do: [transport, C2S].
    fwd = node.kernel.receive_mpls([aware.c2s])
    assert fwd is not None and (fwd.labels, fwd.via, fwd.dev) == (
        (TRANSPORT[aware.server], aware.c2s),
        "10.255.0.2",
        "fab0",
    )
    assert node.labels_of("10.0.1.11") == (TRANSPORT[aware.server], aware.c2s)  # the first packet, by filter
    assert node.kernel.receive_mpls([plain.c2s]) is None  # a plain client's label routes nothing
    # The route goes with the session: a label no live session has goes nowhere.
    node.core.on_flow_events([FlowTableResync(frozenset(), sweep=True)], node.now)
    node.advance(3601)
    assert not node.core.table and node.kernel.receive_mpls([aware.c2s]) is None


def test_a_reassigned_label_aware_session_moves_its_c2s_route_to_the_new_pair_and_server() -> None:
    node = Node(config(AWARE))
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"))
    moved = next(s for s in node.core.table if s.key.value == "10.0.1.11")
    old_c2s = moved.c2s
    event = HealthEvent("web", moved.server, HealthState.UP, HealthState.DOWN, "refused", None, node.now)
    states = {"s1": HealthState.UP, "s2": HealthState.UP, "s3": HealthState.UP, moved.server: HealthState.DOWN}
    plan = node.core.on_health(HealthView(tuple(("web", s, st, None) for s, st in states.items())), [event], node.now)
    assert all(r.ok for r in node.kernel.apply(plan.ops))
    session = next(s for s in node.core.table if s.key.value == "10.0.1.11")
    assert session.c2s != old_c2s
    fwd = node.kernel.receive_mpls([session.c2s])
    assert fwd is not None and fwd.labels == (TRANSPORT[session.server], session.c2s)
    assert node.kernel.receive_mpls([old_c2s]) is None


def test_a_client_without_a_route_is_dropped_and_counted_and_nothing_is_installed() -> None:
    node = Node()
    free = node.core.labels.stats(node.now).free
    before = node.kernel.dump()
    commit = node.packets(syn("192.0.2.7"), syn("10.0.1.10"))
    assert [v.action for v in commit.verdicts] == [Action.DROP, Action.ACCEPT]
    assert commit.verdicts[0].reason == "no route to client 192.0.2.7"
    assert node.core.counters["no_route"] == 1 and node.core.counters.get("sessions_started") == 1
    assert [s.key.value for s in node.core.table] == ["10.0.1.10"]
    assert node.core.labels.stats(node.now).free == free - 1  # only the served client's pair
    # The served client's filter, S2C route and fast-path element; nothing for the other.
    assert node.labels_of("192.0.2.7") == () and len(node.kernel.dump()) == len(before) + 2
    assert len(node.kernel.dump_elements()) == 1


def test_a_mobile_client_moving_to_an_unroutable_care_of_address_keeps_its_old_return_path() -> None:
    v6 = config({"services.http.vip": "2001:db8::100", "services.http.session_key": "mip6-home-address"})
    node = Node(v6)

    def mip6_syn(coa: str, sport: int) -> bytes:
        return bytes(
            IPv6(src=coa, dst="2001:db8::100")
            / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8:aa::1")])
            / TCP(sport=sport, dport=80, flags="S")
        )

    node.packets(mip6_syn("2001:db8:1::10", 1))
    commit = node.packets(mip6_syn("3fff::20", 2))  # no route to 3fff::/20
    assert [v.action for v in commit.verdicts] == [Action.DROP]
    [session] = list(node.core.table)
    assert session.clients == ["2001:db8:1::10"] and len(session.flows) == 1
    assert node.kernel.receive_mpls([session.s2c]).via == "2001:db8:1::10"


def test_a_restart_restores_both_route_forms_as_the_sessions_s2c_route() -> None:
    node = far_node(AWARE)
    node.packets(syn(FAR), syn("10.0.1.12"))
    fresh = Balancer(config(AWARE), node.now)
    assert fresh.restore(node.kernel.dump(), frozenset(), node.now) == []
    assert fresh.fast_path_sync(node.kernel.dump_elements()) == []  # as the daemon does: the elements are there
    for client, labels in ((FAR, 1), ("10.0.1.12", 0)):
        session = next(s for s in fresh.table if s.key.value == client)
        [route] = [o for o in session.objects if isinstance(o, ops.MplsRoute) and o.label == session.s2c]
        assert len(route.out_labels) == labels
        # A label-aware client's session also has its C2S label route back: [C2S] -> [transport, C2S].
        c2s = [o for o in session.objects if isinstance(o, ops.MplsRoute) and o.label == session.c2s]
        assert c2s == ([fresh.c2s_route(session)] if labels else [])
    # Their end deletes them: nothing of ours is left.
    node.core = fresh
    node.advance(31)
    node.advance(2)  # and the hold-down of their pairs, whose markers go with it
    assert node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0"))]


# ---- configuration ---------------------------------------------------------------------------------


def test_label_aware_prefixes_parse_and_show_round_trips() -> None:
    cfg = parse_config(example("balancer", {"clients.label_aware": ["10.0.9.0/24", "10.0.1.11", "fd00:1::/64"]}))
    assert [str(n) for n in cfg.clients.label_aware] == ["10.0.9.0/24", "10.0.1.11/32", "fd00:1::/64"]
    assert cfg.clients.is_label_aware("10.0.9.200") and cfg.clients.is_label_aware("fd00:1::5")
    assert not cfg.clients.is_label_aware("10.0.1.12") and not cfg.clients.is_label_aware("fd00:2::5")
    assert parse_config(json.dumps(cfg.to_dict())) == cfg
    assert parse_config(EXAMPLE).clients.label_aware == ()
    without = example("balancer", {"clients": DELETE})
    assert "label_aware" not in without
    assert parse_config(without).clients.label_aware == ()  # the section is optional


@pytest.mark.parametrize(
    "value, message",
    [
        ("[10.0.9.1/24]", "'10.0.9.1/24' has host bits set; did you mean 10.0.9.0/24?"),
        ("[lan0]", "'lan0' is not an IP prefix (ADDRESS/LENGTH)"),
        ("[10.0.9.0/33]", "'10.0.9.0/33' is not an IP prefix"),
        ("[10.0.9.0/24, 10.0.9.0/24]", "prefix 10.0.9.0/24 is listed twice"),
        ("10.0.9.0/24", "expected a list"),
        ("[[10.0.9.0/24]]", "expected an IP prefix, got a list"),
    ],
)
def test_bad_label_aware_prefixes_are_named_with_their_line(value: str, message: str) -> None:
    text = EXAMPLE.replace("label_aware: []", f"label_aware: {value}")  # text: the error's line is checked
    line = next(i + 1 for i, s in enumerate(text.splitlines()) if s.startswith("  label_aware: "))
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lb.yaml")
    e = info.value
    assert e.line == line and e.path.startswith("clients.label_aware") and message in e.message, str(e)
    assert str(e).startswith(f"lb.yaml:{line}: clients.label_aware")


def test_unknown_key_under_clients_suggests_the_known_one() -> None:
    text = example("balancer", {"clients.label_aware": DELETE, "clients.label_awre": []})
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lb.yaml")
    assert info.value.path == "clients.label_awre" and "did you mean 'label_aware'" in info.value.message


# ---- the netlink provider's route lookup -----------------------------------------------------------


class RouteKernel:
    """The kernel side of a route lookup: answers each RTM_GETROUTE with RTM_NEWROUTE (ifindex,
    gateway, type) or an error, in a shuffled order to prove matching by sequence number, with
    the ACK of the last request last."""

    def __init__(self, table: dict[str, tuple[int, str | None, int] | int]) -> None:
        self.table = table
        self.sends: list[list[tuple[int, int, int, bytes]]] = []
        self.replies: deque[bytes] = deque()

    def setsockopt(self, *args: object) -> None:
        pass

    def bind(self, *args: object) -> None:
        pass

    def settimeout(self, *args: object) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        sent = [(kind, flags, seq, bytes(body)) for kind, flags, seq, body in nla.messages(data)]
        self.sends.append(sent)
        answers, ack = [], []
        for kind, flags, seq, body in sent:
            family, dst_len = body[0], body[1]
            dst = socket.inet_ntop(
                socket.AF_INET6 if family == c.AF_INET6 else socket.AF_INET, bytes(nla.attrs(body, 12)[c.RTA_DST])
            )
            entry = self.table[dst]
            if isinstance(entry, int):
                answers.append(
                    nla.message(
                        c.NLMSG_ERROR,
                        0x100,
                        seq,
                        struct.pack("=i", -entry) + struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0),
                    )
                )
                continue
            oif, gateway, rtype = entry
            attrs = nla.attr(c.RTA_DST, bytes(nla.attrs(body, 12)[c.RTA_DST])) + nla.u32(c.RTA_OIF, oif)
            if gateway:
                attrs += nla.attr(
                    c.RTA_GATEWAY, socket.inet_pton(socket.AF_INET6 if ":" in gateway else socket.AF_INET, gateway)
                )
            reply = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, 254, 2, 0, rtype, 0) + attrs
            answers.append(nla.message(c.RTM_NEWROUTE, 0, seq, reply))
            if flags & c.NLM_F_ACK:
                ack.append(nla.message(c.NLMSG_ERROR, 0x100, seq, struct.pack("=i", 0) + bytes(16)))
        # The kernel handles the requests in order, so the last one's answer (and ACK) comes
        # last; the others are shuffled here to prove that they are matched by sequence.
        last = answers.pop()
        random.Random(7).shuffle(answers)
        stale = nla.message(c.RTM_NEWROUTE, 0, 424242, bytes(12))  # an earlier exchange's reply
        self.replies.extend([stale, b"".join(answers[:2]), *answers[2:], last, *ack])

    def recv_into(self, buf: bytearray) -> int:
        data = self.replies.popleft()
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def provider_with(kernel: RouteKernel) -> NetlinkProvider:
    return NetlinkProvider(sock=nlsocket.NetlinkSocket(sock=kernel), links={"lo": 1, "lan0": 2, "lan1": 3})


def test_route_lookups_go_in_one_sendmsg_and_answers_are_matched_by_sequence() -> None:
    kernel = RouteKernel(
        {
            "10.0.1.10": (2, None, c.RTN_UNICAST),  # on-link
            "10.0.9.1": (3, "10.0.1.10", c.RTN_UNICAST),  # behind a gateway
            "fd00:9::1": (3, "fe80::1", c.RTN_UNICAST),
            "192.0.2.1": 101,  # ENETUNREACH
            "10.0.1.1": (1, None, 2),  # RTN_LOCAL: our own address
            "10.0.9.2": (3, "10.0.1.10", c.RTN_UNICAST),
        }
    )
    asked = ["10.0.1.10", "10.0.9.1", "fd00:9::1", "192.0.2.1", "10.0.1.1", "10.0.9.1", "10.0.9.2", "nonsense"]
    hops = provider_with(kernel).routes_to(asked)
    assert hops == {
        "10.0.1.10": ops.NextHop("lan0"),
        "10.0.9.1": ops.NextHop("lan1", "10.0.1.10"),
        "fd00:9::1": ops.NextHop("lan1", "fe80::1"),
        "192.0.2.1": None,
        "10.0.1.1": None,
        "10.0.9.2": ops.NextHop("lan1", "10.0.1.10"),
        "nonsense": None,
    }
    [sent] = kernel.sends  # one sendmsg, each address once, an ACK asked of the last only
    assert [kind for kind, *_ in sent] == [c.RTM_GETROUTE] * 6
    assert [bool(flags & c.NLM_F_ACK) for _k, flags, _s, _b in sent] == [False] * 5 + [True]
    assert all(flags & c.NLM_F_REQUEST and not flags & c.NLM_F_DUMP for _k, flags, _s, _b in sent)
    assert len({seq for _k, _f, seq, _b in sent}) == 6


def test_the_last_lookup_failing_ends_the_exchange_too() -> None:
    kernel = RouteKernel({"10.0.1.10": (2, None, c.RTN_UNICAST), "192.0.2.1": 113})
    assert provider_with(kernel).routes_to(["10.0.1.10", "192.0.2.1"]) == {
        "10.0.1.10": ops.NextHop("lan0"),
        "192.0.2.1": None,
    }
    assert provider_with(RouteKernel({})).routes_to([]) == {}


def test_route_query_layout_passes_strict_checking() -> None:
    for address, family, plen, packed in (
        ("10.0.9.1", c.AF_INET, 32, bytes([10, 0, 9, 1])),
        ("fd00::1", c.AF_INET6, 128, socket.inet_pton(socket.AF_INET6, "fd00::1")),
    ):
        kind, flags, body = encode.route_query(address)
        assert (kind, flags) == (c.RTM_GETROUTE, c.NLM_F_REQUEST)
        # family, dst_len, then src_len, tos, table, protocol, scope, type, flags all zero
        assert struct.unpack_from("=BBBBBBBBI", body) == (family, plen, 0, 0, 0, 0, 0, 0, 0)
        assert {k: bytes(v) for k, v in nla.attrs(body, 12).items()} == {c.RTA_DST: packed}


def test_an_ipv4_route_via_an_ipv6_gateway_is_decoded() -> None:
    body = (
        struct.pack("=BBBBBBBBI", c.AF_INET, 32, 0, 0, 254, 2, 0, c.RTN_UNICAST, 0)
        + nla.u32(c.RTA_OIF, 3)
        + nla.attr(c.RTA_VIA, struct.pack("=H", c.AF_INET6) + socket.inet_pton(socket.AF_INET6, "fe80::9"))
    )
    assert decode.next_hop(body, {3: "lan1"}.__getitem__) == ops.NextHop("lan1", "fe80::9")


# ---- the fake provider ------------------------------------------------------------------------------


def test_the_fake_answers_lookups_by_longest_prefix() -> None:
    kernel = FakeProvider(["lan0", "lan1"])
    kernel.add_ip_route("10.0.0.0/8", "lan0")
    kernel.add_ip_route("10.0.9.0/24", "lan1", via="10.0.1.10")
    assert kernel.routes_to(["10.0.9.3", "10.0.1.3", "192.0.2.1", "bad"]) == {
        "10.0.9.3": ops.NextHop("lan1", "10.0.1.10"),
        "10.0.1.3": ops.NextHop("lan0"),
        "192.0.2.1": None,
        "bad": None,
    }
    with pytest.raises(ValueError):
        kernel.add_ip_route("10.1.0.0/16", "eth9")


def test_source_address_reads_the_fixed_header_as_the_analyzer_does() -> None:
    assert source_address(bytes(IP(src="10.0.9.1", dst="10.0.0.100") / TCP())) == "10.0.9.1"
    assert source_address(bytes(IPv6(src="fd00:1::0010", dst="fd00::1") / TCP())) == "fd00:1::10"
    assert source_address(b"\x45\x00") is None and source_address(b"") is None


# ---- the daemon's glue --------------------------------------------------------------------------------


def test_the_daemon_looks_up_a_batchs_clients_once_and_passes_the_next_hops() -> None:
    kernel = FakeProvider(["lan0", "lan1", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.1.0/24", "lan0")
    kernel.add_ip_route("10.0.9.0/24", "lan1", via=GATEWAY)
    queue = ScriptedQueue()
    daemon = balancer_daemon(load_balancer_config(BALANCER_EXAMPLE), kernel, queue)
    batch = [
        QueuedPacket(0, i, syn(src, sport=40000 + i), 2, None, 0)
        for i, src in enumerate([FAR, "10.0.1.12", "192.0.2.9", FAR])
    ]
    daemon.decide(batch)
    assert kernel.route_queries == [(FAR, "10.0.1.12", "192.0.2.9")]
    assert [v.verdict for v in queue.sent] == [NF_ACCEPT, NF_ACCEPT, NF_DROP, NF_ACCEPT]
    far = next(s for s in daemon.core.table if s.key.value == FAR)
    assert kernel.receive_mpls([far.s2c]) is not None and kernel.receive_mpls([far.s2c]).via == GATEWAY
    assert daemon.core.counters["no_route"] == 1
