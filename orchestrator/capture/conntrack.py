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
import socket
import struct

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
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
)
from orchestrator.dataplane.netlink.nlsocket import open_netlink

__all__ = ["CTA_MARK", "CTA_MARK_MASK", "CT_MASK", "CT_TAG", "ConntrackListener", "mark_filter", "parse_flow"]

CT_TAG, CT_MASK = 0x6D600000, 0xFFF00000  # "m`" in the high 12 bits of the conntrack mark


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


def is_tagged(body: memoryview) -> bool:
    """Whether a ctnetlink message's conntrack mark carries our tag (CT_TAG)."""
    a = nla.attrs(body, nla.NFGENMSG.size)
    return CTA_MARK in a and struct.unpack_from("!I", a[CTA_MARK])[0] & CT_MASK == CT_TAG


class ConntrackListener:
    """Destroy events of one network namespace's conntrack table; with `new_events`, also the
    new-flow events of our tagged flows (the balancer's fast path: flows it never saw)."""

    def __init__(self, netns: str | None = None, rcvbuf: int = 8 << 20, new_events: bool = False) -> None:
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

        while True:
            try:
                size = self._sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resyncs += 1
                flush()
                return [*events, FlowTableResync(self.dump())]
            for kind, _flags, _seq, body in nla.messages(memoryview(self._buf)[:size]):
                if kind == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW:
                    new = True
                    if not is_tagged(body):
                        continue
                elif kind == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE:
                    new = False
                else:
                    continue
                flow = parse_flow(body)
                if flow is None:
                    continue
                if new != started:
                    flush()
                    started = new
                run.append(flow)
        flush()
        return events

    def sweep(self) -> FlowTableResync:
        """Our live flows now; expired ones are ended by the dump itself (their destroy events
        follow on the event socket and find nothing left to end)."""
        return FlowTableResync(self.dump(), sweep=True)

    def dump(self) -> frozenset[FlowKey]:
        """Our flows (CT_TAG) in the table, on a socket of its own (events keep arriving on ours)."""
        live: set[FlowKey] = set()
        with open_netlink(NETLINK_NETFILTER, self._netns) as sock:
            sock.bind((0, 0))
            buf = bytearray(1 << 18)
            for family in (socket.AF_INET, socket.AF_INET6):
                body = nla.NFGENMSG.pack(family, 0, 0) + mark_filter()
                sock.send(
                    nla.message(
                        NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, body
                    )
                )
                done = False
                while not done:
                    size = sock.recv_into(buf)
                    for kind, _flags, _seq, mbody in nla.messages(memoryview(buf)[:size]):
                        if kind in (NLMSG_DONE, NLMSG_ERROR):
                            done = True
                            break
                        flow = parse_flow(mbody)
                        if flow is not None:
                            live.add(flow)
        return frozenset(live)


def mark_filter() -> bytes:
    """The dump request's attributes that make the kernel report only flows tagged CT_TAG."""
    return nla.attr(CTA_MARK, struct.pack("!I", CT_TAG)) + nla.attr(CTA_MARK_MASK, struct.pack("!I", CT_MASK))
