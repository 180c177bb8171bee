"""The lab fuzz (issue 13, item 6) at a size that fits the suite: mutated and malformed first
packets through the running balancer daemon (`mplsorch lab fuzz`, orchestrator/lab/fuzz.py)
while two clients' five established sessions carry counted traffic. Asserted: the daemon
survived (same pid, memory bounded), every established flow's datagram and request answered and
the sessions unchanged, no queue overflow, the daemon's counts add up to what the ruleset queued
and never exceed what the analyser says of the packets sent, every reason the kernel lets through
counted, and the sessions the fuzz made ended with the label pool back where it was. The full
1,000,000-packet run and its figures: docs/reliability.md."""

from __future__ import annotations

import json

from orchestrator.lab import fuzz
from orchestrator.lab.kit import Lab

PACKETS = 30_000  # under a minute of sending: the daemon analyses some 500-700 first packets a second in UML
SEED = 13
# Reasons whose packets the kernel forwards to the queue (IPv6 headers it does not read on a
# forwarded packet; ESP of the esp service): the daemon must count each of them.
QUEUED_REASONS = {
    "too-many-ext-headers",
    "misplaced-hop-by-hop",
    "bad-dest-option",
    "bad-home-address-option",
    "bad-routing-header",
    "truncated-esp",
}


def test_fuzz_leaves_the_daemon_and_established_sessions_undisturbed(lab: Lab) -> None:
    r = fuzz.run(lab, PACKETS, SEED, PACKETS)
    print("\nlab fuzz: " + json.dumps({k: v for k, v in r.items() if k not in ("by_kind", "daemon_log_tail")}))
    p, d, e, f = r["packets"], r["daemon"], r["established"], r["fuzz_sessions"]
    # The daemon: alive, the same process, its memory within a few MB of where it started.
    assert d["alive"] and d["pid_after"] == d["pid_before"], r.get("daemon_log_tail")
    assert d["rss_kb_after"] - d["rss_kb_before"] < 16 << 10, d
    assert d["batch_errors"] == 0
    # Every packet went out; the queue never overflowed (fail-open would have passed packets on
    # unanalysed); everything queued was analysed and judged exactly once.
    assert p["sent"] == PACKETS and p["send_errors"] == 0
    assert p["overflow"] == 0 and p["queue_dropped"] == 0 and p["user_dropped"] == 0, p
    assert p["analysed"] == p["queued"] == sum(r["verdicts"].values())
    assert p["queued"] > 0.6 * PACKETS, p  # the bulk reached the daemon
    # Per reason: the daemon's count never exceeds the analyser's count of what was sent (the
    # kernel drops the rest before the queue), and every reason the kernel queues is counted.
    assert set(QUEUED_REASONS) <= set(r["malformed"]), r["malformed"]
    for reason, n in r["malformed"].items():
        assert n <= r["expected"].get(reason, 0), (reason, n, r["expected"])
    for reason in QUEUED_REASONS - {"too-many-ext-headers", "misplaced-hop-by-hop"}:
        # Not fragment-prone and never rewritten by the kernel: all of them reach the daemon.
        assert r["malformed"][reason] >= 0.97 * r["expected"][reason], (reason, r)
    assert sum(r["malformed"].values()) <= r["verdicts"].get("drop", 0)
    # The established sessions: untouched, and every datagram and request answered.
    assert e["sessions_unchanged"] and e["sessions_before"] == 5, e
    for name, flow in e["flows"].items():
        assert flow["sent"] > 0 and flow["answered"] == flow["sent"], (name, flow)
    # The sessions the valid mutants made ended; the label pool is back.
    assert f["all_ended"], f
    assert f["labels_in_use_after"] == f["labels_in_use_before"] == 5, f
    assert r["ok"]
