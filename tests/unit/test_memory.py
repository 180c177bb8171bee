"""Issue 15: the balancer core's memory per session, bounded so that a regression fails.

Measured with tracemalloc over the core alone (Balancer.on_packets and commit, every operation
accepted; bench.memory.core_bytes_per_session, as `python -m orchestrator.lab.bench.memory`
prints it): 715 B per UDP session at first, 598 B with a session's client addresses without a
list for one and the label allocator's state in arrays, 200 B with the session table's packed
rows (core.sessions: columns of numbers, IntMap indexes, no object per session). The goal of
the daemon as a whole is <= 400 B of RSS per session (docs/lab.md, `lab bench scale`); the bound
is the measured figure with a margin of 20 % (the indexes grow by doubling), not that goal."""

from __future__ import annotations

from orchestrator.core.sessions import Session
from orchestrator.lab.bench.memory import core_bytes_per_session

SESSIONS = 20_000
BOUND = 240  # bytes per session


def test_the_cores_bytes_per_session_stay_under_the_bound() -> None:
    measured = core_bytes_per_session(SESSIONS)
    assert 0 < measured <= BOUND, f"{measured:.0f} B per session, bound {BOUND}"


def test_a_session_with_one_client_keeps_no_list_of_them() -> None:
    """`clients` reads as a list, but one address is kept as itself (a list of one: 88 B)."""
    from orchestrator.analyze.keys import SessionKey, SessionKeyKind

    s = Session(
        1,
        "dns",
        SessionKey(SessionKeyKind.CLIENT_IP, "10.0.1.1", "10.0.1.1"),
        "10.0.0.100",
        "udp",
        53,
        "s1",
        1001,
        0.0,
        0.0,
    )
    assert s.clients == [] and s.addresses is None and not s.has_client("10.0.1.1")
    s.add_client("10.0.1.1")
    assert s.clients == ["10.0.1.1"] and s.addresses == "10.0.1.1" and s.has_client("10.0.1.1")
    s.add_client("10.0.2.2")
    assert s.clients == ["10.0.1.1", "10.0.2.2"] and s.has_client("10.0.2.2")
    s.clients.append("10.0.3.3")  # a copy: the session's addresses change only through its methods
    assert s.clients == ["10.0.1.1", "10.0.2.2"]
    s.clients = ["10.0.9.9"]
    assert s.addresses == "10.0.9.9"
    s.clients = []
    assert s.addresses is None
