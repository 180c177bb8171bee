"""Embryonic sessions and the global new-session rate limit (issue 13, item 2): a TCP session
whose client sent nothing past its first packet (a spoofed SYN) ends `sessions.embryonic_timeout`
after it started, objects deleted and pair held down as for any session end; one whose client
went on (the handshake's ACK, a second flow) is kept. The balancer's conntrack never sees an
answer (S2C labels bypass netfilter), so the packets through the session's C2S filters tell.
Over the fake provider (its forward_ip counts them, as tc's action statistics do)."""

from __future__ import annotations

import struct
import time

import pytest
from scapy.layers.inet import IP, UDP

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.config import ConfigError, parse_config
from orchestrator.config.examples import example
from orchestrator.core.events import Action, FlowKey, FlowsStarted, FlowTableResync
from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import decode, encode, nla
from orchestrator.dataplane.netlink.constants import (
    RTM_DELTFILTER,
    RTM_GETTFILTER,
    TCA_ACT_KIND,
    TCA_ACT_STATS,
    TCA_FLOWER_ACT,
    TCA_KIND,
    TCA_OPTIONS,
    TCA_STATS_BASIC,
)
from orchestrator.dataplane.records import hold_marker
from tests.unit.conftest import VIP, Node, ScriptedQueue, balancer_daemon, config, syn

EMBRYONIC = {"sessions.embryonic_timeout": "2s", "labels.hold_down": "1s"}


def _packets_out(node: Node, client: str, n: int, dport: int = 80, proto: str = "tcp") -> None:
    """`n` packets of the client's session leave through the fabric (and its C2S filter)."""
    for _ in range(n):
        assert node.kernel.forward_ip(client, VIP, proto=proto, sport=40000, dport=dport, out_dev="fab0")


def test_a_spoofed_syn_session_ends_at_its_embryonic_timeout_and_its_pair_is_held_down() -> None:
    node = Node(config(EMBRYONIC))
    node.packets(syn("10.0.1.50"))
    _packets_out(node, "10.0.1.50", 1)  # the SYN itself, past its new filter; nothing after it
    [session] = node.core.sessions()
    assert session.view()["embryonic"] is True
    node.advance(1.9)
    assert node.check_embryonic() == [] and len(node.core.table) == 1
    node.advance(0.1)
    assert node.check_embryonic() == [session.id]
    assert len(node.core.table) == 0
    assert node.core.counters["ended:embryonic timeout"] == 1
    # Gone as any ended session: filters and fast-path elements deleted, the S2C route replaced
    # by the pair's hold marker until the hold-down ends, then the pair is free again.
    assert node.labels_of("10.0.1.50") == ()
    assert node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0")), ops.Installed(hold_marker(session.s2c))]
    assert node.kernel.dump_elements() == []
    assert node.core.labels.stats(node.now).held_down == 1
    node.advance(1.0)
    assert node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0"))]
    assert node.core.labels.stats(node.now).in_use == 0 and node.core.labels.stats(node.now).held_down == 0


def test_a_label_aware_clients_session_is_never_embryonic() -> None:
    """Its later packets come under the C2S label route, past no C2S filter: a count of one
    would end a live session. Label-aware clients are trusted edges."""
    node = Node(config({**EMBRYONIC, "clients.label_aware": ["10.0.1.52"]}))
    node.packets(syn("10.0.1.52"), syn("10.0.1.53"))
    _packets_out(node, "10.0.1.52", 1)
    _packets_out(node, "10.0.1.53", 1)
    aware, plain = sorted(node.core.sessions(), key=lambda s: s.clients[0])
    assert aware.view()["embryonic"] is False and plain.view()["embryonic"] is True
    node.advance(2.0)
    assert node.check_embryonic() == [plain.id]
    assert node.core.sessions() == [aware]


def test_a_session_whose_client_went_on_is_answered_and_kept() -> None:
    node = Node(config(EMBRYONIC))
    node.packets(syn("10.0.1.51"))
    _packets_out(node, "10.0.1.51", 2)  # the SYN, then the handshake's ACK
    node.advance(2.0)
    assert node.check_embryonic() == []
    [session] = node.core.sessions()
    assert session.view()["embryonic"] is False
    assert node.core.counters["embryonic_answered"] == 1
    node.advance(60.0)  # never checked again
    assert node.check_embryonic() == [] and node.core.sessions() == [session]
    assert node.labels_of("10.0.1.51")[-1] == session.c2s


