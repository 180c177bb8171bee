"""Operations in the pure balancer core, against the fake kernel: health-driven avoidance, the
sessions of a failed server (reassign in one batch, reset), drain and enable, weight with the
share of maglev keys that moved, flush."""

from __future__ import annotations

import collections

import pytest

from orchestrator.core import commands
from orchestrator.core.health import HealthEvent, HealthState, HealthView
from orchestrator.core.servers import AdminState, BadCommand
from orchestrator.dataplane import ops
from orchestrator.dataplane.records import hold_marker
from tests.unit.conftest import TRANSPORT, Node, config, syn

UP, DOWN = HealthState.UP, HealthState.DOWN
VIP6 = "2001:db8::100"
V6 = {"services.mobile.vip": VIP6}


def view(**states: HealthState | tuple[HealthState, float]) -> HealthView:
    rows = []
    for server, st in states.items():
        state, rt = st if isinstance(st, tuple) else (st, None)
        rows.append(("web", server, state, rt))
    return HealthView(tuple(rows))


def down(node: Node, server: str, **others: HealthState):  # type: ignore[no-untyped-def]
    """s goes down: the core's plan, applied to the fake kernel and committed as the daemon does."""
    event = HealthEvent("web", server, UP, DOWN, "connection refused", None, node.now)
    plan = node.core.on_health(view(**{server: DOWN}, **others), [event], node.now)
    results = node.kernel.apply(plan.ops)
    cleanup = node.core.commit_failover(plan, results, node.now)
    assert all(r.ok for r in node.kernel.apply(cleanup))
    return plan, results


def session_of(node: Node, client: str, service: str = "http"):  # type: ignore[no-untyped-def]
    return next(s for s in node.core.table if s.key.value == client and s.service == service)


def test_new_sessions_avoid_a_server_that_is_down() -> None:
    node = Node()
    node.core.on_health(view(s2=DOWN), [], node.now)
    node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(6)))
    assert [s.server for s in node.core.table] == ["s1", "s3"] * 3
    node.core.on_health(view(s2=UP), [], node.now)  # back up: in the rotation again
    node.packets(*(syn(f"10.0.1.{20 + i}") for i in range(3)))
    assert {s.server for s in node.core.table if s.key.value >= "10.0.1.20"} == {"s1", "s2", "s3"}


def test_the_response_time_scheduler_reads_the_measured_times() -> None:
    node = Node(config({"services.http.scheduler": "response-time"}))
    node.core.on_health(view(s1=(UP, 0.030), s2=(UP, 0.002), s3=(UP, 0.010)), [], node.now)
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"))
    assert {s.server for s in node.core.table} == {"s2"}


def test_reassign_moves_the_session_in_one_batch_with_new_labels() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"), syn("10.0.1.12"))
    moved = session_of(node, "10.0.1.11")
    old_c2s, old_id = moved.c2s, moved.id
    assert moved.server == "s2"
    plan, results = down(node, "s2")
    [outcome] = plan.outcomes
    assert (outcome.action, outcome.server, outcome.c2s, outcome.session) == ("reassign", "s2", old_c2s, old_id)
    # One batch: the old filter out before its successor goes in (flower keeps one filter per
    # match), the new S2C route in before the old one goes out.
    kinds = [(type(op).__name__, type(op.obj).__name__) for op in plan.ops]
    assert kinds == [
        ("Delete", "FlowerFilter"),
        ("Add", "FlowerFilter"),
        ("Add", "MplsRoute"),
        ("Replace", "MplsRoute"),
    ]  # the old S2C route becomes the old pair's hold marker
    assert all(r.ok for r in results)
    session = session_of(node, "10.0.1.11")
    assert session.id == old_id and session.server == outcome.new_server != "s2"
    assert session.c2s == outcome.new_c2s != old_c2s
    # The client's next packets leave under the new server's transport label and the new C2S ...
    assert node.labels_of("10.0.1.11") == (TRANSPORT[session.server], session.c2s)
    # ... answers under the new S2C reach it; the old pair routes nothing and is held down.
    back = node.kernel.receive_mpls([session.s2c])
    assert back is not None and back.via == "10.0.1.11"
    assert node.kernel.mpls_lookup(old_c2s + 1) == hold_marker(old_c2s + 1)
    assert node.core.labels.is_held_down(old_c2s) and node.core.labels.stats(node.now).held_down == 1
    assert node.core.table.count(server="s2") == 0 and node.core.table.count(server=session.server) == 2
    # The other sessions are untouched, and the moved one keeps serving new flows.
    assert {s.server for s in node.core.table if s.key.value != "10.0.1.11"} == {"s1", "s3"}
    assert node.packets(syn("10.0.1.11", sport=40001)).verdicts[0].action == "accept"
    assert len(node.core.table) == 3 and node.core.counters["sessions_reassigned"] == 1


