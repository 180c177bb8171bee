"""Benchmark: the balancer daemon holding N concurrent sessions (issue 15: 500,000; the 2^20 label
space holds 524,287 pairs). One run on the default lab:

1. the daemon starts with a label range for N + R x P sessions (P: a probe), long persistence, the
   servers' Python echo stopped; its RSS (/proc/PID/status) and the guest's MemAvailable are read;
2. sessions are opened the way clients open them, by first packets: pktgen floods UDP to VIP:53
   from consecutive spoofed sources (10.64.0.1 onwards, up to 2^20 of them; one packet each, so
   the per-source rate limit never bites), each released by the daemon only once its objects
   are in the kernel and counted out on the balancer node's fabric link;
3. the table is filled to the reference size (10,000), R probes of P new sessions each are
   timed one after the other (the programming rate with the reference installed: their median),
   the table is filled to N, RSS and MemAvailable are read again, `status` and the first and
   last `sessions` pages are timed five times each (on the control socket, and through the
   `mplsorch` command, beside `python -c pass`: their medians, and every run), and R more
   probes are timed (the rate at N: their median); the daemon's counters must show every
   session. One probe lasts a second or two, so a single slow spell of the guest moved a
   one-probe ratio by a third (docs/lab.md, "The probes of `bench scale`").

`mplsorch lab bench scale` runs this module inside `mplsorch lab run`."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from orchestrator.lab.bench.scale_result import TARGET_SESSIONS, ScaleRun, build_scale_result, format_scale

if TYPE_CHECKING:
    from orchestrator.config.examples import KeyPath
    from orchestrator.lab.balancer_lab import BalancerLab
    from orchestrator.lab.bench.testbed import Testbed
    from orchestrator.lab.kit import Lab

SCALE_OCTET = 64  # sources 10.64.0.1 onwards (10.64.0.0/12 holds the label space's worth)
SCALE_NET = "10.64.0.0/12"
LABEL_MAX = 2**20 - 1
HEADROOM = 256  # label pairs beyond the sessions (admission keeps min_free_labels free)
PAGE = 1000  # rows of a timed `sessions` page
RUNS = 5  # times each answer is timed (the result shows their median, and each)
PROBES = 3  # timed probes at each size (the result shows their median rate, and each)


SERVERS = ("s1", "s2", "s3")  # the example's pool web, which serves dns


class Answers(NamedTuple):
    """`answers`' runs, in the order timed."""

    socket_s: dict[str, list[float]]
    cli_s: dict[str, list[float | None]]
    start_s: list[float]


def max_sessions(probe: int, probes: int = PROBES) -> int:
    """The largest N whose sessions and the probes at N fit the label space from the lab's first
    label (the probes at the reference size are among the N)."""
    from orchestrator.lab.balancer_lab import LABELS

    return (LABEL_MAX - LABELS[0] - 1) // 2 - HEADROOM - probes * probe


def changes(total: int) -> dict[KeyPath, Any]:
    """The daemon's configuration for `total` sessions: labels, admission, persistence."""
    from orchestrator.config.examples import DELETE
    from orchestrator.lab.balancer_lab import LABELS

    return {
        "labels.range": [LABELS[0], min(LABEL_MAX, LABELS[0] + 2 * (total + HEADROOM) + 1)],
        "services.dns.persistence_timeout": "3600s",
        "services.dns.admission.max_sessions": total + 16,
        # The example's servers take 50,000 sessions each: 150,000 in all would refuse the rest.
        **{f"pools.web.servers.{server}.max_sessions": DELETE for server in SERVERS},
    }


