"""The kernel fast path (docs/design.md, "The first-packet path"): a session's set elements go to
the kernel once its other objects are acknowledged, right after its first packet's verdict, and
leave with them; the kernel then admits the session's later flows without the daemon, and conntrack's
new-flow events count them towards their session."""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP

from orchestrator.capture import conntrack as ct
from orchestrator.capture import nfqueue, nftables
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.config.examples import DELETE, KeyPath
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import Action, FlowKey, FlowsEnded, FlowsStarted, FlowTableResync
from orchestrator.core.sessions import State
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.dataplane import handles, ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import decode, encode, nla, nlsocket
from orchestrator.dataplane.netlink.provider import NetlinkProvider
from tests.unit.conftest import Node, ScriptedQueue, balancer_daemon, config, conntrack_reading, syn

E = ops.FastPathElement
V6: dict[KeyPath, Any] = {"services.http.vip": "2001:db8::100"}
IID: dict[KeyPath, Any] = {**V6, "services.http.session_key": "ipv6-iid"}
MIP6: dict[KeyPath, Any] = {**V6, "services.http.session_key": "mip6-home-address"}
FIVE: dict[KeyPath, Any] = {"services.http.session_key": "five-tuple"}
ESP_CLIENT: dict[KeyPath, Any] = {"services.dns.protocol": "esp", "services.dns.ports": DELETE}
ESP_SPI: dict[KeyPath, Any] = {**ESP_CLIENT, "services.dns.session_key": "esp-spi"}


def syn6(src: str, sport: int = 40000, hoa: str | None = None) -> bytes:
    ip = IPv6(src=src, dst="2001:db8::100")
    if hoa:
        ip = ip / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])
    return bytes(ip / TCP(sport=sport, dport=80, flags="S"))


def esp(src: str, spi: int) -> bytes:
    return bytes(IP(src=src, dst="10.0.0.100") / ESP(spi=spi, seq=1, data=b"\x00" * 16))


def elements(node: Node) -> list[ops.FastPathElement]:
    return [i.obj for i in node.kernel.dump_elements()]  # type: ignore[misc]


def _one_batch_with_the_filter(node: Node, element: ops.FastPathElement) -> None:
    """The element came with the batch that added the session's C2S filter (flower, or u32 for
    an esp-spi session), held back until the filter and route were in (Plan.elements)."""
    kinds = [type(op.obj) for op in node.plan.ops]
    c2s = ops.U32Filter if ops.U32Filter in kinds else ops.FlowerFilter
    assert c2s in kinds and ops.FastPathElement not in kinds
    assert ops.Add(element) in [op for adds in node.plan.elements.values() for op in adds]


# ---- per key kind: added with the session, removed with it -------------------------------------


def test_client_ip_one_element_per_service_port_with_the_session_and_gone_with_it() -> None:
    node = Node(config({"services.http.ports": [80, 443]}))
    commit = node.packets(syn("10.0.1.10"))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT]
    want = [E("10.0.1.10", "10.0.0.100", "tcp", 80), E("10.0.1.10", "10.0.0.100", "tcp", 443)]
    assert elements(node) == want
    for element in want:
        _one_batch_with_the_filter(node, element)
    assert node.kernel.fast_path("10.0.1.10", "10.0.0.100", "tcp", 443) == want[1]
    assert node.kernel.fast_path("10.0.1.11", "10.0.0.100", "tcp", 80) is None  # another client: queued
    [session] = node.core.table
    node.core.on_flow_events([FlowsEnded(tuple(session.flows))], node.now)
    deletes = node.core.tick(node.now + 31)
    assert {ops.Delete(e) for e in want} <= set(deletes)
    assert any(isinstance(op.obj, ops.FlowerFilter) for op in deletes)  # the same batch as its filter
    assert all(r.ok for r in node.kernel.apply(deletes))
    assert elements(node) == [] and node.kernel.fast_path("10.0.1.10", "10.0.0.100", "tcp", 80) is None


def test_five_tuple_sessions_get_no_element_every_flow_is_its_own_session() -> None:
    node = Node(config(FIVE))
    node.packets(syn("10.0.1.10"), syn("10.0.1.10", 40001))
    assert len(node.core.table) == 2 and elements(node) == []
    assert "fastpath" not in nftables.render(config(FIVE)).split("queued_http")[1].split("\n")[0]


