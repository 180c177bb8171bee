"""`mplsorch lab demo`, run inside the lab: the balancer daemon for real on the default lab.
Every client opens several HTTP connections (IPv4 and IPv6) and UDP exchanges through the VIP;
the daemon sees only the first packet of each client's first flow to a service, programs the
session over netlink (its C2S filter, S2C route and fast-path set element), and the kernel admits
the client's later flows itself and labels every packet. Shows sessions per server, label pairs,
client addresses, the label stacks seen on the fabric, flows and userspace packets per session,
and packets handled in userspace against packets label-switched by the kernel."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab

HTTP_PER_CLIENT = 3  # connections to the IPv4 VIP per client: one session
HTTP6_PER_CLIENT = 2  # to the IPv6 VIP: another
UDP_PER_CLIENT = 2  # UDP exchanges (each a new flow) to the IPv4 VIP: a third


def run(lab: Lab) -> dict[str, Any]:
    # Both services' sessions persist for the whole demo, so the table shows every one of them.
    balancer = BalancerLab(lab, changes={"services.dns.persistence_timeout": "3600s"})
    try:
        balancer.start()
        capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "demo-c2s")
        http = {
            c: [balancer.curl(c) for _ in range(HTTP_PER_CLIENT)]
            + [balancer.curl(c, lab.vip6) for _ in range(HTTP6_PER_CLIENT)]
            for c in lab.names("client")
        }
        udp = {c: [balancer.udp(c) for _ in range(UDP_PER_CLIENT)] for c in lab.names("client")}
        stacks = Counter(capture.stacks())
        sessions = sorted(balancer.sessions(), key=lambda s: s["id"])
        status = balancer.cli("status")
        nft = status.get("nft_counters", {})
        kernel = balancer.kernel_packets()
    finally:
        balancer.close()
    servers = {name: 0 for name in lab.names("server")}
    for s in sessions:
        servers[s["server"]] += 1
        transport = lab.node(s["server"])["transport_label"]
        s["c2s_stack_on_wire"] = [transport, s["c2s_label"]] if stacks[(transport, s["c2s_label"])] else None
    userspace = status["counters"].get("packets_userspace", 0)
    # Each client's flows to one service: the first through the daemon, the others admitted by
    # the kernel's fast path (nft counts both), every one counted towards its session.
    packets = {
        "userspace": userspace,
        "total": kernel,
        "flows": balancer.flows,
        "sessions": len(sessions),
        "queued": sum(v for k, v in nft.items() if k.startswith("queued_")),
        "fast_path": sum(v for k, v in nft.items() if k.startswith("fastpath_")),
    }
    ok = (
        all(code == "200" for codes in http.values() for code in codes)
        and all(answer == "echo hello" for answers in udp.values() for answer in answers)
        and all(s["c2s_stack_on_wire"] for s in sessions)
        and len(sessions) == 3 * len(lab.names("client"))
        and userspace == packets["queued"] == len(sessions)
        and all(s["packets_userspace"] == 1 for s in sessions)
        and sum(s["flows_total"] for s in sessions) == balancer.flows
        and packets["fast_path"] == balancer.flows - len(sessions)
    )
    return {"sessions": sessions, "servers": servers, "packets": packets, "http": http, "udp": udp, "ok": ok}


def show(result: dict[str, Any]) -> None:
    print(
        "mplsorch demo: the balancer on the default lab, several HTTP (IPv4 and IPv6) and UDP flows from every client\n"
    )
    print(
        f"{'client':14}{'service':9}{'server':8}{'C2S':>6}{'S2C':>6}  {'on the fabric':16}{'flows':>6}{'userspace':>10}"
    )
    for s in result["sessions"]:
        wire = "[" + ", ".join(map(str, s["c2s_stack_on_wire"])) + "]" if s["c2s_stack_on_wire"] else "not seen"
        print(
            f"{s['client']:14}{s['service']:9}{s['server']:8}{s['c2s_label']:>6}{s['s2c_label']:>6}  "
            f"{wire:16}{s['flows_total']:>6}{s['packets_userspace']:>10}"
        )
    print("\nsessions per server: " + ", ".join(f"{k} {v}" for k, v in result["servers"].items()))
    p = result["packets"]
    print(
        f"flows: {p['flows']} in {p['sessions']} sessions; {p['userspace']} first packets went through the "
        f"daemon (one per session), {p['fast_path']} new flows were admitted by the kernel's fast path"
    )
    print(f"packets towards the VIP: {p['total']} label-switched by the kernel")
    print("result: " + ("ok" if result["ok"] else "FAILED"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mplsorch lab demo")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    lab = Lab.from_env()
    try:
        result = run(lab)
    finally:
        lab.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
