"""A NETLINK_ROUTE socket that sends requests in batches: many messages per sendmsg, an ACK asked
only of the last message of each chunk. The kernel handles a chunk's messages in order and
reports every failure as an NLMSG_ERROR with the failed message's sequence number, so when the
last message's ACK arrives every error of the chunk has arrived before it: successes cost no
reply at all, which is what makes the batch cheaper than one round trip per object.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

from orchestrator.dataplane.netlink import nla
from orchestrator.dataplane.netlink.constants import (
    AF_UNSPEC,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_GET_STRICT_CHK,
    NETLINK_NETFILTER,
    NETLINK_ROUTE,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    SOL_NETLINK,
)

CLONE_NEWNET = 0x40000000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
# A chunk is bounded so that even if every message fails, the error replies fit the receive
# buffer (each reply costs about 1 KiB of socket memory): nothing is ever dropped unseen.
CHUNK_MESSAGES = 1024
CHUNK_BYTES = 256 * 1024
RCVBUF = 32 * 1024 * 1024
SNDBUF = 4 * 1024 * 1024
DUMP_RETRIES = 5
# How long a request waits for the kernel's answer before TimeoutError. The socket itself is
# non-blocking: a socket with a timeout makes Python read the clock and poll() before every
# send and recv, four system calls more per round trip, each costing as much as the call itself
# in the lab's UML guest (issue 15: a first-packet batch's own CPU). The kernel handles a
# request inside the sendmsg that carries it, so its answer is queued when the call returns
# and the first recv finds it; poll() runs only when it is not there yet (a long dump).
TIMEOUT = 30.0
T = TypeVar("T")


@dataclass(frozen=True)
class KernelError:
    """A failed request: the kernel's errno and its extended-ACK message, if it gave one."""

    errno: int
    message: str

    def __str__(self) -> str:
        # The kernel's name: Python calls 95 ENOTSUP, which the kernel's own messages never do.
        name = (
            "EOPNOTSUPP" if self.errno == errno_mod.EOPNOTSUPP else errno_mod.errorcode.get(self.errno, str(self.errno))
        )
        text = self.message or os.strerror(self.errno)
        return f"{text} ({name})"


class DumpInterrupted(RuntimeError):
    """The kernel kept changing the table while we dumped it."""


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace `name` (as `ip netns` names it)."""
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            libc.setns(home.fileno(), CLONE_NEWNET)


def open_netlink(protocol: int, netns: str | None = None, rcvbuf: int | None = None) -> socket.socket:
    """A raw netlink socket of `protocol`, created inside network namespace `netns` (a socket
    keeps the namespace it was made in), with its receive buffer forced to `rcvbuf` if given."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    if rcvbuf:
        with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; the default buffer still works
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    return sock


def parse_error(flags: int, body: memoryview) -> KernelError | None:
    """The nlmsgerr in `body`: None for an ACK, else the error with its extack message."""
    code = struct.unpack_from("=i", body)[0]
    if code == 0:
        return None
    message = ""
    if flags & NLM_F_ACK_TLVS:
        # With NETLINK_CAP_ACK the original request is cut to its header (CAPPED).
        orig_len = struct.unpack_from("=I", body, 4)[0]
        offset = 4 + (16 if flags & 0x100 else orig_len)
        tlvs = nla.attrs(body, offset)
        if NLMSGERR_ATTR_MSG in tlvs:
            message = nla.get_str(tlvs[NLMSGERR_ATTR_MSG])
    return KernelError(-code, message)


