"""The reference session (docs/design.md, "Illustration with iproute2"), programmed through the provider only,
carries HTTP through the VIP; the wire shows the label stacks; deleting it stops it alone."""

from __future__ import annotations

from typing import Iterator

import pytest

from netns_tests.harness.reference import (
    Session,
    apply_all,
    balancer_node,
    deletes,
    fabric_node,
    once_per_node,
    session_ops,
)
from orchestrator.lab.kit import Lab

# c1 -> s2 with the reference's labels; a second, independent session c2 -> s3.
FIRST = Session(client="c1", server="s2", c2s=1001, handle=1)
SECOND = Session(client="c2", server="s3", c2s=1003, handle=2)


@pytest.fixture(scope="module")
def served(lab: Lab) -> Iterator[dict[str, object]]:
    """Both sessions installed, an HTTP server on the VIP of their servers."""
    setup = once_per_node(lab)
    per_session = {s: session_ops(lab, s) for s in (FIRST, SECOND)}
    results = apply_all(lab, setup) + [r for s in per_session.values() for r in apply_all(lab, s)]
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    logs, servers = {}, []
    for session in (FIRST, SECOND):
        proc, logs[session.server] = lab.http_server(session.server, lab.vip)
        servers.append(proc)
    try:
        yield {"logs": logs, "ops": per_session}
    finally:  # later modules start their own servers on the VIP's port
        for proc in servers:
            lab.stop(proc)
        for session_ops_ in per_session.values():
            apply_all(lab, deletes(session_ops_))
        apply_all(lab, deletes(setup))


def test_http_through_the_vip_with_labels_on_the_wire(lab: Lab, served: dict) -> None:
    p, lb = fabric_node(lab), balancer_node(lab)
    towards_balancer = lab.capture(p, lab.iface(p, towards=lb)["dev"], "c2s")
    towards_server = lab.capture(p, lab.iface(p, towards=FIRST.server)["dev"], "s2c")

    assert lab.curl(FIRST.client, f"http://{lab.vip}/") == "200"

    transport_server = lab.node(FIRST.server)["transport_label"]
    transport_balancer = lab.node(lb)["transport_label"]
    from_balancer = towards_balancer.stacks()
    from_server = towards_server.stacks()
    # C2S arrives at the fabric from the balancer as [server transport, C2S] ...
    assert (transport_server, FIRST.c2s) in from_balancer, from_balancer
    # ... and the answers arrive from the server as [balancer transport, S2C = C2S + 1].
    assert (transport_balancer, FIRST.s2c) in from_server, from_server
    # The fabric popped the transport label towards the balancer: only S2C is left there.
    assert (FIRST.s2c,) in from_balancer
    assert all(stack in {(transport_server, FIRST.c2s), (FIRST.s2c,)} for stack in from_balancer)


def test_server_sees_the_real_client_address(lab: Lab, served: dict) -> None:
    assert lab.curl(FIRST.client, f"http://{lab.vip}/?probe=real-address") == "200"
    log = served["logs"][FIRST.server].read_text()
    line = next(line for line in log.splitlines() if "probe=real-address" in line)
    assert line.startswith(lab.address(FIRST.client) + " "), line


def test_deleting_a_session_stops_it_and_nothing_else(lab: Lab, served: dict) -> None:
    assert lab.curl(SECOND.client, f"http://{lab.vip}/") == "200"
    assert lab.curl(FIRST.client, f"http://{lab.vip}/") == "200"
    removal = deletes(served["ops"][FIRST])
    results = apply_all(lab, removal)
    assert all(r.ok for r in results), [str(r) for r in results]

    assert lab.curl(FIRST.client, f"http://{lab.vip}/", timeout=3) == "000"
    assert lab.curl(SECOND.client, f"http://{lab.vip}/") == "200"
    lb = balancer_node(lab)
    remaining = {i.obj for i in lab.provider(lb).dump()}
    assert not any(op.obj in remaining for op in served["ops"][FIRST][lb])
    assert all(op.obj in remaining for op in served["ops"][SECOND][lb])

    # Back again: the same operations restore the session (for the tests after this one).
    assert all(r.ok for r in apply_all(lab, served["ops"][FIRST]))
    assert lab.curl(FIRST.client, f"http://{lab.vip}/") == "200"
