"""SYN flood (project issue 13, item 2), with counted traffic; a row of docs/reliability.md.

c1 sends spoofed TCP SYNs to the VIP's port 80, each from a random source of 10.64.0.0/10 (a
route on the balancer sends their answers back to c1, which drops them: no handshake ever
completes), at 40 times the configured global rate limit for 8 s (at least 20 times asserted). Meanwhile c2 and c3 hold
established sessions carrying counted traffic (a paced UDP stream each, echoed by sequence
number, and c2's stream of HTTP requests, a new connection each), and a legitimate client that
is not flooding (an alias address of c3, no session yet) opens a TCP connection.

Asserted: the established sessions lose nothing; the legitimate client gets its session during
the flood (its first SYN may meet the global limit; its retransmission 1 s later draws on the
retries' budget); the ruleset's global limit dropped the flood's bulk (`global_rate_limited`)
and the daemon got at most what the limits let through; every session the flood did open ended
as embryonic (its client sent nothing past the SYN) and the label pool is back to where it was
within a few seconds of the flood's end; the daemon's memory grew by less than a bound."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.config.examples import KeyPath
from orchestrator.control_socket import request
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.traffic import REQUESTS, last_json, nft_counters, spawn_stream, wait

LIMIT = 15  # nfqueue.global_rate_limit: first packets a second, all sources together (burst the same)
FLOOD_RATE = 40 * LIMIT  # spoofed SYNs a second: room above 20 times the limit on a loaded host
FLOOD_S = 8.0  # how long the flood lasts
FLOOD_NET, FLOOD_BITS = "10.64.0.0", 10  # the spoofed sources: 4 M addresses, so hardly one repeats
EMBRYONIC = 2.0  # sessions.embryonic_timeout, seconds
LEGIT = "10.0.1.60"  # an alias address of c3: a new client that is not flooding
INTERVAL = 0.02  # the UDP streams' pace
RSS_BOUND_KIB = 32 << 10  # the daemon's resident memory may grow by at most this much
CHANGES: dict[KeyPath, Any] = {
    "nfqueue.global_rate_limit": {"rate": f"{LIMIT}/second", "burst": LIMIT},
    "sessions.embryonic_timeout": f"{EMBRYONIC:g}s",
    "services.dns.persistence_timeout": "3600s",  # no established session ends during the test
}

# Spoofed TCP SYNs from a raw socket (IP_HDRINCL: the kernel fills the IP checksum, nothing
# else), RATE a second for SECONDS, each from a random address of NET/BITS and a random port;
# prints one JSON line: sent, distinct sources, seconds.
FLOOD = r"""
import json, random, socket, struct, sys, time
vip, net, bits, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
base, dst = struct.unpack("!I", socket.inet_aton(net))[0], socket.inet_aton(vip)
rng = random.Random(13)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

def csum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

sent, sources = 0, set()
start = time.monotonic()
while time.monotonic() < start + seconds:
    due = min(int((time.monotonic() - start) * rate) + 1, int(rate * seconds))
    while sent < due:
        src = struct.pack("!I", base + rng.randrange(1, (1 << (32 - bits)) - 1))
        tcp = struct.pack("!HHIIBBHHH", rng.randrange(1024, 65535), 80, rng.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
        tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
        s.sendto(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, src, dst) + tcp, (vip, 0))
        sent += 1
        sources.add(src)
    time.sleep(0.004)
