"""Batching: many messages per sendmsg, errors matched back to their operation by sequence."""

from __future__ import annotations

import errno
import struct
from collections import deque

import pytest

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import encode, nla, nlsocket
from orchestrator.dataplane.netlink import provider as provider_module
from orchestrator.dataplane.netlink.provider import NetlinkProvider


class ScriptedKernel:
    """Stands in for the kernel side of the socket: handles each sent message in order, replies
    with an error for labels it is told to refuse, and with an ACK where one is asked for."""

    def __init__(self, refuse: dict[int, tuple[int, str]] | None = None) -> None:
        self.refuse = refuse or {}
        self.sends: list[list[tuple[int, int, int]]] = []
        self.replies: deque[bytes] = deque()
        self.handled: list[int] = []

    def setsockopt(self, *args: object) -> None:
        pass

    def bind(self, *args: object) -> None:
        pass

    def settimeout(self, *args: object) -> None:
        pass

    def answer(self, body: memoryview) -> tuple[int, str]:
        """(errno, extack text) for one request; 0 is success."""
        label = struct.unpack_from("!I", body, 12 + 4)[0] >> 12  # RTA_DST of an MPLS route
        self.handled.append(label)
        return self.refuse.get(label, (0, ""))

    def sendall(self, data: bytes) -> None:
        batch = []
        for kind, flags, seq, body in nla.messages(data):
            batch.append((kind, flags, seq))
            code, text = self.answer(body)
            if code or flags & c.NLM_F_ACK:
                tlv = nla.asciiz(c.NLMSGERR_ATTR_MSG, text) if text else b""
                payload = struct.pack("=i", -code) + struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + tlv
                self.replies.append(nla.message(c.NLMSG_ERROR, 0x100 | (0x200 if tlv else 0), seq, payload))
        self.sends.append(batch)

    def recv_into(self, buf: bytearray) -> int:
        data = self.replies.popleft()
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def provider_with(kernel: ScriptedKernel) -> NetlinkProvider:
    return NetlinkProvider(sock=nlsocket.NetlinkSocket(sock=kernel), links={"lo": 1})


def test_one_sendmsg_per_chunk_and_ack_only_on_the_last(monkeypatch) -> None:
    monkeypatch.setattr(nlsocket, "CHUNK_MESSAGES", 100)
    kernel = ScriptedKernel()
    results = provider_with(kernel).apply([ops.Add(ops.MplsRoute(16 + i, "lo")) for i in range(250)])
    assert all(r.ok for r in results) and len(results) == 250
    assert [len(batch) for batch in kernel.sends] == [100, 100, 50]
    for batch in kernel.sends:
        acked = [flags & c.NLM_F_ACK for _kind, flags, _seq in batch]
        assert acked[-1] and not any(acked[:-1])


def test_errors_map_to_their_operation_and_nothing_else_is_lost(monkeypatch) -> None:
    monkeypatch.setattr(nlsocket, "CHUNK_MESSAGES", 10)
    kernel = ScriptedKernel(refuse={23: (errno.EEXIST, ""), 29: (errno.EINVAL, "bad label"), 30: (errno.ENOBUFS, "")})
    operations = [ops.Add(ops.MplsRoute(label, "lo")) for label in range(16, 40)]
    results = provider_with(kernel).apply(operations)
    assert [r.op for r in results] == operations
    failed = {r.op.obj.label: r for r in results if not r.ok}
    assert set(failed) == {23, 29, 30}
    assert failed[23].errno == errno.EEXIST and "File exists" in failed[23].error
    assert failed[29].error == "bad label (EINVAL)"
    assert "mpls route 29" in str(failed[29])  # the report names the operation
    assert kernel.handled == list(range(16, 40))  # every operation reached the kernel, in order


def test_unencodable_operation_is_reported_and_others_still_sent() -> None:
    kernel = ScriptedKernel()
    operations = [
        ops.Add(ops.MplsRoute(100, "lo")),
        ops.Add(ops.MplsRoute(1 << 20, "lo")),
        ops.Add(ops.MplsRoute(101, "nosuchdev")),
        ops.Add(ops.MplsRoute(102, "lo")),
    ]
    provider = provider_with(kernel)
    results = provider.apply(operations)
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[1].errno == errno.EINVAL and "not an MPLS label" in results[1].error
    assert results[2].errno == errno.ENODEV and "nosuchdev" in results[2].error
    assert kernel.handled == [100, 102]


def test_stale_replies_of_other_sequences_are_ignored() -> None:
    kernel = ScriptedKernel()
    sock = nlsocket.NetlinkSocket(sock=kernel)  # type: ignore[arg-type]
    stale = nla.message(c.NLMSG_ERROR, 0, 99999, struct.pack("=i", -errno.EPERM) + bytes(16))
    kernel.replies.append(stale)
    body = struct.pack("=BBBBBBBBI", c.AF_MPLS, 20, 0, 0, 254, c.RT_PROTO, 0, 1, 0) + nla.attr(
        c.RTA_DST, struct.pack("!I", 100 << 12 | 0x100)
    )
    assert sock.transact([(c.RTM_NEWROUTE, c.NLM_F_REQUEST, body)]) == [None]


