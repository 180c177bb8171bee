"""Counted lab traffic, as small Python scripts run in a lab node (`python -c SCRIPT ARGS`): one
place for the paced UDP stream, the paced HTTP download, the stream of HTTP requests and the
first-packet probes that the netns tests and `lab bench restart` count, and for reading the
rulesets' counters. Each prints what it
counted; `last_json` reads it back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from orchestrator.lab.kit import patience

if TYPE_CHECKING:
    from orchestrator.lab.kit import Lab

# A paced UDP stream to the VIP's port 53 (the servers echo `echo SEQ`), until the stop file
# appears or `limit` seconds pass, then 2 s for the last echoes. Prints `running` at the first
# echo, then one JSON line: sent, received, lost, the missing sequence numbers, the Unix time it
# started (datagram N was due N * INTERVAL later), the longest gap between two echoes and the five
# longest gaps over 100 ms as [Unix time of the echo before it, milliseconds].
# Arguments: VIP INTERVAL STOP_FILE LIMIT.
STREAM = r"""
import json, os, select, socket, sys, time
vip, interval, stop, limit = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((vip, 53))
sent, got, times, errors = 0, set(), [], 0
start = time.monotonic()
drain = None
while True:
    now = time.monotonic()
    if drain is None and (now > start + limit or os.path.exists(stop)):
        drain = now + 2
    if drain is not None and now > drain:
        break
    due = start + sent * interval
    if drain is None and now >= due:
        s.send(b"%d" % sent)
        sent += 1
        continue
    if select.select([s], [], [], max(0.0, (drain or due) - now))[0]:
        try:
            data = s.recv(100)
        except OSError:
            errors += 1
            continue
        if data.startswith(b"echo "):
            if not got:
                print("running", flush=True)
            got.add(int(data[5:]))
            times.append(time.time())
gaps = [b - a for a, b in zip(times, times[1:])]
long = sorted(((b - a, a) for a, b in zip(times, times[1:]) if b - a > 0.1), reverse=True)[:5]
missing = sorted(set(range(sent)) - got)
print(json.dumps({"sent": sent, "received": len(got), "lost": len(missing), "missing": missing,
                  "start": time.time() - (time.monotonic() - start),
                  "max_gap_ms": round(1000 * max(gaps, default=0)), "errors": errors,
                  "long_gaps": [[round(at, 3), round(1000 * gap)] for gap, at in long]}), flush=True)
