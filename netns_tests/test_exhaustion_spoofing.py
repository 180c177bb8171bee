"""Reliability under two faults (project issue 13, items 3 and 4), with counted traffic; each
scenario is a row of docs/reliability.md.

Label pool exhaustion: a pool of three pairs and `min_free_labels: 0`; three clients hold them,
then more clients (c1's alias addresses) are refused, each answered on the wire (TCP reset, ICMP
administratively prohibited for UDP) and counted by the daemon and the ruleset, while an existing
session keeps passing a counted stream of requests; once sessions end (short persistence and
hold-down) new sessions are served again at the first try after a pair is free.

Label spoofing: c1 injects MPLS frames (a live session's C2S label, with and without the server's
transport label, an IP packet inside) to the balancer's MAC on its client link, where MPLS input
is off: captures on the client link, the fabric and the server's link, and the client link's MPLS
counters, show the kernel dropped every one and none reached a server."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.config.examples import KeyPath
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Capture, Lab, patience
from orchestrator.lab.traffic import REQUESTS

SERVICES = ("http", "dns", "mobile")
EXHAUST: dict[KeyPath, Any] = {
    "labels.range": [1001, 1006],  # three pairs: 1001/1002, 1003/1004, 1005/1006
    "labels.hold_down": "1s",
    **{f"services.{s}.persistence_timeout": "2s" for s in SERVICES},
    **{f"services.{s}.admission.min_free_labels": 0 for s in SERVICES},  # the pool may run dry
}
ALIASES = [f"10.0.1.{20 + i}" for i in range(16)]  # c1's extra source addresses: new clients

# A client that holds one TCP connection to the VIP open (its session stays serving) until stopped.
HOLD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=5)
print("connected", flush=True)
time.sleep(float(sys.argv[2]))
"""
# One first packet per source address (TCP connect, or one UDP datagram to port 53); per source
# what came back: served, rst (connection refused), unreachable (ICMP: EHOSTUNREACH), timeout.
PROBE = """
import errno, json, socket, sys
vip, kind, srcs = sys.argv[1], sys.argv[2], sys.argv[3:]
out = []
for src in srcs:
    udp = kind == "udp"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.bind((src, 0))
    s.settimeout(3)
    try:
        if udp:
            s.connect((vip, 53))
            s.send(b"probe")
            s.recv(100)
        else:
            s.connect((vip, 80))
        out.append("served")
    except ConnectionRefusedError:
        out.append("rst")
    except socket.timeout:
        out.append("timeout")
    except OSError as e:
        out.append("unreachable" if e.errno == errno.EHOSTUNREACH else errno.errorcode.get(e.errno, str(e)))
    finally:
        s.close()
print(json.dumps(out))
"""


def _probe(lab: Lab, kind: str, srcs: list[str]) -> list[str]:
    out = lab.sh("c1", sys.executable, "-c", PROBE, lab.vip, kind, *srcs, timeout=patience(60) + 5 * len(srcs))
    return list(json.loads(out.stdout))


def _counts(balancer: BalancerLab) -> dict[str, int]:
    status = balancer.cli("status")
    return {
        "exhausted": status["counters"].get("refused:labels-exhausted", 0),
        "headroom": status["counters"].get("refused:label-headroom", 0),
        "rst": status["nft_counters"]["refused_rst"],
        "icmp": status["nft_counters"]["refused_icmp"],
        "free": status["labels"]["free"],
        "in_use": status["labels"]["in_use"],
    }


def _http_session(balancer: BalancerLab, client: str) -> dict[str, Any]:
    return next(s for s in balancer.sessions() if s["service"] == "http" and s["client"] == client)


@pytest.fixture
def small_pool(lab: Lab) -> Iterator[BalancerLab]:
    dev = lab.iface("c1", towards="lb")["dev"]
    b = BalancerLab(lab, changes=EXHAUST)
    try:
        b.start()
        for address in ALIASES:
            lab.sh("c1", "ip", "addr", "add", f"{address}/24", "dev", dev)
        yield b
    finally:
        for address in ALIASES:
            lab.sh("c1", "ip", "addr", "del", f"{address}/24", "dev", dev, check=False)
        b.close()