def test_ipv6_iid_element_holds_the_full_address_a_new_prefix_comes_to_the_daemon() -> None:
    node = Node(config(IID))
    node.packets(syn6("2001:db8:1::aa:bb"))
    assert elements(node) == [E("2001:db8:1::aa:bb", "2001:db8::100", "tcp", 80)]
    _one_batch_with_the_filter(node, elements(node)[0])
    # Same IID, new prefix: the kernel cannot admit it (it needs its own filter first); counted.
    assert node.kernel.fast_path("2001:db8:2::aa:bb", "2001:db8::100", "tcp", 80) is None
    node.packets(syn6("2001:db8:2::aa:bb", 40001))
    [session] = node.core.table
    assert session.clients == ["2001:db8:1::aa:bb", "2001:db8:2::aa:bb"] and session.packets_userspace == 2
    assert node.core.counters["fastpath_unmatched:ipv6-iid"] == 1
    assert E("2001:db8:2::aa:bb", "2001:db8::100", "tcp", 80) in elements(node)


def test_mip6_element_holds_the_care_of_address_a_new_one_comes_to_the_daemon() -> None:
    node = Node(config(MIP6))
    node.packets(syn6("2001:db8:1::10", hoa="2001:db8:aa::1"))
    assert elements(node) == [E("2001:db8:1::10", "2001:db8::100", "tcp", 80)]
    node.packets(syn6("2001:db8:2::10", 40001, hoa="2001:db8:aa::1"))  # moved: a new care-of address
    assert node.core.counters["fastpath_unmatched:mip6-home-address"] == 1
    assert elements(node) == [
        E("2001:db8:1::10", "2001:db8::100", "tcp", 80),
        E("2001:db8:2::10", "2001:db8::100", "tcp", 80),
    ]
    [session] = node.core.table
    deletes = node.core.end(session, node.now, "test")
    assert all(r.ok for r in node.kernel.apply(deletes)) and elements(node) == []


def test_esp_spi_element_holds_address_and_spi() -> None:
    node = Node(config(ESP_SPI))
    node.packets(esp("10.0.1.10", 0x1234))
    want = E("10.0.1.10", "10.0.0.100", "esp", spi=0x1234)
    assert elements(node) == [want] and want.set_name == "fastesp4"
    _one_batch_with_the_filter(node, want)
    assert node.kernel.fast_path("10.0.1.10", "10.0.0.100", "esp", spi=0x1234) == want
    assert node.kernel.fast_path("10.0.1.10", "10.0.0.100", "esp", spi=0x9999) is None
    assert "ip saddr . ip daddr . esp spi @fastesp4" in nftables.render(config(ESP_SPI))


def test_esp_spi_queues_every_packet_of_an_unknown_spi_whatever_its_ct_state() -> None:
    """Conntrack keeps one ESP entry per address pair: a client's second SPI is no new flow to
    it, so the queue and rate-limit rules of an esp-spi service ask the set, not `ct state`."""
    lines = nftables.render(config(ESP_SPI)).splitlines()
    dns = [line.strip() for line in lines if "10.0.0.100 meta l4proto esp" in line]
    unknown = "ip daddr 10.0.0.100 meta l4proto esp ip saddr . ip daddr . esp spi != @fastesp4"
    assert dns[0].startswith("ct state new") and dns[0].endswith("counter name fastpath_dns accept")
    assert dns[1].startswith(f"{unknown} update @persrc4") and dns[1].endswith("counter name rate_limited drop")
    assert dns[2].startswith(f"{unknown} ct mark set ct mark and 0x000fffff or 0x6d600000 counter name queued_dns")
    assert len(dns) == 3 and not any("counter name esp_exthdr" in line for line in lines)  # IPv6 only
    # Other services keep `ct state new`.
    assert any(line.strip().startswith("ct state new ip daddr 10.0.0.100 tcp dport { 80 }") for line in lines)


def test_ipv6_esp_behind_extension_headers_is_dropped_and_counted_in_the_kernel() -> None:
    """The IPv6 u32 node reads the SPI right after the fixed header: ESP behind extension
    headers could not be labelled, so the ruleset drops it (first packet or not) and counts it."""
    cfg = config(
        {
            "services.mobile.protocol": "esp",
            "services.mobile.ports": DELETE,
            "services.mobile.session_key": "esp-spi",
            "services.mobile.admission.refuse_with": "icmp",
        }
    )
    lines = [line.strip() for line in nftables.render(cfg).splitlines()]
    rule = "ip6 daddr fd00:100::100 meta l4proto esp ip6 nexthdr != esp counter name esp_exthdr_mobile drop"
    assert "counter esp_exthdr_mobile {}" in lines
    mobile = [line for line in lines if line.startswith(("ct state new ip6", "ip6 daddr"))]
    assert mobile[0] == rule and "@fastesp6 ct mark set" in mobile[1]
    assert mobile[-1].startswith(
        "ip6 daddr fd00:100::100 meta l4proto esp ip6 saddr . ip6 daddr . esp spi != @fastesp6"
    )