def test_reset_ends_the_sessions_of_a_failed_server() -> None:
    node = Node(config({"services.http.on_server_failure": "reset"}))
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"), syn("10.0.1.12"))
    gone = session_of(node, "10.0.1.11")
    plan, _ = down(node, "s2")
    assert [(o.action, o.session) for o in plan.outcomes] == [("reset", gone.id)]
    assert [s.key.value for s in node.core.table] == ["10.0.1.10", "10.0.1.12"]
    assert node.labels_of("10.0.1.11") == () and node.kernel.mpls_lookup(gone.s2c) == hold_marker(gone.s2c)
    assert node.core.counters["ended:server down"] == 1
    # Its labels return after the hold-down (2 s), as every ended session's do.
    assert node.core.labels.stats(node.now).held_down == 1
    assert node.core.labels.stats(node.now + 2).held_down == 0
    # The client's next connection opens a new session on a server that is up.
    node.packets(syn("10.0.1.11", sport=40009))
    assert session_of(node, "10.0.1.11").server != "s2"


def test_a_session_with_nowhere_to_go_is_reset() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    commands.set_admin(node.core, "s2", AdminState.DRAINING)
    node.core.on_health(view(s3=DOWN), [], node.now)
    plan, _ = down(node, "s1", s3=DOWN)
    [outcome] = plan.outcomes
    assert outcome.action == "reset" and "no other server available" in outcome.reason
    node.advance(2)  # the hold-down: its marker goes too
    assert len(node.core.table) == 0 and node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0"))]


def test_a_move_whose_batch_fails_ends_the_session_and_leaves_nothing_behind() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"), syn("10.0.1.11"), syn("10.0.1.12"))
    pairs = sorted(s.c2s for s in node.core.table)
    next_s2c = pairs[-1] + 3  # the next fresh pair's S2C
    node.kernel.apply([ops.Add(ops.MplsRoute(next_s2c, "lan0", via="10.9.9.9"))])  # someone else's
    plan, results = down(node, "s2")
    assert not all(r.ok for r in results)
    assert [s.key.value for s in node.core.table] == ["10.0.1.10", "10.0.1.12"]
    assert node.labels_of("10.0.1.11") == ()
    assert node.kernel.mpls_lookup(next_s2c).via == "10.9.9.9"  # the other owner's route untouched
    assert node.core.counters["ended:reassign failed"] == 1


def test_drain_keeps_sessions_and_takes_no_new_ones_until_enabled() -> None:
    node = Node()
    node.packets(syn("10.0.1.10"))
    kept = session_of(node, "10.0.1.10")
    assert kept.server == "s1"
    answer = commands.set_admin(node.core, "s1", AdminState.DRAINING)
    assert answer == {"server": "s1", "admin": "draining", "previous": "enabled", "sessions": 1}
    node.packets(*(syn(f"10.0.1.{20 + i}") for i in range(4)))
    assert collections.Counter(s.server for s in node.core.table) == {"s1": 1, "s2": 2, "s3": 2}
    # The drained server's session stays, and forwards.
    assert node.packets(syn("10.0.1.10", sport=40001)).verdicts[0].action == "accept"
    assert node.labels_of("10.0.1.10") == (TRANSPORT["s1"], kept.c2s)
    # Drain survives a reload; enable ends it.
    node.core.configure(config(), node.now)
    node.packets(syn("10.0.1.30"))
    assert session_of(node, "10.0.1.30").server != "s1"
    commands.set_admin(node.core, "s1", AdminState.ENABLED)
    node.packets(*(syn(f"10.0.1.{40 + i}") for i in range(3)))
    assert {s.server for s in node.core.table if s.key.value >= "10.0.1.40"} == {"s1", "s2", "s3"}