def test_label_pool_exhaustion_refuses_and_counts_keeps_sessions_and_recovers(
    lab: Lab, small_pool: BalancerLab
) -> None:
    balancer = small_pool
    runtime = Path(lab.node("c1")["runtime_dir"])
    stop, stream_log = runtime / "stream.stop", runtime / "stream.jsonl"
    stop.unlink(missing_ok=True)
    # Three sessions take the three pairs: c1's stream, c2 and c3 holding a connection each.
    c1 = lab.address("c1")
    stream = lab.spawn("c1", sys.executable, "-c", REQUESTS, lab.vip, c1, "2000", str(stop), str(stream_log))
    holders = []
    for client in ("c2", "c3"):
        log = Path(lab.node(client)["runtime_dir"]) / "hold.log"
        holders.append((lab.spawn(client, sys.executable, "-c", HOLD, lab.vip, "120", log=log), log))
    try:
        deadline = time.monotonic() + patience(30)
        while not all(b"connected" in (log.read_bytes() if log.exists() else b"") for _, log in holders) or not (
            stream_log.exists() and stream_log.read_text().count("\n") >= 3
        ):
            assert time.monotonic() < deadline, balancer.log()[-2000:]
            assert all(p.poll() is None for p, _ in holders), [log.read_text() for _, log in holders]
            time.sleep(0.3)
        before = _counts(balancer)
        assert (before["in_use"], before["free"]) == (3, 0), before
        streamed = _http_session(balancer, c1)

        # Refusals: 8 new TCP clients and 4 new UDP clients, while the pool is empty.
        refusing_from = time.time()
        tcp = _probe(lab, "tcp", ALIASES[:8])
        udp = _probe(lab, "udp", ALIASES[8:12])
        refusing_to = time.time()
        assert tcp == ["rst"] * 8, tcp
        assert udp == ["unreachable"] * 4, udp
        after = _counts(balancer)
        assert after["exhausted"] - before["exhausted"] == 12, (before, after)
        assert after["headroom"] == before["headroom"], (before, after)
        assert (after["rst"] - before["rst"], after["icmp"] - before["icmp"]) == (8, 4), (before, after)
        assert (after["in_use"], after["free"]) == (3, 0), after

        # Pairs come back: the holders end; a new client is refused while no pair is free and
        # served at the first try once one is (the status says free, nothing else takes it).
        for proc, _ in holders:
            lab.stop(proc)
        waiting, refused_waiting = ALIASES[12], 0
        deadline = time.monotonic() + patience(40)  # TCP close (1 s) + a sweep (10 s) + persistence + hold-down
        while True:
            free = _counts(balancer)["free"]
            outcome = _probe(lab, "tcp", [waiting])[0]
            if outcome == "served":
                break
            assert outcome == "rst" and free == 0, (outcome, free)  # a free pair must have served it
            refused_waiting += 1
            assert time.monotonic() < deadline, balancer.log()[-2000:]
            time.sleep(0.5)
        deadline = time.monotonic() + patience(40)
        while _counts(balancer)["free"] == 0:  # the second holder's pair
            assert time.monotonic() < deadline, balancer.log()[-2000:]
            time.sleep(0.5)
        assert _probe(lab, "tcp", [ALIASES[13]]) == ["served"]
        assert _probe(lab, "tcp", [ALIASES[14]]) == ["rst"]  # three sessions again: full again
        final = _counts(balancer)
        assert final["exhausted"] - after["exhausted"] == refused_waiting + 1, (after, final, refused_waiting)
        assert final["rst"] - after["rst"] == refused_waiting + 1, (after, final)
        assert final["headroom"] == before["headroom"]
    finally:
        stop.touch()
        for proc, _ in holders:
            lab.stop(proc)
        stream.wait(timeout=patience(30))
    # The existing session: every request of its stream answered, before, during and after the
    # refusals, and it is still the same session with the same labels.
    requests = [json.loads(line) for line in stream_log.read_text().splitlines()]
    during = [r for r in requests if refusing_from <= r["t"] <= refusing_to]
    assert len(requests) >= 20 and len(during) >= 3, (len(requests), len(during))
    assert sum(r["ok"] for r in requests) == len(requests), [r for r in requests if not r["ok"]][:5]
    now = _http_session(balancer, c1)
    assert (now["id"], now["server"], now["c2s_label"]) == (streamed["id"], streamed["server"], streamed["c2s_label"])
    print(
        f"exhaustion: stream {len(requests)} sent {sum(r['ok'] for r in requests)} answered "
        f"({len(during)} while refusing); refused 8 tcp + 4 udp + {refused_waiting + 1} while waiting"
    )


# ---------------------------------------------------------------------------------------------
# Label spoofing from a client link.

MARK = b"mplsorch-spoof"
# Labelled frames to the balancer's MAC: per label stack (outermost first) COUNT frames, each an
# IPv4 UDP packet to the VIP carrying MARK.
SPOOF = """
import sys
from scapy.all import IP, UDP, Ether, Raw, conf, sendp
from scapy.contrib.mpls import MPLS
conf.verb = 0
mac, dev, src, vip, count, mark = sys.argv[1:7]
frames = []
for stack in sys.argv[7:]:
    labels = [int(x) for x in stack.split(",")]
    pkt = IP(src=src, dst=vip) / UDP(sport=5353, dport=53) / Raw(mark.encode())
    for i, label in reversed(list(enumerate(labels))):
        pkt = MPLS(label=label, s=int(i == len(labels) - 1), ttl=64) / pkt
    frames += [Ether(dst=mac, type=0x8847) / pkt] * int(count)
sendp(frames, iface=dev, inter=0.01)
"""