def vm_rss_kb(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if not match:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return int(match[1])


def threads(pid: int) -> list[str]:
    """Each thread of a process: its name, state and kernel wait channel (what a stalled run shows)."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            stat = (task / "stat").read_text()
            name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
            out.append(f"{task.name} {name} {state} {(task / 'wchan').read_text()}")
        except OSError:
            continue
    return out


def meminfo_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    if not match:
        raise RuntimeError(f"no {field} in /proc/meminfo")
    return int(match[1])


def prepare(bed: Testbed, total: int) -> None:
    """The flood's sources routed (and not reverse-path filtered) by the balancer node; room in
    conntrack for every flow; pktgen loaded."""
    lab, lb = bed.lab, bed.balancer
    subprocess.run(["modprobe", "pktgen"], check=True)
    lab.sh(lb, "ip", "route", "replace", SCALE_NET, "dev", bed.lan_dev)
    lab.sh(lb, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{bed.lan_dev}.rp_filter=0")
    Path("/proc/sys/net/netfilter/nf_conntrack_max").write_text(str(total + 65536))
    lab.sh(lab.names("client")[0], "ping", "-c", "1", "-W", "5", lab.address(lb, towards=bed.client))


def python_start_s() -> float:
    """The wall time of one `python -c pass` here: the floor under every `mplsorch` command (in
    the UML guest a large part of it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def command_s(balancer: BalancerLab, words: list[str]) -> float | None:
    """The wall time of `mplsorch WORDS --json` (as `BalancerLab.cli` runs it), its output then
    read as JSON outside the time (None: the command failed, e.g. on its own 10 s timeout)."""
    from orchestrator.lab.bench.testbed import say
    from orchestrator.lab.kit import daemon_cli_argv, patience

    start = time.perf_counter()
    try:
        out = subprocess.run(
            daemon_cli_argv(balancer.sock, *words), capture_output=True, text=True, timeout=patience(20)
        )
    except subprocess.TimeoutExpired as exc:
        say(f"scale: `mplsorch {' '.join(words)}` did not end in {exc.timeout:.0f} s")
        return None
    took = time.perf_counter() - start
    if out.returncode != 0:
        say(f"scale: `mplsorch {' '.join(words)}` failed after {took:.1f} s: {out.stderr}"[:400])
        return None
    json.loads(out.stdout)  # what it printed is the JSON
    return took


def answers(balancer: BalancerLab, held: int, runs: int = RUNS) -> Answers:
    """`status` and the first and last `sessions` page, each `runs` times, in rounds (each round
    asks each once, then starts Python once, so that a slow spell of the guest weighs on every
    figure alike): the control socket's round trip (what the daemon takes), the `mplsorch`
    command's wall time (its Python start included; None when it failed, e.g. on its own 10 s
    timeout) and `python -c pass`'s."""
    from orchestrator.control_socket import request

    sock = str(balancer.sock)
    last = max(0, held - PAGE)
    checks: dict[str, tuple[str, dict[str, Any]]] = {
        "status": ("status", {}),
        "sessions_first_page": ("sessions", {"limit": PAGE}),
        "sessions_last_page": ("sessions", {"offset": last, "limit": PAGE}),
    }
    cli = {
        "status": ["status"],
        "sessions_first_page": ["sessions", "--limit", str(PAGE)],
        "sessions_last_page": ["sessions", "--offset", str(last), "--limit", str(PAGE)],
    }
    socket_s: dict[str, list[float]] = {name: [] for name in checks}
    cli_s: dict[str, list[float | None]] = {name: [] for name in cli}
    start_s: list[float] = []
    for _ in range(runs):
        for name, (cmd, page_args) in checks.items():
            start = time.perf_counter()
            request(sock, cmd, timeout=900, **page_args)
            socket_s[name].append(time.perf_counter() - start)
        for name, words in cli.items():
            cli_s[name].append(command_s(balancer, words))
        start_s.append(python_start_s())
    page = request(sock, "sessions", timeout=120, offset=last, limit=PAGE)
    if page["total"] != held or len(page["sessions"]) != min(PAGE, held):
        raise RuntimeError(f"scale: the last page holds {len(page['sessions'])} of {page['total']} sessions")
    return Answers(socket_s, cli_s, start_s)


def probes(bed: Testbed, at: int, probe: int, count: int) -> list[float]:
    """`count` probes of `probe` new sessions from `at` installed on, one after the other: their rates."""
    rates = []
    for k in range(count):
        installed = at + k * probe
        rates.append(
            bed.flood(f"scale probe {k + 1}/{count} at {installed}", SCALE_OCTET, probe, offset=installed).per_s
        )
    return rates


def run(lab: Lab, sessions: int, reference: int, probe: int, per_size: int = PROBES) -> ScaleRun:
    """`per_size`: the probes timed at each size."""
    from orchestrator.control_socket import request
    from orchestrator.lab.balancer_lab import BalancerLab
    from orchestrator.lab.bench.balancer import start_balancer, stop_servers
    from orchestrator.lab.bench.setup import BACKLOG, backlog
    from orchestrator.lab.bench.testbed import Testbed, say

    total = sessions + per_size * probe
    bed = Testbed(lab, probe, 1)
    prepare(bed, total)
    balancer = BalancerLab(lab, bed.balancer, changes=changes(total))
    try:
        say(f"scale: starting the daemon for {total} sessions")
        start_balancer(balancer)
        stop_servers(lab)
        lab.sh(bed.balancer, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=3600")
        status = balancer.cli("status")
        pid, started0 = status["pid"], status["counters"].get("sessions_started", 0)
        rss0, avail0 = vm_rss_kb(pid), meminfo_kb("MemAvailable")
        say(f"scale: daemon {pid} RSS {rss0} kB, guest MemAvailable {avail0} kB")
        with backlog(BACKLOG):
            bed.flood(f"scale fill to {reference}", SCALE_OCTET, reference)
            at_reference = probes(bed, reference, probe, per_size)
            done = reference + per_size * probe
            chunk = 65_000  # one flood helper per chunk: its progress on stderr
            while done < sessions:
                count = min(chunk, sessions - done)
                bed.flood(f"scale fill to {done + count}", SCALE_OCTET, count, offset=done)
                done += count
            time.sleep(2)  # the last flows' conntrack events
            rss1, avail1 = vm_rss_kb(pid), meminfo_kb("MemAvailable")
            say(f"scale: {done} sessions; daemon RSS {rss1} kB, guest MemAvailable {avail1} kB")
            timed = answers(balancer, done)
            say(f"scale: answers {timed.socket_s}, through the command {timed.cli_s}, python -c pass {timed.start_s}")
            at_sessions = probes(bed, done, probe, per_size)
        final = request(str(balancer.sock), "status", timeout=900)  # slow at N: see answers()
        started = final["counters"].get("sessions_started", 0) - started0
        held = final["sessions"]
        sent = done + per_size * probe
        if started != sent or held != sent:
            raise RuntimeError(f"scale: {started} sessions started, {held} held, {sent} first packets")
    except Exception:
        print(balancer.log()[-3000:], file=sys.stderr)
        print("\n".join([x for x in balancer.log().splitlines() if " start: " not in x][-40:]), file=sys.stderr)
        if "pid" in locals():
            print(
                f"scale: daemon threads: {threads(pid)}; control socket there: {balancer.sock.exists()}",
                file=sys.stderr,
            )
        if balancer.proc is not None and balancer.proc.poll() is not None:
            print(f"scale: the daemon exited: {balancer.proc.returncode}", file=sys.stderr)
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
        print("scale: the kernel's last words:\n" + "\n".join(dmesg.splitlines()[-25:]), file=sys.stderr)
        try:  # where the daemon stands: its counters and queue (status answers at once at any size)
            stand = request(str(balancer.sock), "status", timeout=30)
            print(
                json.dumps({k: stand.get(k) for k in ("sessions", "counters", "queue", "offload_age_s")}),
                file=sys.stderr,
            )
        except Exception as exc:  # the daemon may be what failed
            alive = Path(f"/proc/{pid}").exists() if "pid" in locals() else None
            print(
                f"scale: no status: {exc}; daemon alive: {alive}; {meminfo_kb('MemAvailable')} kB available",
                file=sys.stderr,
            )
        raise
    finally:
        balancer.close()
    return ScaleRun(
        sessions=done,
        reference=reference,
        probe=probe,
        rates_at_reference=at_reference,
        rates_at_sessions=at_sessions,
        rss_before_kb=rss0,
        rss_after_kb=rss1,
        guest_available_before_kb=avail0,
        guest_available_after_kb=avail1,
        guest_total_kb=meminfo_kb("MemTotal"),
        answer_s=timed.socket_s,
        cli_s=timed.cli_s,
        python_start_s=timed.start_s,
        page=PAGE,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mplsorch lab bench scale")
    parser.add_argument("--sessions", type=int, default=TARGET_SESSIONS)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--probe", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=PROBES, help="timed probes at each size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.probes <= 9:
        parser.error("need 1 <= --probes <= 9")
    if not 1 <= args.probe <= 20_000 or not 1 <= args.reference < args.sessions - args.probes * args.probe:
        parser.error("need 1 <= --probe <= 20000 and 1 <= --reference < --sessions - --probes x --probe")
    if args.sessions > max_sessions(args.probe, args.probes):
        parser.error(
            f"--sessions at most {max_sessions(args.probe, args.probes)} (the label space, the probes at N, headroom)"
        )
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from orchestrator.lab.kit import Lab

    lab = Lab.from_env()
    try:
        result = build_scale_result(run(lab, args.sessions, args.reference, args.probe, args.probes))
    finally:
        lab.close()
    print(json.dumps(asdict(result)) if args.json else format_scale(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
