"""Restore is exact and failures leave nothing behind (issue 12, items 3 and 4), on the fake kernel:
a restarted balancer rebuilds every session of every key kind with its id, key, labels, server
and port from what its kernel objects carry (dataplane/records.py); held-down pairs stay held
down; objects of no session are removed; a failed re-key removes only what it added; a failed
new session frees its pair at once."""

from __future__ import annotations

from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt

from orchestrator.config.examples import DELETE
from orchestrator.config.model import BalancerConfig
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import Action
from orchestrator.core.health import HealthEvent, HealthState, HealthView
from orchestrator.dataplane import handles, ops, records
from tests.unit.conftest import TRANSPORT, VIP, Node, config, syn

VIP6 = "fd00:100::100"
HOME = "2001:db8:aa::1"


def mip6(coa: str, sport: int = 40000, home: str | None = HOME) -> bytes:
    ext = IPv6ExtHdrDestOpt(options=[HAO(hoa=home)]) if home else IPv6ExtHdrDestOpt()
    return bytes(IPv6(src=coa, dst=VIP6) / ext / TCP(sport=sport, dport=80, flags="S"))


def v6(src: str, sport: int = 40000) -> bytes:
    return bytes(IPv6(src=src, dst=VIP6) / TCP(sport=sport, dport=80, flags="S"))


def esp(src: str, spi: int) -> bytes:
    return bytes(IP(src=src, dst=VIP, proto=50) / (spi.to_bytes(4, "big") + b"\x00\x00\x00\x01" + b"\x00" * 8))


def esp6(src: str, spi: int) -> bytes:
    return bytes(IPv6(src=src, dst=VIP6, nh=50) / (spi.to_bytes(4, "big") + b"\x00\x00\x00\x01" + b"\x00" * 8))


ESP = config({"services.dns.protocol": "esp", "services.dns.ports": DELETE, "services.dns.session_key": "esp-spi"})
# Both families: dns over IPv4, mobile (VIP6) as ESP keyed by SPI over IPv6.
ESP46 = config(
    {
        "services.dns.protocol": "esp",
        "services.dns.ports": DELETE,
        "services.dns.session_key": "esp-spi",
        "services.mobile.protocol": "esp",
        "services.mobile.ports": DELETE,
        "services.mobile.session_key": "esp-spi",
        "services.mobile.admission.refuse_with": "icmp",
    }
)

# Per key kind: the configuration, and the first packets of its sessions in order (several
# addresses of one mobile client, a new IPv6 prefix of one interface, two clients' SPIs).
CASES: dict[str, tuple[BalancerConfig, list[bytes]]] = {
    "client-ip": (
        config({"services.http.ports": [80, 8080]}),
        [syn("10.0.1.10"), syn("10.0.1.11", dport=8080), syn("10.0.1.12")],
    ),
    "five-tuple": (
        config({"services.http.session_key": "five-tuple"}),
        [syn("10.0.1.10", sport=1), syn("10.0.1.10", sport=2), syn("10.0.1.11", sport=1)],
    ),
    "mip6-home-address": (
        config(),
        [mip6("2001:db8:1::10"), mip6("2001:db8:2::20", sport=2), mip6("2001:db8:bb::1", home=None)],
    ),
    "ipv6-iid": (
        config({"services.mobile.session_key": "ipv6-iid"}),
        [v6("2001:db8:1::abcd"), v6("2001:db8:2::abcd", sport=2), v6("2001:db8:1::1234")],
    ),
    "esp-spi": (ESP, [esp("10.0.1.30", 0x1001), esp("10.0.1.30", 0x1002), esp("10.0.1.31", 0x2002)]),
    "esp-spi-ipv6": (
        ESP46,
        [esp6("2001:db8:1::30", 0x1001), esp6("2001:db8:1::30", 0x1002), esp("10.0.1.30", 0x1001)],
    ),
}


