"""A full sweep's dump read a slice at a time (capture.conntrack.FlowDump): the kernel's
datagrams, as it writes them for one dump of every family, decoded DUMP_SLICE a step; "wait"
when none is ready; the kernel's error raised."""

from __future__ import annotations

import collections
import errno
import socket
import struct

import pytest

from orchestrator.capture import conntrack as ct
from orchestrator.core.events import FlowKey
from orchestrator.dataplane.netlink.constants import IPCTNL_MSG_CT_NEW, NLMSG_DONE, NLMSG_ERROR
from orchestrator.lab.bench.hotpath import EventSocket


def end(kind: int = NLMSG_DONE, code: int = 0) -> bytes:
    """The message that ends a dump: NLMSG_DONE, or NLMSG_ERROR with -code."""
    return struct.pack("=IHHII", 20, kind, 2, 1, 0) + struct.pack("=i", -code)


class DumpSocket(EventSocket):
    """The dump's socket: each request sends back its datagrams, one by one (read as the bench's
    event socket reads them)."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        super().__init__()
        self.answers = collections.deque(answers)
        self.families: list[int] = []
        self.closed = False

    def send(self, message: bytes) -> int:
        self.families.append(message[16])  # nfgenmsg's family
        self.datagrams.extend(self.answers.popleft())
        return len(message)

    def close(self) -> None:
        self.closed = True


def flow_dump(sock: DumpSocket) -> ct.FlowDump:
    dump = ct.FlowDump.__new__(ct.FlowDump)
    dump._sock, dump._buf = sock, bytearray(1 << 18)  # type: ignore[assignment]
    dump._live, dump.datagrams = set(), 0
    dump._request()
    return dump


def flows(n: int, first: int = 0) -> list[FlowKey]:
    return [FlowKey(6, f"198.51.100.{i % 250 + 1}", "192.0.2.10", 10_000 + i, 80) for i in range(first, first + n)]


def datagram(keys: list[FlowKey]) -> bytes:
    return b"".join(ct.event_message(IPCTNL_MSG_CT_NEW, k, ct.CT_TAG | 1) for k in keys)


def test_a_dump_of_every_family_is_read_a_slice_of_datagrams_at_a_time() -> None:
    """One request (AF_UNSPEC: the kernel walks its table once for both families), its
    datagrams read 2 a step here (the budget), IPv4 and IPv6 flows alike, up to the dump's end.
    A dump per family walked the table twice, and the IPv6 one's walk came in one read."""
    v4 = flows(500)
    v6 = FlowKey(6, "2001:db8::7", "2001:db8::10", 40_000, 80)
    answers = [[datagram(v4[i : i + 100]) for i in range(0, 500, 100)] + [datagram([v6]) + end()]]
    sock = DumpSocket(answers)
    dump = flow_dump(sock)
    states = []
    while not states or states[-1] != "done":
        states.append(dump.step(2))
        assert len(states) < 20
    assert states == ["more", "more", "done"]  # 6 datagrams, the last with the dump's end
    assert sock.families == [socket.AF_UNSPEC]
    assert dump.live == frozenset(v4) | {v6} and dump.datagrams == 6


def test_a_dump_says_wait_when_the_kernel_has_nothing_ready_and_raises_its_error() -> None:
    sock = DumpSocket([[datagram(flows(10))]])
    dump = flow_dump(sock)
    assert dump.step() == "more" and dump.live == frozenset(flows(10))  # DUMP_SLICE: one datagram
    assert dump.step() == "wait"
    sock.datagrams.append(datagram(flows(5, 10)) + end(NLMSG_ERROR, errno.EBUSY))
    with pytest.raises(OSError) as failed:
        dump.step()
    assert failed.value.errno == errno.EBUSY