@pytest.mark.parametrize("told", ["new-flow event", "resync"])
def test_a_later_fast_path_flow_answers_the_session_without_asking_the_kernel(told: str) -> None:
    """Its first packet went through the session's filter, so the count would be two or more:
    answered at once, and no filter count is ever asked for it. Its own first flow's event
    (the daemon saw that packet) answers nothing. Through `_adopt_started`'s inlined case
    (a new-flow event) and `_adopt` (a resync that finds the flow live)."""
    node = Node(config(EMBRYONIC))
    node.packets(syn("10.0.1.54"), syn("10.0.1.55"))
    _packets_out(node, "10.0.1.54", 1)
    first = FlowKey(6, "10.0.1.54", VIP, 40000, 80)
    node.core.on_flow_events([FlowsStarted((first,))], node.now)
    [answered, spoofed] = sorted(node.core.sessions(), key=lambda s: s.clients[0])
    assert answered.view()["embryonic"] is True, "its own first flow says nothing new"
    later = FlowKey(6, "10.0.1.54", VIP, 40001, 80)
    assert node.kernel.forward_ip("10.0.1.54", VIP, proto="tcp", sport=40001, dport=80, out_dev="fab0")
    events = [FlowsStarted((later,))] if told == "new-flow event" else [FlowTableResync(frozenset({first, later}))]
    node.core.on_flow_events(events, node.now)
    assert answered.view()["embryonic"] is False and spoofed.view()["embryonic"] is True
    assert node.core.counters["embryonic_answered"] == 1
    node.advance(2.0)
    assert list(node.core.embryonic_due(node.now)) == [spoofed.id], "no count asked for the answered one"
    assert node.core.sessions() == [answered, spoofed]


def test_a_count_the_kernel_cannot_give_keeps_the_session() -> None:
    node = Node(config(EMBRYONIC))
    node.packets(syn("10.0.1.52"))
    [session] = node.core.sessions()
    flt = next(o for o in session.objects if isinstance(o, ops.FlowerFilter))
    assert all(r.ok for r in node.kernel.apply([ops.Delete(flt)]))  # an operator deleted it
    node.advance(2.0)
    assert node.check_embryonic() == []
    assert node.core.sessions() == [session] and node.core.counters["embryonic_unchecked"] == 1


def test_udp_sessions_and_a_null_timeout_are_never_embryonic() -> None:
    node = Node(config(EMBRYONIC))
    node.packets(bytes(IP(src="10.0.1.53", dst=VIP) / UDP(sport=5000, dport=53) / b"q"))
    off = Node(config({"sessions.embryonic_timeout": None}))
    off.packets(syn("10.0.1.54"))
    for n in (node, off):
        [session] = n.core.sessions()
        assert session.view()["embryonic"] is False
        n.advance(3600.0)
        assert n.core.embryonic_due(n.now) == {} and n.core.sessions() == [session]


def test_a_flood_of_spoofed_syns_gives_the_label_pool_back_within_seconds() -> None:
    """Without embryonic sessions the flood's sessions would hold the pool until conntrack ends
    their flows (120 s for an unanswered SYN): the legitimate client would be refused."""
    node = Node(
        config(
            {
                **EMBRYONIC,
                "labels.range": [1001, 1040],  # 20 pairs
                **{f"services.{s}.admission.min_free_labels": 0 for s in ("http", "dns", "mobile")},
            }
        )
    )
    spoofed = [f"10.0.{2 + i // 250}.{1 + i % 250}" for i in range(20)]
    node.packets(*(syn(src) for src in spoofed))
    for src in spoofed:
        _packets_out(node, src, 1)
    assert node.core.labels.stats(node.now).free == 0
    [refused] = node.packets(syn("10.0.1.99")).verdicts
    assert refused.action == Action.REFUSE and refused.reason == "labels-exhausted"
    node.advance(2.0)
    assert len(node.check_embryonic()) == 20 and len(node.core.table) == 0
    node.advance(1.0)  # the hold-down
    assert node.core.labels.stats(node.now).free == 20
    [served] = node.packets(syn("10.0.1.99")).verdicts
    assert served.action == Action.ACCEPT
    assert node.core.counters["ended:embryonic timeout"] == 20


