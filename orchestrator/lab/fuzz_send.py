"""The lab fuzz's sender, run in a client's namespace: `python -m orchestrator.lab.fuzz_send
SPEC.json` builds the corpus's frames first (orchestrator.lab.fuzz_packets: `distinct` mutants),
then sends `packets` frames on one AF_PACKET socket, cycling through the mutants; each malformed
IPv6 mutant goes out from the next address of its spoofed pool each time it comes round again, so
no two of its frames are alike. Prints one JSON object: what was sent, by kind and by the
analyser's outcome.

Pacing: the frames go out in bursts of `burst`; before each burst the sender reads the depth of
the balancer's queues from the daemon's namespace (`/proc/PID/net/netfilter/nfnetlink_queue`,
`queue_total`) and waits while it is above `high`, so the daemon analyses the packets rather
than the queue overflowing (it is fail-open: an overflow would pass packets unanalysed). With
`pace_pid` 0 it sends as fast as it can."""

from __future__ import annotations

import itertools
import json
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.inet import pton
from orchestrator.lab.fuzz_packets import VALID, Targets, corpus

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def queue_depth(path: Path) -> int:
    """Packets waiting in all queues of /proc/.../nfnetlink_queue (its third column)."""
    try:
        return sum(int(line.split()[2]) for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def build(spec: dict[str, Any]) -> tuple[list[bytes], list[str], list[str], list[bool]]:
    """The frames (link layer included), their kinds and outcomes, and which ones rotate source."""
    targets = Targets.from_json(spec["targets"])
    head4 = bytes.fromhex(spec["dst_mac"].replace(":", "")) + bytes.fromhex(spec["src_mac"].replace(":", ""))
    frames, kinds, outs, rotate = [], [], [], []
    for m in itertools.islice(corpus(spec["seed"], targets), spec["distinct"]):
        v6 = len(m.data) >= 1 and m.data[0] >> 4 == 6
        frames.append(head4 + (ETH_P_IPV6 if v6 else ETH_P_IP).to_bytes(2, "big") + m.data)
        kinds.append(m.kind)
        outs.append(m.outcome)
        rotate.append(v6 and m.outcome != VALID and len(m.data) >= 40)
    return frames, kinds, outs, rotate


def send(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    frames, kinds, outs, rotate = build(spec)
    built = time.monotonic() - t0
    spoofed = [pton(a)[1] for a in spec["targets"]["spoofed6"]]
    n, burst, high = spec["packets"], spec.get("burst", 256), spec.get("high", 1536)
    depth = Path(f"/proc/{spec['pace_pid']}/net/netfilter/nfnetlink_queue") if spec.get("pace_pid") else None
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((spec["iface"], 0))
    k = len(frames)
    sent = errors = waits = 0
    start = time.monotonic()
    while sent < n:
        if depth is not None:
            while queue_depth(depth) > high:
                waits += 1
                time.sleep(0.001)
        for j in range(sent, min(n, sent + burst)):
            i = j % k
            frame = frames[i]
            if rotate[i] and j >= k:  # this mutant again: from another spoofed source
                frame = frame[:22] + spoofed[(j // k + i) % len(spoofed)] + frame[38:]
            try:
                s.send(frame)
            except OSError:
                errors += 1
        sent = min(n, sent + burst)
    seconds = time.monotonic() - start
    s.close()
    by_outcome: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    rounds, rest = divmod(n, k)
    for i in range(k):
        times = rounds + (1 if i < rest else 0)
        by_outcome[outs[i]] += times
        by_kind[kinds[i]] += times
    return {
        "sent": n,
        "distinct": k,
        "send_errors": errors,
        "build_s": round(built, 1),
        "send_s": round(seconds, 1),
        "per_s": round(n / seconds) if seconds else None,
        "pace_waits": waits,
        "by_outcome": dict(sorted(by_outcome.items())),
        "by_kind": dict(sorted(by_kind.items())),
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(send(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
