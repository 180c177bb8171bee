"""Counted traffic the netns tests share: scripts run in a client node (`python -c SCRIPT ...`)
that report what they sent and what came back, and the readers of their results and of the
balancer ruleset's counters."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from orchestrator.lab.kit import Lab, patience

# A paced UDP stream to the VIP's port 53 (the servers echo `echo SEQ`), until the stop file
# appears or `limit` seconds pass, then 2 s for the last echoes; prints one JSON line.
UDP_STREAM = r"""
import json, os, select, socket, sys, time
vip, interval, stop, limit = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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
            got.add(int(data[5:]))
            times.append(time.time())
gaps = [b - a for a, b in zip(times, times[1:])]
long = sorted(((b - a, a) for a, b in zip(times, times[1:]) if b - a > 0.1), reverse=True)[:5]
missing = sorted(set(range(sent)) - got)
print(json.dumps({"sent": sent, "received": len(got), "lost": len(missing), "missing": missing[:20],
                  "max_gap_ms": round(1000 * max(gaps, default=0)), "errors": errors,
                  "long_gaps": [[round(at, 3), round(1000 * gap)] for gap, at in long]}), flush=True)
"""
# A counted stream of HTTP requests, one per new connection from source address SRC, each
# outcome one JSON line (time, ok), until the stop file appears, COUNT requests or 120 s.
HTTP_REQUESTS = """
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


def nft_counters(lab: Lab) -> dict[str, int]:
    """The ruleset's named counters (packets), read from the kernel: also while the daemon is down."""
    out = json.loads(lab.sh("lb", "nft", "-j", "list", "counters", "table", "inet", "mplsorch").stdout)
    return {c["counter"]["name"]: c["counter"]["packets"] for c in out["nftables"] if "counter" in c}


def wait(what: str, ready: Any, seconds: float) -> None:
    deadline = time.monotonic() + patience(seconds)
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def last_json(path: Path) -> dict[str, Any]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    assert lines, path.read_text()
    result: dict[str, Any] = json.loads(lines[-1])
    return result