print(json.dumps({"sent": sent, "sources": len(sources), "seconds": round(time.monotonic() - start, 2)}), flush=True)
"""


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab, changes=CHANGES)
    try:
        b.start()
        yield b
    finally:
        b.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _labels(balancer: BalancerLab) -> dict[str, Any]:
    """The label pool (`labels --json`) straight from the control socket, in this process: a
    CLI process per sample would take seconds to start on a loaded lab."""
    labels: dict[str, Any] = request(str(balancer.sock), "labels", timeout=patience(10))["labels"]
    return labels


def _status(balancer: BalancerLab) -> dict[str, Any]:
    status: dict[str, Any] = balancer.cli("status")
    return status


def test_syn_flood_cut_by_the_limits_sessions_kept_pool_recovers(lab: Lab, balancer: BalancerLab) -> None:
    assert balancer.curl("c2") == "200"
    for client in ("c2", "c3"):
        assert balancer.udp(client).startswith("echo ")
    c3_dev = lab.iface("c3", towards="lb")["dev"]
    lab.sh("c3", "ip", "addr", "add", f"{LEGIT}/24", "dev", c3_dev)
    # The spoofed sources' answers go back to c1 (which drops them): a route, so the balancer
    # has a next hop for their S2C routes (without one it would open no session at all).
    flood_net = f"{FLOOD_NET}/{FLOOD_BITS}"
    lab.sh("lb", "ip", "route", "add", flood_net, "via", lab.address("c1", towards="lb"))
    stop = Path(lab.node("lb")["runtime_dir"]) / "flood-stop"
    stop.unlink(missing_ok=True)
    procs = []
    try:
        streams = {c: Path(lab.node(c)["runtime_dir"]) / "flood-udp.log" for c in ("c2", "c3")}
        for client, log in streams.items():
            procs.append(spawn_stream(lab, client, log, stop, patience(90), INTERVAL))
        requests = Path(lab.node("c2")["runtime_dir"]) / "flood-http.log"
        c2 = lab.address("c2", towards="lb")
        procs.append(lab.spawn("c2", sys.executable, "-c", REQUESTS, lab.vip, c2, "100000", str(stop), str(requests)))
        wait("c2's first request", lambda: requests.exists() and '"ok": true' in requests.read_text(), 20)
        time.sleep(1.0)
        pid = balancer.proc.pid if balancer.proc else 0
        before, nft_before, rss_before = _status(balancer), nft_counters(lab), _rss_kib(pid)
        sessions_before = {s["id"] for s in balancer.sessions()}

        flood_log = Path(lab.node("c1")["runtime_dir"]) / "flood.log"
        flood = lab.spawn(
            "c1",
            sys.executable,
            "-c",
            FLOOD,
            lab.vip,
            FLOOD_NET,
            str(FLOOD_BITS),
            str(FLOOD_RATE),
            str(FLOOD_S),
            log=flood_log,
        )
        flood_start, flood_wall = time.monotonic(), time.time()
        time.sleep(2.0)
        # The legitimate client, in the middle of the flood: curl, as any client would.
        legit_log = Path(lab.node("c3")["runtime_dir"]) / "flood-legit.log"
        legit_proc = lab.spawn(
            "c3",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "10",
            "-w",
            "%{http_code} %{time_total}",
            "--interface",
            LEGIT,
            f"http://{lab.vip}/",
            log=legit_log,
        )
        procs.append(legit_proc)
        # Sampled from memory (`labels`: no nft subprocess, unlike `status`), every 0.1 s.
        peak_in_use, samples = 0, 0
        while flood.poll() is None:
            peak_in_use = max(peak_in_use, _labels(balancer)["in_use"])
            samples += 1
            assert time.monotonic() < flood_start + patience(FLOOD_S + 30), "the flood did not end"
            time.sleep(0.1)
        flood_end, flood_wall_end = time.monotonic(), time.time()
        sent = last_json(flood_log)
        assert legit_proc.wait(timeout=patience(30)) == 0, legit_log.read_text()
        legit, legit_s = legit_log.read_text().split()[:2]
        rss_flood = _rss_kib(pid)
        # The label pool recovers: only the established sessions and the legitimate client's hold
        # pairs, none held down.
        want_in_use = before["labels"]["in_use"] + 1
        recovered = None
        deadline = flood_end + patience(EMBRYONIC + 12)
        while time.monotonic() < deadline:
            labels = _labels(balancer)
            if labels["in_use"] == want_in_use and labels["held_down"] == 0:
                recovered = time.monotonic() - flood_end
                break
            time.sleep(0.1)
        after, nft_after, rss_after = _status(balancer), nft_counters(lab), _rss_kib(pid)
        sessions_after = balancer.sessions()

        stop.touch()
        for proc in procs:
            proc.wait(timeout=patience(30))
        udp = {c: last_json(log) for c, log in streams.items()}
        http = [json.loads(line) for line in requests.read_text().splitlines() if line.startswith("{")]
        during_flood = [r for r in http if flood_wall <= r["t"] <= flood_wall_end]

        def delta(name: str, was: dict[str, Any] = before, now: dict[str, Any] = after) -> int:
            return int(now["counters"].get(name, 0)) - int(was["counters"].get(name, 0))

        started = delta("sessions_started")
        embryonic_ended = delta("ended:embryonic timeout")
        limited = nft_after["global_rate_limited"] - nft_before["global_rate_limited"]
        retried = nft_after["global_rate_retried"] - nft_before["global_rate_retried"]
        queued = nft_after["queued_http"] - nft_before["queued_http"]
        print(
            f"\nSYN flood: {sent['sent']} spoofed SYNs from {sent['sources']} sources in {sent['seconds']} s "
            f"({sent['sent'] / sent['seconds']:.0f}/s, global limit {LIMIT}/s): global_rate_limited +{limited}, "
            f"global_rate_retried +{retried}, rate_limited +{nft_after['rate_limited'] - nft_before['rate_limited']}, "
            f"queued_http +{queued}; sessions started {started}, ended as embryonic {embryonic_ended}, "
            f"answered {delta('embryonic_answered')}; label pairs in use {before['labels']['in_use']} before, "
            f"peak {peak_in_use} ({samples} samples), back to {want_in_use} "
            f"with none held down {recovered if recovered is None else round(recovered, 1)} s after the flood; "
            f"legitimate client: HTTP {legit} in {legit_s} s; UDP per client (sent/received/lost): "
            + ", ".join(f"{c} {u['sent']}/{u['received']}/{u['lost']}" for c, u in udp.items())
            + f"; c2's HTTP requests {sum(r['ok'] for r in http)}/{len(http)} answered; daemon RSS "
            f"{rss_before} KiB before, {rss_flood} KiB after the flood, {rss_after} KiB recovered"
        )

        # The flood: at least 20 times the limit, from that many distinct sources.
        assert sent["sent"] >= 20 * LIMIT * FLOOD_S * 0.9, sent
        assert sent["sent"] / sent["seconds"] >= 20 * LIMIT, sent
        assert sent["sources"] >= 0.99 * sent["sent"], sent
        # The established sessions lost nothing.
        for client, result in udp.items():
            assert result["lost"] == 0 and result["sent"] > (FLOOD_S + 2) / INTERVAL, (client, result)
        assert http and all(r["ok"] for r in http), [r for r in http if not r["ok"]][:5]
        assert len(during_flood) >= 10, len(during_flood)
        for s in before_sessions(sessions_before, sessions_after):
            assert not s["embryonic"], s
        # The legitimate client opened its session during the flood.
        assert legit == "200", legit
        assert any(s["client"] == LEGIT and s["service"] == "http" and not s["embryonic"] for s in sessions_after)
        # The kernel cut the flood: the global limit dropped its bulk, the daemon saw at most what
        # the two budgets let through (LIMIT a second each, bursts of LIMIT) plus the client's SYNs.
        assert limited >= 0.8 * sent["sent"], (limited, sent)
        budget = 2 * LIMIT * (flood_end - flood_start + 1) + 2 * LIMIT
        assert 0 < queued <= budget, (queued, budget)
        assert 0 < started <= queued, (started, queued)
        # Every session the flood opened ended as embryonic; the pool came back within seconds.
        assert embryonic_ended == started - 1, (started, embryonic_ended)
        assert peak_in_use > want_in_use, peak_in_use
        # embryonic timeout + hold-down (1 s) + the daemon's backlog on a loaded lab: seconds, where
        # conntrack alone would keep the pairs 120 s + the persistence timeout.
        assert recovered is not None and recovered <= EMBRYONIC + 7, (recovered, after["labels"], before["labels"])
        assert after["labels"]["free"] == before["labels"]["free"] - 1, (before["labels"], after["labels"])
        assert after["sessions_embryonic"] == 0, after
        # Bounded memory.
        assert rss_after - rss_before <= RSS_BOUND_KIB, (rss_before, rss_flood, rss_after)
    finally:
        stop.touch()
        for proc in procs:
            lab.stop(proc)
        lab.sh("lb", "ip", "route", "del", flood_net, check=False)
        lab.sh("c3", "ip", "addr", "del", f"{LEGIT}/24", "dev", c3_dev, check=False)


def before_sessions(ids: set[int], sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sessions of `ids` that are still in `sessions`: all of them, or the test fails here."""
    kept = [s for s in sessions if s["id"] in ids]
    assert len(kept) == len(ids), (ids, sessions)
    return kept
