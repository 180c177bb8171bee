"""The balancer's decision core, driven with real packets against the fake provider: what the
kernel would do with the operations it returns is checked by asking the fake where packets go."""

from __future__ import annotations

import collections

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt

from orchestrator.config.examples import DELETE
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import Action, FlowsEnded, FlowTableResync
from orchestrator.dataplane import ops
from orchestrator.dataplane.records import hold_marker
from tests.unit.conftest import TRANSPORT, VIP, Node, config, syn


def test_new_session_is_programmed_before_its_packet_is_accepted() -> None:
    node = Node()
    commit = node.packets(syn("10.0.1.10"))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT]
    [session] = list(node.core.table)
    assert session.server == "s1" and session.c2s % 2 == 1
    # C2S leaves on the fabric link with [server transport, C2S] ...
    assert node.labels_of("10.0.1.10") == (TRANSPORT["s1"], session.c2s)
    # ... and S2C = C2S + 1 is popped towards the client on its own link.
    back = node.kernel.receive_mpls([session.c2s + 1])
    assert back is not None and (back.labels, back.via, back.dev) == ((), "10.0.1.10", "lan0")
    # Other clients and other services are not matched by this session's filter.
    assert node.labels_of("10.0.1.11") == ()
    assert node.labels_of("10.0.1.10", dport=53, proto="udp") == ()


def test_round_robin_spreads_and_a_client_keeps_its_session() -> None:
    node = Node()
    commit = node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(6)))
    assert all(v.action == Action.ACCEPT for v in commit.verdicts)
    assert [s.server for s in node.core.table] == ["s1", "s2", "s3"] * 2
    pairs = [(s.c2s, s.s2c) for s in node.core.table]
    assert all(c % 2 == 1 and s == c + 1 for c, s in pairs) and len({c for c, _ in pairs}) == 6
    before = len(node.kernel.dump())
    again = node.packets(syn("10.0.1.10", sport=40001), syn("10.0.1.10", sport=40002))
    assert all(v.action == Action.ACCEPT for v in again.verdicts)
    assert len(node.core.table) == 6 and len(node.kernel.dump()) == before  # no new objects
    assert next(s for s in node.core.table if s.key.value == "10.0.1.10").flows.__len__() == 3


def test_two_first_packets_of_one_client_in_one_batch_open_one_session() -> None:
    node = Node()
    commit = node.packets(syn("10.0.1.10", sport=1), syn("10.0.1.10", sport=2))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT, Action.ACCEPT]
    assert len(node.core.table) == 1


def test_wrr_and_lc_follow_their_rules() -> None:
    node = Node(config({"services.http.scheduler": "wrr"}))
    node.packets(*(syn(f"10.0.{i // 200}.{i % 200 + 1}") for i in range(300)))
    counts = collections.Counter(s.server for s in node.core.table)
    assert counts == {"s1": 75, "s2": 75, "s3": 150}  # weights 1:1:2, exact over whole cycles
    lc = Node(config({"services.http.scheduler": "lc"}))
    lc.packets(syn("10.0.1.10"), syn("10.0.1.11"))
    first = next(s for s in lc.core.table if s.key.value == "10.0.1.10")
    lc.core.on_flow_events([FlowsEnded(tuple(first.flows))], lc.now)
    lc.advance(31)  # persistence 30 s: s1's session ends, so s1 has fewest sessions again
    lc.packets(syn("10.0.1.12"))
    assert next(s for s in lc.core.table if s.key.value == "10.0.1.12").server == "s1"


def test_session_ends_after_its_last_flow_and_the_persistence_timeout() -> None:
    node = Node()
    node.packets(syn("10.0.1.10", sport=1), syn("10.0.1.10", sport=2))
    [session] = list(node.core.table)
    flows = sorted(session.flows, key=lambda f: f.sport or 0)
    node.core.on_flow_events([FlowsEnded((flows[0],))], node.now)
    node.advance(100)
    assert len(node.core.table) == 1  # one flow still alive: no timer
    node.core.on_flow_events([FlowsEnded((flows[1],))], node.now)
    node.advance(29.9)
    assert len(node.core.table) == 1 and node.labels_of("10.0.1.10") != ()
    node.advance(0.2)
    assert len(node.core.table) == 0
    # Every object gone but the pair's hold marker, which says in the kernel that it is held down.
    assert node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0")), ops.Installed(hold_marker(session.s2c))]
    # The labels come back only after the hold-down (2 s), and the marker goes with it.
    stats = node.core.labels.stats(node.now)
    assert stats.held_down == 1 and node.core.labels.stats(node.now + 2).held_down == 0
    node.advance(2)
    assert node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0"))]


