"""ESP sessions keyed by SPI in the lab, over IPv4 (dns made ESP, 10.0.0.100) and IPv6 (mobile
made ESP, fd00:100::100): one session per SPI, several SPIs per client (the second while the
first's conntrack entry lives), each SPI's packets label-switched by its own cls_u32 node, IPv6
ESP behind an extension header dropped and counted by the ruleset, and all sessions given back
exactly after the balancer is killed (SIGKILL) and started again."""

from __future__ import annotations

import re
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
    "services.mobile.protocol": "esp",
    "services.mobile.ports": DELETE,
    "services.mobile.session_key": "esp-spi",
    "services.mobile.persistence_timeout": "3600s",
    "services.mobile.admission.refuse_with": "icmp",
}
SEND = """
import sys
from scapy.all import IP, ESP, Raw, send, conf
conf.verb = 0
vip, spi, count = sys.argv[1], int(sys.argv[2], 16), int(sys.argv[3])
send([IP(dst=vip) / ESP(spi=spi, seq=i + 1) / Raw(b"x" * 32) for i in range(count)], inter=0.05)
"""
# IPv6 ESP, sent to the balancer's MAC as netns_tests/test_fast_path.py does; with "ext", behind
# a destination options header (which the C2S u32 node could not read past).
SEND6 = """
import sys
from scapy.all import ESP, Ether, IPv6, IPv6ExtHdrDestOpt, Raw, conf, sendp
conf.verb = 0
src, vip, spi, count, ext, mac, dev = sys.argv[1:8]
ip = IPv6(src=src, dst=vip) / IPv6ExtHdrDestOpt() if ext == "ext" else IPv6(src=src, dst=vip)
pkts = [Ether(dst=mac) / ip / ESP(spi=int(spi, 16), seq=i + 1) / Raw(b"x" * 32) for i in range(int(count))]
sendp(pkts, iface=dev, inter=0.05)
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


def _send6(lab: Lab, client: str, spi: int, count: int = 1, ext: bool = False) -> None:
    mac = lab.sh("lb", "cat", f"/sys/class/net/{lab.iface('lb', towards=client)['dev']}/address").stdout.strip()
    dev = lab.iface(client, towards="lb")["dev"]
    src = lab.address(client, version=6)
    args = (src, lab.vip6, f"{spi:x}", str(count), "ext" if ext else "-", mac, dev)
    lab.sh(client, sys.executable, "-c", SEND6, *args, timeout=patience(60))


def _esp(balancer: BalancerLab, service: str = "dns") -> dict[str, dict[str, Any]]:
    return {s["key"]: s for s in balancer.sessions() if s["service"] == service}


def _wait(balancer: BalancerLab, key: str, service: str = "dns") -> dict[str, Any]:
    deadline = time.monotonic() + patience(40)
    while key not in _esp(balancer, service):
        assert time.monotonic() < deadline, balancer.log()[-2000:]
        time.sleep(0.5)
    return _esp(balancer, service)[key]


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

    # IPv6: the same, in the same u32 classifier; c1's second SPI at once, its pair's entry live.
    capture6 = lab.capture("p", lab.iface("p", towards="lb")["dev"], "esp6-c2s")
    _send6(lab, "c1", 0x6001)
    first6 = _wait(balancer, "spi:0x00006001", "mobile")
    pair6 = FlowKey(IPPROTO_ESP, lab.address("c1", version=6), lab.vip6, None, None)
    listener = ConntrackListener(lab.netns("lb"))
    try:
        assert pair6 in listener.dump()
    finally:
        listener.close()
    _send6(lab, "c1", 0x6002)
    second6 = _wait(balancer, "spi:0x00006002", "mobile")
    assert first6["client"] == second6["client"] == lab.address("c1", version=6)
    assert first6["c2s_label"] != second6["c2s_label"]
    for spi in (0x6001, 0x6002):
        _send6(lab, "c1", spi, 3)
    # ESP behind an extension header: dropped and counted in the kernel, never labelled nor queued.
    exthdr = balancer.cli("status")["nft_counters"]["esp_exthdr_mobile"]
    _send6(lab, "c1", 0x6003, 2, ext=True)
    assert balancer.cli("status")["nft_counters"]["esp_exthdr_mobile"] - exthdr == 2
    capture6.stacks()
    seen6 = _labelled_spis(str(capture6.path))
    v6 = _esp(balancer, "mobile")
    assert sorted(v6) == ["spi:0x00006001", "spi:0x00006002"]
    for key, s in v6.items():
        spi = int(key[len("spi:") :], 16)
        assert seen6.get(spi) == {(lab.node(s["server"])["transport_label"], s["c2s_label"])}, seen6
    assert 0x6003 not in seen6
    nodes = [i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.U32Filter)]
    assert sorted(ops.esp_of(n.keys)[2] for n in nodes) == [0x1001, 0x1002, 0x2001, 0x6001, 0x6002]
    assert {(n.pref, n.protocol, n.handle >> 20) for n in nodes} == {(12, "all", 0x800)}

    # SIGKILL, then a new daemon: the same sessions, from the kernel's u32 nodes and their records.
    before = balancer.restorable_sessions()
    balancer.kill_and_restart()
    assert balancer.restorable_sessions() == before
    assert [i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.U32Filter)] == nodes
