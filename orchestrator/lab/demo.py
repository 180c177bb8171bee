"""`mplsorch lab demo`, run inside the lab: the balancer daemon for real on the default lab.
Every client opens HTTP connections and a UDP exchange through the VIP; the daemon sees only
their first packets, programs each session over netlink, and the kernel labels the rest. Shows
sessions per server, label pairs, client addresses, the label stacks seen on the fabric, and
packets handled in userspace against packets label-switched by the kernel."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from orchestrator.lab.balancer_lab import BalancerLab
from orchestrator.lab.kit import Lab

HTTP_PER_CLIENT = 2


def run(lab: Lab) -> dict[str, Any]:
    # Both services' sessions persist for the whole demo, so the table shows every one of them.
    balancer = BalancerLab(lab, changes={"services.dns.persistence_timeout": "3600s"})
    try:
        balancer.start()
        capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "demo-c2s")
        http = {c: [balancer.curl(c) for _ in range(HTTP_PER_CLIENT)] + [balancer.curl(c, lab.vip6)]
                for c in lab.names("client")}
        udp = {c: balancer.udp(c) for c in lab.names("client")}
        stacks = Counter(capture.stacks())
        sessions = sorted(balancer.sessions(), key=lambda s: s["id"])
        status = balancer.cli("status")
        kernel = balancer.kernel_packets()
    finally:
        balancer.close()
    servers = {name: 0 for name in lab.names("server")}
    for s in sessions:
        servers[s["server"]] += 1
        transport = lab.node(s["server"])["transport_label"]
        s["c2s_stack_on_wire"] = [transport, s["c2s_label"]] if stacks[(transport, s["c2s_label"])] else None
    ok = (all(code == "200" for codes in http.values() for code in codes)
          and all(answer == "echo hello" for answer in udp.values())
          and all(s["c2s_stack_on_wire"] for s in sessions)
          and len(sessions) == 3 * len(lab.names("client")))
    return {"sessions": sessions, "servers": servers,
            "packets": {"userspace": status["counters"].get("packets_userspace", 0), "total": kernel,
                        "flows": balancer.flows},
            "http": http, "udp": udp, "ok": ok}


def show(result: dict[str, Any]) -> None:
    print("mplsorch demo: the balancer on the default lab, HTTP (IPv4 and IPv6) and UDP from every client\n")
    print(f"{'client':14}{'service':9}{'server':8}{'C2S':>6}{'S2C':>6}  {'on the fabric':16}{'flows':>6}")
    for s in result["sessions"]:
        wire = "[" + ", ".join(map(str, s["c2s_stack_on_wire"])) + "]" if s["c2s_stack_on_wire"] else "not seen"
        print(f"{s['client']:14}{s['service']:9}{s['server']:8}{s['c2s_label']:>6}{s['s2c_label']:>6}  "
              f"{wire:16}{s['flows']:>6}")
    print("\nsessions per server: " + ", ".join(f"{k} {v}" for k, v in result["servers"].items()))
    p = result["packets"]
    print(f"packets towards the VIP: {p['total']} label-switched by the kernel, of which {p['userspace']} "
          f"(the first of each of {p['flows']} new flows) went through the daemon")
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
