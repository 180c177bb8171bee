"""`mplsorch status` reads nftables' named counters over nf_tables netlink: one NFT_MSG_GETOBJ
dump of our table's counter objects, no `nft` subprocess. The kernel's side is scripted here
with the bytes nf_tables_fill_obj_info sends."""

from __future__ import annotations

import asyncio
import errno
import struct
from collections import deque

import pytest

from orchestrator.capture import nftables
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import decode, encode, nla
from orchestrator.dataplane.netlink.nlsocket import NftBatchSocket
from tests.unit.conftest import balancer_daemon, config

NFT_MSG_NEWOBJ = 18
NFTA_OBJ_USE, NFTA_OBJ_HANDLE, NFTA_OBJ_PAD = 5, 6, 7
NFTA_COUNTER_PAD = 3
NFT_OBJECT_QUOTA = 2


def be64(kind: int, value: int, pad: int) -> bytes:
    """nla_put_be64 on a 64-bit kernel: an empty pad attribute first when the value would not be
    8-byte aligned (it is not after an odd number of 4-byte words)."""
    return nla.attr(pad, b"") + nla.attr(kind, struct.pack("!Q", value))


def object_message(seq: int, name: str, packets: int, table: str = "mplsorch", kind: int = 1) -> bytes:
    """One NFT_MSG_NEWOBJ dump message as nf_tables_fill_obj_info builds it."""
    data = be64(c.NFTA_COUNTER_BYTES, packets * 60, NFTA_COUNTER_PAD) + be64(
        c.NFTA_COUNTER_PACKETS, packets, NFTA_COUNTER_PAD
    )
    body = (
        nla.NFGENMSG.pack(c.NFPROTO_INET, 0, 7)  # res_id: the ruleset's generation
        + nla.asciiz(c.NFTA_OBJ_TABLE, table)
        + nla.asciiz(c.NFTA_OBJ_NAME, name)
        + nla.attr(c.NFTA_OBJ_TYPE, struct.pack("!I", kind))
        + nla.attr(NFTA_OBJ_USE, struct.pack("!I", 1))
        + nla.nest(c.NFTA_OBJ_DATA, data)
        + be64(NFTA_OBJ_HANDLE, 3, NFTA_OBJ_PAD)
    )
    return nla.message(c.NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWOBJ, c.NLM_F_MULTI, seq, body)


class KernelSocket:
    """A netlink socket whose answers to each request are scripted: `reply(seq)` -> datagrams."""

    def __init__(self, reply) -> None:  # type: ignore[no-untyped-def]
        self.reply = reply
        self.sent: list[bytes] = []
        self.data: deque[bytes] = deque()
        self.closed = False

    def setsockopt(self, *args: object) -> None:
        pass

    def bind(self, addr: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)
        self.data.extend(self.reply(nla.header(data, 0)[3]))

    def recv_into(self, buf: bytearray) -> int:
        data = self.data.popleft()
        buf[: len(data)] = data
        return len(data)


def done(seq: int) -> bytes:
    return nla.message(c.NLMSG_DONE, c.NLM_F_MULTI, seq, struct.pack("=i", 0))


def test_the_request_asks_for_our_tables_counter_objects_only() -> None:
    kind, body = encode.counters_dump()
    assert kind == 10 << 8 | 19  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETOBJ
    assert body == (
        b"\x01\x00\x00\x00"  # nfgenmsg: NFPROTO_INET, version 0, res_id 0
        + b"\x0d\x00\x01\x00mplsorch\x00\x00\x00\x00"  # NFTA_OBJ_TABLE "mplsorch\0", padded
        + b"\x08\x00\x03\x00\x00\x00\x00\x01"  # NFTA_OBJ_TYPE NFT_OBJECT_COUNTER, big endian
    )


def test_a_counter_object_decodes_to_its_name_and_packets() -> None:
    message = object_message(1, "queued_http", 2**33 + 5)
    [(_kind, _flags, _seq, body)] = nla.messages(message)
    assert decode.counter(body) == ("queued_http", 2**33 + 5)
    [(_kind, _flags, _seq, other)] = nla.messages(object_message(1, "x", 1, table="filter"))
    assert decode.counter(other) is None
    [(_kind, _flags, _seq, quota)] = nla.messages(object_message(1, "q", 1, kind=NFT_OBJECT_QUOTA))
    assert decode.counter(quota) is None
    with pytest.raises(decode.DecodeError):
        decode.counter(body[:40])  # cut before its name


def test_read_counters_dumps_the_objects_over_netlink() -> None:
    def kernel(seq: int) -> list[bytes]:  # two datagrams, as a dump that fills a page
        return [
            object_message(seq, "queued_http", 3) + object_message(seq, "fastpath_http", 40),
            object_message(seq, "refused_rst", 0) + done(seq),
        ]

    fake = KernelSocket(kernel)
    counters = nftables.read_counters(NftBatchSocket(sock=fake))  # type: ignore[arg-type]
    assert counters == {"queued_http": 3, "fastpath_http": 40, "refused_rst": 0}
    [request] = fake.sent
    length, kind, flags, _seq = nla.header(request, 0)
    assert (length, kind, flags) == (len(request), 10 << 8 | 19, c.NLM_F_REQUEST | c.NLM_F_DUMP)
    assert request[16:] == encode.counters_dump()[1]
    assert fake.closed


def test_no_table_yet_is_no_counters() -> None:
    def kernel(seq: int) -> list[bytes]:
        error = struct.pack("=i", -errno.ENOENT) + nla.message(0, 0, seq, b"")[:16]
        return [nla.message(c.NLMSG_ERROR, 0, seq, error)]

    assert nftables.read_counters(NftBatchSocket(sock=KernelSocket(kernel))) == {}  # type: ignore[arg-type]


def test_status_over_the_control_socket_carries_the_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "read_counters", lambda: {"rate_limited": 7})
    daemon = balancer_daemon(config(), FakeProvider(["lan0", "fab0"]))
    status = asyncio.run(daemon.answer({"cmd": "status"}))
    assert status["nft_counters"] == {"rate_limited": 7} and status["role"] == "balancer"
    assert asyncio.run(daemon.answer({"cmd": "labels"})) == daemon.handle_request({"cmd": "labels"})
