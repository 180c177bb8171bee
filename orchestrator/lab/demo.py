"""`mplsorch lab demo`, run inside the lab: one session per client, each to its own server,
programmed through the netlink provider; HTTP from every client through the VIP; the label
stacks seen on the fabric; the objects each node holds with their offload state."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from orchestrator.dataplane import ops
from orchestrator.lab.kit import Lab
from orchestrator.lab.reference import (
    Session, apply_all, balancer_node, deletes, fabric_node, once_per_node, session_ops,
)


@dataclass(frozen=True)
class SessionReport:
    session: Session
    client_address: str
    http_status: str
    c2s_on_wire: tuple[int, ...] | None
    s2c_on_wire: tuple[int, ...] | None
    server_saw_client: bool

    def as_json(self, lab: Lab) -> dict[str, object]:
        s = self.session
        return {"id": s.handle, "client": self.client_address, "key": self.client_address,
                "vip": lab.vip, "protocol": "tcp", "port": 80, "server": s.server,
                "c2s_label": s.c2s, "s2c_label": s.s2c, "state": "serving",
                "http_status": int(self.http_status), "c2s_stack_on_wire": self.c2s_on_wire,
                "s2c_stack_on_wire": self.s2c_on_wire, "server_saw_client": self.server_saw_client}


def plan(lab: Lab) -> list[Session]:
    clients, servers = lab.names("client"), lab.names("server")
    return [Session(client=c, server=servers[i % len(servers)], c2s=1001 + 2 * i, handle=i + 1)
            for i, c in enumerate(clients)]


def run(lab: Lab) -> tuple[list[SessionReport], dict[str, list[ops.Installed]]]:
    sessions = plan(lab)
    per_session = [session_ops(lab, s) for s in sessions]
    setup = once_per_node(lab)
    results = apply_all(lab, setup) + [r for p in per_session for r in apply_all(lab, p)]
    failed = [str(r) for r in results if not r.ok]
    if failed:
        raise RuntimeError("programming failed: " + "; ".join(failed))
    p, lb = fabric_node(lab), balancer_node(lab)
    logs = {server: lab.http_server(server, lab.vip)[1] for server in {s.server for s in sessions}}
    reports = []
    for s in sessions:
        towards_lb = lab.capture(p, lab.iface(p, towards=lb)["dev"], f"demo-c2s-{s.handle}")
        towards_server = lab.capture(p, lab.iface(p, towards=s.server)["dev"], f"demo-s2c-{s.handle}")
        status = lab.curl(s.client, f"http://{lab.vip}/?demo={s.client}")
        c2s = [st for st in towards_lb.stacks() if len(st) == 2 and st[1] == s.c2s]
        s2c = [st for st in towards_server.stacks() if len(st) == 2 and st[1] == s.s2c]
        address = lab.address(s.client)
        seen = any(line.startswith(address + " ") and f"demo={s.client}" in line
                   for line in logs[s.server].read_text().splitlines())
        reports.append(SessionReport(s, address, status, c2s[0] if c2s else None,
                                     s2c[0] if s2c else None, seen))
    installed = {node: lab.provider(node).dump() for node in [lb, *sorted({s.server for s in sessions})]}
    for p_ops in per_session:
        apply_all(lab, deletes(p_ops))
    apply_all(lab, deletes(setup))
    return reports, installed


def _stack(stack: tuple[int, ...] | None) -> str:
    return "[" + ", ".join(map(str, stack)) + "]" if stack else "none"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mplsorch lab demo")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    lab = Lab.from_env()
    try:
        reports, installed = run(lab)
    finally:
        lab.close()
    ok = all(r.http_status == "200" and r.c2s_on_wire and r.s2c_on_wire and r.server_saw_client
             for r in reports)
    if args.json:
        servers: dict[str, int] = {name: 0 for name in lab.names("server")}
        for r in reports:
            servers[r.session.server] += 1
        print(json.dumps({"sessions": [r.as_json(lab) for r in reports], "servers": servers,
                          "objects": {node: [{"object": i.obj.describe(), "offload": i.offload.describe()}
                                             for i in objs] for node, objs in installed.items()},
                          "ok": ok}, indent=2))
    else:
        print(f"VIP {lab.vip}: one session per client, programmed over netlink\n")
        print(f"{'client':16}{'server':8}{'C2S':>6}{'S2C':>6}  {'HTTP':5}{'C2S on fabric':16}"
              f"{'S2C on fabric':16}{'server saw client'}")
        for r in reports:
            s = r.session
            print(f"{r.client_address:16}{s.server:8}{s.c2s:>6}{s.s2c:>6}  {r.http_status:5}"
                  f"{_stack(r.c2s_on_wire):16}{_stack(r.s2c_on_wire):16}{'yes' if r.server_saw_client else 'NO'}")
        for node, objs in installed.items():
            print(f"\n{node}: {len(objs)} objects of ours")
            for i in objs:
                print(f"  {i.obj.describe()}  [{i.offload.describe()}]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