def identity(node_or_core: Node | Balancer) -> list[tuple[object, ...]]:
    """What a restart must give back of each session: all of `mplsorch sessions --json` but the
    times and the flow count, and the session's objects (in any order)."""
    core = node_or_core.core if isinstance(node_or_core, Node) else node_or_core
    keep = (
        "id",
        "clients",
        "key",
        "key_kind",
        "service",
        "vip",
        "protocol",
        "port",
        "server",
        "c2s_label",
        "s2c_label",
    )
    return sorted((tuple(str(s.view()[k]) for k in keep), tuple(sorted(map(repr, s.objects)))) for s in core.table)


@pytest.mark.parametrize("kind", list(CASES))
def test_a_restart_gives_back_every_session_of_every_key_kind(kind: str) -> None:
    cfg, packets = CASES[kind]
    node = Node(cfg)
    v4 = kind in ("client-ip", "five-tuple", "esp-spi", "esp-spi-ipv6")
    node.packets(syn("10.0.1.5") if v4 else v6("2001:db8:5::5"))
    ended = next(iter(node.core.table))  # ended below: a gap in the ids, a pair held down
    for packet in packets:
        assert [v.action for v in node.packets(packet).verdicts] == [Action.ACCEPT]
    node.packets(packets[0])  # a flow of an earlier session: no new session
    assert all(r.ok for r in node.kernel.apply(node.core.end(ended, node.now, "test")))
    assert {str(s.key.kind) for s in node.core.table} == {kind.removesuffix("-ipv6")}
    before = identity(node)
    live = frozenset(f for s in node.core.table for f in s.flows)

    fresh = Balancer(cfg, node.now)
    assert fresh.restore(node.kernel.dump(), live, node.now) == []
    assert fresh.fast_path_sync(node.kernel.dump_elements()) == []  # as the daemon does next: nothing to add
    assert identity(fresh) == before
    assert fresh.labels.is_held_down(ended.c2s) and fresh.markers.keys() == {ended.c2s}
    # Every later flow of a restored session finds it: no new session, nothing to program.
    node.core = fresh
    for packet in packets[1:]:
        commit = node.packets(packet)
        assert [v.action for v in commit.verdicts] == [Action.ACCEPT] and node.plan.ops == []
    assert identity(node) == before
    # A new session gets a fresh id and a pair neither in use nor held down.
    node.packets(syn("10.0.1.99") if v4 else v6("2001:db8:9::9"))
    newest = max(fresh.table, key=lambda s: s.id)
    assert newest.id > max(int(row[0][0]) for row in before)
    assert newest.c2s not in {ended.c2s} | {int(row[0][9]) for row in before}


def test_a_mobile_client_restored_away_from_home_keeps_its_care_of_filters() -> None:
    """On main a restart keyed this session by its care-of address: the next flow from the
    other care-of address opened a second session."""
    node = Node()
    node.packets(mip6("2001:db8:1::10"), mip6("2001:db8:2::20", sport=2))
    [session] = list(node.core.table)
    fresh = Balancer(config(), node.now)
    assert fresh.restore(node.kernel.dump(), frozenset(), node.now) == []
    [restored] = list(fresh.table)
    assert (restored.key.value, restored.clients) == (HOME, ["2001:db8:1::10", "2001:db8:2::20"])
    node.core = fresh
    node.packets(mip6("2001:db8:3::30", sport=3))  # a third care-of address: a re-key, same labels
    assert len(fresh.table) == 1 and restored.c2s == session.c2s
    assert node.kernel.receive_mpls([session.s2c]).via == "2001:db8:3::30"
    for coa in ("2001:db8:1::10", "2001:db8:2::20", "2001:db8:3::30"):  # no filter was deleted
        out = node.kernel.forward_ip(coa, VIP6, proto="tcp", sport=1, dport=80, out_dev="fab0")
        assert out is not None and out.labels == (TRANSPORT[session.server], session.c2s)


def test_a_restart_holds_down_the_pairs_that_were_held_down_and_restarts_their_timer() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"))
    gone = next(iter(node.core.table))
    node.kernel.apply(node.core.end(gone, node.now, "test"))
    node.now += 1.5  # 0.5 s of the 2 s hold-down left ...
    fresh = Balancer(config(), node.now)
    assert fresh.restore(node.kernel.dump(), frozenset(), node.now) == []
    node.core = fresh
    node.advance(1)  # ... but the timer restarted: still held down, still marked in the kernel
    assert fresh.labels.is_held_down(gone.c2s) and node.kernel.mpls_lookup(gone.s2c) == records.hold_marker(gone.s2c)
    node.packets(*(syn(f"10.0.1.{20 + i}") for i in range(3)))
    assert gone.c2s not in {s.c2s for s in fresh.table}
    node.advance(1)  # over: the marker goes and the pair is free again
    assert node.kernel.mpls_lookup(gone.s2c) is None and fresh.labels.stats(node.now).held_down == 0


