"""`mplsorch lab demo`, run inside the lab: the balancer daemon for real on the default lab, the
server agent on every server and the client agent on the label-aware client c4.
Every plain client opens several HTTP connections (IPv4 and IPv6) and UDP exchanges through the
VIP; the daemon sees only the first packet of each client's first flow to a service, programs the
session over netlink (its C2S filter, S2C route and fast-path set element), and the kernel admits
the client's later flows itself and labels every packet. Shows sessions per server, label pairs,
client addresses, the label stacks seen on the fabric, flows and userspace packets per session,
and packets handled in userspace against packets label-switched by the kernel. Then the
label-aware client: its first packet of a session is labelled by the balancer's filter, every
later one by the client itself, and the balancer only switches it (its C2S label route)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from orchestrator.lab.balancer_lab import UDP_ASK
from orchestrator.lab.client_lab import NODE, ClientAgentLab, Sniffer, balancer_changes, filter_packets
from orchestrator.lab.kit import Lab
from orchestrator.lab.server_lab import ServerLab

HTTP_PER_CLIENT = 3  # connections to the IPv4 VIP per client: one session
HTTP6_PER_CLIENT = 2  # to the IPv6 VIP: another
UDP_PER_CLIENT = 2  # UDP exchanges (each a new flow) to the IPv4 VIP: a third


def run(lab: Lab) -> dict[str, Any]:
    # Both services' sessions persist for the whole demo, so the table shows every one of them.
    farm = ServerLab(lab, {"services.dns.persistence_timeout": "3600s", **balancer_changes(lab)})
    balancer = farm.balancer
    agent = ClientAgentLab(lab, changes={"sessions.persistence_timeout": "3600s"})
    try:
        farm.start()
        agent.start()
        capture = lab.capture("p", lab.iface("p", towards="lb")["dev"], "demo-c2s")
        http = {
            c: [balancer.curl(c) for _ in range(HTTP_PER_CLIENT)]
            + [balancer.curl(c, lab.vip6) for _ in range(HTTP6_PER_CLIENT)]
            for c in lab.names("client")
        }
        udp = {c: [balancer.udp(c) for _ in range(UDP_PER_CLIENT)] for c in lab.names("client")}
        stacks = Counter(capture.stacks())
        everything = sorted(balancer.sessions(), key=lambda s: s["id"])
        status = balancer.cli("status")
        nft = status.get("nft_counters", {})
        kernel = balancer.kernel_packets()
        aware = label_aware(lab, farm, agent)
    finally:
        agent.close()
        farm.close()
    sessions = [s for s in everything if s["client"] != lab.address(NODE)]
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
    ok = ok and aware["ok"]
    return {
        "sessions": sessions,
        "servers": servers,
        "packets": packets,
        "http": http,
        "udp": udp,
        "label_aware": aware,
        "ok": ok,
    }


def label_aware(lab: Lab, farm: ServerLab, agent: ClientAgentLab) -> dict[str, Any]:
    """The label-aware client c4: HTTP connections and UDP exchanges to the IPv4 VIP (a session
    each), its link captured; per session the balancer's view (server, labels, packets its C2S
    filter labelled) against the client agent's (its filter's ports) and what c4's link carried."""
    c4, vip = lab.address(NODE), lab.vip
    sniff = Sniffer(lab, "demo-c4")
    http = [lab.curl(NODE, f"http://{vip}/") for _ in range(HTTP_PER_CLIENT)]
    udp = [lab.sh(NODE, sys.executable, "-c", UDP_ASK, vip, check=False).stdout.strip() for _ in range(UDP_PER_CLIENT)]
    packets = sniff.packets()
    learned = {s["s2c_label"]: s for s in agent.cli("sessions")}
    rows = []
    for s in sorted(farm.balancer.sessions(), key=lambda s: s["id"]):
        if s["client"] != c4:
            continue
        c2s, s2c = s["c2s_label"], s["s2c_label"]
        mine = learned.get(s2c, {})
        transport = lab.node(s["server"])["transport_label"]
        rows.append(
            {
                "service": s["service"],
                "server": s["server"],
                "c2s_label": c2s,
                "s2c_label": s2c,
                "client_ports": mine.get("ports", []),
                "first_packet": {"labelled_by": "lb", "stack": [transport, c2s]},
                "later_packets": {"labelled_by": NODE, "stack": [c2s], "switched_by": "lb", "to": [transport, c2s]},
                "balancer_filter_packets": filter_packets(lab, c2s),
                "labelled_out": sum(1 for p in packets if p == ((c2s,), c4, vip)),
                "labelled_back": sum(1 for p in packets if p == ((s2c,), vip, c4)),
            }
        )
    plain = sum(1 for p in packets if not p[0] and p[1] == c4)
    status = agent.cli("status")
    ok = (
        all(code == "200" for code in http)
        and all(answer == "echo hello" for answer in udp)
        and len(rows) == 2
        and plain == len(rows)  # the first packet of each session, nothing else
        and all(r["client_ports"] and r["balancer_filter_packets"] == 1 and r["labelled_out"] for r in rows)
    )
    return {
        "client": c4,
        "sessions": rows,
        "plain_packets": plain,
        "client_agent": {"sessions_learned": status["counters"].get("sessions_learned", 0), **status["nft_counters"]},
        "http": http,
        "udp": udp,
        "ok": ok,
    }


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
    a = result["label_aware"]
    print(
        f"\nlabel-aware client {NODE} ({a['client']}, client agent): the balancer's filter labels a session's first "
        "packet, the client every later one, which the balancer only switches"
    )
    print(
        f"{'service':9}{'server':8}{'C2S':>6}{'S2C':>6}  {'first packet':22}{'later packets':30}"
        f"{'out [C2S]':>10}{'back [S2C]':>11}{'lb filter':>10}"
    )
    for r in a["sessions"]:
        first = f"lb pushes {r['first_packet']['stack']}"
        later = f"{NODE} pushes [{r['c2s_label']}], lb swaps"
        print(
            f"{r['service']:9}{r['server']:8}{r['c2s_label']:>6}{r['s2c_label']:>6}  {first:22}{later:30}"
            f"{r['labelled_out']:>10}{r['labelled_back']:>11}{r['balancer_filter_packets']:>10}"
        )
    agent = a["client_agent"]
    print(
        f"unlabelled packets from {NODE}: {a['plain_packets']} (one per session); the client agent learned "
        f"{agent.get('sessions_learned', 0)} sessions, queued {agent.get('queued', 0)} first answers and left "
        f"{agent.get('labelled_established', 0)} later labelled answers in the kernel"
    )
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