def test_a_new_flow_during_the_persistence_timeout_keeps_the_session() -> None:
    node = Node()
    node.packets(syn("10.0.1.10", sport=1))
    [session] = list(node.core.table)
    c2s = session.c2s
    node.core.on_flow_events([FlowsEnded(tuple(session.flows))], node.now)
    node.advance(10)
    node.packets(syn("10.0.1.10", sport=2))
    node.advance(60)
    assert [s.c2s for s in node.core.table] == [c2s]


def test_lost_conntrack_events_are_recovered_from_a_dump() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"))
    keep = next(s for s in node.core.table if s.key.value == "10.0.1.11")
    node.core.on_flow_events([FlowTableResync(frozenset(keep.flows))], node.now)
    node.advance(31)
    assert [s.key.value for s in node.core.table] == ["10.0.1.11"]


def test_admission_refuses_new_sessions_only() -> None:
    node = Node(config({"services.http.admission.max_sessions": 2}))
    commit = node.packets(syn("10.0.1.10"), syn("10.0.1.11"), syn("10.0.1.12"))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT, Action.ACCEPT, Action.REFUSE]
    assert commit.verdicts[2].refuse_with == "rst" and commit.verdicts[2].reason == "service-full"
    assert node.core.counters["refused:service-full"] == 1
    # An existing session's new flow is still served.
    assert node.packets(syn("10.0.1.10", sport=5)).verdicts[0].action == Action.ACCEPT


def test_label_pool_headroom_and_exhaustion() -> None:
    node = Node(
        config(
            {
                "labels.range": [1001, 1010],
                **{f"services.{s}.admission.min_free_labels": 4 for s in ("http", "dns", "mobile")},
            }
        )
    )
    commit = node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(5)))
    # 5 pairs: 1001..1010; sessions stop while 2 pairs (4 labels) would be left.
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT] * 3 + [Action.REFUSE] * 2
    assert node.core.counters["refused:label-headroom"] == 2


def test_an_empty_pool_is_counted_as_exhausted_not_as_headroom() -> None:
    node = Node(
        config(
            {
                "labels.range": [1001, 1006],
                **{f"services.{s}.admission.min_free_labels": 0 for s in ("http", "dns", "mobile")},
            }
        )
    )
    commit = node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(5)))
    # 3 pairs: 1001/1002, 1003/1004, 1005/1006; then the pool is empty.
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT] * 3 + [Action.REFUSE] * 2
    assert commit.verdicts[3].reason == "labels-exhausted"
    assert node.core.counters["refused:labels-exhausted"] == 2
    assert node.core.counters["refused:label-headroom"] == 0


def test_malformed_and_unknown_packets_are_dropped_and_counted() -> None:
    node = Node()
    commit = node.packets(b"\x45\x00", syn("10.0.1.10", dport=8080), syn("10.0.1.10")[:30])
    assert [v.action for v in commit.verdicts] == [Action.DROP] * 3
    assert node.core.counters["no_service"] == 1
    assert sum(v for k, v in node.core.counters.items() if k.startswith("malformed:")) == 2
    assert len(node.core.table) == 0


def test_failed_programming_drops_the_packet_and_leaves_nothing_behind() -> None:
    node = Node()
    node.kernel.apply([ops.Add(ops.MplsRoute(1002, "lan0", via="10.9.9.9"))])  # someone's label
    commit = node.packets(syn("10.0.1.10"), syn("10.0.1.11"))
    assert [v.action for v in commit.verdicts] == [Action.DROP, Action.ACCEPT]
    assert "mpls route 1002" in commit.verdicts[0].reason
    assert [s.key.value for s in node.core.table] == ["10.0.1.11"]
    assert node.labels_of("10.0.1.10") == ()  # its filter was rolled back
    assert node.kernel.mpls_lookup(1002).via == "10.9.9.9"  # the other owner's route untouched