@pytest.mark.parametrize("server", ["s9", None, 3])
def test_unknown_servers_are_refused_naming_them(server: object) -> None:
    node = Node()
    with pytest.raises(BadCommand, match=f"unknown server {server!r}; known: s1, s2, s3"):
        commands.set_admin(node.core, server, AdminState.DRAINING)
    with pytest.raises(BadCommand, match="unknown server"):
        commands.set_weight(node.core, server, 1, node.now)
    assert not node.core.admin.draining


def test_a_weight_change_rebuilds_maglev_and_reports_the_keys_that_moved() -> None:
    node = Node(config(V6))
    keys = [f"2001:db8:1::{i:x}" for i in range(1, 301)]
    sched = node.core.scheduler("mobile")
    svc = node.core.config.service("mobile")
    before_picks = {k: node.core.pick(svc, k, node.now) for k in keys}
    before = sched.table
    change = commands.set_weight(node.core, "s3", 1, node.now)
    assert (change.server, change.weight, change.previous) == ("s3", 1, 2)
    after = sched.table
    share = sum(a != b for a, b in zip(before, after)) / len(after)
    assert change.moved == {"mobile": share}  # measured on the lookup table, before against after
    # s3 went from 1/2 of the table to 1/3: at least 1/6 must move, maglev moves little more.
    assert 1 / 6 - 0.02 <= share <= 0.3, share
    assert collections.Counter(after)["s3"] == pytest.approx(len(after) / 3, abs=3)
    after_picks = {k: node.core.pick(svc, k, node.now) for k in keys}
    moved_keys = sum(before_picks[k] != after_picks[k] for k in keys) / len(keys)
    assert abs(moved_keys - share) < 0.08  # the keys follow the table
    # The weight is what the schedulers see, and what the core reports.
    assert node.core.weight("s3") == 1
    assert commands.set_weight(node.core, "s3", 1, node.now).moved == {"mobile": 0.0}
    # A reload keeps it while the file's weight of s3 is unchanged; a new file weight wins.
    node.core.configure(config(V6), node.now)
    assert node.core.weight("s3") == 1
    node.core.configure(config({**V6, "pools.web.servers.s3.weight": 3}), node.now)
    assert node.core.weight("s3") == 3


def test_weight_zero_takes_no_new_sessions_and_bad_weights_change_nothing() -> None:
    node = Node(config({"services.http.scheduler": "wrr"}))
    commands.set_weight(node.core, "s3", 0, node.now)
    node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(4)))
    assert collections.Counter(s.server for s in node.core.table) == {"s1": 2, "s2": 2}
    for bad in (-1, "2", 1.5, True, None):
        with pytest.raises(BadCommand, match="bad weight"):
            commands.set_weight(node.core, "s1", bad, node.now)
    assert node.core.weight("s1") == 1 and node.core.weight("s3") == 0


def test_flush_ends_the_matching_sessions_and_deletes_their_objects() -> None:
    node = Node()
    node.packets(*(syn(f"10.0.1.{10 + i}") for i in range(6)))  # s1 s2 s3 s1 s2 s3
    done = commands.flush(node.core, node.now, server="s2")
    assert sorted(s.key.value for s in done.ended) == ["10.0.1.11", "10.0.1.14"]
    assert all(r.ok for r in node.kernel.apply(done.ops))
    assert node.labels_of("10.0.1.11") == () and node.core.table.count(server="s2") == 0
    assert node.core.counters["ended:flushed"] == 2
    assert node.core.labels.stats(node.now).held_down == 2
    by_client = commands.flush(node.core, node.now, client="10.0.1.10")
    assert [s.key.value for s in by_client.ended] == ["10.0.1.10"]
    node.kernel.apply(by_client.ops)
    assert commands.flush(node.core, node.now, server="s1", client="10.0.1.12").ended == []  # s3's client
    with pytest.raises(BadCommand, match="bad client 'nobody'"):
        commands.flush(node.core, node.now, client="nobody")
    with pytest.raises(BadCommand, match="unknown server 's7'"):
        commands.flush(node.core, node.now, server="s7", client="10.0.1.12")
    assert len(node.core.table) == 3
    everything = commands.flush(node.core, node.now)
    node.kernel.apply(everything.ops)
    node.advance(2)  # the hold-down: the markers go too
    assert len(everything.ended) == 3 and node.kernel.dump() == [ops.Installed(ops.ClsactQdisc("fab0"))]
