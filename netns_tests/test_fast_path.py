"""The kernel fast path, for every key kind the kernel can match: N new flows from one client put
exactly one packet in userspace (the daemon's counter and the ruleset's queue counter say so, the
fast-path rule's counter took the others) and every one of them reaches the same server under
the session's labels. One balancer serves the module, with five services: http (client-ip, IPv4),
mobile (mip6-home-address, IPv6), iid (ipv6-iid, IPv6 port 8080), dns made ESP (esp-spi) and ft
(five-tuple, IPv6 port 8081: no fast path, every flow is its own session and its one userspace
packet). Last, the balancer is killed and started again: every key kind's sessions come back as
they were, and their next flows stay in the kernel."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.config.examples import DELETE, KeyPath
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Capture, Lab, patience

N = 4
CHANGES: dict[KeyPath, Any] = {
    "services.dns.protocol": "esp",
    "services.dns.ports": DELETE,
    "services.dns.session_key": "esp-spi",
    "services.dns.persistence_timeout": "3600s",
    "services.iid": {
        "vip": "fd00:100::100",
        "protocol": "tcp",
        "ports": [8080],
        "pool": "web",
        "session_key": "ipv6-iid",
        "persistence_timeout": "3600s",
        "scheduler": "rr",
    },
    "services.ft": {
        "vip": "fd00:100::100",
        "protocol": "tcp",
        "ports": [8081],
        "pool": "web",
        "session_key": "five-tuple",
        "persistence_timeout": "3600s",
        "scheduler": "rr",
    },
}
# Raw first packets from a client: TCP SYNs (with a Home Address option when given one) or ESP,
# sent to the balancer's MAC (a care-of address the client does not hold has no neighbour entry).
SEND = """
import sys
from scapy.all import ESP, HAO, IP, TCP, Ether, IPv6, IPv6ExtHdrDestOpt, conf, sendp
conf.verb = 0
kind, src, dst, first, count, hoa, mac, dev = sys.argv[1:9]
for i in range(int(first), int(first) + int(count)):
    if kind == "esp":
        pkt = IP(src=src, dst=dst) / ESP(spi=0x1234, seq=i, data=b"\\0" * 16)
    else:
        ip = IPv6(src=src, dst=dst)
        if hoa != "-":
            ip = ip / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])
        pkt = ip / TCP(sport=41000 + i, dport=int(kind), flags="S")
    sendp(Ether(dst=mac) / pkt, iface=dev)
"""


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab, changes=CHANGES)
    try:
        b.start()
        yield b
    finally:
        b.close()


def _counters(balancer: BalancerLab, service: str) -> tuple[int, int, int]:
    """(packets the daemon saw, the ruleset's queue counter, its fast-path counter) of a service."""
    status = balancer.cli("status")
    nft = status["nft_counters"]
    return status["counters"].get("packets_userspace", 0), nft[f"queued_{service}"], nft[f"fastpath_{service}"]


def _session(balancer: BalancerLab, service: str, key: str) -> dict[str, Any]:
    deadline = time.monotonic() + patience(40)
    while True:
        found = [s for s in balancer.sessions() if s["service"] == service and s["key"] == key]
        if found:
            return found[0]
        assert time.monotonic() < deadline, balancer.log()[-2000:]
        time.sleep(0.5)


def _send(lab: Lab, client: str, kind: str, src: str, dst: str, first: int, count: int, hoa: str = "-") -> None:
    lan = lab.iface("lb", towards=client)["dev"]
    mac = lab.sh("lb", "cat", f"/sys/class/net/{lan}/address").stdout.strip()
    lab.sh(
        client,
        sys.executable,
        "-c",
        SEND,
        kind,
        src,
        dst,
        str(first),
        str(count),
        hoa,
        mac,
        lab.iface(client, towards="lb")["dev"],
        timeout=patience(60),
    )


def _one_userspace_packet(balancer: BalancerLab, service: str, before: tuple[int, int, int], flows: int) -> None:
    after = _counters(balancer, service)
    assert after[0] - before[0] == 1 and after[1] - before[1] == 1, (before, after)
    assert after[2] - before[2] == flows - 1, (before, after)


def _all_under(capture: Capture, lab: Lab, session: dict[str, Any], packets: int) -> None:
    stacks = capture.stacks()
    transport = lab.node(session["server"])["transport_label"]
    assert len(stacks) >= packets and set(stacks) == {(transport, session["c2s_label"])}, stacks


def test_client_ip_n_connections_one_userspace_packet_one_server(lab: Lab, balancer: BalancerLab) -> None:
    before = _counters(balancer, "http")
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "fast-http")
    assert [balancer.curl("c1") for _ in range(N)] == ["200"] * N
    session = _session(balancer, "http", lab.address("c1"))
    _all_under(capture, lab, session, 5 * N)
    _one_userspace_packet(balancer, "http", before, N)
    assert session["packets_userspace"] == 1 and session["flows_total"] == N
    for server in lab.names("server"):  # every connection reached the session's server, none another
        log = Path(lab.node(server)["runtime_dir"]) / "http-80.log"
        lines = [
            line
            for line in (log.read_text() if log.exists() else "").splitlines()
            if line.startswith(lab.address("c1") + " ")
        ]
        assert len(lines) == (N if server == session["server"] else 0), (server, lines)