def test_mobile_client_keeps_server_and_labels_when_its_care_of_address_changes() -> None:
    v6 = config({"services.http.vip": "2001:db8::100", "services.http.session_key": "mip6-home-address"})
    node = Node(v6)

    def mip6_syn(coa: str, sport: int) -> bytes:
        return bytes(
            IPv6(src=coa, dst="2001:db8::100")
            / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8:aa::1")])
            / TCP(sport=sport, dport=80, flags="S")
        )

    node.packets(mip6_syn("2001:db8:1::10", 1))
    [session] = list(node.core.table)
    assert node.plan.rekeyed == set()  # a new session: logged as a start
    node.packets(mip6_syn("2001:db8:2::20", 2))
    [same] = list(node.core.table)
    assert node.plan.rekeyed == {same.id} and node.core.counters["rekeyed"] == 1  # logged as a rekey
    assert (same.id, same.server, same.c2s) == (session.id, session.server, session.c2s)
    assert same.clients == ["2001:db8:1::10", "2001:db8:2::20"]
    assert node.kernel.receive_mpls([same.s2c]).via == "2001:db8:2::20"  # answers follow the move
    fwd = node.kernel.forward_ip("2001:db8:2::20", "2001:db8::100", proto="tcp", sport=3, dport=80, out_dev="fab0")
    assert fwd is not None and fwd.labels == (TRANSPORT[same.server], same.c2s)


def test_a_failed_session_in_a_batch_does_not_fail_or_undo_another_sessions_rekey() -> None:
    """Found by the lab fuzz (issue 13, item 6): in one batch a mobile session starts, another
    session's objects fail (here: its care-of address is already the first one's, so flower
    refuses the same match), then the first session re-keys to a new care-of address. Each
    session is judged by its own operations: the first keeps both its clients, the second fails
    alone and only its objects are rolled back."""
    v6 = config({"services.http.vip": "2001:db8::100", "services.http.session_key": "mip6-home-address"})
    node = Node(v6)

    def mip6_syn(coa: str, home: str, sport: int) -> bytes:
        return bytes(
            IPv6(src=coa, dst="2001:db8::100")
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
            / TCP(sport=sport, dport=80, flags="S")
        )

    commit = node.packets(
        mip6_syn("2001:db8:1::10", "2001:db8:aa::1", 1),
        mip6_syn("2001:db8:1::10", "2001:db8:aa::2", 2),  # another home, the same care-of address
        mip6_syn("2001:db8:2::20", "2001:db8:aa::1", 3),  # the first home moves on
    )
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT, Action.DROP, Action.ACCEPT]
    assert "same match" in commit.verdicts[1].reason
    [session] = list(node.core.table)
    assert session.key.value == "2001:db8:aa::1" and session.clients == ["2001:db8:1::10", "2001:db8:2::20"]
    assert node.core.counters["sessions_failed"] == 1 and node.core.counters["rekeys_failed"] == 0
    for coa in session.clients:  # both addresses' filters are in the kernel
        fwd = node.kernel.forward_ip(coa, "2001:db8::100", proto="tcp", sport=9, dport=80, out_dev="fab0")
        assert fwd is not None and fwd.labels == (TRANSPORT[session.server], session.c2s)
    assert node.kernel.receive_mpls([session.s2c]).via == "2001:db8:2::20"
    assert node.core.labels.stats(node.now).in_use == 1  # the failed session's pair is free again