class NetlinkSocket:
    """One rtnetlink socket, opened in a network namespace; not thread-safe."""

    protocol = NETLINK_ROUTE

    def __init__(self, netns: str | None = None, sock: socket.socket | None = None) -> None:
        """`sock` replaces the kernel socket (tests script the kernel's replies with it)."""
        if sock is None:
            sock = open_netlink(self.protocol, netns, RCVBUF)
        self._sock = sock
        self.netns = netns
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_NETLINK, option, 1)
        sock.bind((0, 0))
        sock.settimeout(0.0)  # non-blocking: _send and _recv wait with poll() only when they must
        self._seq = 1
        self._buf = bytearray(1 << 20)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seqs(self, count: int) -> int:
        """The first of `count` contiguous sequence numbers (wrapping before 2^31)."""
        if self._seq + count >= 0x7FFFFFFF:
            self._seq = 1
        first = self._seq
        self._seq += count
        return first

    def _recv(self) -> memoryview:
        while True:
            try:
                size = self._sock.recv_into(self._buf)
                break
            except BlockingIOError:  # not there yet (or a spurious wake-up): wait for it
                self._wait(select.POLLIN)
        return memoryview(self._buf)[:size]

    def _send(self, data: bytes) -> None:
        """One datagram (a netlink message is never sent in part). The kernel takes it without
        waiting; should the socket ever say it would block, it is sent once it can be."""
        while True:
            try:
                self._sock.sendall(data)
                return
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def _wait(self, events: int) -> None:
        """Until the socket is ready for `events`; TimeoutError after TIMEOUT seconds, as a
        socket with that timeout would raise."""
        poller = select.poll()
        poller.register(self._sock.fileno(), events | select.POLLERR)
        deadline = time.monotonic() + TIMEOUT
        while not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            if time.monotonic() >= deadline:
                raise TimeoutError("timed out")

    def transact(self, requests: Sequence[tuple[int, int, bytes]]) -> list[KernelError | None]:
        """Send every request; return per request None (done) or its KernelError."""
        results: list[KernelError | None] = [None] * len(requests)
        for start, end in _chunks(requests):
            self._transact_chunk(requests, start, end, results)
        return results

    def _transact_chunk(
        self, requests: Sequence[tuple[int, int, bytes]], start: int, end: int, results: list[KernelError | None]
    ) -> None:
        first = self._next_seqs(end - start)
        last_seq = first + end - start - 1
        parts = [
            nla.message(kind, flags | (NLM_F_ACK if i == end - 1 else 0), first + i - start, body)
            for i, (kind, flags, body) in enumerate(requests[start:end], start=start)
        ]
        self._send(b"".join(parts))
        while True:
            for kind, flags, seq, body in nla.messages(self._recv()):
                if kind != NLMSG_ERROR or not first <= seq <= last_seq:
                    continue  # a late reply of an earlier exchange, or a notification
                results[start + seq - first] = parse_error(flags, body)
                if seq == last_seq:
                    return

    def query(self, requests: Sequence[tuple[int, int, bytes]]) -> list[tuple[int, bytes] | KernelError]:
        """Get requests that each have one answer (RTM_GETROUTE for one address, ...), a chunk
        per sendmsg with an ACK asked only of its last request: the kernel answers a chunk's
        requests in order, each with its reply or an error carrying its sequence number, so
        when the last one's ACK (or error) arrives every answer of the chunk is in. Returns per
        request its answer (message type, body) or its KernelError."""
        results: list[tuple[int, bytes] | KernelError | None] = [None] * len(requests)
        for start, end in _chunks(requests):
            first = self._next_seqs(end - start)
            last_seq = first + end - start - 1
            self._send(
                b"".join(
                    nla.message(
                        kind, flags | NLM_F_REQUEST | (NLM_F_ACK if i == end - 1 else 0), first + i - start, body
                    )
                    for i, (kind, flags, body) in enumerate(requests[start:end], start=start)
                )
            )
            done = False
            while not done:
                for kind, flags, seq, body in nla.messages(self._recv()):
                    if not first <= seq <= last_seq:
                        continue  # a late reply of an earlier exchange, or a notification
                    i = start + seq - first
                    if kind == NLMSG_ERROR:
                        error = parse_error(flags, body)
                        if error is not None:
                            results[i] = error
                        done = done or seq == last_seq
                    else:
                        results[i] = (kind, bytes(body))  # copied: the receive buffer is reused
        return [r if r is not None else KernelError(errno_mod.ENOMSG, "no answer") for r in results]

    def dump(self, kind: int, body: bytes) -> list[tuple[int, memoryview]]:
        """All messages of a dump request as (type, body); restarted if the kernel says the
        table changed under it (NLM_F_DUMP_INTR)."""
        for _attempt in range(DUMP_RETRIES):
            out: list[tuple[int, memoryview]] = []
            try:
                out.extend(self.dump_stream(kind, body))
            except _Changed:
                continue
            return out
        raise DumpInterrupted(f"dump of message type {kind} kept changing; gave up after {DUMP_RETRIES}")

    def dump_stream(self, kind: int, body: bytes) -> Iterator[tuple[int, memoryview]]:
        """One attempt at a dump, each message (type, body) handed over as it is read, for a
        caller that counts as it decodes instead of keeping a list of every message (issue 15:
        memory). Raises _Changed at its end if the kernel said the table changed under it: what
        was handed over is then not the table, and the caller starts again (`fold_dump`)."""
        seq = self._next_seqs(1)
        self._send(nla.message(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
        interrupted = False
        done = False
        while not done:
            data = bytes(self._recv())  # copied: the receive buffer is reused
            for mkind, flags, mseq, mbody in nla.messages(data):
                if mseq != seq:
                    continue
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if mkind == NLMSG_DONE:
                    done = True
                    break
                if mkind == NLMSG_ERROR:
                    error = parse_error(flags, mbody)
                    if error is not None:
                        raise OSError(error.errno, f"dump failed: {error}")
                    done = True
                    break
                yield mkind, mbody
        if interrupted:
            raise _Changed(kind)

    def fold_dump(self, kind: int, body: bytes, fold: Callable[[Iterator[tuple[int, memoryview]]], T]) -> T:
        """`fold` of a dump's messages as they are read (as `dump`, without the list): an attempt
        the kernel interrupted is folded again from the start, at most DUMP_RETRIES times."""
        for _attempt in range(DUMP_RETRIES):
            try:
                return fold(self.dump_stream(kind, body))
            except _Changed:
                continue
        raise DumpInterrupted(f"dump of message type {kind} kept changing; gave up after {DUMP_RETRIES}")


class _Changed(Exception):
    """A dump's attempt that the kernel marked interrupted (NLM_F_DUMP_INTR)."""


class NftBatchSocket(NetlinkSocket):
    """A NETLINK_NETFILTER socket for nf_tables requests (the fast-path set elements), which the
    kernel takes only inside a batch: NFNL_MSG_BATCH_BEGIN (res_id NFNL_SUBSYS_NFTABLES), the
    messages, NFNL_MSG_BATCH_END, all in one sendmsg (nfnetlink_rcv_batch reads the batch from one
    skb). A batch is a transaction: the kernel runs every message, reports each one's error, and
    if any failed aborts them all. So every message asks for an ACK, and after a failure the
    messages that did not fail are sent again in a new batch: as on rtnetlink, a failed
    operation never stops the others."""

    protocol = NETLINK_NETFILTER

    def transact(self, requests: Sequence[tuple[int, int, bytes]]) -> list[KernelError | None]:
        results: list[KernelError | None] = [None] * len(requests)
        for start, end in _chunks(requests):
            todo = list(range(start, end))
            while todo:
                errors = self._batch([requests[i] for i in todo])
                for i, error in zip(todo, errors):
                    results[i] = error
                if all(error is None for error in errors):
                    break
                todo = [i for i, error in zip(todo, errors) if error is None]  # rolled back: again
        return results

    def _batch(self, requests: Sequence[tuple[int, int, bytes]]) -> list[KernelError | None]:
        """One transaction; per message None (acknowledged) or its error. An error answering the
        batch header (e.g. ENOMEM, EPERM) is every message's."""
        first = self._next_seqs(len(requests) + 2)
        frame = nla.NFGENMSG.pack(AF_UNSPEC, 0, NFNL_SUBSYS_NFTABLES)
        parts = [nla.message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first, frame)]
        parts += [
            nla.message(kind, flags | NLM_F_ACK, first + 1 + i, body) for i, (kind, flags, body) in enumerate(requests)
        ]
        parts.append(nla.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, first + len(requests) + 1, frame))
        self._send(b"".join(parts))
        results: list[KernelError | None] = [None] * len(requests)
        waiting = set(range(len(requests)))
        while waiting:
            for kind, flags, seq, body in nla.messages(self._recv()):
                if kind != NLMSG_ERROR or not first <= seq <= first + len(requests) + 1:
                    continue  # a late reply of an earlier exchange
                error = parse_error(flags, body)
                if seq in (first, first + len(requests) + 1):
                    if error is not None:
                        return [error] * len(requests)
                    continue
                results[seq - first - 1] = error
                waiting.discard(seq - first - 1)
        return results


def _chunks(requests: Sequence[tuple[int, int, bytes]]) -> Iterator[tuple[int, int]]:
    """(start, end) of each chunk: at most CHUNK_MESSAGES messages, CHUNK_BYTES unless one
    message alone is bigger."""
    start = 0
    while start < len(requests):
        end, size = start, 0
        while end < len(requests) and end - start < CHUNK_MESSAGES and (size < CHUNK_BYTES or end == start):
            size += 16 + len(requests[end][2])
            end += 1
        yield start, end
        start = end