def test_a_service_without_ports_gets_the_protocol_element() -> None:
    node = Node(config(ESP_CLIENT))
    node.packets(esp("10.0.1.10", 0x1234))
    assert elements(node) == [E("10.0.1.10", "10.0.0.100", "esp")]
    assert elements(node)[0].set_name == "fastproto4"
    assert "ip saddr . ip daddr . meta l4proto @fastproto4" in nftables.render(config(ESP_CLIENT))


def balancer_kernel() -> FakeProvider:
    """A balancer node's kernel: the clsact qdisc on the fabric, the clients' LAN routed."""
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    return kernel


def _first_packet_with_elements(
    elements: Callable[[Sequence[ops.Operation]], list[ops.OpResult]],
) -> tuple[FakeProvider, ScriptedQueue, BalancerDaemon]:
    """A daemon whose kernel answers its fast-path element batches with `elements` (everything
    else as the fake kernel does), after one SYN from 10.0.1.10."""
    kernel = balancer_kernel()
    apply = kernel.apply
    kernel.apply = lambda operations: (  # type: ignore[method-assign]
        elements(operations) if all(isinstance(op.obj, E) for op in operations) else apply(operations)
    )
    queue = ScriptedQueue()
    daemon = balancer_daemon(config(), kernel, queue)
    queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))
    daemon.on_packets()
    return kernel, queue, daemon


def test_the_element_goes_in_after_the_verdict_once_the_sessions_batch_is_acknowledged() -> None:
    """The first packet waits for its filter and S2C route only: at its verdict's sendmsg the
    filter is in the kernel (the packet leaves labelled) and the element is not yet; the element
    is added right after, in its own nf_tables batch (issue 15: one round trip less per batch)."""
    kernel = balancer_kernel()
    applies: list[list[ops.Operation]] = []
    apply = kernel.apply
    kernel.apply = lambda operations: applies.append(list(operations)) or apply(operations)  # type: ignore[method-assign]
    queue = ScriptedQueue(
        observe=lambda: (
            kernel.fast_path("10.0.1.10", "10.0.0.100", "tcp", 80),
            kernel.forward_ip("10.0.1.10", "10.0.0.100", proto="tcp", sport=40000, dport=80, out_dev="fab0"),
        )
    )
    daemon = balancer_daemon(config(), kernel, queue)
    queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))
    daemon.on_packets()
    [(verdicts, (element_then, labels_then))] = queue.sent_batches
    assert [v.verdict for v in verdicts] == [nfqueue.NF_ACCEPT]
    assert element_then is None  # not in yet
    assert labels_then is not None and labels_then.labels  # but the packet leaves labelled by its filter
    assert kernel.fast_path("10.0.1.10", "10.0.0.100", "tcp", 80) == E("10.0.1.10", "10.0.0.100", "tcp", 80)
    [batch, admit] = applies
    assert {type(op.obj) for op in batch} == {ops.FlowerFilter, ops.MplsRoute}
    assert admit == [ops.Add(E("10.0.1.10", "10.0.0.100", "tcp", 80))]
    assert daemon.core.counters["fastpath_errors"] == 0


def test_a_failed_element_is_counted_and_the_verdicted_packet_still_goes() -> None:
    """The kernel refuses the element (ENOMEM) after the packet's verdict: the packet went
    (accepted, labelled), the failure is counted (`fastpath_errors`), the session stays, and its
    client's next flow, which the kernel cannot admit, is queued and accepted into it."""
    kernel, queue, daemon = _first_packet_with_elements(
        lambda operations: [ops.OpResult(op, "Cannot allocate memory", errno.ENOMEM) for op in operations]
    )
    assert [(v.packet_id, v.verdict) for v in queue.sent] == [(1, nfqueue.NF_ACCEPT)]
    assert daemon.core.counters["fastpath_errors"] == 1 and daemon.core.counters["batch_errors"] == 0
    assert kernel.fast_path("10.0.1.10", "10.0.0.100", "tcp", 80) is None
    [session] = list(daemon.core.table)
    assert session.state == State.SERVING
    queue.script(QueuedPacket(0, 2, syn("10.0.1.10", 40001), 2, None, 0))
    daemon.on_packets()
    assert [(v.packet_id, v.verdict) for v in queue.sent] == [(1, nfqueue.NF_ACCEPT), (2, nfqueue.NF_ACCEPT)]
    assert [s.id for s in daemon.core.table] == [session.id] and daemon.core.counters["fastpath_late"] == 1