def test_the_daemon_ends_embryonic_sessions_on_its_tick() -> None:
    cfg = config({"sessions.embryonic_timeout": "50ms"})
    node = Node(cfg)  # for its fake kernel's routes and qdisc
    queue = ScriptedQueue()
    daemon = balancer_daemon(cfg, node.kernel, queue)
    queue.script(QueuedPacket(0, 1, syn("10.0.1.60"), 0, None, 0))
    daemon.on_packets()
    assert len(daemon.core.table) == 1 and daemon.status_details(time.monotonic())["sessions_embryonic"] == 1
    time.sleep(0.06)
    daemon.tick()
    assert len(daemon.core.table) == 0
    assert daemon.core.counters["ended:embryonic timeout"] == 1
    assert daemon.status_details(time.monotonic())["sessions_embryonic"] == 0


def test_configuration_keys() -> None:
    cfg = config({"nfqueue.global_rate_limit": {"rate": "600/minute", "burst": 20}})
    assert cfg.nfqueue.global_rate_limit is not None and cfg.nfqueue.global_rate_limit.per_second == 10.0
    assert cfg.sessions.embryonic_timeout == 30.0  # the default
    assert config().nfqueue.global_rate_limit is None  # off unless configured
    shown = cfg.to_dict()
    assert shown["nfqueue"]["global_rate_limit"] == {"rate": "600/minute", "burst": 20}
    assert shown["sessions"] == {"embryonic_timeout": 30.0}
    for bad, message in (
        ({"sessions.embryonic_timeout": "0s"}, "sessions.embryonic_timeout: must be > 0"),
        ({"nfqueue.global_rate_limit": {"rate": "5/hour"}}, "nfqueue.global_rate_limit.rate"),
        ({"sessions.idle": 3}, "sessions.idle"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(example("balancer", bad), "x.yaml")


def test_the_ruleset_cuts_floods_globally_before_the_queue() -> None:
    ruleset = nftables.render(config({"nfqueue.global_rate_limit": {"rate": "50/second", "burst": 50}}))
    assert "limit new_sessions {\n\t\trate over 50/second burst 50 packets" in ruleset
    assert "counter global_rate_limited {}" in ruleset and "counter global_rate_retried {}" in ruleset
    rules = [line.strip() for line in ruleset.splitlines() if "ip daddr 10.0.0.100 tcp dport { 80 }" in line]
    kinds = ["fastpath_http", "rate_limited", '"retried_sessions"', "global_rate_retried", '"new_sessions"', "queue"]
    # In this order: the fast path, the per-source limit, the retries' budget, the global one, the queue.
    assert [next(i for i, r in enumerate(rules) if k in r) for k in kinds] == list(range(len(kinds))), rules
    assert "update @retry4 { ip saddr }" in ruleset
    off = nftables.render(config())
    assert "new_sessions" not in off and "counter global_rate_limited {}" in off  # the counter always exists


def test_filter_counts_are_read_from_the_first_action_s_statistics() -> None:
    flt = ops.FlowerFilter("fab0", 0x10001, ops.FlowerMatch(src="10.0.1.5/32", dst=f"{VIP}/32", ip_proto="tcp"), ())
    kind, _flags, body = encode.filter_get(flt, lambda dev: 3)
    assert kind == RTM_GETTFILTER and body == encode.encode(ops.Delete(flt), lambda dev: 3)[2]
    assert encode.encode(ops.Delete(flt), lambda dev: 3)[0] == RTM_DELTFILTER

    def action(packets: int) -> bytes:
        stats = nla.attr(TCA_STATS_BASIC, struct.pack("=QI4x", 100 * packets, packets))
        return nla.asciiz(TCA_ACT_KIND, "mpls") + nla.nest(TCA_ACT_STATS, stats)

    acts = nla.nest(2, action(5)) + nla.nest(1, action(7))  # order 1 is the first, whatever comes first
    reply = bytearray(body[: nla.TCMSG.size]) + nla.asciiz(TCA_KIND, "flower")
    reply += nla.nest(TCA_OPTIONS, nla.nest(TCA_FLOWER_ACT, acts))
    assert decode.filter_packets(memoryview(bytes(reply))) == 7
    bare = bytes(body[: nla.TCMSG.size]) + nla.asciiz(TCA_KIND, "flower")
    assert decode.filter_packets(memoryview(bare)) is None
