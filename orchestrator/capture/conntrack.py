"""Conntrack events: a session's flows end here, and (balancer) the flows the kernel's fast path
admitted start here: new-flow events of flows carrying our tag. When the kernel cannot deliver events
(ENOBUFS on the socket), the listener dumps our flows instead and reports the live ones, so the
daemon ends exactly the flows that are gone: a session end is never lost.

The kernel reports an expired flow's end only when its garbage collector reaches the entry (its
scan interval grows up to a minute and more on a busy table), or when a lookup or a dump does:
`sweep()` dumps on a timer, which both ends the expired entries and tells which are alive. Our
rulesets tag the flows they queue with CT_TAG in the conntrack mark, so a dump asks the kernel
for ours only instead of copying a router's whole table to userspace."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Literal, NamedTuple

from orchestrator.core.events import FlowKey, FlowsEnded, FlowsStarted, FlowTableResync
from orchestrator.dataplane.netlink import nla
from orchestrator.dataplane.netlink.constants import (
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
)
from orchestrator.dataplane.netlink.nlsocket import open_netlink

__all__ = [
    "CTA_MARK",
    "CTA_MARK_MASK",
    "CT_MASK",
    "CT_TAG",
    "NO_FLOW",
    "ConntrackListener",
    "FlowDump",
    "event_flow",
    "event_message",
    "mark_filter",
    "parse_flow",
]

CT_TAG, CT_MASK = 0x6D600000, 0xFFF00000  # "m`" in the high 12 bits of the conntrack mark
NO_FLOW = (1, 0)  # (mark, mask): no mark under mask 0 is 1, so a dump with it reports no flow
# The event socket's receive buffer. The daemon reads it on its loop's tick (daemon.loop: every
# 0.25 s, not when it turns readable), so it holds a tick's events of the fast path's busiest
# moments: an event takes an estimated 1-1.5 KB of it (an skb each; not measured), so 32 MB some
# 20,000-30,000 events, where `lab bench setup`'s (d) flood brings about 4,000 a tick. Memory
# only while events wait.
EVENTS_RCVBUF = 32 << 20
# A full sweep's dump is read on the daemon's loop a slice at a time (FlowDump.step), never in a
# thread: a thread that decodes holds the GIL, and at the lowest CPU priority it held it while
# normal-priority work had the one CPU, the loop waiting for it (docs/design.md, "the conntrack
# sweep"). A slice is this many datagrams: the kernel writes a dump's datagrams of at most 32 KB
# (netlink_recvmsg caps max_recvmsg_len), about 190 of our flows each in the lab, and fills the
# next one in the recvmsg that reads this one. Two a slice took 3.7 ms of the lab guest's loop
# on average (40,019 flows in 104 slices, 0.387 s): one is about half that.
DUMP_SLICE = 1
DUMP_WAIT = 5.0  # seconds a dump may keep the kernel's next datagram waiting: then it failed
DumpState = Literal["done", "more", "wait"]


EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"


def events_enabled(path: str = EVENTS_SYSCTL) -> bool:
    """Whether the kernel sends conntrack events in this network namespace (the sysctl above 0:
    1 always, 2 for entries made while a listener exists); False when it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return False


