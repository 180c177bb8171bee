"""The arithmetic and parsing of `lab bench setup`, pure so that it is tested without a lab:
percentiles and ratios of the result, the flood's address and burst plan, and the kernel's texts
(pktgen's result, /proc/net/softnet_stat, /proc/net/ip_vs_conn, /proc/net/dev) it reads."""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from typing import Sequence

FLOOD_SPAN = 2**20 - 2  # sources one flood plan may use: the label space's worth


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


def flood_sources(second_octet: int, count: int, offset: int = 0) -> list[str]:
    """`count` consecutive spoofed sources from 10.<second_octet>.0.1 + `offset` (as pktgen walks
    them; past 10.<second_octet>.255.255 they go on into the next /16s, up to 2^20 in all)."""
    if not 0 < count or offset < 0 or offset + count > FLOOD_SPAN:
        raise ValueError(f"count {count} at offset {offset} out of range")
    first = int(ipaddress.IPv4Address(f"10.{second_octet}.0.1")) + offset
    return [str(ipaddress.IPv4Address(first + i)) for i in range(count)]


def alias_addresses(network: str, count: int) -> list[str]:
    """The first `count` host addresses of `network`."""
    hosts = [str(a) for a in itertools.islice(ipaddress.ip_network(network).hosts(), count)]
    if len(hosts) < count:
        raise ValueError(f"{network} has fewer than {count} host addresses")
    return hosts


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


def cpu_times(proc_stat: str) -> tuple[int, int]:
    """(idle, total) ticks of all CPUs from /proc/stat's first line (idle counts iowait too)."""
    fields = [int(x) for x in proc_stat.splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # user nice system idle iowait irq softirq steal


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time spent idle between two `cpu_times` readings (1.0 when no tick passed)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 1.0


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


def cpu_seconds(proc_stat: str, ticks_per_s: int) -> float:
    """User and system CPU seconds of a process, from its /proc/PID/stat text (fields 14 and 15,
    counted after the command name, which may hold spaces and parentheses)."""
    fields = proc_stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def round_order(rounds: int) -> list[tuple[str, int]]:
    """The order of `lab bench setup`'s rate floods: (d) `existing` and (c) `ipvs` round by
    round, in the same minutes, the system that floods first alternating from round to round
    (d c, c d, d c, ...), so that neither gets every first flood after (b) nor every moment of
    a drift in the host's load."""
    order: list[tuple[str, int]] = []
    for r in range(rounds):
        pair = [("existing", r), ("ipvs", r)]
        order += pair if r % 2 == 0 else pair[::-1]
    return order
