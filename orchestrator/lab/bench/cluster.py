"""Benchmark: several balancers sharing the session table in etcd (issue 16, item 5), in one run
on one lab:

- (a) new sessions per second of one balancer without cluster mode (the reference): N first
  packets (UDP to VIP:53, each from its own spoofed source) sent by pktgen from c1 through lb,
  timed from the first leaving c1 to the N-th leaving lb on its fabric link (as `lab bench
  setup` times them: a first packet leaves only once its session's objects are in the kernel);
- (b) the same N first packets spread over two balancers in cluster mode with one etcd member
  (orchestrator/lab/cluster_lab.py): half from c1 through lb (member lb1), half from c2 through
  lb2, both floods at once; timed from the first packet of either to the last one out of either
  balancer's fabric link, and until every member holds every session (each installs the other's
  from etcd's watch); the ratio b/a;
- (c) etcd's writes per session: its own counters (/metrics: keys put, transactions, Raft
  proposals, WAL fsyncs) before the cluster's flood and after every member holds every session,
  over N; and the daemons' own (`cluster_txns`, `cluster_rows_written`);
- (d) the failover gap: a counted paced UDP stream from c1 through lb (one datagram every 10 ms,
  each echoed by sequence number); lb's daemon SIGKILLed, its links down, the routes moved to lb2
  as the cluster's failover test does (`ClusterLab.fail_lb1`); the gap is the longest run of lost
  datagrams x the interval, and the time from the kill to the first datagram through lb2.

Both phases run the same configuration (the lab's, a label range for N, `dns` sessions
persisting an hour, `cluster.label_block` at its default of 256 pairs) but for `cluster:`.
The run fails unless each daemon counted its share of new sessions and every member holds all
N. Runs as root inside `mplsorch lab run` (`mplsorch lab bench cluster`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from orchestrator.lab.bench.cluster_result import (
    DAEMON_COUNTERS,
    ClusterRun,
    StreamRun,
    build_cluster_result,
    etcd_deltas,
    format_cluster,
)
from orchestrator.lab.bench.result import RateRun

if TYPE_CHECKING:
    from orchestrator.config.examples import KeyPath
    from orchestrator.lab.cluster_lab import ClusterLab
    from orchestrator.lab.kit import Lab

DEFAULT_SESSIONS, MAX_SESSIONS = 10_000, 30_000  # the lab's 100,000 platform labels hold 30,000 and the blocks
# cluster.label_block: 4,096 pairs, not the default 256. A member claims its next block only once
# fewer than a quarter of a block is free, after the batch that used them: a burst of first
# packets larger than that (the flood's bursts are 2,000) is refused (`label-headroom`) until the
# claim is in. With 256-pair blocks a 300-packet burst lost 52 first packets per member.
BLOCK = 4096
LEASE_TTL = 10  # cluster.lease_ttl's default: the lab's 3 s expired under a flood on a loaded host
FLOOD_NET = "10.208.0.0/12"  # every flood's spoofed sources, routed by both balancers to the clients' LAN
OCTETS = {"single": 208, "lb1": 212, "lb2": 216}  # second octet of each flood's first source (4 /16s each)
INTERVAL = 0.01  # the failover stream's pace
START_S = 5  # the two floods start together this long after their helpers are spawned
CONVERGE_S = 300  # at most this long for every member to hold every session after the floods


def changes(sessions: int) -> dict[KeyPath, Any]:
    """Both phases' configuration changes to the lab's: labels for N sessions and every member's
    spare blocks, `dns` sessions that outlive the run, blocks of the default size."""
    from orchestrator.lab.bench.balancer import label_range

    return {
        "labels.range": list(label_range(sessions, 4 * BLOCK)),
        "services.dns.persistence_timeout": "3600s",
        "cluster.label_block": BLOCK,
        "cluster.lease_ttl": LEASE_TTL,
    }


def single_changes(sessions: int) -> dict[KeyPath, Any]:
    return {k: v for k, v in changes(sessions).items() if not str(k).startswith("cluster")}


def ns_sh(netns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, check=True).stdout


def prepare(netns: str, lan_dev: str, sessions: int) -> None:
    """A balancer namespace routes the floods' sources to the clients' LAN (its daemon answers
    only clients it has a route to), does not drop them by reverse path, and keeps their flows
    through the run (the lab's harness sets 3 s); conntrack has room for them all."""
    ns_sh(netns, "ip", "route", "replace", FLOOD_NET, "dev", lan_dev)
    ns_sh(netns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{lan_dev}.rp_filter=0")
    ns_sh(netns, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
    knob = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    knob.write_text(str(max(int(knob.read_text()), 4 * sessions + 65536)))


def start_flood(
    lab: Lab, client: str, netns: str, lan_dev: str, fab_dev: str, pid: int, octet: int, count: int, at: float = 0
) -> subprocess.Popen[str]:
    """The flood helper in `client`: `count` first packets to the balancer in `netns` (its LAN
    device's MAC), counted out of its `fab_dev` through process `pid` (one in that namespace),
    not before the monotonic time `at`."""
    from orchestrator.lab.bench import flood, pktgen
    from orchestrator.lab.bench.testbed import helper

    link = json.loads(ns_sh(netns, "ip", "-j", "link", "show", "dev", lan_dev))[0]
    dev = lab.iface(client, towards="lb")["dev"]
    args = (
        dev,
        link["address"],
        lab.vip,
        str(octet),
        str(count),
        str(pid),
        fab_dev,
        str(pktgen.SOURCE_PORT),
        "0",
        str(at),
    )
    return subprocess.Popen(
        helper(lab, client, flood, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def flood_result(proc: subprocess.Popen[str], what: str, count: int) -> tuple[RateRun, float, float]:
    """The helper's figures: the rate run, and the monotonic times (the clock is the kernel's,
    the same in every process) of its first packet leaving the client and of its last one out of
    the balancer; RuntimeError unless every packet left the balancer."""
    from orchestrator.lab.bench.flood import STALL_S
    from orchestrator.lab.bench.testbed import say

    out, err = proc.communicate(timeout=900 + count)
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: flood helper failed: {err}")
    f = json.loads(out)
    say(f"{what}: {f['seen']} of {count} first packets out in {f['reached'] - f['start']:.3f} s")
    if f["seen"] < count:
        raise RuntimeError(f"{what}: only {f['seen']} of {count} first packets left ({STALL_S:.0f} s stalled)")
    return RateRun(count, f["reached"] - f["start"], f["send_s"]), f["start"], f["reached"]


Ask = Callable[..., dict[str, Any]]  # (command, **arguments) -> a daemon's answer on its control socket


class Member:
    """A balancer daemon asked on its control socket directly (no `mplsorch` process: cheap to
    poll; `status` may take long with many sessions: it dumps the kernel's objects)."""

    def __init__(self, ask: Ask) -> None:
        self.ask = ask

    def held(self) -> int:
        """Sessions in its table (a one-row page, answered from memory)."""
        return int(self.ask("sessions", limit=1)["total"])

    def counters(self) -> dict[str, int]:
        """Its pid, and the counters the run checks and reports."""
        status = self.ask("status", timeout=300)
        names = ("sessions_started", *DAEMON_COUNTERS)
        return {"pid": int(status["pid"]), **{n: int(status["counters"].get(n, 0)) for n in names}}


def refusals(member: Member) -> dict[str, int]:
    """A member's counters that say why first packets were not served (`refused:*`, `store_down`)."""
    counters = member.ask("status", timeout=300)["counters"]
    names = ("store_down", "store_rejoins", "store_deadlines_late", "cluster_watch_failures", "cluster_label_conflict")
    return {k: int(v) for k, v in counters.items() if k.startswith("refused") or k in names}


def loop_lags(member: Member) -> int:
    """The longest its loop ran late, in milliseconds."""
    return int(member.ask("status", timeout=300)["cluster"]["loop_lag_max_ms"])


def table_owners(cluster: ClusterLab) -> dict[str, int]:
    """Session rows in etcd per owner (etcd's JSON gateway, read in its namespace): whether a
    member's sessions missing on the other are missing in etcd too."""
    import base64

    from orchestrator.cluster import codec
    from orchestrator.lab.cluster_lab import ETCD, ETCD_LB1

    prefix = codec.session_key("/mplsorch/", "", "")[: -len("/")]
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    body = json.dumps({"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()})
    out = subprocess.run(
        ["ip", "netns", "exec", ETCD, "curl", "-sf", "-m", "30", "-d", body, f"http://{ETCD_LB1}:2379/v3/kv/range"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    owners: dict[str, int] = {}
    for kv in json.loads(out).get("kvs", []):
        row = codec.decode_session(base64.b64decode(kv["value"]))
        name = row.owner if row is not None else "(damaged)"
        owners[name] = owners.get(name, 0) + 1
    return owners


def store_events(log: str) -> list[str]:
    """A daemon's log lines about etcd: its deadlines, downs and rejoins."""
    words = ("etcd", "deadline", "watch")
    return [line for line in log.splitlines() if any(w in line for w in words)][-40:]


def on_socket(sock: Path) -> Ask:
    from orchestrator.control_socket import request
    from orchestrator.lab.kit import patience

    def ask(cmd: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
        return request(str(sock), cmd, timeout=patience(timeout), **args)

    return ask


def single_phase(lab: Lab, sessions: int) -> RateRun:
    """(a): one balancer, no cluster mode."""
    from orchestrator.lab.balancer_lab import BalancerLab
    from orchestrator.lab.bench.balancer import start_balancer
    from orchestrator.lab.bench.testbed import say

    balancer = BalancerLab(lab, changes=single_changes(sessions))
    lan, fab = lab.iface("lb", segment="lan")["dev"], lab.iface("lb", towards="p")["dev"]
    try:
        say("single: starting the balancer")
        start_balancer(balancer)
        prepare(lab.netns("lb"), lan, sessions)
        member = Member(on_socket(balancer.sock))
        before, held = member.counters(), member.held()
        proc = start_flood(lab, "c1", lab.netns("lb"), lan, fab, before["pid"], OCTETS["single"], sessions)
        rate, _, _ = flood_result(proc, "single", sessions)
        started = member.counters()["sessions_started"] - before["sessions_started"]
        more = member.held() - held
        if started != sessions or more != sessions:
            raise RuntimeError(f"single: {started} sessions started and {more} more held, {sessions} first packets")
    except Exception:
        print(balancer.log()[-3000:], file=sys.stderr)
        raise
    finally:
        balancer.close()
    return rate


def cluster_phase(lab: Lab, cluster: ClusterLab, sessions: int, single: RateRun) -> ClusterRun:
    """(b), (c) and (d) on two members and one etcd."""
    from orchestrator.lab.bench.testbed import say
    from orchestrator.lab.cluster_lab import LINK_EVENT
    from orchestrator.lab.kit import patience
    from orchestrator.lab.traffic import last_json, spawn_stream, wait, wait_running

    lb1 = cluster.lb1
    ns2, lan2, fab2 = cluster.flood_port()
    ports = {
        "lb1": ("c1", lab.netns("lb"), lab.iface("lb", segment="lan")["dev"], lab.iface("lb", towards="p")["dev"]),
        "lb2": ("c2", ns2, lan2, fab2),
    }
    for _, ns, lan, _ in ports.values():
        prepare(ns, lan, sessions)
    say("cluster: both members running")
    members = {"lb1": Member(on_socket(lb1.sock)), "lb2": Member(cluster.request2)}
    # c1's session first (through lb, from lb1's first block, whose labels the plain servers
    # terminate): the failover stream's, on both members before anything is measured.
    cluster.via("c1", "lb")
    if not lb1.udp("c1").startswith("echo "):
        raise RuntimeError("c1: no answer through lb")
    wait("c1's session on lb2", lambda: members["lb2"].held() >= 1, 30)
    say("cluster: c1's session on both members")
    before = {m: member.counters() for m, member in members.items()}
    base = {m: member.held() for m, member in members.items()}
    metrics_before = cluster.etcd_metrics()

    shares = {"lb1": sessions - sessions // 2, "lb2": sessions // 2}
    say(f"cluster: {shares['lb1']} first packets through lb and {shares['lb2']} through lb2, at once")
    at = time.monotonic() + patience(START_S)  # both helpers (Python processes) up by then
    procs = {
        m: start_flood(lab, client, ns, lan, fab, before[m]["pid"], OCTETS[m], shares[m], at)
        for m, (client, ns, lan, fab) in ports.items()
    }
    try:
        floods = {m: flood_result(proc, f"cluster {m}", shares[m]) for m, proc in procs.items()}
    except RuntimeError as exc:  # what the members refused, and whether etcd went away meanwhile
        raise RuntimeError(
            f"{exc}; the members' refusals: {[refusals(member) for member in members.values()]}"
        ) from None
    start = min(f[1] for f in floods.values())
    elapsed = max(f[2] for f in floods.values()) - start
    say(f"cluster: the floods' first packets {abs(floods['lb1'][1] - floods['lb2'][1]) * 1000:.0f} ms apart")
    deadline = time.monotonic() + patience(CONVERGE_S)
    while True:
        held = {m: member.held() - base[m] for m, member in members.items()}
        if all(h >= sessions for h in held.values()):
            break
        if time.monotonic() > deadline:
            why = {m: refusals(member) for m, member in members.items()}
            raise RuntimeError(
                f"cluster: the members hold {held} of the flood's {sessions} sessions; {why};"
                f" session rows in etcd by owner: {table_owners(cluster)}"
            )
        time.sleep(0.2)
    converged = time.monotonic() - start
    say(f"cluster: {sessions} sessions out after {elapsed:.3f} s, on both members after {converged:.3f} s")
    for m, member in members.items():
        say(f"cluster {m}: loop late by up to {loop_lags(member)} ms; {refusals(member)}")
    metrics_after = cluster.etcd_metrics()
    after = {m: member.counters() for m, member in members.items()}
    for m in members:
        started = after[m]["sessions_started"] - before[m]["sessions_started"]
        if started != shares[m] or held[m] != sessions:
            raise RuntimeError(
                f"cluster: {m} started {started} sessions of its {shares[m]}, holds {held[m]} of {sessions}"
            )
    daemon = {name: sum(after[m][name] - before[m][name] for m in members) for name in DAEMON_COUNTERS}

    say("cluster: lb fails under c1's counted stream")
    log, stop = cluster.dir / "bench-stream.log", cluster.dir / "bench-stream-stop"
    stop.unlink(missing_ok=True)
    stream = spawn_stream(lab, "c1", log, stop, patience(120), INTERVAL)
    wait_running([log], "running")
    time.sleep(1)
    killed, down = cluster.fail_lb1()
    moved = down + LINK_EVENT  # the router and p skip lb's next hops by then (ClusterLab.fail_lb1)
    time.sleep(2)  # the stream goes on through lb2
    stop.touch()
    stream.wait(timeout=patience(30))
    r = last_json(log)
    say(
        f"cluster: stream {r['sent']} sent, {r['lost']} lost; lb's links down {1000 * (down - killed):.0f} ms after the kill"
    )
    return ClusterRun(
        single=single,
        members={m: f[0] for m, f in floods.items()},
        cluster_elapsed_s=elapsed,
        converged_s=converged,
        etcd=etcd_deltas(metrics_before, metrics_after),
        daemon=daemon,
        stream=StreamRun(INTERVAL, r["start"], r["sent"], r["missing"], killed, moved),
    )


def run(lab: Lab, sessions: int) -> ClusterRun:
    from orchestrator.lab.bench.setup import BACKLOG, backlog
    from orchestrator.lab.bench.testbed import say
    from orchestrator.lab.cluster_lab import ClusterLab

    subprocess.run(["modprobe", "pktgen"], check=True)
    with backlog(BACKLOG):
        single = single_phase(lab, sessions)
        cluster = ClusterLab(lab)
        try:
            cluster.configure(changes(sessions))
            say("cluster: starting etcd and two balancers")
            cluster.start()
            return cluster_phase(lab, cluster, sessions, single)
        except Exception:
            print(cluster.lb1.log()[-2000:] + "\n--- lb2 ---\n" + cluster.log2()[-2000:], file=sys.stderr)
            raise
        finally:
            for name, log in (("lb1", cluster.lb1.log()), ("lb2", cluster.log2())):
                for line in store_events(log):
                    print(f"{name}: {line}", file=sys.stderr)
            cluster.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mplsorch lab bench cluster")
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 2 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions 2..{MAX_SESSIONS}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from orchestrator.lab.kit import Lab

    lab = Lab.from_env()
    try:
        result = build_cluster_result(run(lab, args.sessions))
    finally:
        lab.close()
    print(json.dumps(asdict(result)) if args.json else format_cluster(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
