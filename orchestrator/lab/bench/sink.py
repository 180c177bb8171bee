"""What the servers run on VIP:80 while connects are timed (`python -m
orchestrator.lab.bench.sink VIP PORT [DRAIN_S]`): a listener with a deep accept queue whose
handshakes the kernel completes, drained (accepted and closed) every DRAIN_S seconds. Says
`listening` once it is.

Python's http.server listens with a backlog of 5; in a loaded emulated VM it falls behind, its
queue overflows and a SYN waits 1 s for its retransmission. And an accept loop woken by each
connection took the lab's one CPU from the client whose connect was timed, for both systems
alike: the handshake's last ACK reaches the server inside the client's own `connect()` (IPVS's
connects, an existing session's) or inside the balancer's verdict (a new session's). On real
servers that loop runs on machines of its own; here it wakes between connects, rarely, and under
SCHED_BATCH (no preemption on waking), so no timed connect carries its work (docs/lab.md, "The
servers' accept sinks")."""

from __future__ import annotations

import os
import socket
import sys
import time

BACKLOG = 4096  # the kernel's somaxconn caps it (4096 since Linux 5.4)
DRAIN_S = 5.0  # between drains: the latency runs open about 24 connections a second in all


def out_of_the_way() -> None:
    """This process under SCHED_BATCH: it never preempts the running task on waking (Linux)."""
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def serve(address: str, port: int, drain_s: float = DRAIN_S) -> None:
    """Listen; every `drain_s`, accept and close what the kernel queued, forever."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(BACKLOG)
        listener.setblocking(False)
        print("listening", flush=True)
        while True:
            time.sleep(drain_s)
            drain(listener)


def drain(listener: socket.socket) -> int:
    """Accept and close every connection queued on `listener` (non-blocking); how many."""
    done = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return done
        conn.close()
        done += 1


def main(argv: list[str]) -> int:
    address, port, *rest = argv
    out_of_the_way()
    serve(address, int(port), float(rest[0]) if rest else DRAIN_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