def test_a_big_batch_is_sent_by_the_pipeline_in_order_with_every_error_mapped(monkeypatch) -> None:
    """Pieces encoded while the sender thread has the previous one in the kernel: same order,
    same results as one piece, an unencodable operation reported in place."""
    monkeypatch.setattr(nlsocket, "CHUNK_MESSAGES", 7)
    monkeypatch.setattr(provider_module, "PIPELINE_PIECE", 10)
    kernel = ScriptedKernel(refuse={25: (errno.EEXIST, ""), 51: (errno.EINVAL, "bad")})
    provider = provider_with(kernel)
    operations = [ops.Add(ops.MplsRoute(label, "lo" if label != 40 else "nosuchdev")) for label in range(16, 66)]
    results = provider.apply(operations)
    assert [r.op for r in results] == operations
    assert {r.op.obj.label: r.errno for r in results if not r.ok} == {
        25: errno.EEXIST,
        40: errno.ENODEV,
        51: errno.EINVAL,
    }
    assert kernel.handled == [label for label in range(16, 66) if label != 40]


class AddressKernel(ScriptedKernel):
    """Answers every request (here: RTM_NEWADDR) with one errno and keeps the bodies."""

    def __init__(self, code: int = 0, text: str = "") -> None:
        super().__init__()
        self.code, self.text = code, text
        self.bodies: list[bytes] = []

    def answer(self, body: memoryview) -> tuple[int, str]:
        self.bodies.append(bytes(body))
        return self.code, self.text


def test_add_address_is_one_exclusive_rtm_newaddr_for_the_devices_index() -> None:
    kernel = AddressKernel()
    provider_with(kernel).add_address("lo", "10.0.0.100/32")
    [[(kind, flags, _seq)]] = kernel.sends
    assert kind == c.RTM_NEWADDR and flags & c.NLM_F_CREATE and flags & c.NLM_F_EXCL and flags & c.NLM_F_ACK
    assert kernel.bodies == [encode.address_add("10.0.0.100/32", 1)[2]]  # lo is index 1


def test_add_address_already_there_is_done_so_apply_stays_idempotent() -> None:
    provider_with(AddressKernel(errno.EEXIST)).add_address("lo", "fd00:100::100/128")  # no exception


def test_add_address_failures_are_os_errors_with_the_kernels_errno() -> None:
    with pytest.raises(OSError) as raised:
        provider_with(AddressKernel(errno.EPERM, "not allowed")).add_address("lo", "10.0.0.100/32")
    assert raised.value.errno == errno.EPERM and "not allowed (EPERM)" in str(raised.value)
    kernel = AddressKernel()
    provider = provider_with(kernel)
    with pytest.raises(OSError) as raised:
        provider.add_address("nosuchdev", "10.0.0.100/32")
    assert raised.value.errno == errno.ENODEV and "nosuchdev" in str(raised.value)
    assert kernel.sends == []


class DumpingKernel(ScriptedKernel):
    """Answers dump requests: MPLS label routes (the first attempt marked interrupted, as the
    kernel marks a dump whose table changed under it), nothing else; no nexthop objects."""

    def __init__(self, labels: list[int]) -> None:
        super().__init__()
        self.labels = labels
        self.route_dumps = 0

    def sendall(self, data: bytes) -> None:
        for kind, _flags, seq, body in nla.messages(data):
            family = body[0]
            out = b""
            if kind == c.RTM_GETROUTE and family == c.AF_MPLS:
                self.route_dumps += 1
                intr = c.NLM_F_DUMP_INTR if self.route_dumps == 1 else 0
                for label in self.labels:
                    route = ops.MplsRoute(label, "lo")
                    _k, _f, rbody = encode.mpls_route(ops.Add(route), route, lambda dev: 1)
                    out += nla.message(c.RTM_NEWROUTE, c.NLM_F_MULTI | intr, seq, rbody)
            if kind == c.RTM_GETNEXTHOP:
                payload = struct.pack("=i", -errno.EOPNOTSUPP) + bytes(16)
                self.replies.append(nla.message(c.NLMSG_ERROR, 0, seq, payload))
                continue
            self.replies.append(out + nla.message(c.NLMSG_DONE, c.NLM_F_MULTI, seq, b"\0\0\0\0"))


def test_offload_counts_are_a_dumps_counts_without_its_list() -> None:
    """Provider.offload_counts (the offload sampler's, issue 15: memory): the counts of
    dump(elements=False), an interrupted attempt counted again from the start, never twice."""
    from orchestrator.dataplane import offload

    labels = list(range(100, 140))
    kernel = DumpingKernel(labels)
    provider = provider_with(kernel)
    counted = provider.offload_counts()
    assert kernel.route_dumps == 2  # the interrupted attempt, then the whole one
    assert counted == offload.counts(provider.dump(elements=False))
    assert sum(counted.values()) == len(labels)
    odd = provider.offload_counts(lambda item: isinstance(item.obj, ops.MplsRoute) and item.obj.label % 2 == 1)
    assert sum(odd.values()) == len(labels) // 2
