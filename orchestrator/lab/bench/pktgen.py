"""The kernel's packet generator (pktgen) as the flood drives it: one device on the first pktgen
thread, minimal UDP first packets to the VIP, one burst of consecutive sources at a time. A
Python sender would be IPVS's bottleneck; pktgen is not. Commands are planned by pure functions
(tested) and written to /proc/net/pktgen by the rest."""

from __future__ import annotations

import threading
from pathlib import Path

from orchestrator.lab.bench.stats import pktgen_result

UDP_PORT = 53  # the VIP's DNS service: each first packet to it opens a session
SOURCE_PORT = 5353  # a flood's source port; another one makes new flows of the same clients
PROC = Path("/proc/net/pktgen")
THREAD = "kpktgend_0"

Command = tuple[str, str]  # (file under /proc/net/pktgen, what is written to it)


def setup_commands(dev: str, dst_mac: str, vip: str, sport: int = SOURCE_PORT) -> list[Command]:
    """One device on the first pktgen thread, minimal UDP packets from port `sport` to the VIP's
    port 53, at full speed, each skb built afresh (veth cannot share them)."""
    return [
        (THREAD, "rem_device_all"),
        (THREAD, f"add_device {dev}"),
        (dev, "clone_skb 0"),
        (dev, "pkt_size 60"),
        (dev, "delay 0"),
        (dev, f"dst {vip}"),
        (dev, f"dst_mac {dst_mac}"),
        (dev, f"udp_src_min {sport}"),
        (dev, f"udp_src_max {sport}"),
        (dev, f"udp_dst_min {UDP_PORT}"),
        (dev, f"udp_dst_max {UDP_PORT}"),
    ]


def burst_commands(dev: str, sources: list[str]) -> list[Command]:
    """The commands for one burst: one packet from each of `sources` (consecutive), in order."""
    return [(dev, f"count {len(sources)}"), (dev, f"src_min {sources[0]}"), (dev, f"src_max {sources[-1]}")]


def write(commands: list[Command]) -> None:
    """Each command on its own write: pktgen parses one per write() and fails it there."""
    for name, command in commands:
        with open(PROC / name, "w") as f:
            f.write(command + "\n")


def configure(dev: str, dst_mac: str, vip: str, sport: int = SOURCE_PORT) -> None:
    write(setup_commands(dev, dst_mac, vip, sport))


def start(dev: str, sources: list[str]) -> threading.Thread:
    """Start a burst and return the thread that is sending it: the write to pgctrl returns only
    once pktgen is done, and its thread picks the start up within 100 ms, so the caller watches
    the first packet leave meanwhile."""
    write(burst_commands(dev, sources))
    runner = threading.Thread(target=write, args=([("pgctrl", "start")],))
    runner.start()
    return runner


def result(dev: str) -> tuple[int, int]:
    """(microseconds, packets sent) of the last burst on `dev`."""
    return pktgen_result((PROC / dev).read_text())


def release() -> None:
    """Hand the device back: no pktgen state outlives the flood."""
    write([(THREAD, "rem_device_all")])