def parse_flow(body: memoryview) -> FlowKey | None:
    a = nla.attrs(body, nla.NFGENMSG.size)
    if CTA_TUPLE_ORIG not in a:
        return None
    tup = nla.attrs(a[CTA_TUPLE_ORIG])
    if CTA_TUPLE_IP not in tup or CTA_TUPLE_PROTO not in tup:
        return None
    ip = nla.attrs(tup[CTA_TUPLE_IP])
    proto = nla.attrs(tup[CTA_TUPLE_PROTO])
    if CTA_IP_V4_SRC in ip:
        family, src, dst = socket.AF_INET, ip[CTA_IP_V4_SRC], ip.get(CTA_IP_V4_DST)
    elif CTA_IP_V6_SRC in ip:
        family, src, dst = socket.AF_INET6, ip[CTA_IP_V6_SRC], ip.get(CTA_IP_V6_DST)
    else:
        return None
    if dst is None or CTA_PROTO_NUM not in proto:
        return None
    sport = struct.unpack_from("!H", proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else None
    dport = struct.unpack_from("!H", proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else None
    return FlowKey(
        proto[CTA_PROTO_NUM][0],
        socket.inet_ntop(family, bytes(src)),
        socket.inet_ntop(family, bytes(dst)),
        sport,
        dport,
    )


_NLMSG = struct.Struct("=IH")  # nlmsghdr's length and type
_NLA = struct.Struct("=HH")
_MARK = struct.Struct("!I")
_NEW = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE


def _word(length: int, kind: int) -> int:
    """An attribute header (host order) as the big-endian word `_V4_TUPLE` reads it as."""
    return int.from_bytes(_NLA.pack(length, kind), "big")


# The original tuple of an IPv4 flow with both ports, exactly as ctnetlink lays it out (its
# payload: CTA_TUPLE_IP {src, dst}, CTA_TUPLE_PROTO {num, sport, dport}): each attribute header
# as one word to compare, the addresses and ports as they are.
_V4_TUPLE = struct.Struct(">I I4s I4s I I B3x I H2x I H2x")
_V4_TUPLE_LEN = 4 + _V4_TUPLE.size  # the CTA_TUPLE_ORIG attribute with its header
_V4_HEADERS = (
    _word(20, CTA_TUPLE_IP | NLA_F_NESTED),
    _word(8, CTA_IP_V4_SRC),
    _word(8, CTA_IP_V4_DST),
    _word(28, CTA_TUPLE_PROTO | NLA_F_NESTED),
    _word(5, CTA_PROTO_NUM),
    _word(6, CTA_PROTO_SRC_PORT),
    _word(6, CTA_PROTO_DST_PORT),
)

# Destinations of tagged flows are the services' VIPs, a few: their text is kept (bounded).
_VIPS: dict[bytes, str] = {}


class _Layout(NamedTuple):
    """How the messages of one body length were laid out, read in two unpacks: every
    attribute header (the top level's and the IPv4 original tuple's), to compare with
    `headers`, then the flow's fields (source, destination, protocol, ports, the mark if any)."""

    read_headers: struct.Struct
    headers: tuple[int, ...]
    read_fields: struct.Struct
    marked: bool


# Layouts by body length: the kernel writes the events of a kind of flow alike (ctnetlink's
# attributes in a fixed order and size), so a few lengths cover them; None: not one of ours.
_LAYOUTS: dict[int, _Layout | None] = {}
_MAX_LAYOUTS = 64


def _struct_at(fields: list[tuple[int, str]]) -> struct.Struct:
    """A big-endian struct reading `fields` (offset, code) from offset 0, skipping the rest."""
    fmt, at = ">", 0
    for offset, code in sorted(fields):
        fmt += f"{offset - at}x{code}" if offset > at else code
        at = offset + struct.calcsize(">" + code)
    return struct.Struct(fmt)


def _learn(buf: bytes | bytearray, start: int, end: int) -> _Layout | None:
    """The layout of the message in buf[start:end], when its attributes fill it exactly and its
    original tuple is IPv4 with ports (`_V4_TUPLE`); None otherwise."""
    headers: list[tuple[int, int]] = []
    orig = mark = -1
    offset = nla.NFGENMSG.size
    while offset + 4 <= end - start:
        length, kind = _NLA.unpack_from(buf, start + offset)
        if length < 4:
            return None
        headers.append((offset, _word(length, kind)))
        if kind & NLA_TYPE_MASK == CTA_TUPLE_ORIG:
            if length != _V4_TUPLE_LEN:
                return None
            orig = offset
        elif kind & NLA_TYPE_MASK == CTA_MARK:
            if length != 8:
                return None
            mark = offset
        offset += (length + 3) & ~3
    if offset != end - start or orig < 0:
        return None
    values = _V4_TUPLE.unpack_from(buf, start + orig + 4)
    if values[0:2] + values[3:4] + values[5:7] + values[8:9] + values[10:11] != _V4_HEADERS:
        return None
    inner = (0, 4, 12, 20, 24, 32, 40)  # where _V4_TUPLE has its headers
    headers += [(orig + 4 + at, word) for at, word in zip(inner, _V4_HEADERS)]
    fields = [(orig + 12, "4s"), (orig + 20, "4s"), (orig + 32, "B"), (orig + 40, "H"), (orig + 48, "H")]
    if mark >= 0:
        fields.append((mark + 4, "I"))
    return _Layout(
        _struct_at([(at, "I") for at, _ in headers]),
        tuple(word for _, word in sorted(headers)),
        _struct_at(fields),
        mark >= 0,
    )


def event_flow(buf: bytes | bytearray, start: int, end: int, tagged: bool) -> FlowKey | None:
    """The flow of the ctnetlink message whose body (nfgenmsg onwards) is buf[start:end]; None
    when it has none, or (`tagged`) when its conntrack mark lacks our tag. What `is_tagged` and
    `parse_flow` tell, for less (issue 15: one event per flow the fast path admits): a message
    laid out as an earlier one of its length (`_LAYOUTS`: every attribute header the same) is
    read in two unpacks; any other goes to `parse_flow`."""
    size = end - start
    layout = _LAYOUTS.get(size)
    if layout is None:
        if size in _LAYOUTS or len(_LAYOUTS) >= _MAX_LAYOUTS:
            return _parse(buf, start, end, tagged)
        layout = _LAYOUTS[size] = _learn(buf, start, end)
        if layout is None:
            return _parse(buf, start, end, tagged)
    if layout.read_headers.unpack_from(buf, start) != layout.headers:
        return _parse(buf, start, end, tagged)
    if layout.marked:
        src, dst, proto, sport, dport, mark = layout.read_fields.unpack_from(buf, start)
        if tagged and mark & CT_MASK != CT_TAG:
            return None
    elif tagged:
        return None
    else:
        src, dst, proto, sport, dport = layout.read_fields.unpack_from(buf, start)
    vip = _VIPS.get(dst)
    if vip is None:
        if len(_VIPS) >= 1024:
            _VIPS.clear()
        vip = _VIPS[dst] = socket.inet_ntoa(dst)
    return FlowKey(proto, socket.inet_ntoa(src), vip, sport, dport)


def _parse(buf: bytes | bytearray, start: int, end: int, tagged: bool) -> FlowKey | None:
    body = memoryview(buf)[start:end]
    if tagged and not is_tagged(body):
        return None
    return parse_flow(body)


def is_tagged(body: memoryview) -> bool:
    """Whether a ctnetlink message's conntrack mark carries our tag (CT_TAG)."""
    a = nla.attrs(body, nla.NFGENMSG.size)
    return CTA_MARK in a and struct.unpack_from("!I", a[CTA_MARK])[0] & CT_MASK == CT_TAG


class ConntrackListener:
    """Destroy events of one network namespace's conntrack table; with `new_events`, also the
    new-flow events of our tagged flows (the balancer's fast path: flows it never saw)."""

    def __init__(self, netns: str | None = None, rcvbuf: int = EVENTS_RCVBUF, new_events: bool = False) -> None:
        self._netns = netns
        self._sock = open_netlink(NETLINK_NETFILTER, netns, rcvbuf)
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
        if new_events:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_NEW)
        self._sock.setblocking(False)
        self._buf = bytearray(1 << 18)
        self.resyncs = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read(self) -> list[FlowsStarted | FlowsEnded | FlowTableResync]:
        """What happened since the last read (call when readable), in the order it happened:
        a flow that started and ended between two reads is reported started first."""
        events: list[FlowsStarted | FlowsEnded | FlowTableResync] = []
        run: list[FlowKey] = []
        started = False

        def flush() -> None:
            if run:
                events.append(FlowsStarted(tuple(run)) if started else FlowsEnded(tuple(run)))
                run.clear()

        buf, recv_into, header = self._buf, self._sock.recv_into, _NLMSG.unpack_from
        while True:
            try:
                size = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resyncs += 1
                flush()
                self.discard_queued()
                return [*events, FlowTableResync(self.dump())]
            offset = 0
            while offset + 16 <= size:  # the datagram's messages (nla.messages, inlined)
                length, kind = header(buf, offset)
                if length < 16:
                    break
                if kind == _NEW or kind == _DELETE:
                    new = kind == _NEW
                    flow = event_flow(buf, offset + 16, min(offset + length, size), new)
                    if flow is not None:
                        if new != started:
                            flush()
                            started = new
                        run.append(flow)
                offset += (length + 3) & ~3
        flush()
        return events

    def discard_queued(self) -> int:
        """Read and drop every event queued on our socket; how many datagrams. After an
        overrun the kernel drops every event for this socket, silently, until a read empties
        its queue (af_netlink.c: netlink_overrun sets NETLINK_S_CONGESTED and reports ENOBUFS
        once; netlink_broadcast_deliver refuses while it is set; netlink_rcv_wake clears it
        when the queue is empty). So the queue is emptied before the dump that resyncs: what
        was queued is older than that dump, and every event after it is delivered again, or
        its loss reported again by ENOBUFS."""
        dropped = 0
        while True:
            try:
                self._sock.recv_into(self._buf)
            except BlockingIOError:
                return dropped
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                continue  # an overrun after the one being handled: the dump after this covers it
            dropped += 1

    def sweep(self) -> FlowTableResync:
        """Our live flows now; expired ones are ended by the dump itself (their destroy events
        follow on the event socket and find nothing left to end)."""
        return FlowTableResync(self.dump(), sweep=True)

    def expire(self) -> None:
        """The kernel ends the expired entries a dump walks past (their destroy events follow on
        the event socket and end the flows there). This dump asks for a mark no flow can carry
        (NO_FLOW: CTA_MARK 1 under CTA_MARK_MASK 0): the kernel walks the whole table, both
        families, and answers with its end only, so no flow is copied or decoded."""
        with open_netlink(NETLINK_NETFILTER, self._netns) as sock:
            sock.bind((0, 0))
            body = nla.NFGENMSG.pack(socket.AF_UNSPEC, 0, 0) + mark_filter(*NO_FLOW)
            sock.send(
                nla.message(
                    NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, socket.AF_UNSPEC, body
                )
            )
            buf = bytearray(1 << 16)
            while True:
                size = sock.recv_into(buf)
                offset = 0
                while offset + 16 <= size:
                    length, kind = _NLMSG.unpack_from(buf, offset)
                    if length < 16 or kind in (NLMSG_DONE, NLMSG_ERROR):
                        if kind == NLMSG_ERROR and length >= 20:
                            code = -struct.unpack_from("=i", buf, offset + 16)[0]
                            if code:
                                raise OSError(code, f"conntrack expiry dump: {os.strerror(code)}")
                        return
                    offset += (length + 3) & ~3

    def start_dump(self) -> FlowDump:
        """A dump of our flows, read by whoever drives it (`FlowDump.step`)."""
        return FlowDump(self._netns)

    def dump(self) -> frozenset[FlowKey]:
        """Our flows (CT_TAG) in the table, on a socket of its own (events keep arriving on ours),
        read in one go."""
        dump = FlowDump(self._netns)
        try:
            while (state := dump.step(1 << 30)) != "done":
                if state == "wait" and not select.select([dump], [], [], DUMP_WAIT)[0]:
                    raise TimeoutError(f"conntrack dump: nothing from the kernel in {DUMP_WAIT:.0f} s")
            return dump.live
        finally:
            dump.close()


class FlowDump:
    """A dump of our flows (CT_TAG) in the table, every family in one walk, on a non-blocking
    socket of its own, read a slice at a time (`step`) by the thread that asks: the daemon's loop reads a
    slice, serves what is ready (first packets), reads the next. The kernel's own work for the
    dump happens in those reads (it fills the next datagram when one is read), so it comes in
    slices too."""

    def __init__(self, netns: str | None = None) -> None:
        self._sock = open_netlink(NETLINK_NETFILTER, netns)
        try:
            self._sock.bind((0, 0))
            self._sock.setblocking(False)
            self._buf = bytearray(1 << 18)
            self._live: set[FlowKey] = set()
            self.datagrams = 0  # read so far
            self._request()
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    @property
    def live(self) -> frozenset[FlowKey]:
        """Our flows read so far: all of them once `step` said "done"."""
        return frozenset(self._live)

    def _request(self) -> None:
        """One dump of every family (AF_UNSPEC): the kernel walks its table once. A dump per
        family walked it twice, and the IPv6 one, finding none of our flows, never filled a
        datagram, so its whole walk (40,000 entries in the lab) came in one read: a slice of
        about 100 ms on the loop."""
        body = nla.NFGENMSG.pack(socket.AF_UNSPEC, 0, 0) + mark_filter()
        self._sock.send(
            nla.message(
                NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, socket.AF_UNSPEC, body
            )
        )

    def step(self, budget: int = DUMP_SLICE) -> DumpState:
        """Read and decode up to `budget` datagrams: "done" once the dump has ended,
        "wait" when the kernel has none ready (wait until `fileno` is readable), else "more".
        A dump the kernel ends with an error raises OSError."""
        buf, live = self._buf, self._live
        while budget > 0:
            try:
                size = self._sock.recv_into(buf)
            except BlockingIOError:
                return "wait"
            budget -= 1
            self.datagrams += 1
            offset = 0
            while offset + 16 <= size:
                length, kind = _NLMSG.unpack_from(buf, offset)
                if length < 16:
                    break
                if kind == NLMSG_ERROR and length >= 20:
                    code = -struct.unpack_from("=i", buf, offset + 16)[0]
                    if code:
                        raise OSError(code, f"conntrack dump: {os.strerror(code)}")
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return "done"
                flow = event_flow(buf, offset + 16, min(offset + length, size), False)
                if flow is not None:
                    live.add(flow)
                offset += (length + 3) & ~3
        return "more"


# The other top-level attributes of an event (linux/netfilter/nfnetlink_conntrack.h); only
# `event_message` writes them, as the kernel does.
_CTA_TUPLE_REPLY, _CTA_STATUS, _CTA_TIMEOUT, _CTA_ID = 2, 3, 7, 12


def event_message(kind: int, flow: FlowKey, mark: int | None, flow_id: int = 1) -> bytes:
    """A ctnetlink event of `flow` as the kernel multicasts it (ctnetlink_conntrack_event,
    Linux 6.1: both tuples, id, status, for a new flow its timeout, then the mark when set):
    what the tests and the hot path bench feed the listener."""
    family = socket.AF_INET6 if ":" in flow.src else socket.AF_INET
    src_kind, dst_kind = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if family == socket.AF_INET6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)

    def tuple_of(kind: int, src: str, dst: str, sport: int | None, dport: int | None) -> bytes:
        ports = b""
        if sport is not None:
            ports += nla.attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
        if dport is not None:
            ports += nla.attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
        return nla.nest(
            kind,
            nla.nest(
                CTA_TUPLE_IP,
                nla.attr(src_kind, socket.inet_pton(family, src)),
                nla.attr(dst_kind, socket.inet_pton(family, dst)),
            ),
            nla.nest(CTA_TUPLE_PROTO, nla.u8(CTA_PROTO_NUM, flow.proto), ports),
        )

    body = nla.NFGENMSG.pack(family, 0, 0)
    body += tuple_of(CTA_TUPLE_ORIG, flow.src, flow.dst, flow.sport, flow.dport)
    body += tuple_of(_CTA_TUPLE_REPLY, flow.dst, flow.src, flow.dport, flow.sport)
    body += nla.attr(_CTA_ID, struct.pack("!I", flow_id)) + nla.attr(_CTA_STATUS, struct.pack("!I", 0x188))
    if kind == IPCTNL_MSG_CT_NEW:
        body += nla.attr(_CTA_TIMEOUT, struct.pack("!I", 30))
    if mark:
        body += nla.attr(CTA_MARK, struct.pack("!I", mark))
    return nla.message(NFNL_SUBSYS_CTNETLINK << 8 | kind, 0, 0, body)


def mark_filter(mark: int = CT_TAG, mask: int = CT_MASK) -> bytes:
    """The dump request's attributes that make the kernel report only flows whose conntrack
    mark under `mask` is `mark`: by default those tagged CT_TAG."""
    return nla.attr(CTA_MARK, struct.pack("!I", mark)) + nla.attr(CTA_MARK_MASK, struct.pack("!I", mask))
