"""S2C label routes towards the client's next hop, with the real balancer daemon: an off-link
client (behind c1, which routes for it) is answered through its gateway, and a label-aware client
(c2, declared in `clients.label_aware`) receives its answers still carrying the S2C label.

Servers are plain (answers as IP); the fabric switch p stands in for a server's S2C return path
with an encap route `CLIENT/32 encap mpls S2C via lb`, once the session's S2C label is known, so
the answers of a second request reach the client only through the balancer's S2C label route."""

from __future__ import annotations

from typing import Iterator

import pytest

from orchestrator.dataplane import ops
from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab

FAR = "10.0.9.1"  # on c1's lo; the balancer routes 10.0.9.0/24 via c1


@pytest.fixture(scope="module")
def balancer(lab: Lab) -> Iterator[BalancerLab]:
    b = BalancerLab(lab, changes={"clients.label_aware": [f"{lab.address('c2')}/32"]})
    try:
        b.start()
        yield b
    finally:
        b.close()


def _session(balancer: BalancerLab, client: str) -> tuple[int, int]:
    """(C2S, S2C) of the http session the daemon logged for `client`."""
    found = balancer.logged("start", "http", client)
    assert len(found) == 1, balancer.log()[-2000:]
    return found[0]["c2s_label"], found[0]["s2c_label"]


def _s2c_route(lab: Lab, s2c: int) -> ops.MplsRoute:
    [route] = [i.obj for i in lab.provider("lb").dump() if isinstance(i.obj, ops.MplsRoute) and i.obj.label == s2c]
    assert isinstance(route, ops.MplsRoute)
    return route


def _curl_from(lab: Lab, node: str, source: str) -> str:
    result = lab.sh(
        node,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "20",
        "-w",
        "%{http_code}",
        "--interface",
        source,
        f"http://{lab.vip}/",
        check=False,
        timeout=40,
    )
    return result.stdout.strip() or "000"


def test_an_off_link_client_is_answered_through_its_gateway(lab: Lab, balancer: BalancerLab) -> None:
    c1 = lab.address("c1")
    lb_fabric = lab.peer_address("p", "lb")
    pl = lab.iface("p", towards="lb")["dev"]
    # c1 routes for 10.0.9.0/24 and answers ARP only for its own LAN address, so a label route
    # that named the client itself as next hop could not deliver.
    setup = [
        ("c1", "ip", "addr", "add", f"{FAR}/32", "dev", "lo"),
        ("c1", "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"),
        ("lb", "ip", "route", "add", "10.0.9.0/24", "via", c1),
        ("p", "ip", "route", "add", "10.0.9.0/24", "via", lb_fabric),
    ]
    undo = [
        ("c1", "ip", "addr", "del", f"{FAR}/32", "dev", "lo"),
        ("c1", "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=0"),
        ("lb", "ip", "route", "del", "10.0.9.0/24"),
        ("p", "ip", "route", "del", "10.0.9.0/24"),
        ("p", "ip", "route", "del", f"{FAR}/32"),
    ]
    try:
        for node, *cmd in setup:
            lab.sh(node, *cmd)
        assert _curl_from(lab, "c1", FAR) == "200", balancer.log()[-2000:]
        c2s, s2c = _session(balancer, FAR)
        assert _s2c_route(lab, s2c) == ops.MplsRoute(s2c, "lan0", via=c1)  # pop, via the gateway
        # Answers now come back to the balancer under S2C only: through its label route.
        lab.sh("p", "ip", "route", "replace", f"{FAR}/32", "encap", "mpls", str(s2c), "via", lb_fabric, "dev", pl)
        capture = lab.capture("p", pl, "off-link-s2c")
        assert _curl_from(lab, "c1", FAR) == "200", balancer.log()[-2000:]
        stacks = capture.stacks()
        assert (s2c,) in stacks and all(s == (s2c,) or s[-1] == c2s for s in stacks), stacks
    finally:
        for node, *cmd in undo:
            lab.sh(node, *cmd, check=False)


def test_a_label_aware_client_receives_its_answers_under_the_s2c_label(lab: Lab, balancer: BalancerLab) -> None:
    c2 = lab.address("c2")
    dev = lab.iface("c2", towards="lb")["dev"]
    lb_fabric = lab.peer_address("p", "lb")
    pl = lab.iface("p", towards="lb")["dev"]
    assert lab.curl("c2", f"http://{lab.vip}/", timeout=20) == "200", balancer.log()[-2000:]
    _c2s, s2c = _session(balancer, c2)
    assert _s2c_route(lab, s2c) == ops.MplsRoute(s2c, "lan0", via=c2, out_labels=(s2c,))  # swap, not pop
    try:
        # c2 takes labelled packets and pops its session label itself (answers then arrive on lo).
        lab.sh(
            "c2",
            "sysctl",
            "-qw",
            "net.mpls.platform_labels=100000",
            f"net.mpls.conf.{dev}.input=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.lo.rp_filter=0",
            f"net.ipv4.conf.{dev}.rp_filter=0",
        )
        lab.sh("c2", "ip", "-f", "mpls", "route", "add", str(s2c), "dev", "lo")
        lab.sh("p", "ip", "route", "replace", f"{c2}/32", "encap", "mpls", str(s2c), "via", lb_fabric, "dev", pl)
        capture = lab.capture("c2", dev, "label-aware-s2c")
        assert lab.curl("c2", f"http://{lab.vip}/", timeout=20) == "200", balancer.log()[-2000:]
        stacks = capture.stacks()
        assert stacks and all(s == (s2c,) for s in stacks), stacks
    finally:
        lab.sh("p", "ip", "route", "del", f"{c2}/32", check=False)
        lab.sh("c2", "ip", "-f", "mpls", "route", "del", str(s2c), "dev", "lo", check=False)
        lab.sh("c2", "sysctl", "-qw", f"net.mpls.conf.{dev}.input=0", check=False)