def test_a_restart_removes_what_belongs_to_no_session() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    [session] = list(node.core.table)
    tag = records.pack(records.SessionRecord(77, "client-ip", 80))
    orphans = [
        ops.MplsRoute(3002, "lan0", via="10.0.1.50"),  # an S2C route without its filter
        ops.MplsRoute(3005, "lo"),  # a marker at an odd label: no pair's
        ops.FlowerFilter(
            "fab0",
            handles.filter_handle(3011, 0),  # a VIP no service has
            ops.FlowerMatch(src="10.0.1.60/32", dst="10.0.0.200/32", ip_proto="tcp", dst_port=80),
            ops.push_stack((101, 3011)),
            tag=tag,
        ),
        ops.FlowerFilter(
            "fab0",
            handles.filter_handle(3013, 0),  # names the session's id, not its pair
            ops.FlowerMatch(src="10.0.1.61/32", dst=f"{VIP}/32", ip_proto="tcp", dst_port=80),
            ops.push_stack((101, 3013)),
            tag=records.pack(records.SessionRecord(session.id, "client-ip", 80)),
        ),
    ]
    assert all(r.ok for r in node.kernel.apply([ops.Add(o) for o in orphans]))
    fresh = Balancer(config(), node.now)
    stale = fresh.restore(node.kernel.dump(), frozenset(), node.now)
    assert sorted(map(ops.describe, stale)) == sorted(ops.describe(ops.Delete(o)) for o in orphans)
    assert [s.id for s in fresh.table] == [session.id] and fresh.markers == {}


def test_a_failed_rekey_removes_only_what_it_added() -> None:
    """On main the session ended: its older filter and S2C route stayed in the kernel and its
    pair went to hold-down."""
    node = Node()
    node.packets(mip6("2001:db8:1::10"))
    [session] = list(node.core.table)
    first = [o for o in session.objects]
    # Someone else's filter where the re-key's filter goes: its add fails (EEXIST).
    other = ops.FlowerFilter(
        "fab0",
        handles.filter_handle(session.c2s, 1),
        ops.FlowerMatch(src="2001:db8:99::1/128", dst=f"{VIP6}/128"),
        ops.push_stack((5,)),
        pref=11,
    )
    assert all(r.ok for r in node.kernel.apply([ops.Add(other)]))
    commit = node.packets(mip6("2001:db8:2::20", sport=2))
    assert [v.action for v in commit.verdicts] == [Action.DROP]
    assert node.core.counters["rekeys_failed"] == 1 and node.core.counters["sessions_failed"] == 0
    # The session is as it was, and so is the kernel: its filter, its route to the old address.
    assert list(node.core.table) == [session] and session.clients == ["2001:db8:1::10"]
    assert session.objects == first and len(session.flows) == 1
    assert node.kernel.receive_mpls([session.s2c]).via == "2001:db8:1::10"
    assert sorted(map(repr, (i.obj for i in node.kernel.dump() + node.kernel.dump_elements()))) == sorted(
        map(repr, [ops.ClsactQdisc("fab0"), other, *first])
    )
    assert not node.core.labels.is_held_down(session.c2s) and node.core.labels.owner(session.c2s) == session.server
    # Once the obstacle is gone the same care-of address re-keys.
    node.kernel.apply([ops.Delete(other)])
    assert [v.action for v in node.packets(mip6("2001:db8:2::20", sport=3)).verdicts] == [Action.ACCEPT]
    assert node.kernel.receive_mpls([session.s2c]).via == "2001:db8:2::20"


