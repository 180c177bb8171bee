"""`mplsorch lab fuzz`, run inside the lab (issue 13, item 6): malformed and mutated first packets
through the running balancer daemon while established sessions carry counted traffic.

The balancer runs the lab's configuration with short persistence (the sessions the fuzz makes
end within seconds) and one more service, `esp` on the IPv6 VIP (ESP, client-ip key), so bad ESP
reaches the queue too. c1 and c2 hold established sessions and keep them busy for the whole run:
a paced UDP stream each (every datagram echoed by its sequence number), HTTP requests to the IPv4
VIP each (a new connection per request: the kernel's fast path) and c1 HTTP requests to the IPv6
VIP (the mobile service). c3 sends the corpus (orchestrator.lab.fuzz_send) from addresses of the
client LAN: valid mutants from a few addresses it holds (their answers come back to it), the
malformed ones from many it does not.

Reported: packets sent; what the ruleset counted (queued, admitted by the fast path, rate
limited); what the daemon analysed and how it judged it (per malformed reason, sessions started,
...), against what the analyser says of each packet sent; the daemon's pid and memory before and
after; each established flow's sent against answered; the established sessions unchanged; the
sessions the fuzz made, and the label pool back to where it was once they ended."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.config.examples import KeyPath
from orchestrator.lab.balancer_lab import RESTORED, BalancerLab
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.traffic import PACED_REQUESTS, STREAM, last_json

SESSION4 = tuple(f"10.0.1.{i}" for i in range(100, 108))  # c3's own: valid mutants' sources
SESSION6 = tuple(f"fd00:1::{i:x}" for i in range(0x100, 0x108))
SPOOFED4 = tuple(f"10.0.1.{i}" for i in range(128, 255))  # nobody's: malformed mutants' sources
SPOOFED6 = tuple(f"fd00:1::f:{i:x}" for i in range(256))
HOMES = tuple(f"fd00:99::{i}" for i in range(1, 5))  # mobile nodes' home addresses in valid mutants
FUZZER = "c3"
CHECKED = ("c1", "c2")
INTERVAL = 0.02  # the UDP streams' pace
HTTP_INTERVAL = 0.1  # between two HTTP requests of one client
PERSISTENCE = "5s"  # the fuzz's sessions end soon; the established ones never idle that long

CHANGES: dict[KeyPath, Any] = {
    "services.http.persistence_timeout": PERSISTENCE,
    "services.mobile.persistence_timeout": PERSISTENCE,
    "services.dns.persistence_timeout": PERSISTENCE,
    "services.esp": {
        "vip": "fd00:100::100",
        "protocol": "esp",
        "pool": "web",
        "session_key": "client-ip",
        "persistence_timeout": PERSISTENCE,
        "scheduler": "rr",
        "admission": {"max_sessions": 100000, "min_free_labels": 16, "refuse_with": "icmp"},
        "fail_policy": "open",
    },
}

# Conntrack ends the fuzz's flows within seconds (the lab's UDP timeout is already 3 s): unanswered
# SYNs, ESP, and a mutant whose flags are no SYN any more that conntrack picked up mid-stream
# (established) while the server, seeing a bad checksum, never answers it. The established
# sessions' HTTP connections each last well under a second.
SYSCTLS = (
    "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=3",
    "net.netfilter.nf_conntrack_tcp_timeout_syn_recv=3",
    "net.netfilter.nf_conntrack_tcp_timeout_established=10",
    "net.netfilter.nf_conntrack_tcp_timeout_unacknowledged=10",
    "net.netfilter.nf_conntrack_generic_timeout=3",
)

STREAM_LIMIT = "3600"  # seconds: the UDP streams run until the stop file


def _counted(result: dict[str, Any]) -> dict[str, Any]:
    """{"sent", "answered"} of a STREAM's (sent, received) or a PACED_REQUESTS' result."""
    return {"sent": result["sent"], "answered": result.get("answered", result.get("received"))}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _delta(after: dict[str, int], before: dict[str, int], prefix: str = "") -> dict[str, int]:
    return {
        k[len(prefix) :]: after[k] - before.get(k, 0)
        for k in sorted(after)
        if k.startswith(prefix) and after[k] != before.get(k, 0)
    }


def _mac(lab: Lab, node: str, dev: str) -> str:
    return str(json.loads(lab.sh(node, "ip", "-j", "link", "show", "dev", dev).stdout)[0]["address"])


def _wait(what: str, ready: Any, seconds: float) -> bool:
    """Poll `ready` (a question to the daemon: on a loaded host its CLI may take longer than its
    timeout, which counts as not yet) until it holds or `seconds` of patience are gone."""
    deadline = time.monotonic() + patience(seconds)
    while True:
        try:
            if ready():
                return True
        except (subprocess.TimeoutExpired, RuntimeError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def run(lab: Lab, packets: int, seed: int, distinct: int) -> dict[str, Any]:
    balancer = BalancerLab(lab, changes=CHANGES)
    dev = lab.iface(FUZZER, towards="lb")["dev"]
    procs = []
    try:
        balancer.start()
        lab.sh("lb", "sysctl", "-qw", *SYSCTLS)
        for a in SESSION4:
            lab.sh(FUZZER, "ip", "addr", "add", f"{a}/24", "dev", dev)
        for a in SESSION6:
            lab.sh(FUZZER, "ip", "addr", "add", f"{a}/64", "dev", dev, "nodad")
        # The established sessions, opened by their own traffic and kept busy by it: per checked
        # client http and dns, and c1's mobile (IPv6 http).
        stop = Path(lab.node("lb")["runtime_dir"]) / "fuzz-stop"
        stop.unlink(missing_ok=True)
        logs: dict[str, Path] = {}
        for client in CHECKED:
            run_dir = Path(lab.node(client)["runtime_dir"])
            flows = {
                "udp": (STREAM, lab.vip, INTERVAL, [STREAM_LIMIT]),
                "http": (PACED_REQUESTS, lab.vip, HTTP_INTERVAL, []),
            }
            if client == CHECKED[0]:
                flows["http6"] = (PACED_REQUESTS, lab.vip6, HTTP_INTERVAL, [])
            for name, (script, vip, interval, more) in flows.items():
                logs[f"{client}-{name}"] = run_dir / f"fuzz-{name}.log"
                procs.append(
                    lab.spawn(
                        client,
                        sys.executable,
                        "-c",
                        script,
                        vip,
                        str(interval),
                        str(stop),
                        *more,
                        log=logs[f"{client}-{name}"],
                    )
                )
        _wait("the established sessions", lambda: len(balancer.sessions()) >= len(logs), 60)
        time.sleep(2.0)
        checked = sorted(({k: s[k] for k in RESTORED} for s in balancer.sessions()), key=lambda s: s["id"])
        assert balancer.proc is not None
        pid = balancer.proc.pid
        before = balancer.cli("status")
        rss_before = _rss_kb(pid)

        spec = {
            "seed": seed,
            "packets": packets,
            "distinct": min(distinct, packets),
            "iface": dev,
            "src_mac": _mac(lab, FUZZER, dev),
            "dst_mac": _mac(lab, "lb", lab.iface("lb", towards=FUZZER)["dev"]),
            "pace_pid": pid,
            "targets": {
                "vip4": lab.vip,
                "vip6": lab.vip6,
                "session4": SESSION4,
                "session6": SESSION6,
                "spoofed4": SPOOFED4,
                "spoofed6": SPOOFED6,
                "homes": HOMES,
                "esp6": True,
            },
        }
        spec_path = Path(lab.node(FUZZER)["runtime_dir"]) / "fuzz-spec.json"
        spec_path.write_text(json.dumps(spec))
        out = lab.sh(FUZZER, sys.executable, "-m", "orchestrator.lab.fuzz_send", str(spec_path), timeout=3600)
        sender = json.loads(out.stdout.strip().splitlines()[-1])
        # The daemon works through what is queued; then its counters hold still.
        _wait("the queue to drain", lambda: balancer.cli("status")["queue"]["waiting"] == 0, 60)
        time.sleep(1.0)
        after = balancer.cli("status")
        rss_after = _rss_kb(pid) if balancer.proc.poll() is None else 0
        alive = balancer.proc.poll() is None and after["pid"] == before["pid"]
        sessions_after = balancer.sessions()
        ids = {c["id"] for c in checked}
        checked_after = sorted(
            ({k: s[k] for k in RESTORED} for s in sessions_after if s["id"] in ids), key=lambda s: s["id"]
        )
        # The fuzz's sessions end (no flows for their persistence) while the established ones go
        # on: the label pool comes back to what it was.
        ended = _wait("the fuzz's sessions to end", lambda: {s["id"] for s in balancer.sessions()} <= ids, 60)
        final = balancer.cli("status")
        left = [s for s in balancer.sessions() if s["id"] not in ids]
        stop.touch()
        for proc in procs:
            proc.wait(timeout=patience(60))
        traffic = {name: _counted(last_json(log)) for name, log in logs.items()}
    finally:
        stop_file = Path(lab.node("lb")["runtime_dir"]) / "fuzz-stop"
        stop_file.touch()
        for proc in procs:
            lab.stop(proc)
        log_tail = balancer.log()[-3000:]
        balancer.close()
        for a in SESSION4:
            lab.sh(FUZZER, "ip", "addr", "del", f"{a}/24", "dev", dev, check=False)
        for a in SESSION6:
            lab.sh(FUZZER, "ip", "addr", "del", f"{a}/64", "dev", dev, check=False)

    counters = _delta(after["counters"], before["counters"])
    nft = _delta(after["nft_counters"], before["nft_counters"])
    queued = sum(v for k, v in nft.items() if k.startswith("queued_"))
    analysed = counters.get("packets_userspace", 0)
    malformed = {k[len("malformed:") :]: v for k, v in counters.items() if k.startswith("malformed:")}
    verdicts = {k[len("verdict:") :]: v for k, v in counters.items() if k.startswith("verdict:")}
    judged = {
        k: v
        for k, v in counters.items()
        if not k.startswith(("malformed:", "verdict:"))
        and k
        not in (
            "packets_userspace",
            "flows_fast_path",
            "conntrack_sweeps",
            "sessions_ended",
            "batch_errors",
        )
        and not k.startswith("ended:")
    }
    expected = sender["by_outcome"]
    labels_before, labels_final = before["labels"], final["labels"]
    result: dict[str, Any] = {
        "seed": seed,
        "packets": {
            "sent": sender["sent"],
            "distinct": sender["distinct"],
            "send_errors": sender["send_errors"],
            "send_s": sender["send_s"],
            "per_s": sender["per_s"],
            "build_s": sender["build_s"],
            "pace_waits": sender["pace_waits"],
            "queued": queued,
            "fast_path": sum(v for k, v in nft.items() if k.startswith("fastpath_")),
            "rate_limited": nft.get("rate_limited", 0),
            "analysed": analysed,
            "overflow": queued - analysed,
            "not_queued": sender["sent"] - queued - nft.get("rate_limited", 0),
            "queue_dropped": after["queue"]["queue_dropped"] - before["queue"]["queue_dropped"],
            "user_dropped": after["queue"]["user_dropped"] - before["queue"]["user_dropped"],
        },
        "nft_counters": nft,
        "expected": expected,
        "by_kind": sender["by_kind"],
        "malformed": malformed,
        "verdicts": verdicts,
        "judged": judged,
        "daemon": {
            "pid_before": before["pid"],
            "pid_after": after["pid"],
            "alive": alive,
            "rss_kb_before": rss_before,
            "rss_kb_after": rss_after,
            "batch_errors": counters.get("batch_errors", 0),
        },
        "established": {
            "flows": traffic,
            "sessions_before": len(checked),
            "sessions_unchanged": checked_after == checked,
            "changed": [s for s in checked_after if s not in checked] + [s for s in checked if s not in checked_after],
        },
        "fuzz_sessions": {
            "started": counters.get("sessions_started", 0),
            "ended": final["counters"].get("sessions_ended", 0) - before["counters"].get("sessions_ended", 0),
            "all_ended": ended,
            "left": left,
            "labels_in_use_before": labels_before["in_use"],
            "labels_in_use_after": labels_final["in_use"],
        },
    }
    result["ok"] = bool(
        alive
        and sender["send_errors"] == 0
        and checked_after == checked
        and len(checked) == len(traffic)
        and all(f["sent"] > 0 and f["answered"] == f["sent"] for f in traffic.values())
        and analysed == sum(verdicts.values())
        and sum(malformed.values()) <= verdicts.get("drop", 0)
        and all(malformed[r] <= expected.get(r, 0) for r in malformed)
        and counters.get("batch_errors", 0) == 0
        and ended
        and labels_final["in_use"] == labels_before["in_use"]
    )
    if not result["ok"]:
        result["daemon_log_tail"] = log_tail
    return result


def show(r: dict[str, Any]) -> None:
    p = r["packets"]
    print(f"mplsorch lab fuzz: {p['sent']} mutated first packets (seed {r['seed']}, {p['distinct']} distinct mutants)")
    print(
        f"sent in {p['send_s']} s ({p['per_s']}/s, paced by the queue's depth: {p['pace_waits']} waits); "
        f"queued {p['queued']}, fast path {p['fast_path']}, rate limited {p['rate_limited']}, "
        f"not queued (dropped by the kernel, no rule matched, or the fast path) {p['not_queued']}; "
        f"analysed by the daemon {p['analysed']}, queue overflow {p['overflow']}"
    )
    print("malformed by reason (daemon / analyser's count of the packets sent):")
    for reason in sorted(set(r["malformed"]) | {k for k in r["expected"] if k != "valid"}):
        print(f"  {reason:26}{r['malformed'].get(reason, 0):>10}{r['expected'].get(reason, 0):>10}")
    print(f"valid packets sent {r['expected'].get('valid', 0)}; daemon verdicts {r['verdicts']}; other: {r['judged']}")
    d = r["daemon"]
    print(
        f"daemon: pid {d['pid_before']} -> {d['pid_after']} ({'alive' if d['alive'] else 'GONE'}), "
        f"RSS {d['rss_kb_before']} kB -> {d['rss_kb_after']} kB"
    )
    e = r["established"]
    print(
        f"established: {e['sessions_before']} sessions {'unchanged' if e['sessions_unchanged'] else 'CHANGED'}; "
        + ", ".join(f"{k} {v['answered']}/{v['sent']}" for k, v in e["flows"].items())
    )
    f = r["fuzz_sessions"]
    print(
        f"sessions made by the fuzz: {f['started']}, ended {f['ended']} ({'all' if f['all_ended'] else 'NOT all'}); "
        f"labels in use {f['labels_in_use_before']} before, {f['labels_in_use_after']} after"
    )
    print("result: " + ("ok" if r["ok"] else "FAILED"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mplsorch lab fuzz")
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--distinct", type=int, default=50_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    lab = Lab.from_env()
    try:
        result = run(lab, args.packets, args.seed, args.distinct)
    finally:
        lab.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
