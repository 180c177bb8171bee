"""What the servers run on VIP:80 while connects are timed (`python -m
orchestrator.lab.bench.sink VIP PORT`): it accepts and closes at once, from a deep accept queue.
Python's http.server listens with a backlog of 5; in a loaded emulated VM it falls behind, its
queue overflows and a SYN waits 1 s for its retransmission. Says `listening` once it is."""

from __future__ import annotations

import socket
import sys

BACKLOG = 4096


def serve(address: str, port: int) -> None:
    """Accept and close, forever."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(BACKLOG)
        print("listening", flush=True)
        while True:
            conn, _ = listener.accept()
            conn.close()


def main(argv: list[str]) -> int:
    address, port = argv
    serve(address, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