def test_a_failed_new_session_frees_its_pair_at_once() -> None:
    """On main the pair went to hold-down although no packet of it could be in flight."""
    node = Node()
    first = node.core.labels.c2s_range()[0]
    free = node.core.labels.free(now=node.now)
    other = ops.FlowerFilter(
        "fab0", handles.filter_handle(first, 0), ops.FlowerMatch(src="10.9.9.9/32"), ops.push_stack((5,))
    )
    assert all(r.ok for r in node.kernel.apply([ops.Add(other)]))
    commit = node.packets(syn("10.0.1.10"))
    assert [v.action for v in commit.verdicts] == [Action.DROP]
    stats = node.core.labels.stats(node.now)
    assert stats.held_down == 0 and stats.in_use == 0 and stats.free == free
    assert node.kernel.mpls_lookup(first + 1) is None and node.core.markers == {}


def test_restore_keeps_the_handle_limit_of_a_session() -> None:
    """A restored session's filters come back in handle order, so its next client address takes
    the next index, and a full session stays full."""
    ports = list(range(80, 208))  # 128 ports: two client addresses fill the 256 handles
    cfg = config({"services.mobile.ports": ports})
    node = Node(cfg)
    node.packets(mip6("2001:db8:1::10"))
    node.packets(mip6("2001:db8:2::20", sport=2))
    fresh = Balancer(cfg, node.now)
    dump = node.kernel.dump()
    assert fresh.restore(list(reversed(dump)), frozenset(), node.now) == []
    [session] = list(fresh.table)
    assert session.clients == ["2001:db8:1::10", "2001:db8:2::20"]
    indexes = [handles.handle_index(o.handle) for o in session.objects if isinstance(o, ops.FlowerFilter)]
    assert indexes == list(range(handles.FILTERS_PER_SESSION))
    node.core = fresh
    commit = node.packets(mip6("2001:db8:3::30", sport=3))
    assert "no filter handle left" in commit.verdicts[0].reason and node.plan.ops == []


def test_the_record_round_trips_and_refuses_what_does_not_fit() -> None:
    for record in (
        records.SessionRecord(1, "client-ip"),
        records.SessionRecord(2**32 - 1, "five-tuple", 65535),
        records.SessionRecord(5, "mip6-home-address", 80, home=HOME),
        records.SessionRecord(6, "esp-spi", None, spi=0xFFFFFFFF),
        records.SessionRecord(7, "ipv6-iid", 443),
    ):
        tag = records.pack(record)
        assert len(tag) == records.TAG_SIZE == ops.tag_capacity(2) and records.unpack(tag) == record
    assert records.unpack(b"") is None and records.unpack(bytes(24)) is None  # no record: a legacy filter
    for bad in (
        records.SessionRecord(2**32, "client-ip"),
        records.SessionRecord(1, "mac"),
        records.SessionRecord(1, "client-ip", 70000),
    ):
        with pytest.raises(ValueError):
            records.pack(bad)


def test_one_esp_session_per_spi_and_several_spis_per_client() -> None:
    """flower has no SPI key: on main a client's second SPI got "same match" and its first packet
    was dropped. Each SPI of an IPv4 client is a u32 node matching source, VIP and SPI."""
    node = Node(ESP)
    for spi in (0x1001, 0x1002, 0x1003):
        assert [v.action for v in node.packets(esp("10.0.1.30", spi)).verdicts] == [Action.ACCEPT]
    sessions = {s.key.value: s for s in node.core.table}
    assert sorted(sessions) == ["spi:0x00001001", "spi:0x00001002", "spi:0x00001003"]
    assert len({s.c2s for s in sessions.values()}) == 3 and len({s.server for s in sessions.values()}) == 3
    for value, session in sessions.items():
        spi = int(value[4:], 16)
        out = node.kernel.forward_ip("10.0.1.30", VIP, proto="esp", spi=spi, out_dev="fab0")
        assert out is not None and out.labels == (TRANSPORT[session.server], session.c2s)
    # Another SPI, another client's packets and other protocols are not labelled by them.
    assert node.kernel.forward_ip("10.0.1.30", VIP, proto="esp", spi=0x9999, out_dev="fab0").labels == ()
    assert node.kernel.forward_ip("10.0.1.31", VIP, proto="esp", spi=0x1001, out_dev="fab0").labels == ()
    assert node.labels_of("10.0.1.30", dport=53, proto="udp") == ()
    # Ending one frees its node; the next session takes it, the others keep theirs.
    gone = sessions["spi:0x00001002"]
    [u32] = [o for o in gone.objects if isinstance(o, ops.U32Filter)]
    node.kernel.apply(node.core.end(gone, node.now, "test"))
    node.packets(esp("10.0.1.31", 0x2002))
    newest = next(s for s in node.core.table if s.key.value == "spi:0x00002002")
    assert [o.handle for o in newest.objects if isinstance(o, ops.U32Filter)] == [u32.handle]


