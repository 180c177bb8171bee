"""Benchmark: session setup, the balancer daemon against Linux IPVS (tunnel mode) on the same lab,
in one run. Two figures per system:

- rate: N first packets (UDP to the VIP's port 53, each from its own spoofed source) sent from
  c1 by the kernel's packet generator (pktgen; a Python sender would be IPVS's bottleneck), in
  bursts of at most 2,000, against the time from the first of them leaving c1 to the N-th
  leaving the balancer node on its fabric link. The balancer accepts a first packet only after
  its session's objects are in the kernel, and IPVS forwards one only after it made the
  connection, so that moment is "N sessions installed". Afterwards the daemon's counters and the
  kernel's filters (or IPVS's connection table) are checked to hold all N.
- added latency: TCP connect() time to VIP:80 of a new session (a fresh source address) minus
  that of a second connection from the same address right after (the session exists: the
  balancer still sees its first packet, IPVS finds its persistence template), per sample;
  p50 and p99.

Runs as root inside `mplsorch lab run` on the default lab (`mplsorch lab bench setup`). The helpers
`flood` and `connect` run inside the client's namespace, started by the benchmark itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from orchestrator.config.model import BalancerConfig
    from orchestrator.lab.balancer_lab import BalancerLab
    from orchestrator.lab.kit import Lab

UDP_PORT, TCP_PORT = 53, 80
FLOOD_NETS = {"balancer": 200, "ipvs": 201}  # second octet of each phase's spoofed sources
ALIAS_NET = "10.0.16.0/20"  # the latency samples' client addresses, on c1
MAX_SESSIONS, MAX_SAMPLES = 40000, 4000
IPVS_PERSISTENCE_S = 300
STALL_S = 30.0  # this long without a packet out on the fabric ends a flood
CHUNK = 2000  # first packets per burst: well within the daemon's NFQUEUE (4096 packets, 8 MiB)
BACKLOG = 4 * CHUNK  # net.core.netdev_max_backlog during the run
TCP_INFO_LEN, TCPI_TOTAL_RETRANS = 104, 100  # struct tcp_info: tcpi_total_retrans is at byte 100
CONNECT_GAP_S = 0.02  # between connects, so each one meets an idle system
IPVS_SCHEDULERS = {"rr": "rr", "wrr": "wrr", "lc": "lc", "wlc": "wlc", "maglev": "mh",
                   "source-hash": "sh", "response-time": "sed"}


T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress on stderr (stdout is the result)."""
    print(f"bench: {time.monotonic() - T0:7.1f}s {msg}", file=sys.stderr, flush=True)


# ---- pure logic ----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs; None when the reference is not positive (no meaningful ratio)."""
    return ours / theirs if theirs > 0 else None


def flood_sources(second_octet: int, count: int) -> list[str]:
    """`count` consecutive spoofed sources from 10.<second_octet>.0.1 (as pktgen walks them)."""
    if not 0 < count <= 65534:
        raise ValueError(f"count {count} out of range")
    first = int(ipaddress.IPv4Address(f"10.{second_octet}.0.1"))
    return [str(ipaddress.IPv4Address(first + i)) for i in range(count)]


def alias_addresses(network: str, count: int) -> list[str]:
    """The first `count` host addresses of `network`."""
    hosts = ipaddress.ip_network(network).hosts()
    return [str(next(hosts)) for _ in range(count)]


def pktgen_setup(dev: str, dst_mac: str, vip: str) -> list[tuple[str, str]]:
    """(file under /proc/net/pktgen, command): one device on the first pktgen thread, minimal UDP
    packets to the VIP's port 53, at full speed, each skb built afresh (veth cannot share them)."""
    return [("kpktgend_0", "rem_device_all"), ("kpktgend_0", f"add_device {dev}"),
            (dev, "clone_skb 0"), (dev, "pkt_size 60"), (dev, "delay 0"), (dev, f"dst {vip}"),
            (dev, f"dst_mac {dst_mac}"), (dev, "udp_src_min 5353"), (dev, "udp_src_max 5353"),
            (dev, f"udp_dst_min {UDP_PORT}"), (dev, f"udp_dst_max {UDP_PORT}")]


