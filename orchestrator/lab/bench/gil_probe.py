"""The GIL priority inversion probe (issue 15, docs/lab.md "The conntrack sweep's stalls"), on
the host: everything pinned to one CPU, as in the lab's single-CPU guest. The main thread plays
the daemon's loop: it waits 1 ms (as in epoll), then makes two short system calls (a socketpair
round trip), and times each round. Beside it, `--thread idle|normal|none`: a thread decoding
conntrack messages (40,000 flows, the listener's own decoding) without end, at SCHED_IDLE, at
the loop's priority, or no thread; and a normal-priority process on the same CPU, busy
`--busy` seconds then asleep `--sleep` seconds (the guest's other work). Prints the rounds'
lateness past the 1 ms wait: p50, p99, p99.9, max.

    python -m orchestrator.lab.bench.gil_probe --thread idle --busy 0.02 --sleep 0.005
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import struct
import sys
import threading
import time
from multiprocessing.synchronize import Event as EventType

from orchestrator.capture import conntrack
from orchestrator.core.events import FlowKey
from orchestrator.dataplane.netlink.constants import IPCTNL_MSG_CT_NEW

SWITCH_INTERVAL = 0.0005  # the daemon's (daemon.loop.SWITCH_INTERVAL)


def competitor(cpu: int, busy: float, sleep: float, stop: EventType) -> None:
    os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        began = time.perf_counter()
        while time.perf_counter() - began < busy:
            pass
        time.sleep(sleep)


def messages(n: int) -> bytes:
    return b"".join(
        conntrack.event_message(
            IPCTNL_MSG_CT_NEW,
            FlowKey(6, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "10.9.0.1", 1024 + i % 60000, 80),
            conntrack.CT_TAG | 1,
        )
        for i in range(n)
    )


def decode(buf: bytes) -> int:
    offset = flows = 0
    while offset < len(buf):
        length = struct.unpack_from("=I", buf, offset)[0]
        if conntrack.event_flow(buf, offset + 16, offset + length, False) is not None:
            flows += 1
        offset += (length + 3) & ~3
    return flows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thread", choices=("idle", "normal", "none"), required=True)
    parser.add_argument("--busy", type=float, default=0.02)
    parser.add_argument("--sleep", type=float, default=0.005)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cpu", type=int, default=0)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    sys.setswitchinterval(SWITCH_INTERVAL)
    buf = messages(40_000)
    stop_thread = threading.Event()

    def background() -> None:
        if args.thread == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while not stop_thread.is_set():
            decode(buf)

    stop = multiprocessing.Event()
    other = multiprocessing.Process(target=competitor, args=(args.cpu, args.busy, args.sleep, stop))
    other.start()
    thread = threading.Thread(target=background) if args.thread != "none" else None
    if thread is not None:
        thread.start()
    a, b = socket.socketpair()
    late: list[float] = []
    try:
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            began = time.perf_counter()
            time.sleep(0.001)
            a.send(b"x")
            b.recv(1)
            late.append((time.perf_counter() - began - 0.001) * 1000)
    finally:
        stop_thread.set()
        stop.set()
        other.join()
        if thread is not None:
            thread.join()
        a.close()
        b.close()
    late.sort()

    def q(p: float) -> float:
        return late[min(len(late) - 1, int(len(late) * p))]

    print(
        f"thread {args.thread}, busy {args.busy} s / sleep {args.sleep} s: {len(late)} rounds, late p50 "
        f"{q(0.5):.3f} ms, p99 {q(0.99):.2f} ms, p99.9 {q(0.999):.2f} ms, max {late[-1]:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