def test_ipv6_esp_sessions_one_per_spi_in_the_same_u32_classifier_as_ipv4() -> None:
    """On main an IPv6 client's second SPI got flower's "same match" and its first packet was
    dropped. Now each SPI is a u32 node reading the IPv6 header (next header ESP, source,
    destination, the SPI at 40), in the one protocol-all classifier that holds the IPv4 nodes."""
    node = Node(ESP46)
    for packet in (esp6("2001:db8:1::30", 0x1001), esp6("2001:db8:1::30", 0x1002), esp("10.0.1.30", 0x1001)):
        assert [v.action for v in node.packets(packet).verdicts] == [Action.ACCEPT]
    sessions = {(s.vip, s.key.value): s for s in node.core.table}
    assert len(sessions) == 3 and len({s.c2s for s in sessions.values()}) == 3
    nodes = [o for s in sessions.values() for o in s.objects if isinstance(o, ops.U32Filter)]
    assert {(n.pref, n.protocol) for n in nodes} == {(12, "all")} and len({n.handle for n in nodes}) == 3
    assert not any(isinstance(o, ops.FlowerFilter) for s in sessions.values() for o in s.objects)
    for spi in (0x1001, 0x1002):
        session = sessions[(VIP6, f"spi:0x{spi:08x}")]
        assert session.clients == ["2001:db8:1::30"]
        out = node.kernel.forward_ip("2001:db8:1::30", VIP6, proto="esp", spi=spi, out_dev="fab0")
        assert out is not None and out.labels == (TRANSPORT[session.server], session.c2s)
        [element] = [o for o in session.objects if isinstance(o, ops.FastPathElement)]
        assert (element.set_name, element.spi) == ("fastesp6", spi)
    # IPv4 keys never match an IPv6 packet nor the reverse; an unknown SPI is not labelled.
    assert node.kernel.forward_ip("2001:db8:1::30", VIP6, proto="esp", spi=0x9999, out_dev="fab0").labels == ()
    assert node.kernel.forward_ip("2001:db8:1::31", VIP6, proto="esp", spi=0x1001, out_dev="fab0").labels == ()
    v4 = sessions[(VIP, "spi:0x00001001")]
    out = node.kernel.forward_ip("10.0.1.30", VIP, proto="esp", spi=0x1001, out_dev="fab0")
    assert out is not None and out.labels == (TRANSPORT[v4.server], v4.c2s)


def test_nodes_of_the_ipv4_only_layout_move_to_the_protocol_all_classifier_at_restore() -> None:
    """An earlier version put IPv4 nodes in a protocol-ip classifier at pref 12: while one stays
    there no protocol-all node can join the pref, so restore makes them again in the new one."""
    node = Node(ESP46)
    node.packets(esp("10.0.1.30", 0x1001), esp("10.0.1.31", 0x1002))
    new = [o for s in node.core.table for o in s.objects if isinstance(o, ops.U32Filter)]
    old = [replace(n, protocol="ip") for n in new]
    assert all(r.ok for r in node.kernel.apply([ops.Delete(n) for n in new] + [ops.Add(n) for n in old]))
    # What the old layout blocks: an IPv6 node at the same pref.
    blocked = ops.U32Filter("fab0", handles.u32_handle(9), ops.esp_keys("2001:db8::9", VIP6, 9), new[0].actions)
    [refused] = node.kernel.apply([ops.Add(blocked)])
    assert not refused.ok and "another protocol" in str(refused)
    fresh = Balancer(ESP46, node.now)
    migrate = fresh.restore(node.kernel.dump(), frozenset(), node.now)
    assert migrate == [ops.Delete(n) for n in old] + [ops.Add(n) for n in new]
    assert all(r.ok for r in node.kernel.apply(migrate)) and fresh.counters["u32_nodes_migrated"] == 2
    assert sorted(map(repr, (o for s in fresh.table for o in s.objects if isinstance(o, ops.U32Filter)))) == sorted(
        map(repr, new)
    )
    node.core = fresh
    assert [v.action for v in node.packets(esp6("2001:db8:1::30", 0x6001)).verdicts] == [Action.ACCEPT]
    for session in fresh.table:
        assert all(r.ok for r in node.kernel.apply(fresh.end(session, node.now, "test")))
    assert not any(isinstance(i.obj, ops.U32Filter) for i in node.kernel.dump())