@pytest.fixture
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab)
    try:
        b.start()
        yield b
    finally:
        b.close()


def _mpls_rx(lab: Lab, node: str, dev: str) -> dict[str, int]:
    """The device's MPLS receive counters (packets, dropped, noroute, ...), per the kernel's
    per-device MPLS statistics (`ip stats ... afstats subgroup mpls`)."""
    out = lab.sh(node, "ip", "-j", "stats", "show", "dev", dev, "group", "afstats", "subgroup", "mpls").stdout
    entry = json.loads(out)[0]
    return {k: int(v) for k, v in entry["mpls_stats"]["rx"].items()}


def _marked(capture: Capture) -> tuple[int, list[tuple[int, ...]]]:
    """Stop the capture: how many frames carried MARK, and every label stack seen."""
    stacks = capture.stacks()
    from scapy.all import rdpcap

    return sum(MARK in bytes(p) for p in rdpcap(str(capture.path))), stacks


def test_labelled_frames_from_a_client_link_are_dropped_and_never_reach_a_server(
    lab: Lab, balancer: BalancerLab
) -> None:
    assert balancer.curl("c1") == "200" and balancer.curl("c2") == "200"
    own, other = _http_session(balancer, lab.address("c1")), _http_session(balancer, lab.address("c2"))
    lan0, fab0 = lab.iface("lb", towards="c1")["dev"], lab.iface("lb", towards="p")["dev"]
    sysctl = lab.sh("lb", "sysctl", "-n", f"net.mpls.conf.{lan0}.input", f"net.mpls.conf.{fab0}.input").stdout.split()
    assert sysctl == ["0", "1"], sysctl  # MPLS input off on the client link, on on the fabric
    transport = {s["server"]: lab.node(s["server"])["transport_label"] for s in (own, other)}
    stacks = [
        f"{transport[other['server']]},{other['c2s_label']}",  # another session's labels, as lb would push them
        f"{other['c2s_label']}",  # its C2S label alone
        f"{transport[own['server']]},{own['c2s_label']}",  # the client's own session's labels
    ]
    count = 10
    server = other["server"]
    captures = {
        "client link": lab.capture("lb", lan0, "spoof-lan"),
        "fabric": lab.capture("p", lab.iface("p", towards="lb")["dev"], "spoof-fabric"),
        f"{server}'s link": lab.capture(server, lab.iface(server, towards="p")["dev"], "spoof-server"),
    }
    rx_before = _mpls_rx(lab, "lb", lan0)
    started = balancer.cli("status")["counters"].get("sessions_started", 0)
    mac = lab.sh("lb", "cat", f"/sys/class/net/{lan0}/address").stdout.strip()
    lab.sh(
        "c1",
        sys.executable,
        "-c",
        SPOOF,
        mac,
        lab.iface("c1", towards="lb")["dev"],
        lab.address("c2"),
        lab.vip,
        str(count),
        MARK.decode(),
        *stacks,
        timeout=patience(60),
    )
    time.sleep(1)
    rx_after = _mpls_rx(lab, "lb", lan0)
    # The control: the other session's own traffic is on the fabric under the same labels.
    assert balancer.curl("c2") == "200"
    seen = {where: _marked(capture) for where, capture in captures.items()}
    sent = count * len(stacks)
    assert seen["client link"][0] == sent, seen  # every spoofed frame reached the balancer ...
    assert seen["fabric"][0] == 0 and seen[f"{server}'s link"][0] == 0, seen  # ... none went further
    assert (transport[server], other["c2s_label"]) in seen["fabric"][1], seen["fabric"][1]
    assert (other["c2s_label"],) in seen[f"{server}'s link"][1], seen[f"{server}'s link"][1]  # popped by p
    # The kernel's count: received on the client link as MPLS, every one dropped (input off).
    assert rx_after["packets"] - rx_before["packets"] == sent, (rx_before, rx_after)
    assert rx_after["dropped"] - rx_before["dropped"] == sent, (rx_before, rx_after)
    assert rx_after["noroute"] == rx_before["noroute"], (rx_before, rx_after)  # dropped for input off, not lookup
    # Nothing reached userspace or changed the sessions.
    assert balancer.cli("status")["counters"].get("sessions_started", 0) == started
    assert _http_session(balancer, lab.address("c2"))["id"] == other["id"]
    print(f"spoofing: {sent} labelled frames sent on {lan0}, {sent} dropped by the kernel, 0 on the fabric")
