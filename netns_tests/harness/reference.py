"""The reference session's kernel objects, built from the lab description exactly as the
iproute2 illustration in docs/design.md ("Kernel objects per session") builds them by hand."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.dataplane import ops
from orchestrator.lab.kit import Lab

RETURN_TABLE = 100
RULE_PRIORITY = 1000


@dataclass(frozen=True)
class Session:
    client: str
    server: str
    c2s: int
    handle: int

    @property
    def s2c(self) -> int:
        return self.c2s + 1


def balancer_node(lab: Lab) -> str:
    return lab.names("balancer")[0]


def fabric_node(lab: Lab) -> str:
    return lab.names("fabric")[0]


def once_per_node(lab: Lab) -> dict[str, list[ops.Operation]]:
    """clsact on the balancer's fabric link; the per-VIP return rule on every server."""
    lb, p = balancer_node(lab), fabric_node(lab)
    out = {lb: [ops.Add(ops.ClsactQdisc(lab.iface(lb, towards=p)["dev"]))]}
    for server in lab.names("server"):
        out[server] = [ops.Add(ops.Rule(f"{lab.vip}/32", RETURN_TABLE, RULE_PRIORITY))]
    return out


def session_ops(lab: Lab, s: Session) -> dict[str, list[ops.Operation]]:
    """Per node, the Add operations of one session (C2S imposition + S2C pop on the balancer,
    C2S termination + S2C encap return on the server)."""
    lb, p = balancer_node(lab), fabric_node(lab)
    client_addr = lab.address(s.client)
    server_iface = lab.iface(s.server, towards=p)
    return {
        lb: [
            ops.Add(
                ops.FlowerFilter(
                    lab.iface(lb, towards=p)["dev"],
                    s.handle,
                    ops.FlowerMatch(src=f"{client_addr}/32", dst=f"{lab.vip}/32"),
                    ops.push_stack((lab.node(s.server)["transport_label"], s.c2s)),
                )
            ),
            ops.Add(ops.MplsRoute(s.s2c, lab.iface(lb, towards=s.client)["dev"], via=client_addr)),
        ],
        s.server: [
            ops.Add(ops.MplsRoute(s.c2s, "lo")),
            ops.Add(
                ops.EncapRoute(
                    f"{client_addr}/32",
                    (lab.node(lb)["transport_label"], s.s2c),
                    server_iface["dev"],
                    via=lab.peer_address(s.server, p),
                    table=RETURN_TABLE,
                )
            ),
        ],
    }


def apply_all(lab: Lab, per_node: dict[str, list[ops.Operation]]) -> list[ops.OpResult]:
    results = []
    for node, node_ops in per_node.items():
        results += lab.provider(node).apply(node_ops)
    return results


def deletes(per_node: dict[str, list[ops.Operation]]) -> dict[str, list[ops.Operation]]:
    return {node: [ops.Delete(op.obj) for op in reversed(node_ops)] for node, node_ops in per_node.items()}