def test_esp_sessions_refuse_a_new_spi_when_every_u32_node_is_taken() -> None:
    node = Node(ESP)
    node.core.u32_nodes.update(range(1, handles.U32_NODES + 1))
    commit = node.packets(esp("10.0.1.30", 0x1001))
    assert [v.action for v in commit.verdicts] == [Action.DROP] and "no u32 node left" in commit.verdicts[0].reason
    assert node.plan.ops == [] and node.core.counters["no_filter_handle"] == 1 and len(node.core.table) == 0
    assert node.core.labels.stats(node.now).in_use == 0


def test_an_esp_session_moves_to_another_server_under_its_node() -> None:
    node = Node(ESP)
    node.packets(esp("10.0.1.30", 0x1001))
    [session] = list(node.core.table)
    event = HealthEvent("web", session.server, HealthState.UP, HealthState.DOWN, "refused", None, node.now)
    plan = node.core.on_health(HealthView((("web", session.server, HealthState.DOWN, None),)), [event], node.now)
    assert all(r.ok for r in node.kernel.apply(plan.ops))
    out = node.kernel.forward_ip("10.0.1.30", VIP, proto="esp", spi=0x1001, out_dev="fab0")
    assert out is not None and out.labels == (TRANSPORT[session.server], session.c2s)


def test_a_failed_move_of_an_esp_session_frees_its_node() -> None:
    node = Node(ESP)
    node.packets(esp("10.0.1.30", 0x1001))
    [session] = list(node.core.table)
    blocker = ops.MplsRoute(session.c2s + 3, "lan0", via="10.9.9.9")  # the next pair's S2C: someone else's
    assert all(r.ok for r in node.kernel.apply([ops.Add(blocker)]))
    event = HealthEvent("web", session.server, HealthState.UP, HealthState.DOWN, "refused", None, node.now)
    plan = node.core.on_health(HealthView((("web", session.server, HealthState.DOWN, None),)), [event], node.now)
    results = node.kernel.apply(plan.ops)
    assert not all(r.ok for r in results)
    assert all(r.ok for r in node.kernel.apply(node.core.commit_failover(plan, results, node.now)))
    assert len(node.core.table) == 0 and node.core.u32_nodes == set()
    assert not any(isinstance(i.obj, ops.U32Filter) for i in node.kernel.dump())


@pytest.mark.parametrize("kind", ["client-ip", "five-tuple"])
def test_live_flows_join_their_own_sessions_at_restore(kind: str) -> None:
    """Each live flow joins the session it belongs to (found by client and VIP, then port for a
    five-tuple key), whatever the number of sessions: the flows of many clients, several each."""
    cfg = config({"services.http.session_key": kind})
    node = Node(cfg)
    for i in range(60):
        for sport in (40000, 40001):
            node.packets(syn(f"10.0.2.{i}", sport=sport))
    flows = {s.id: frozenset(s.flows) for s in node.core.table}
    live = frozenset(f for s in node.core.table for f in s.flows)
    assert len(live) == 120 and len(flows) == (60 if kind == "client-ip" else 120)
    fresh = Balancer(cfg, node.now)
    assert fresh.restore(node.kernel.dump(), live, node.now) == []
    assert {s.id: frozenset(s.flows) for s in fresh.table} == flows
    assert {str(s.state) for s in fresh.table} == {"serving"}