"""

# An HTTP/1.0 download read at a fixed pace (a small receive buffer: TCP flow control holds the
# server back). curl's --limit-rate does not hold its pace in a UML guest (1 MiB arrives in well
# under a second at "100k"), hence this script. Prints `started STATUS-LINE` once the head has
# arrived, then one JSON line {"bytes": body bytes, "seconds": ...}; exits 1 unless the status
# is 200. Arguments: VIP PATH RATE (bytes a second) [OUT, a file the body is written to].
GET = r"""
import json, socket, sys, time
vip, path, rate = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = open(sys.argv[4], "wb") if len(sys.argv) > 4 else None
s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
s.settimeout(30)
s.connect((vip, 80))
s.sendall(f"GET {path} HTTP/1.0\r\nHost: {vip}\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit(1)
    head += chunk
head, _, body = head.partition(b"\r\n\r\n")
print("started", head.split(b"\r\n")[0].decode(), flush=True)
if head.split(b" ", 2)[1:2] != [b"200"]:
    sys.exit(1)
got, start = 0, time.monotonic()
while True:
    if out:
        out.write(body)
        out.flush()
    got += len(body)
    time.sleep(max(0.0, start + got / rate - time.monotonic()))
    body = s.recv(4096)
    if not body:
        break
print(json.dumps({"bytes": got, "seconds": round(time.monotonic() - start, 1)}), flush=True)
"""

# N UDP datagrams from `src` to the VIP's port 53, each from a socket of its own (a new flow
# each); prints how many were echoed within WAIT seconds. Arguments: SRC VIP N [WAIT, 1 s].
PROBE = r"""
import select, socket, sys, time
src, vip, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
wait = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
for s in socks:
    s.bind((src, 0))
    s.sendto(b"probe", (vip, 53))
echoed, deadline = set(), time.monotonic() + wait
while len(echoed) < n and time.monotonic() < deadline:
    for s in select.select(socks, [], [], max(0.0, deadline - time.monotonic()))[0]:
        try:
            if s.recv(100).startswith(b"echo "):
                echoed.add(s)
        except OSError:
            pass
print(len(echoed))
"""

# N TCP connection attempts from `src` to the VIP's port 80, each a new flow; prints how many
# were accepted within WAIT seconds (less than TCP's first SYN retransmission, 1 s, so each flow
# sends exactly one SYN). Arguments: SRC VIP N WAIT.
CONNECT = r"""
import select, socket, sys, time
src, vip, n, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind((src, 0))
    s.connect_ex((vip, 80))
    socks.append(s)
done, deadline = set(), time.monotonic() + wait
while len(done) < n and time.monotonic() < deadline:
    for s in select.select([], [s for s in socks if s not in done], [], max(0.0, deadline - time.monotonic()))[1]:
        done.add(s)
print(sum(1 for s in done if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0))
"""


# A counted stream of HTTP requests, one per new connection from source address SRC, each
# outcome one JSON line (time, ok), until the stop file appears, COUNT requests or 120 s.
REQUESTS = """
import http.client, json, os, sys, time
vip, src, count, stop, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
deadline = time.monotonic() + 120
with open(out, "w") as f:
    for _ in range(count):
        if os.path.exists(stop) or time.monotonic() > deadline:
            break
        t, ok = time.time(), False
        try:
            c = http.client.HTTPConnection(vip, 80, timeout=5, source_address=(src, 0))
            c.request("GET", "/")
            ok = c.getresponse().status == 200
            c.close()
        except OSError:
            pass
        f.write(json.dumps({"t": t, "ok": ok}) + "\\n")
        f.flush()
        time.sleep(0.05)
"""


# HTTP requests from any source address, a new connection each, one every INTERVAL seconds, until
# the stop file appears; prints one JSON line {"sent", "answered"} at the end (REQUESTS logs each
# request's time and outcome instead). Arguments: VIP INTERVAL STOP_FILE.
PACED_REQUESTS = r"""
import http.client, json, os, sys, time
vip, interval, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
sent = answered = 0
while not os.path.exists(stop):
    t = time.monotonic()
    sent += 1
    try:
        c = http.client.HTTPConnection(vip, 80, timeout=5)
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        answered += r.status == 200
        c.close()
    except OSError:
        pass
    time.sleep(max(0.0, t + interval - time.monotonic()))
print(json.dumps({"sent": sent, "answered": answered}), flush=True)
"""


def spawn_stream(
    lab: Lab, client: str, log: Path, stop: Path, limit: float, interval: float, vip: str | None = None
) -> subprocess.Popen[bytes]:
    """A STREAM from `client` to `vip` (the lab's IPv4 VIP), its output in `log`."""
    args = (vip or lab.vip, str(interval), str(stop), str(limit))
    return lab.spawn(client, sys.executable, "-c", STREAM, *args, log=log)


def spawn_download(lab: Lab, client: str, log: Path, rate: int, path: str = "/big.bin") -> subprocess.Popen[bytes]:
    """A GET of `path` from `client` at `rate` bytes a second, its output in `log`."""
    return lab.spawn(client, sys.executable, "-u", "-c", GET, lab.vip, path, str(rate), log=log)


def wait_running(logs: Iterable[Path], what: str = "started", seconds: float = 20) -> None:
    """Until every log shows `what` (a download's head arrived: `started`; a stream's first echo:
    `running`)."""
    for log in logs:

        def shows(log: Path = log) -> bool:
            return log.exists() and what in log.read_text()

        wait(f"{what} in {log.name}", shows, seconds)


def nft_counters(lab: Lab, node: str = "lb") -> dict[str, int]:
    """A node's mplsorch ruleset's named counters (packets), read from the kernel: also while its
    daemon is down."""
    out = json.loads(lab.sh(node, "nft", "-j", "list", "counters", "table", "inet", "mplsorch").stdout)
    return {c["counter"]["name"]: c["counter"]["packets"] for c in out["nftables"] if "counter" in c}


def wait(what: str, ready: Callable[[], object], seconds: float = 20) -> None:
    """Until `ready()` is true, or an AssertionError after `seconds` (scaled by the backend)."""
    deadline = time.monotonic() + patience(seconds)
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def last_json(path: Path) -> dict[str, Any]:
    """The last JSON line a script above printed to its log."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    assert lines, path.read_text()
    result: dict[str, Any] = json.loads(lines[-1])
    return result
