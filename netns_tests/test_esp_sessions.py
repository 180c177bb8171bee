"""ESP sessions keyed by SPI in the lab: one session per SPI, several SPIs per client, each SPI's
packets label-switched by its own cls_u32 node, and all of them given back exactly after the
balancer is killed (SIGKILL) and started again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from orchestrator.capture.conntrack import ConntrackListener
from orchestrator.config.examples import DELETE, KeyPath
from orchestrator.core.events import FlowKey
from orchestrator.dataplane import ops
from orchestrator.ipproto import IPPROTO_ESP
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab, patience

ESP_SERVICE: dict[KeyPath, Any] = {
    "services.dns.protocol": "esp",
    "services.dns.ports": DELETE,
    "services.dns.session_key": "esp-spi",
    "services.dns.persistence_timeout": "3600s",
}
SEND = """
import sys
from scapy.all import IP, ESP, Raw, send, conf
conf.verb = 0
vip, spi, count = sys.argv[1], int(sys.argv[2], 16), int(sys.argv[3])
send([IP(dst=vip) / ESP(spi=spi, seq=i + 1) / Raw(b"x" * 32) for i in range(count)], inter=0.05)
"""


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab, changes=ESP_SERVICE)
    try:
        b.start()
        yield b
    finally:
        b.close()


def _send(lab: Lab, client: str, spi: int, count: int = 1) -> None:
    lab.sh(client, sys.executable, "-c", SEND, lab.vip, f"{spi:x}", str(count), timeout=patience(60))


def _esp(balancer: BalancerLab) -> dict[str, dict[str, Any]]:
    return {s["key"]: s for s in balancer.sessions() if s["service"] == "dns"}


def _wait(balancer: BalancerLab, key: str) -> dict[str, Any]:
    deadline = time.monotonic() + patience(40)
    while key not in _esp(balancer):
        assert time.monotonic() < deadline, balancer.log()[-2000:]
        time.sleep(0.5)
    return _esp(balancer)[key]


def _labelled_spis(path: str) -> dict[int, set[tuple[int, ...]]]:
    """SPI -> the label stacks its packets left the balancer with, from a capture file."""
    text = subprocess.run(["tcpdump", "-nn", "-r", path], capture_output=True, text=True, check=True).stdout
    out: dict[int, set[tuple[int, ...]]] = {}
    for line in text.splitlines():
        spi = re.search(r"ESP\(spi=0x([0-9a-f]+)", line)
        if "MPLS" in line and spi:
            out.setdefault(int(spi[1], 16), set()).add(tuple(int(x) for x in re.findall(r"label (\d+)", line)))
    return out


def test_each_spi_of_a_client_is_a_session_and_survives_a_sigkill(lab: Lab, balancer: BalancerLab) -> None:
    # Conntrack tracks ESP by address pair only, so c1's second SPI below is an established
    # flow to it (the pair's entry is live, 600 s by default): the ruleset queues it because its
    # SPI is in no fast-path set, and it gets its own session at once.
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "esp-c2s")
    _send(lab, "c1", 0x1001)
    _send(lab, "c2", 0x2001)
    first = _wait(balancer, "spi:0x00001001")
    _wait(balancer, "spi:0x00002001")
    pair = FlowKey(IPPROTO_ESP, lab.address("c1"), lab.vip, None, None)
    listener = ConntrackListener(lab.netns("lb"))
    try:
        assert pair in listener.dump()  # the first SPI's entry is live: the second is no new flow
        started = time.monotonic()
        _send(lab, "c1", 0x1002)
        second = _wait(balancer, "spi:0x00001002")
        assert time.monotonic() - started < patience(20)
        assert pair in listener.dump()  # still the one entry: no expiry was needed
    finally:
        listener.close()
    assert first["client"] == second["client"] == lab.address("c1")
    assert first["c2s_label"] != second["c2s_label"]
    sessions = _esp(balancer)
    assert {s["key_kind"] for s in sessions.values()} == {"esp-spi"} and len(sessions) == 3
    # Each SPI's next packets stay in the kernel and leave under their own session's labels.
    for client, spi in (("c1", 0x1001), ("c1", 0x1002), ("c2", 0x2001)):
        _send(lab, client, spi, 3)
    capture.stacks()
    seen = _labelled_spis(str(capture.path))
    for key, s in sessions.items():
        spi = int(key[len("spi:") :], 16)
        assert seen.get(spi) == {(lab.node(s["server"])["transport_label"], s["c2s_label"])}, seen
    nodes = [i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.U32Filter)]
    assert sorted(ops.esp_of(n.keys)[2] for n in nodes) == [0x1001, 0x1002, 0x2001]

    # SIGKILL, then a new daemon: the same sessions, from the kernel's u32 nodes and their records.
    before = sorted(balancer.sessions(), key=lambda s: s["id"])
    assert balancer.proc is not None
    os.kill(balancer.proc.pid, signal.SIGKILL)
    balancer.proc.wait(timeout=patience(15))
    (balancer.dir / "daemon.log").rename(balancer.dir / "daemon-killed.log")
    balancer.proc = lab.spawn(
        "lb",
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        "--config",
        str(balancer.config),
        log=balancer.dir / "daemon.log",
    )
    deadline = time.monotonic() + patience(60)
    while "balancer running" not in balancer.log():
        assert balancer.proc.poll() is None and time.monotonic() < deadline, balancer.log()
        time.sleep(0.5)
    keep = (
        "id",
        "client",
        "clients",
        "key",
        "key_kind",
        "service",
        "vip",
        "protocol",
        "port",
        "server",
        "c2s_label",
        "s2c_label",
    )
    after = sorted(balancer.sessions(), key=lambda s: s["id"])
    assert [{k: s[k] for k in keep} for s in after] == [{k: s[k] for k in keep} for s in before]
    assert [i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.U32Filter)] == nodes