def test_an_element_batch_that_raises_after_the_verdicts_sends_no_second_verdict() -> None:
    """The nf_tables socket fails (OSError) after the verdicts went: the packet is not verdicted
    again (it is gone), the batch is no `batch_errors`, its elements count `fastpath_errors`."""

    def failing(operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        raise OSError(errno.ENOBUFS, "No buffer space available")

    _, queue, daemon = _first_packet_with_elements(failing)
    assert [(v.packet_id, v.verdict) for v in queue.sent] == [(1, nfqueue.NF_ACCEPT)]
    assert daemon.core.counters["fastpath_errors"] == 1 and daemon.core.counters["batch_errors"] == 0
    assert len(daemon.core.table) == 1


def test_a_session_whose_filter_failed_never_gets_its_element() -> None:
    """Had the element gone in the filter's batch, a new flow of the client could pass the fast
    path unlabelled until the rollback deleted it: it is only added once the filter is in."""
    node = Node(config(ESP_SPI))
    # Another owner's node at the handle the first session takes: its filter fails (EEXIST),
    # its S2C route gets in and is rolled back.
    squatter = ops.U32Filter("fab0", handles.u32_handle(1), ops.esp_keys("10.9.9.9", "10.0.0.100", 7), ())
    assert all(r.ok for r in node.kernel.apply([ops.Add(squatter)]))
    seen: list[ops.Operation] = []
    apply = node.kernel.apply
    node.kernel.apply = lambda operations: seen.extend(operations) or apply(operations)  # type: ignore[method-assign]
    commit = node.packets(esp("10.0.1.11", 0x1), esp("10.0.1.12", 0x2))
    assert [v.action for v in commit.verdicts] == [Action.DROP, Action.ACCEPT]
    assert commit.admit == (ops.Add(E("10.0.1.12", "10.0.0.100", "esp", spi=0x2)),)
    assert [op.obj for op in seen if isinstance(op.obj, ops.FastPathElement)] == [
        E("10.0.1.12", "10.0.0.100", "esp", spi=0x2)
    ]
    assert elements(node) == [E("10.0.1.12", "10.0.0.100", "esp", spi=0x2)] and len(node.core.table) == 1


# ---- flows the kernel admitted count towards their session ----------------------------------------


def test_new_flow_events_count_fast_path_flows_and_keep_the_session_alive() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    [session] = node.core.table
    first = next(iter(session.flows))
    later = FlowKey(6, "10.0.1.10", "10.0.0.100", 40001, 80)
    stranger = FlowKey(6, "10.0.1.99", "10.0.0.100", 40001, 80)
    node.core.on_flow_events([FlowsStarted((first, later, stranger))], node.now)
    assert session.flows == {first, later} and session.flows_total == 2 and session.packets_userspace == 1
    assert node.core.counters["flows_fast_path"] == 1
    node.core.on_flow_events([FlowsEnded((first,))], node.now)
    node.advance(31)
    assert session.state == State.SERVING and len(node.core.table) == 1  # the fast-path flow lives on
    node.core.on_flow_events([FlowsEnded((later,))], node.now)
    node.advance(31)
    assert len(node.core.table) == 0 and elements(node) == []
    view = session.view()
    assert view["flows_total"] == 2 and view["packets_userspace"] == 1


def test_a_sweep_adopts_fast_path_flows_whose_start_was_missed() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    [session] = node.core.table
    later = FlowKey(6, "10.0.1.10", "10.0.0.100", 40001, 80)
    node.core.on_flow_events([FlowTableResync(frozenset({later}), sweep=True)], node.now)
    assert session.flows == {later} and session.state == State.SERVING and session.flows_total == 2


def test_conntrack_new_events_of_tagged_flows_become_flows_started_in_order() -> None:
    def message(kind: int, src: str, sport: int, mark: int | None) -> bytes:
        ip = nla.nest(
            ct.CTA_TUPLE_IP,
            nla.attr(c.CTA_IP_V4_SRC, socket.inet_aton(src)),
            nla.attr(c.CTA_IP_V4_DST, socket.inet_aton("10.0.0.100")),
        )
        l4 = nla.nest(
            ct.CTA_TUPLE_PROTO,
            nla.u8(c.CTA_PROTO_NUM, 6),
            nla.attr(c.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
            nla.attr(c.CTA_PROTO_DST_PORT, struct.pack("!H", 80)),
        )
        body = struct.pack("!BBH", socket.AF_INET, 0, 0) + nla.nest(ct.CTA_TUPLE_ORIG, ip, l4)
        if mark is not None:
            body += nla.attr(ct.CTA_MARK, struct.pack("!I", mark))
        return nla.message(c.NFNL_SUBSYS_CTNETLINK << 8 | kind, 0, 0, body)

    listener = conntrack_reading(
        [
            message(c.IPCTNL_MSG_CT_NEW, "10.0.1.10", 1, ct.CT_TAG | 5)
            + message(c.IPCTNL_MSG_CT_NEW, "10.0.1.11", 2, 0x5)  # not ours
            + message(c.IPCTNL_MSG_CT_NEW, "10.0.1.12", 3, None)
            + message(c.IPCTNL_MSG_CT_DELETE, "10.0.1.10", 1, ct.CT_TAG)
        ]
    )
    flow = FlowKey(6, "10.0.1.10", "10.0.0.100", 1, 80)
    assert listener.read() == [FlowsStarted((flow,)), FlowsEnded((flow,))]


# ---- after a ruleset load ------------------------------------------------------------------------


def test_a_reload_refills_the_emptied_sets_and_drops_elements_of_no_session(monkeypatch) -> None:
    kernel = balancer_kernel()
    monkeypatch.setattr(nftables, "load", lambda ruleset: kernel.flush_elements())
    daemon = balancer_daemon(config(), kernel)
    daemon.make_ready = lambda cfg: None  # type: ignore[method-assign]
    monkeypatch.setattr("orchestrator.daemon.balancer.load_balancer_config", lambda path: config())
    daemon.queue.script(QueuedPacket(0, 1, syn("10.0.1.10"), 2, None, 0))  # type: ignore[union-attr]
    daemon.on_packets()
    assert kernel.apply([ops.Add(E("10.0.9.9", "10.0.0.100", "tcp", 80))])[0].ok  # of no session
    daemon.reload()
    assert [i.obj for i in kernel.dump_elements()] == [E("10.0.1.10", "10.0.0.100", "tcp", 80)]
    [session] = daemon.core.table
    assert session.objects.count(E("10.0.1.10", "10.0.0.100", "tcp", 80)) == 1
    assert daemon.core.fast_path_sync(kernel.dump_elements()) == []


def test_sync_deletes_stray_elements_and_adds_missing_ones_of_restored_sessions() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    fresh = Balancer(config(), node.now)
    fresh.restore(node.kernel.dump(), frozenset(), node.now)
    node.kernel.flush_elements()
    stray = E("10.0.9.9", "10.0.0.100", "tcp", 80)
    node.kernel.apply([ops.Add(stray)])
    sync = fresh.fast_path_sync(node.kernel.dump_elements())
    assert sync == [ops.Delete(stray), ops.Add(E("10.0.1.10", "10.0.0.100", "tcp", 80))]
    [session] = fresh.table
    assert E("10.0.1.10", "10.0.0.100", "tcp", 80) in session.objects  # its end deletes it


# ---- nf_tables encoding ----------------------------------------------------------------------------


def test_element_keys_are_laid_out_as_nft_lays_out_a_concatenation() -> None:
    # `nft --debug=netlink add element inet t fast4 { 10.0.1.11 . 10.0.0.100 . tcp . 443 }`
    # prints the key as host-order words: 0b01000a 6400000a 00000006 0000bb01
    key = encode.element_key(E("10.0.1.11", "10.0.0.100", "tcp", 443))
    assert key.hex() == "0a00010b0a0000640600000001bb0000"
    assert encode.element_key(E("10.0.1.11", "10.0.0.100", "udp")).hex() == "0a00010b0a00006411000000"
    assert encode.element_key(E("10.0.1.11", "10.0.0.100", "esp", spi=0x1234)).hex() == "0a00010b0a00006400001234"
    assert len(encode.element_key(E("2001:db8::1", "2001:db8::100", "sctp", 80))) == 40


def test_elements_round_trip_through_a_dump_message() -> None:
    for element in (
        E("10.0.1.11", "10.0.0.100", "tcp", 443),
        E("2001:db8::1", "2001:db8::100", "udp"),
        E("2001:db8::1", "2001:db8::100", "esp", spi=0xDEADBEEF),
    ):
        kind, flags, body = encode.set_element(ops.Add(element), element, lambda dev: 0)
        assert kind == c.NFNL_SUBSYS_NFTABLES << 8 | c.NFT_MSG_NEWSETELEM and flags & c.NLM_F_EXCL
        assert decode.set_elements(memoryview(body)) == [element]
        kind, _flags, _body = encode.set_element(ops.Delete(element), element, lambda dev: 0)
        assert kind == c.NFNL_SUBSYS_NFTABLES << 8 | c.NFT_MSG_DELSETELEM


def test_an_impossible_element_is_refused_before_the_kernel() -> None:
    results = FakeProvider(["fab0"]).apply(
        [
            ops.Add(E("10.0.1.1", "10.0.0.100", "icmp", 80)),
            ops.Add(E("10.0.1.1", "2001:db8::1", "tcp", 80)),
            ops.Add(E("10.0.1.1", "10.0.0.100", "tcp", 80, spi=1)),
        ]
    )
    assert [r.ok for r in results] == [False, False, False]


class NftKernel:
    """The kernel side of an nf_tables batch: refuses the elements it is told to, acknowledges the
    others, and commits only a batch without errors (nfnetlink_rcv_batch)."""

    def __init__(self, refuse: set[bytes]) -> None:
        self.refuse = refuse
        self.committed: list[bytes] = []
        self.sends: list[list[int]] = []
        self.replies: deque[bytes] = deque()

    def setsockopt(self, *args: object) -> None:
        pass

    bind = settimeout = close = setsockopt

    def sendall(self, data: bytes) -> None:
        parts = list(nla.messages(data))
        self.sends.append([kind for kind, _f, _s, _b in parts])
        assert parts[0][0] == c.NFNL_MSG_BATCH_BEGIN and parts[-1][0] == c.NFNL_MSG_BATCH_END
        assert nla.NFGENMSG.unpack_from(parts[0][3])[2] == c.NFNL_SUBSYS_NFTABLES
        batch, failed = [], False
        for kind, flags, seq, body in parts[1:-1]:
            elements = nla.attrs(body, 4)[c.NFTA_SET_ELEM_LIST_ELEMENTS]
            keys = [
                bytes(nla.attrs(nla.attrs(element)[c.NFTA_SET_ELEM_KEY])[c.NFTA_DATA_VALUE])
                for _kind, element in nla.iter_attrs(elements)
            ]
            code = 17 if any(key in self.refuse for key in keys) else 0  # a message fails whole
            failed |= bool(code)
            batch += keys
            assert flags & c.NLM_F_ACK
            self.replies.append(
                nla.message(
                    c.NLMSG_ERROR, 0x100, seq, struct.pack("=i", -code) + struct.pack("=IHHII", 16, kind, flags, seq, 0)
                )
            )
        if not failed:
            self.committed += batch

    def recv_into(self, buf: bytearray) -> int:
        data = b"".join(self.replies)
        self.replies.clear()
        buf[: len(data)] = data
        return len(data)


def test_a_failed_element_fails_alone_the_batch_is_sent_again_without_it() -> None:
    good = [E("10.0.1.1", "10.0.0.100", "tcp", 80), E("10.0.1.3", "10.0.0.100", "tcp", 80)]
    bad = E("10.0.1.2", "10.0.0.100", "tcp", 80)
    kernel = NftKernel({encode.element_key(bad)})
    provider = NetlinkProvider(
        sock=nlsocket.NetlinkSocket(sock=kernel),  # type: ignore[arg-type]
        links={"lo": 1},
        nft_sock=nlsocket.NftBatchSocket(sock=kernel),
    )  # type: ignore[arg-type]
    results = provider.apply([ops.Add(good[0]), ops.Add(bad), ops.Add(good[1])])
    assert [r.ok for r in results] == [True, False, True] and results[1].errno == 17
    assert kernel.committed == [encode.element_key(e) for e in good]
    element = c.NFNL_SUBSYS_NFTABLES << 8 | c.NFT_MSG_NEWSETELEM
    assert kernel.sends == [
        [c.NFNL_MSG_BATCH_BEGIN, element, c.NFNL_MSG_BATCH_END],  # the three in one message: refused
        [c.NFNL_MSG_BATCH_BEGIN, element, element, element, c.NFNL_MSG_BATCH_END],  # one each
        [c.NFNL_MSG_BATCH_BEGIN, element, element, c.NFNL_MSG_BATCH_END],  # without the refused one
    ]


def test_elements_go_many_to_a_message_one_message_per_set_and_kind() -> None:
    kernel = NftKernel(set())
    provider = NetlinkProvider(
        sock=nlsocket.NetlinkSocket(sock=kernel),  # type: ignore[arg-type]
        links={"lo": 1},
        nft_sock=nlsocket.NftBatchSocket(sock=kernel),
    )  # type: ignore[arg-type]
    v4 = [E(f"10.0.{i // 250}.{i % 250 + 1}", "10.0.0.100", "udp", 53) for i in range(600)]
    v6 = [E("2001:db8::1", "fd00:100::100", "tcp", 80), E("2001:db8::2", "fd00:100::100", "tcp", 80)]
    operations: list[ops.Operation] = [ops.Replace(e) for e in v4] + [ops.Add(e) for e in v6]
    results = provider.apply(operations)
    assert all(r.ok for r in results) and [r.op for r in results] == operations
    assert kernel.committed == [encode.element_key(e) for e in v4 + v6]
    element = c.NFNL_SUBSYS_NFTABLES << 8 | c.NFT_MSG_NEWSETELEM
    # 600 in fast4: 256 + 256 + 88; the two of fast6 in a fourth message.
    assert kernel.sends == [[c.NFNL_MSG_BATCH_BEGIN, element, element, element, element, c.NFNL_MSG_BATCH_END]]


def test_a_replaced_element_is_added_if_absent_and_left_if_present() -> None:
    kernel = FakeProvider(["fab0"])
    element = E("10.0.1.1", "10.0.0.100", "tcp", 80)
    assert [r.ok for r in kernel.apply([ops.Replace(element), ops.Replace(element)])] == [True, True]
    assert [i.obj for i in kernel.dump_elements()] == [element]
    kind, flags, _body = encode.set_element(ops.Replace(element), element, lambda dev: 0)
    assert kind == c.NFNL_SUBSYS_NFTABLES << 8 | c.NFT_MSG_NEWSETELEM and flags & c.NLM_F_CREATE
    assert not flags & c.NLM_F_EXCL  # nft_add_set_elem: an element already there is no error


def test_the_provider_deletes_elements_first_and_adds_them_last() -> None:
    order: list[str] = []

    class Recording(NetlinkProvider):
        def _apply(self, operations):  # type: ignore[no-untyped-def]
            order.append("rtnetlink")
            return [ops.OpResult(op) for op in operations]

        def _apply_nft(self, operations):  # type: ignore[no-untyped-def]
            order.append("add" if isinstance(operations[0], ops.Add) else "delete")
            return [ops.OpResult(op) for op in operations]

    provider = Recording.__new__(Recording)
    element = E("10.0.1.1", "10.0.0.100", "tcp", 80)
    route = ops.MplsRoute(1002, "lan0", via="10.0.1.1")
    operations = [ops.Add(route), ops.Add(element), ops.Delete(element), ops.Delete(route)]
    results = provider._apply_all(operations)
    assert [r.op for r in results] == operations and order == ["delete", "rtnetlink", "add"]


def test_the_fast_path_rule_comes_before_the_rate_limit_and_the_queue_and_tags_the_flow() -> None:
    lines = nftables.render(config()).splitlines()
    http = [i for i, line in enumerate(lines) if "tcp dport { 80 }" in line and "10.0.0.100" in line]
    fast, limit, queue = (lines[i] for i in http)
    assert "ip saddr . ip daddr . meta l4proto . th dport @fast4" in fast and fast.endswith(
        "counter name fastpath_http accept"
    )
    assert "ct mark set ct mark and 0x000fffff or 0x6d600000" in fast
    assert "@persrc4" in limit and " queue " in queue
    assert any("ip6 saddr . ip6 daddr . meta l4proto . th dport @fast6" in line for line in lines)
    assert {f"set {name} {{" for name in decode.FAST_PATH_SETS} <= {line.strip() for line in lines}


def test_a_flow_queued_before_its_element_was_in_is_counted_late_and_joins_its_session() -> None:
    node = Node()
    commit = node.packets(syn("10.0.1.10"), syn("10.0.1.10", 40001))  # one batch: the element is not in yet
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT, Action.ACCEPT]
    [session] = node.core.table
    assert session.packets_userspace == 2 and session.flows_total == 2
    assert node.core.counters["fastpath_late"] == 1 and elements(node) == [E("10.0.1.10", "10.0.0.100", "tcp", 80)]


def test_status_shows_fast_path_flows_and_what_the_kernel_could_not_take() -> None:
    from orchestrator.cli.asking import _counter_line

    line = _counter_line({"packets_userspace": 3, "flows_fast_path": 9, "fastpath_unmatched:ipv6-iid": 1})
    assert "packets_userspace 3, flows_fast_path 9" in line and "fastpath_unmatched:ipv6-iid 1" in line


# ---- a restart that finds its ruleset loaded ------------------------------------------------------


def _restarted(kernel: FakeProvider, monkeypatch: Any, loaded: bool) -> tuple[Any, list[str]]:
    """A new daemon's setup over `kernel` (its node check stubbed), the kernel's table holding the
    ruleset it would load when `loaded`; what it asked of nftables."""
    asked: list[str] = []

    def load(ruleset: str) -> None:
        asked.append("load")
        kernel.flush_elements()  # as loading the ruleset does to the sets

    monkeypatch.setattr(nftables, "load", load)
    monkeypatch.setattr(nftables, "loaded", lambda ruleset: asked.append("loaded?") or loaded)
    daemon = balancer_daemon(config(), kernel)
    daemon.make_ready = lambda cfg: None  # type: ignore[method-assign]
    daemon.setup()
    return daemon, asked


def test_a_restart_that_finds_its_ruleset_loaded_keeps_the_sets_and_puts_every_element_in_again(
    monkeypatch: Any,
) -> None:
    node = Node()
    for client in ("10.0.1.10", "10.0.1.11", "10.0.1.12"):
        node.packets(syn(client))
    before = sorted(elements(node), key=str)
    assert len(before) == 3
    lost = before[1]
    assert node.kernel.apply([ops.Delete(lost)])[0].ok  # as if a crash came between filter and element
    dumped: list[bool] = []
    monkeypatch.setattr(node.kernel, "dump_elements", lambda: dumped.append(True) or [])
    daemon, asked = _restarted(node.kernel, monkeypatch, loaded=True)
    assert asked == ["loaded?"] and not dumped  # no load, the sets not read back
    monkeypatch.undo()
    assert sorted((i.obj for i in node.kernel.dump_elements()), key=str) == before  # the lost one back
    assert {e for s in daemon.core.table for e in s.objects if isinstance(e, E)} == set(before)  # its end deletes them
    assert daemon.op_results["error"] == 0  # the two still there: no EEXIST


def test_a_restart_loads_the_ruleset_when_the_kernel_holds_another_or_a_filter_was_stale(monkeypatch: Any) -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    _daemon, asked = _restarted(node.kernel, monkeypatch, loaded=False)
    assert asked == ["loaded?", "load"] and [i.obj for i in node.kernel.dump_elements()] == elements(node)
    # A filter of no service (its VIP gone): the restore deletes it, and its element may be in a
    # set, so the sets start again from empty whatever the kernel's table says.
    stray = ops.FlowerFilter(
        "fab0",
        handles.filter_handle(1999, 0),
        ops.FlowerMatch("10.0.9.9/32", "10.0.0.99/32", "tcp", dst_port=80),
        ops.push_stack([100, 1999]),
        tag=b"",
    )
    assert node.kernel.apply([ops.Add(stray), ops.Add(E("10.0.9.9", "10.0.0.99", "tcp", 80))])[1].ok
    _daemon, asked = _restarted(node.kernel, monkeypatch, loaded=True)
    assert asked == ["load"]
    assert [i.obj for i in node.kernel.dump_elements()] == [E("10.0.1.10", "10.0.0.100", "tcp", 80)]


def test_the_ruleset_carries_its_digest_in_its_table_comment_as_nft_stores_it() -> None:
    ruleset = nftables.render(config())
    loaded = nftables.with_digest(ruleset)
    comment = f"{nftables.DIGEST_COMMENT}{nftables.digest(ruleset)}"
    lines = loaded.splitlines()
    assert lines[lines.index(nftables.TABLE_OPENS) + 1] == f'\tcomment "{comment}"'
    assert loaded.replace(f'\tcomment "{comment}"\n', "") == ruleset
    assert nftables.digest(nftables.render(config({"services.dns.vip": "10.0.0.101"}))) != nftables.digest(ruleset)
    # NFT_MSG_NEWTABLE as the kernel answers NFT_MSG_GETTABLE: the comment in libnftnl's udata
    # record (type 0, length, the text and its NUL), after the table's name and flags.
    udata = bytes([c.NFTNL_UDATA_TABLE_COMMENT, len(comment) + 1]) + comment.encode() + b"\0"
    body = nla.NFGENMSG.pack(c.NFPROTO_INET, 0, 0) + nla.asciiz(c.NFTA_TABLE_NAME, "mplsorch")
    assert decode.table_comment(memoryview(body)) is None
    body += nla.u32(2, 0) + nla.attr(c.NFTA_TABLE_USERDATA, bytes([7, 1, 0]) + udata)
    assert decode.table_comment(memoryview(body)) == comment
    kind, flags, request = encode.table_get()
    assert kind == c.NFNL_SUBSYS_NFTABLES << 8 | c.NFT_MSG_GETTABLE and not flags & c.NLM_F_DUMP
    assert nla.get_str(nla.attrs(request, nla.NFGENMSG.size)[c.NFTA_TABLE_NAME]) == "mplsorch"