def test_a_client_address_beyond_the_sessions_filter_handles_is_dropped() -> None:
    """128 ports: two client addresses fill the session's 256 filter handles; a third one would
    wrap onto the first one's handles, so its packet is dropped and nothing is programmed."""
    v6 = config(
        {
            "services.http.vip": "2001:db8::100",
            "services.http.ports": list(range(80, 208)),
            "services.http.session_key": "mip6-home-address",
        }
    )
    node = Node(v6)

    def mip6_syn(coa: str) -> bytes:
        return bytes(
            IPv6(src=coa, dst="2001:db8::100")
            / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8:aa::1")])
            / TCP(sport=1, dport=80, flags="S")
        )

    for coa in ("2001:db8:1::10", "2001:db8:2::20"):
        assert [v.action for v in node.packets(mip6_syn(coa)).verdicts] == [Action.ACCEPT]
    [session] = list(node.core.table)
    assert len([o for o in session.objects if isinstance(o, ops.FlowerFilter)]) == 256
    commit = node.packets(mip6_syn("2001:db8:3::30"))
    assert [v.action for v in commit.verdicts] == [Action.DROP] and "no filter handle left" in commit.verdicts[0].reason
    assert node.plan.ops == [] and node.core.counters["no_filter_handle"] == 1
    assert session.clients == ["2001:db8:1::10", "2001:db8:2::20"]
    assert all(flow.src != "2001:db8:3::30" for flow in session.flows)  # its flow was not taken in


def test_restart_restores_sessions_from_the_kernel() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"), syn("10.0.1.12"))
    before = {(s.key.value, s.server, s.c2s) for s in node.core.table}
    live = frozenset(f for s in node.core.table for f in s.flows if s.key.value != "10.0.1.12")
    fresh = Balancer(config(), node.now)
    stale = fresh.restore(node.kernel.dump(), live, node.now)
    assert stale == []
    assert {(s.key.value, s.server, s.c2s) for s in fresh.table} == before
    idle = next(s for s in fresh.table if s.key.value == "10.0.1.12")
    assert idle.ends_at == node.now + 30  # no flow alive: its persistence timer runs
    # The restored allocator will not hand out a label that is in use.
    node.core = fresh
    node.packets(syn("10.0.1.13"))
    assert len({s.c2s for s in fresh.table}) == 4


def test_reload_changes_the_scheduler_and_keeps_sessions() -> None:
    node = Node(config({"services.http.scheduler": "wrr"}))
    node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(4)))  # wrr 1:1:2 -> s1, s2, s3, s3
    assert collections.Counter(s.server for s in node.core.table) == {"s1": 1, "s2": 1, "s3": 2}
    node.core.configure(config({"services.http.scheduler": "lc"}), node.now)
    node.packets(syn("10.0.1.50"), syn("10.0.1.51"))
    picked = {s.key.value: s.server for s in node.core.table}
    assert len(picked) == 6 and {picked["10.0.1.50"], picked["10.0.1.51"]} == {"s1", "s2"}


def test_esp_and_sctp_sessions_match_their_protocol_in_the_kernel() -> None:
    """The C2S filter of an ESP or SCTP service matches its IP protocol, so other traffic of the
    same client to the same VIP is not labelled into the session."""
    node = Node(config({"services.dns.protocol": "esp", "services.dns.ports": DELETE}))
    packet = bytes(IP(src="10.0.1.30", dst=VIP, proto=50) / (b"\x00\x00\x10\x01" + b"\x00" * 12))
    assert [v.action for v in node.packets(packet).verdicts] == [Action.ACCEPT]
    flt = next(i.obj for i in node.kernel.dump() if isinstance(i.obj, ops.FlowerFilter))
    assert flt.match.ip_proto == "esp" and flt.match.dst_port is None
    [session] = list(node.core.table)
    assert node.labels_of("10.0.1.30", proto="esp") == (TRANSPORT[session.server], session.c2s)
    assert node.labels_of("10.0.1.30", dport=53, proto="udp") == ()


def test_session_counts_follow_adds_and_removes_without_a_scan() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"), syn("10.0.1.12"))
    table = node.core.table
    expected = {s.server: 1 for s in table}
    assert {name: table.count(server=name) for name in expected} == expected
    assert table.count(service="http") == 3 and table.count() == 3 and table.count(service="dns") == 0
    first = next(iter(table))
    table.remove(first)
    table.remove(first)  # twice: counted once
    assert table.count(server=first.server) == 0 and table.count(server=first.server, service="http") == 0
    assert table.count(service="http") == 2 == table.count()