def test_ipv6_iid_n_connections_one_userspace_packet_one_server(lab: Lab, balancer: BalancerLab) -> None:
    before = _counters(balancer, "iid")
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "fast-iid")
    src = lab.address("c1", version=6)
    _send(lab, "c1", "8080", src, lab.vip6, 0, 1)
    session = _session(balancer, "iid", "iid:" + ":".join(_iid_words(src)))
    _send(lab, "c1", "8080", src, lab.vip6, 1, N - 1)
    _all_under(capture, lab, session, N)
    _one_userspace_packet(balancer, "iid", before, N)


def test_mip6_n_connections_from_a_care_of_address_one_userspace_packet_one_server(
    lab: Lab, balancer: BalancerLab
) -> None:
    home, coa = "fd00:200::8", "fd00:1::81"
    before = _counters(balancer, "mobile")
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "fast-mobile")
    _send(lab, "c2", "80", coa, lab.vip6, 0, 1, hoa=home)
    session = _session(balancer, "mobile", home)
    _send(lab, "c2", "80", coa, lab.vip6, 1, N - 1, hoa=home)
    _all_under(capture, lab, session, N)
    _one_userspace_packet(balancer, "mobile", before, N)


def test_esp_spi_n_packets_one_userspace_packet_one_server(lab: Lab, balancer: BalancerLab) -> None:
    # Nothing answers ESP here, so conntrack holds the client's ESP as one flow that stays new:
    # without the fast path every packet would go to the daemon.
    before = _counters(balancer, "dns")
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "fast-esp")
    src = lab.address("c3")
    _send(lab, "c3", "esp", src, lab.vip, 0, 1)
    session = _session(balancer, "dns", "spi:0x00001234")
    _send(lab, "c3", "esp", src, lab.vip, 1, N - 1)
    _all_under(capture, lab, session, N)
    _one_userspace_packet(balancer, "dns", before, N)


def _iid_words(address: str) -> list[str]:
    import ipaddress

    low = ipaddress.IPv6Address(address).packed[8:].hex()
    return [low[i : i + 4] for i in range(0, 16, 4)]


def test_a_reload_refills_the_sets_it_emptied(lab: Lab, balancer: BalancerLab) -> None:
    """Loading the ruleset empties the sets; the daemon adds every session's elements back, so
    the client's next connection still stays in the kernel."""
    session = _session(balancer, "http", lab.address("c1"))
    balancer.reload(CHANGES)
    assert "configuration reloaded" in balancer.log()
    listed = lab.sh("lb", "nft", "list", "set", "inet", "mplsorch", "fast4").stdout
    assert f"{lab.address('c1')} . {lab.vip} . tcp . 80" in listed, listed
    before = _counters(balancer, "http")
    assert balancer.curl("c1") == "200"
    after = _counters(balancer, "http")
    assert (after[0], after[1], after[2]) == (before[0], before[1], before[2] + 1), (before, after)
    assert _session(balancer, "http", lab.address("c1"))["id"] == session["id"]


def test_five_tuple_every_flow_is_a_session_with_one_userspace_packet(lab: Lab, balancer: BalancerLab) -> None:
    def seen() -> tuple[int, int]:
        status = balancer.cli("status")
        return status["counters"].get("packets_userspace", 0), status["nft_counters"]["queued_ft"]

    before = seen()
    src = lab.address("c3", version=6)
    _send(lab, "c3", "8081", src, lab.vip6, 0, N)
    deadline = time.monotonic() + patience(40)
    while len(mine := [s for s in balancer.sessions() if s["service"] == "ft"]) < N:
        assert time.monotonic() < deadline, (mine, balancer.log()[-2000:])
        time.sleep(0.5)
    assert len(mine) == N and all(s["packets_userspace"] == 1 for s in mine), mine
    after = seen()
    assert (after[0] - before[0], after[1] - before[1]) == (N, N), (before, after)


def test_after_sigkill_and_a_restart_every_key_kind_comes_back_and_stays_in_the_kernel(
    lab: Lab, balancer: BalancerLab
) -> None:
    before = balancer.restorable_sessions()
    kinds = {"client-ip", "ipv6-iid", "mip6-home-address", "esp-spi", "five-tuple"}
    assert {s["key_kind"] for s in before} == kinds, before
    balancer.kill_and_restart()
    assert f"restored {len(before)} sessions from the kernel" in balancer.log(), balancer.log()[-2000:]
    assert balancer.restorable_sessions() == before
    # The sets were refilled from the restored sessions: a client's next flows stay in the kernel,
    # under the same labels.
    session = _session(balancer, "http", lab.address("c1"))
    counters = _counters(balancer, "http")
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "fast-restarted")
    assert [balancer.curl("c1") for _ in range(N)] == ["200"] * N
    _all_under(capture, lab, session, N)
    after = _counters(balancer, "http")
    assert (after[0], after[1], after[2]) == (counters[0], counters[1], counters[2] + N), (counters, after)
    esp = _session(balancer, "dns", "spi:0x00001234")
    counters = _counters(balancer, "dns")
    capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "fast-restarted-esp")
    _send(lab, "c3", "esp", lab.address("c3"), lab.vip, 100, N)
    _all_under(capture, lab, esp, N)
    after = _counters(balancer, "dns")
    assert (after[0], after[1]) == (counters[0], counters[1]), (counters, after)