def pktgen_chunk(dev: str, sources: list[str]) -> list[tuple[str, str]]:
    """The commands for one burst: one packet from each of `sources` (consecutive), in order."""
    return [(dev, f"count {len(sources)}"), (dev, f"src_min {sources[0]}"), (dev, f"src_max {sources[-1]}")]


def chunks(count: int, size: int) -> list[tuple[int, int]]:
    """(first index, length) of the bursts that send `count` packets, each at most `size`."""
    return [(i, min(size, count - i)) for i in range(0, count, size)]


def pktgen_result(text: str) -> tuple[int, int]:
    """(microseconds, packets sent) of pktgen's last run, from /proc/net/pktgen/DEV."""
    match = re.search(r"Result: OK: (\d+)\(.*?\) usec, (\d+) ", text)
    if not match:
        raise RuntimeError("pktgen: " + (text.strip().splitlines() or ["no result"])[-1])
    return int(match[1]), int(match[2])


def softnet_drops(text: str) -> int:
    """Packets dropped from the per-CPU input backlogs, summed, from /proc/net/softnet_stat."""
    return sum(int(line.split()[1], 16) for line in text.splitlines() if line.strip())


def ipvs_connections(proc_text: str, sources: set[str]) -> int:
    """Connections (not persistence templates, which carry client port 0) from `sources` in a
    /proc/net/ip_vs_conn text (addresses and ports in hex)."""
    count = 0
    for line in proc_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 3 or fields[2] == "0000":
            continue
        try:
            client = str(ipaddress.IPv4Address(int(fields[1], 16)))
        except ValueError:
            continue
        count += client in sources
    return count


def tx_packets(proc_net_dev: str, dev: str) -> int:
    """Packets `dev` transmitted, from a /proc/net/dev text."""
    for line in proc_net_dev.splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == dev:
            return int(counters.split()[9])
    raise KeyError(f"no device {dev} in /proc/net/dev")


@dataclass(frozen=True)
class RateRun:
    """One flood: `count` first packets, pktgen sending for `send_s` in all, the last of them out
    on the fabric `elapsed_s` after the first left the client."""
    count: int
    elapsed_s: float
    send_s: float

    @property
    def per_s(self) -> float:
        return self.count / self.elapsed_s

    @property
    def offered_per_s(self) -> float:
        return self.count / self.send_s if self.send_s > 0 else float("inf")


@dataclass(frozen=True)
class Latency:
    """connect() times (seconds) of (new session, existing session) pairs, per sample, and how
    many of those connects retransmitted their SYN."""
    pairs: list[tuple[float, float]]
    retransmits: int = 0

    def added_ms(self, q: float) -> float:
        return 1000 * percentile([new - old for new, old in self.pairs], q)

    def new_ms(self, q: float) -> float:
        return 1000 * percentile([new for new, _ in self.pairs], q)

    def existing_ms(self, q: float) -> float:
        return 1000 * percentile([old for _, old in self.pairs], q)


@dataclass(frozen=True)
class SetupResult:
    sessions: int
    samples: int
    sessions_per_s: float
    ipvs_connections_per_s: float
    setup_ratio: float | None
    added_latency_p50_ms: float
    added_latency_p99_ms: float
    ipvs_added_latency_p50_ms: float
    ipvs_added_latency_p99_ms: float
    latency_p50_ratio: float | None
    latency_p99_ratio: float | None
    connect_new_p50_ms: float
    connect_existing_p50_ms: float
    ipvs_connect_new_p50_ms: float
    ipvs_connect_existing_p50_ms: float
    offered_per_s: float
    ipvs_offered_per_s: float
    syn_retransmits: int
    ipvs_syn_retransmits: int


