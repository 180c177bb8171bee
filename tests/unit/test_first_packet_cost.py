"""A first-packet batch's own system calls (issue 15): in the lab's UML guest a clock reading is
a system call (about 16 us), and so is every poll() or fcntl a socket call brings along. A
one-packet batch reads the clock once per part (the stall witness's laps), the netlink sockets
are non-blocking (an answer already queued costs one recv, no clock and no poll; one not there
yet is waited for, TimeoutError after nlsocket.TIMEOUT as before), and the verdicts go in one
sendmsg without switching the queue's socket to blocking and back."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest
from scapy.layers.inet import IP, TCP

from orchestrator.capture.nfqueue import NF_ACCEPT, NF_DROP, NfQueue, QueuedPacket, Verdict
from orchestrator.daemon import loop, stalls
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import nla, nlsocket
from tests.unit.conftest import VIP, ScriptedQueue, balancer_daemon, config

PARTS = (
    "batch: decide",  # the route lookup included
    "batch: rtnetlink",
    "batch: verdicts",
    "batch: step aside",
    "batch: commit",
    "batch: nf_tables",
)


class Counting:
    """A clock that counts its readings."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.clock()


def test_a_one_packet_batch_reads_the_clock_once_per_part(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    queue = ScriptedQueue()
    daemon = balancer_daemon(config(), kernel, queue)
    monotonic, perf = Counting(time.monotonic), Counting(time.perf_counter)
    monkeypatch.setattr(time, "monotonic", monotonic)
    monkeypatch.setattr(time, "perf_counter", perf)
    daemon.stalls.clock = monotonic
    packet = bytes(IP(src="10.0.1.10", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    daemon.decide([QueuedPacket(0, 7, packet, 0, None, 0)])
    reads = monotonic.reads + perf.reads
    monkeypatch.undo()
    assert [(v.packet_id, v.verdict) for v in queue.sent] == [(7, NF_ACCEPT)]
    assert daemon.core.counters["sessions_started"] == 1
    spent = daemon.stalls.spent()
    assert {part: spent[part]["runs"] for part in PARTS} == dict.fromkeys(PARTS, 1)
    # one reading where the batch begins (the core's `now` too), one where each part ends; the
    # code before read the clock 15 times (a step's two, `program`'s two per netlink batch)
    assert reads == 1 + len(PARTS)
    # the two netlink batches (session objects, then the fast-path element) in the metrics
    assert daemon.batch_duration.snapshot().count == 2


def test_the_verdict_waits_for_two_clock_readings_and_not_for_the_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the loop the batch's `now` is the reading its step began with: before the verdict the
    clock is read where the decision and the kernel's answer end, and nothing else (there were
    five readings); the core's bookkeeping of the batch (`commit`: the session SERVING) comes
    after the verdicts went."""
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    clock = Counting(time.monotonic)
    holder: list[Any] = []
    queue = ScriptedQueue(
        observe=lambda: (
            clock.reads,
            [str(s.state) for s in holder[0].core.sessions()],
            [i for i in kernel.dump() if isinstance(i.obj, ops.FlowerFilter)],
        )
    )
    daemon = balancer_daemon(config(), kernel, queue)
    holder.append(daemon)
    monkeypatch.setattr(time, "monotonic", clock)
    daemon.stalls.clock = clock
    packet = bytes(IP(src="10.0.1.10", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    with daemon.stalls.step("first-packet batch") as began:
        daemon.decide([QueuedPacket(0, 7, packet, 0, None, 0)], began)
    monkeypatch.undo()
    [(verdicts, (reads, states, filters))] = queue.sent_batches
    assert [(v.packet_id, v.verdict) for v in verdicts] == [(7, NF_ACCEPT)]
    assert reads == 1 + 2  # the step's own, then the decision's and the kernel's laps
    assert states == ["opening"] and len(filters) == 1  # its filter in, the batch not booked yet
    assert [str(s.state) for s in daemon.core.sessions()] == ["serving"]


class Readiness:
    """The loop's poll of the queue's socket (`Daemon.waiting`): notes what stood when the
    daemon blocked on it, and for how long it asked."""

    def __init__(self, observe: Callable[[], Any]) -> None:
        self.observe = observe
        self.polls: list[tuple[float | None, Any]] = []

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self.polls.append((timeout, self.observe()))
        return []


def test_the_loop_steps_aside_after_the_verdicts_and_before_the_bookkeeping() -> None:
    """What the verdicts woke (in the lab's one-CPU guest: the client whose SYN-ACK came back
    inside the verdict's system call) gets the CPU before the batch's commit and fast-path
    element: the daemon blocks on the queue's socket for at most STEP_ASIDE_MS."""
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    queue = ScriptedQueue()
    daemon = balancer_daemon(config(), kernel, queue)
    readiness = Readiness(lambda: (len(queue.sent), [str(s.state) for s in daemon.core.sessions()]))
    daemon.waiting = readiness  # type: ignore[assignment]
    packet = bytes(IP(src="10.0.1.10", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    daemon.decide([QueuedPacket(0, 7, packet, 0, None, 0)])
    assert readiness.polls == [(loop.STEP_ASIDE_MS, (1, ["opening"]))]  # verdict sent, not booked
    assert [str(s.state) for s in daemon.core.sessions()] == ["serving"]
    assert daemon.stalls.spent()["batch: step aside"]["runs"] == 1


def test_a_failed_batch_does_not_step_aside() -> None:
    """When an object was refused the verdicts wait for `commit`: nothing to step aside for."""
    kernel = FakeProvider(["lan0", "fab0"])  # no clsact qdisc on fab0: the C2S filter is refused
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    daemon = balancer_daemon(config(), kernel, ScriptedQueue())
    readiness = Readiness(lambda: None)
    daemon.waiting = readiness  # type: ignore[assignment]
    packet = bytes(IP(src="10.0.1.10", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    daemon.decide([QueuedPacket(0, 7, packet, 0, None, 0)])
    assert readiness.polls == []


def test_first_packets_waiting_end_the_step_aside_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step aside is a poll of the queue's socket: with a datagram waiting there it returns
    at once, however long it may wait (here 10 minutes), so a busy queue is never kept waiting."""
    kernel = FakeProvider(["lan0", "fab0"])
    daemon = balancer_daemon(config(), kernel, ScriptedQueue())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        theirs.send(b"a first packet")
        daemon.waiting = select.poll()
        daemon.waiting.register(ours.fileno(), select.POLLIN)
        monkeypatch.setattr(loop, "STEP_ASIDE_MS", 600_000)
        began = time.monotonic()
        daemon.step_aside()
        assert time.monotonic() - began < 60  # it did not wait its 10 minutes
        assert ours.recv(64) == b"a first packet"  # left for the loop's read
    finally:
        ours.close()
        theirs.close()


def test_a_failed_session_is_judged_before_its_verdict() -> None:
    """When an object of the batch is refused, `commit` decides first: the packet is dropped,
    and what did get in is gone before the verdict."""
    kernel = FakeProvider(["lan0", "fab0"])  # no clsact qdisc on fab0: the C2S filter is refused
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    queue = ScriptedQueue(observe=lambda: [i for i in kernel.dump() if isinstance(i.obj, ops.MplsRoute)])
    daemon = balancer_daemon(config(), kernel, queue)
    packet = bytes(IP(src="10.0.1.10", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    daemon.decide([QueuedPacket(0, 7, packet, 0, None, 0)])
    [(verdicts, routes)] = queue.sent_batches
    assert [(v.packet_id, v.verdict) for v in verdicts] == [(7, NF_DROP)]
    assert routes == []  # the S2C route that got in was deleted before the verdict
    assert daemon.core.sessions() == []


def test_laps_time_consecutive_steps_with_one_reading_each() -> None:
    now = [10.0]
    clock = Counting(lambda: now[0])
    witness = stalls.LoopStalls(clock=clock)
    laps = witness.laps(now[0])
    now[0] += 0.002
    assert laps.lap("a") == pytest.approx(0.002)
    now[0] += 0.060  # a stall of its own
    assert laps.lap("b") == pytest.approx(0.060)
    assert clock.reads == 2
    assert witness.spent() == {"a": {"runs": 1, "seconds": 0.002}, "b": {"runs": 1, "seconds": 0.06}}
    assert witness.counts() == {"b": {"stalls": 1, "worst_ms": 60.0}}


class Peer:
    """One end of a datagram socket pair as the netlink socket's: bind and the netlink options
    are ignored; counts the receives and the poll()s (which ask for the descriptor)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = self.polls = 0

    def setsockopt(self, *args: object) -> None:
        pass

    def bind(self, *args: object) -> None:
        pass

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def fileno(self) -> int:
        self.polls += 1
        return self.sock.fileno()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_into(self, buf: bytearray) -> int:
        self.recvs += 1
        return self.sock.recv_into(buf)

    def close(self) -> None:
        self.sock.close()


def ack(seq: int) -> bytes:
    return nla.message(c.NLMSG_ERROR, 0x100, seq, struct.pack("=i", 0) + struct.pack("=IHHII", 16, 0, 0, seq, 0))


def pair() -> tuple[nlsocket.NetlinkSocket, Peer, socket.socket]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer = Peer(ours)
    return nlsocket.NetlinkSocket(sock=peer), peer, kernel  # type: ignore[arg-type]


def test_an_answer_already_queued_costs_one_recv_and_no_poll() -> None:
    nl, peer, kernel = pair()
    try:
        assert peer.gettimeout() == 0.0  # non-blocking: no clock reading or poll() per call
        kernel.send(ack(1))  # the kernel answers inside the sendmsg: queued before our recv
        assert nl.transact([(c.RTM_NEWROUTE, c.NLM_F_REQUEST, b"x" * 12)]) == [None]
        assert (peer.recvs, peer.polls) == (1, 0)
        assert len(kernel.recv(4096)) > 0  # the request went
    finally:
        nl.close()
        kernel.close()


def test_an_answer_not_there_yet_is_awaited(monkeypatch: pytest.MonkeyPatch) -> None:
    nl, peer, kernel = pair()

    def answer_late() -> None:
        request = kernel.recv(4096)
        seq = struct.unpack_from("=I", request, 8)[0]
        time.sleep(0.05)
        kernel.send(ack(seq))

    thread = threading.Thread(target=answer_late)
    thread.start()
    try:
        assert nl.transact([(c.RTM_NEWROUTE, c.NLM_F_REQUEST, b"x" * 12)]) == [None]
        assert peer.polls == 1 and peer.recvs == 2  # EAGAIN, poll, then the answer
    finally:
        thread.join()
        nl.close()
        kernel.close()


def test_no_answer_is_a_timeout_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nlsocket, "TIMEOUT", 0.2)
    nl, _peer, kernel = pair()
    began = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            nl.transact([(c.RTM_NEWROUTE, c.NLM_F_REQUEST, b"x" * 12)])
        assert time.monotonic() - began >= 0.2
    finally:
        nl.close()
        kernel.close()


class QueueSocket:
    """The queue's socket: records the calls; `busy` sends say they would block."""

    def __init__(self, busy: int = 0) -> None:
        self.calls: list[Any] = []
        self.busy = busy
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.calls.append("sendall")
        if self.busy:
            self.busy -= 1
            raise BlockingIOError
        self.sent.append(data)

    def setblocking(self, flag: bool) -> None:
        self.calls.append(("setblocking", flag))


def queue_with(sock: QueueSocket) -> NfQueue:
    queue = NfQueue.__new__(NfQueue)
    queue._sock, queue._seq = sock, 0  # type: ignore[assignment]
    return queue


def test_verdicts_go_in_one_sendmsg_without_switching_to_blocking() -> None:
    sock = QueueSocket()
    queue_with(sock).send_verdicts([Verdict(0, 1, NF_ACCEPT), Verdict(0, 2, NF_ACCEPT, 5)])
    assert sock.calls == ["sendall"]
    ids = [
        struct.unpack("!II", bytes(nla.attrs(body, 4)[c.NFQA_VERDICT_HDR]))[1]
        for *_, body in nla.messages(sock.sent[0])
    ]
    assert ids == [1, 2]


def test_a_send_that_would_block_waits_as_a_blocking_socket() -> None:
    sock = QueueSocket(busy=1)
    queue_with(sock).send_verdicts([Verdict(0, 1, NF_ACCEPT)])
    assert sock.calls == ["sendall", ("setblocking", True), "sendall", ("setblocking", False)]
    assert len(sock.sent) == 1