def build_result(ours: RateRun, theirs: RateRun, our_lat: Latency, their_lat: Latency) -> SetupResult:
    def r3(x: float) -> float:
        return round(x, 3)

    def opt(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    added = {q: (our_lat.added_ms(q), their_lat.added_ms(q)) for q in (50, 99)}
    return SetupResult(
        sessions=ours.count, samples=len(our_lat.pairs),
        sessions_per_s=round(ours.per_s, 1), ipvs_connections_per_s=round(theirs.per_s, 1),
        setup_ratio=opt(ratio(ours.per_s, theirs.per_s)),
        added_latency_p50_ms=r3(added[50][0]), added_latency_p99_ms=r3(added[99][0]),
        ipvs_added_latency_p50_ms=r3(added[50][1]), ipvs_added_latency_p99_ms=r3(added[99][1]),
        latency_p50_ratio=opt(ratio(*added[50])), latency_p99_ratio=opt(ratio(*added[99])),
        connect_new_p50_ms=r3(our_lat.new_ms(50)), connect_existing_p50_ms=r3(our_lat.existing_ms(50)),
        ipvs_connect_new_p50_ms=r3(their_lat.new_ms(50)),
        ipvs_connect_existing_p50_ms=r3(their_lat.existing_ms(50)),
        offered_per_s=round(ours.offered_per_s, 1), ipvs_offered_per_s=round(theirs.offered_per_s, 1),
        syn_retransmits=our_lat.retransmits, ipvs_syn_retransmits=their_lat.retransmits)


def format_table(r: SetupResult) -> str:
    """The human-readable result: both systems side by side, ratio = balancer / IPVS."""
    def num(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    rows = [
        (f"new sessions/s ({r.sessions} first packets)", r.sessions_per_s, r.ipvs_connections_per_s,
         r.setup_ratio, 0),
        ("  offered by the sender/s", r.offered_per_s, r.ipvs_offered_per_s, None, 0),
        (f"added latency p50, ms ({r.samples} samples)", r.added_latency_p50_ms,
         r.ipvs_added_latency_p50_ms, r.latency_p50_ratio, 2),
        ("added latency p99, ms", r.added_latency_p99_ms, r.ipvs_added_latency_p99_ms, r.latency_p99_ratio, 2),
        ("  connect p50, new session, ms", r.connect_new_p50_ms, r.ipvs_connect_new_p50_ms, None, 2),
        ("  connect p50, existing session, ms", r.connect_existing_p50_ms, r.ipvs_connect_existing_p50_ms,
         None, 2),
        (f"  connects with a SYN retransmit (of {2 * r.samples})", r.syn_retransmits, r.ipvs_syn_retransmits,
         None, 0),
    ]
    lines = ["session setup: the balancer against IPVS (tunnel mode), same lab, same run",
             f"{'':40}{'balancer':>12}{'IPVS':>12}{'ratio':>8}"]
    for label, ours, theirs, rat, digits in rows:
        lines.append(f"{label:40}{num(ours, digits):>12}{num(theirs, digits):>12}{num(rat, 2):>8}")
    return "\n".join(lines)


# ---- helpers that run in the client's namespace --------------------------------------------------
def _pktgen(commands: list[tuple[str, str]]) -> None:
    for name, command in commands:
        with open(f"/proc/net/pktgen/{name}", "w") as f:
            f.write(command + "\n")


def flood(dev: str, dst_mac: str, vip: str, second_octet: int, count: int,
          out: Callable[[], int]) -> dict[str, float]:
    """Send `count` first packets from consecutive sources with pktgen, in bursts the daemon's
    queue can hold, each once the previous one is through; return the time the first packet left
    this node and the time `out` (packets out of the balancer node) had grown by `count`."""
    sources = flood_sources(second_octet, count)
    _pktgen(pktgen_setup(dev, dst_mac, vip))
    net_dev = Path("/proc/self/net/dev")
    out_base = out()
    first_sent: float | None = None
    busy_us = 0
    for first, length in chunks(count, CHUNK):
        _pktgen(pktgen_chunk(dev, sources[first:first + length]))
        sent_base = tx_packets(net_dev.read_text(), dev)
        # pktgen's thread picks the start up within 100 ms; the write returns once it is done
        runner = threading.Thread(target=_pktgen, args=([("pgctrl", "start")],))
        runner.start()
        if first_sent is None:
            first_sent, _ = wait_for(lambda: tx_packets(net_dev.read_text(), dev) - sent_base, 1, time.monotonic())
        runner.join()
        usec, sent = pktgen_result(Path(f"/proc/net/pktgen/{dev}").read_text())
        if sent != length:
            raise RuntimeError(f"pktgen sent {sent} of {length} packets")
        busy_us += usec
        reached, seen = wait_for(lambda: out() - out_base, first + length, first_sent)
        if seen < first + length:
            break
    _pktgen([("kpktgend_0", "rem_device_all")])
    return {"start": first_sent, "send_s": busy_us / 1e6, "reached": reached, "seen": seen}


def wait_for(count: Callable[[], int], target: int, since: float) -> tuple[float, int]:
    """(when count reached target, count); if it stalls first, (its last change, count). Polls
    at 0.5 % of the time since `since` (1 to 20 ms): precise enough, and cheap for the CPUs the
    systems under test need."""
    last, changed = count(), time.monotonic()
    while True:
        now, seen = time.monotonic(), count()
        if seen != last:
            last, changed = seen, now
        if seen >= target:
            return now, seen
        if now - changed > STALL_S:
            return changed, seen
        time.sleep(min(max((now - since) / 200, 0.001), 0.02))


def _connect_time(source: str, vip: str, port: int, timeout: float) -> tuple[float, bool]:
    """Seconds for one TCP connect(), and whether the SYN had to be sent again (a lost SYN or
    SYN-ACK costs the initial retransmission timeout, 1 s); the socket is then reset (no FIN
    exchange, no TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.settimeout(timeout)
        sock.bind((source, 0))
        start = time.perf_counter()
        sock.connect((vip, port))
        elapsed = time.perf_counter() - start
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        return elapsed, struct.unpack_from("I", info, TCPI_TOTAL_RETRANS)[0] > 0


def connects(vip: str, port: int, sources: list[str], warmup: str, gap: float) -> dict[str, Any]:
    """Per source: connect() as a new session, then again as an existing one (a gap before each,
    so every connect meets an idle system: this is latency, not load)."""
    for _ in range(2):  # code paths and caches along the way, not measured
        _connect_time(warmup, vip, port, 10)
    pairs, failed, retransmits = [], [], 0
    for source in sources:
        try:
            time.sleep(gap)
            new, again = _connect_time(source, vip, port, 10)
            time.sleep(gap)
            old, again_old = _connect_time(source, vip, port, 10)
            pairs.append((new, old))
            retransmits += again + again_old
        except OSError as exc:
            failed.append(f"{source}: {exc}")
    return {"pairs": pairs, "failed": failed, "retransmits": retransmits}


# What the servers run on VIP:80 while connects are timed: it accepts and closes at once, from a
# deep accept queue. (Python's http.server listens with a backlog of 5; in a loaded emulated VM it
# falls behind, its queue overflows and a SYN waits 1 s for its retransmission.)
ACCEPT_SINK = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
               "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096); print('listening', flush=True)\n"
               "while True:\n c,_=s.accept(); c.close()")


# ---- the lab side ----------------------------------------------------------------------------------
def _helper(lab: "Lab", node: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", lab.netns(node), sys.executable, "-m", "orchestrator.lab.bench_setup", *args]


def _mac(lab: "Lab", node: str, dev: str) -> str:
    return json.loads(lab.sh(node, "ip", "-j", "link", "show", "dev", dev).stdout)[0]["address"]


def _batch(lab: "Lab", node: str, lines: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        lab.sh(node, "ip", "-batch", f.name)
    finally:
        os.unlink(f.name)


class NodeProcess:
    """A process parked in a node, so that /proc/PID/net/dev shows that node's links to any
    process (reading it costs the systems under test nothing)."""

    def __init__(self, lab: "Lab", node: str) -> None:
        self.lab = lab
        self.proc = lab.spawn(node, "sleep", "100000")
        netns = os.stat(f"/run/netns/{lab.netns(node)}").st_ino
        deadline = time.monotonic() + 30
        while os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino != netns:  # `ip netns exec` not there yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"no process entered {node}'s namespace")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.lab.stop(self.proc)


class Setup:
    """The topology facts both phases need, and the client side they share."""

    def __init__(self, lab: "Lab", sessions: int, samples: int) -> None:
        self.lab, self.sessions, self.samples = lab, sessions, samples
        self.client = lab.names("client")[0]
        self.balancer = lab.names("balancer")[0]
        self.fabric = next(p["node"] for p in lab.iface(self.balancer, segment="core")["peers"])
        client_iface = lab.iface(self.client, towards=self.balancer)
        self.client_dev = client_iface["dev"]
        self.client_subnet = next(s["subnet"] for s in lab.desc["segments"] if s["name"] == client_iface["segment"])
        self.lan_dev = lab.iface(self.balancer, towards=self.client)["dev"]
        self.fab_dev = lab.iface(self.balancer, towards=self.fabric)["dev"]
        self.aliases = alias_addresses(ALIAS_NET, samples)
        self.sinks: list[subprocess.Popen[bytes]] = []

    def prepare_clients(self) -> None:
        """Latency sources: aliases on the client, reachable from the balancer (permanent neighbour
        entries: no ARP inside a measured connect) and from the fabric (servers answer through it).
        Spoofed flood sources must be routed by the balancer and not dropped by its reverse-path
        filter."""
        lab, lb = self.lab, self.balancer
        subprocess.run(["modprobe", "pktgen"], check=True)
        _batch(lab, self.client, [f"address add {a}/32 dev {self.client_dev}" for a in self.aliases])
        mac = _mac(lab, self.client, self.client_dev)
        # The flood's spoofed sources sit behind the client LAN too: the balancer answers (and so
        # opens sessions for) only clients it has a route to.
        _batch(lab, lb, [f"route replace {ALIAS_NET} dev {self.lan_dev}"]
               + [f"route replace 10.{octet}.0.0/16 dev {self.lan_dev}" for octet in FLOOD_NETS.values()]
               + [f"neigh replace {a} lladdr {mac} dev {self.lan_dev} nud permanent" for a in self.aliases])
        lab.sh(self.fabric, "ip", "route", "replace", ALIAS_NET, "via", lab.peer_address(self.fabric, lb))
        lab.sh(lb, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{self.lan_dev}.rp_filter=0")
        lab.sh(self.client, "ping", "-c", "1", "-W", "5", lab.address(lb, towards=self.client))

    def start_sinks(self) -> None:
        """The accept sink on every server's VIP:80, ready when it says so."""
        for server in self.lab.names("server"):
            log = Path(self.lab.node(server)["runtime_dir"]) / "accept-sink.log"
            proc = self.lab.spawn(server, sys.executable, "-c", ACCEPT_SINK, self.lab.vip, str(TCP_PORT), log=log)
            self.sinks.append(proc)
            deadline = time.monotonic() + 120
            while b"listening" not in (log.read_bytes() if log.exists() else b""):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"accept sink on {server} did not start: {log.read_text()}")
                time.sleep(0.2)

    def stop_sinks(self) -> None:
        for proc in self.sinks:
            self.lab.stop(proc)
        self.sinks.clear()

    def rate(self, phase: str) -> RateRun:
        """Flood from the client; the helper waits until the balancer node has sent it all on."""
        lab = self.lab
        watch = NodeProcess(lab, self.balancer)
        drops_before = softnet_drops(Path("/proc/net/softnet_stat").read_text())
        try:
            cmd = _helper(lab, self.client, "flood", self.client_dev, _mac(lab, self.balancer, self.lan_dev),
                          lab.vip, str(FLOOD_NETS[phase]), str(self.sessions), str(watch.pid), self.fab_dev)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900 + self.sessions)
        finally:
            watch.close()
        if done.returncode != 0:
            raise RuntimeError(f"flood helper failed: {done.stderr}")
        out = json.loads(done.stdout)
        elapsed = out["reached"] - out["start"]
        say(f"{phase}: {out['seen']} of {self.sessions} first packets out on the fabric after {elapsed:.3f} s "
            f"(pktgen busy {out['send_s']:.3f} s)")
        if out["seen"] < self.sessions:
            drops = softnet_drops(Path("/proc/net/softnet_stat").read_text()) - drops_before
            raise RuntimeError(f"{phase}: only {out['seen']} of {self.sessions} first packets left the "
                               f"balancer node ({STALL_S:.0f} s without progress; {drops} dropped "
                               f"from the kernel's input backlog)")
        return RateRun(self.sessions, elapsed, out["send_s"])

    def latency(self, phase: str) -> Latency:
        lab = self.lab
        cmd = _helper(lab, self.client, "connect", lab.vip, str(TCP_PORT), lab.address(self.client),
                      ",".join(self.aliases))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + 5 * self.samples)
        if done.returncode != 0:
            raise RuntimeError(f"connect helper failed: {done.stderr}")
        out = json.loads(done.stdout)
        if out["failed"]:
            raise RuntimeError(f"{phase}: {len(out['failed'])} connects failed, first: {out['failed'][0]}")
        say(f"{phase}: {out['retransmits']} of {2 * len(out['pairs'])} connects retransmitted their SYN")
        return Latency([(new, old) for new, old in out["pairs"]], out["retransmits"])


# ---- phase 1: the balancer daemon ------------------------------------------------------------------
def label_range(sessions: int, samples: int) -> tuple[int, int]:
    """Labels for every session of the run, with room for the admission headroom."""
    from orchestrator.lab.balancer_lab import LABELS

    last = LABELS[0] + 2 * (sessions + samples + 256) + 1
    return LABELS[0], max(last, LABELS[1])


def balancer_phase(setup: Setup) -> tuple[RateRun, Latency]:
    from orchestrator.dataplane import ops
    from orchestrator.lab.balancer_lab import LABELS, BalancerLab

    lab = setup.lab
    first, last = label_range(setup.sessions, setup.samples)
    balancer = BalancerLab(lab, setup.balancer, **{
        "range: [1000, 99999]": f"range: [{first}, {last}]",
        # the flood's sessions live through the whole phase, so the kernel holds them all at the end
        "persistence_timeout: 30s\n    scheduler: wrr": "persistence_timeout: 600s\n    scheduler: wrr"})
    try:
        say("balancer: starting the daemon and the servers")
        start_balancer(balancer)
        stop_servers(lab)
        setup.start_sinks()
        say("balancer: started")
        lab.sh(setup.balancer, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        for server in lab.names("server"):  # termination routes beyond the harness's own range
            results = lab.provider(server).apply([ops.Add(ops.MplsRoute(label, "lo"))
                                                  for label in range(LABELS[1], last, 2)])
            if not all(r.ok for r in results):
                raise RuntimeError(f"termination routes on {server}: {next(r for r in results if not r.ok)}")
        started = balancer.cli("status")["counters"].get("sessions_started", 0)
        rate = setup.rate("balancer")
        check_balancer(setup, balancer, started)
        say("balancer: checked; latency")
        latency = setup.latency("balancer")
        say("balancer: latency done; closing")
    except Exception:
        print(balancer.log()[-3000:], file=sys.stderr)
        raise
    finally:
        setup.stop_sinks()
        balancer.close()
    return rate, latency


def start_balancer(balancer: "BalancerLab", attempts: int = 2) -> None:
    """The harness gives the daemon 90 s to come up, which a loaded emulated VM can overrun
    (imports over 9p, nft's module loads): one more try before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            balancer.start()
            return
        except RuntimeError as exc:
            if attempt == attempts or "did not start" not in str(exc):
                raise
            say(f"balancer: the daemon did not start in time (attempt {attempt}), again")
            balancer.close()


def stop_servers(lab: "Lab") -> None:
    """Stop what the harness runs on the servers' IPv4 VIP: UDP echo would answer every flood
    packet from Python, competing for the emulated CPUs with what is measured (the answers have
    nowhere to go anyway; the servers' kernels now drop the flood with a rate-limited ICMP port
    unreachable), and HTTP gives way to the accept sink."""
    from orchestrator.lab.balancer_lab import UDP_ECHO

    for proc in lab.procs:
        args = list(proc.args)  # type: ignore[arg-type]
        if UDP_ECHO in args or ("http.server" in args and lab.vip in args):
            lab.stop(proc)


def check_balancer(setup: Setup, balancer: "BalancerLab", started_before: int) -> None:
    """The daemon counted every flood session, and the kernel holds a filter for each."""
    from orchestrator.dataplane import ops

    started = balancer.cli("status")["counters"].get("sessions_started", 0) - started_before
    sources = {f"{s}/32" for s in flood_sources(FLOOD_NETS["balancer"], setup.sessions)}
    filters = [i.obj for i in setup.lab.provider(setup.balancer).dump() if isinstance(i.obj, ops.FlowerFilter)]
    held = sum(f.match.src in sources for f in filters)
    if started < setup.sessions or held < setup.sessions:
        raise RuntimeError(f"balancer: {started} sessions started, {held} filters in the kernel, "
                           f"{setup.sessions} first packets out on the fabric")


# ---- phase 2: IPVS ------------------------------------------------------------------------------------
class Ipvs:
    """IPVS on the balancer node in tunnel mode (servers behind the fabric in other subnets), with
    the balancer's pool and schedulers; persistent services, the analogue of client-ip sessions."""

    def __init__(self, setup: Setup, config: "BalancerConfig") -> None:
        self.setup, self.config = setup, config
        self.lab = setup.lab

    def start(self) -> None:
        lab, lb, setup = self.lab, self.setup.balancer, self.setup
        for module in ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ipip"):
            subprocess.run(["modprobe", module], check=True)
        fabric_hop = lab.peer_address(lb, setup.fabric)
        # IPVS takes packets to local addresses only; the servers' answers come back through this
        # node from the VIP, now a local address, which fab0 must accept.
        _batch(lab, lb, [f"address add {lab.vip}/32 dev lo"]
               + [f"route replace {s}/32 via {fabric_hop}" for s in lab_servers(lab)])
        lab.sh(lb, "sysctl", "-qw", f"net.ipv4.conf.{setup.fab_dev}.accept_local=1",
               f"net.ipv4.conf.{setup.fab_dev}.rp_filter=0")
        lab.sh(setup.fabric, "ip", "route", "replace", setup.client_subnet, "via", lab.peer_address(setup.fabric, lb))
        for server in lab.names("server"):
            lab.sh(server, "ip", "link", "set", "tunl0", "up")
            lab.sh(server, "sysctl", "-qw", "net.ipv4.conf.tunl0.rp_filter=0", "net.ipv4.conf.all.rp_filter=0")
        setup.start_sinks()
        for svc in self.config.services:
            if str(svc.vip) == lab.vip and svc.protocol.value in ("tcp", "udp"):  # what the benchmark uses
                self.service(svc)

    def service(self, svc: Any) -> None:
        lab, lb = self.lab, self.setup.balancer
        flag = {"tcp": "-t", "udp": "-u"}[svc.protocol.value]
        for port in svc.ports:
            vip = f"{svc.vip}:{port}"
            lab.sh(lb, "ipvsadm", "-A", flag, vip, "-s", IPVS_SCHEDULERS[svc.scheduler.value],
                   "-p", str(IPVS_PERSISTENCE_S))
            for server in self.config.pool(svc.pool).servers:
                lab.sh(lb, "ipvsadm", "-a", flag, vip, "-r", f"{server.address}:{port}", "-i",
                       "-w", str(server.weight))

    def connections(self, sources: set[str]) -> int:
        return ipvs_connections(self.lab.sh(self.setup.balancer, "cat", "/proc/net/ip_vs_conn").stdout, sources)

    def close(self) -> None:
        lab, lb, setup = self.lab, self.setup.balancer, self.setup
        setup.stop_sinks()
        lab.sh(lb, "ipvsadm", "-C", check=False)
        lab.sh(lb, "ip", "address", "del", f"{lab.vip}/32", "dev", "lo", check=False)
        for s in lab_servers(lab):
            lab.sh(lb, "ip", "route", "del", f"{s}/32", check=False)
        lab.sh(lb, "sysctl", "-qw", f"net.ipv4.conf.{setup.fab_dev}.accept_local=0", check=False)
        lab.sh(setup.fabric, "ip", "route", "del", setup.client_subnet, check=False)
        for server in lab.names("server"):
            lab.sh(server, "ip", "link", "set", "tunl0", "down", check=False)


def lab_servers(lab: "Lab") -> list[str]:
    return [lab.address(s) for s in lab.names("server")]


def ipvs_phase(setup: Setup, config: "BalancerConfig") -> tuple[RateRun, Latency]:
    ipvs = Ipvs(setup, config)
    try:
        say("ipvs: starting")
        ipvs.start()
        say("ipvs: started")
        rate = setup.rate("ipvs")
        held = ipvs.connections(set(flood_sources(FLOOD_NETS["ipvs"], setup.sessions)))
        if held < setup.sessions:
            raise RuntimeError(f"ipvs: {held} connections in its table, {setup.sessions} packets forwarded")
        say("ipvs: checked; latency")
        latency = setup.latency("ipvs")
        say("ipvs: latency done; closing")
    finally:
        ipvs.close()
    return rate, latency


# ---- the benchmark -------------------------------------------------------------------------------------
def run(lab: "Lab", sessions: int, samples: int) -> SetupResult:
    from orchestrator.config.load import load_config
    from orchestrator.lab.balancer_lab import ROOT

    setup = Setup(lab, sessions, samples)
    setup.prepare_clients()
    say("clients prepared")
    with backlog(BACKLOG):
        ours, our_latency = balancer_phase(setup)
        config = load_config(ROOT / "templates" / "balancer.example.yaml")
        theirs, their_latency = ipvs_phase(setup, config)
    return build_result(ours, theirs, our_latency, their_latency)


@contextlib.contextmanager
def backlog(packets: int) -> Iterator[None]:
    """Room for a whole burst in the kernel's per-CPU input backlog (global, so restored after):
    the lab's forwarding runs in softirq on pktgen's CPU, and with the default 1,000 packets a
    burst that the kernel cannot forward as fast as pktgen sends it is partly dropped there,
    before IPVS ever sees it. The daemon's queue holds its bursts anyway."""
    knob = Path("/proc/sys/net/core/netdev_max_backlog")
    old = int(knob.read_text())
    knob.write_text(str(max(old, packets)))
    try:
        yield
    finally:
        knob.write_text(str(old))


def _helper_main(argv: list[str]) -> int:
    if argv[0] == "flood":
        dev, mac, vip, octet, count, pid, counter_dev = argv[1:8]
        net_dev = Path(f"/proc/{pid}/net/dev")
        print(json.dumps(flood(dev, mac, vip, int(octet), int(count),
                               lambda: tx_packets(net_dev.read_text(), counter_dev))))
    else:
        vip, port, warmup, sources = argv[1:5]
        print(json.dumps(connects(vip, int(port), sources.split(","), warmup, CONNECT_GAP_S)))
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("flood", "connect"):
        return _helper_main(argv)
    parser = argparse.ArgumentParser(prog="mplsorch lab bench setup")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS or not 1 <= args.samples <= MAX_SAMPLES:
        parser.error(f"--sessions 1..{MAX_SESSIONS}, --samples 1..{MAX_SAMPLES}")
    from orchestrator.lab.kit import Lab

    lab = Lab.from_env()
    try:
        result = run(lab, args.sessions, args.samples)
    finally:
        lab.close()
    print(json.dumps(asdict(result)) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
