"""Per-label liveness of label-aware sessions on the balancer (issue 14): the later packets of a
label-aware client's session arrive labelled [C2S] and are switched by the kernel, past the
balancer's conntrack, so the session's only flow is its first one. A liveness filter on the
label-aware interface's ingress (`mpls_label C2S`, act_gact pass) counts them: while it counts,
the session lives on after that flow and its persistence; when it stops, the session ends a
persistence timeout later. Over the fake provider (its receive_mpls counts the ingress
`mpls_label` filters of the device the packet arrives on, as tc's action statistics do)."""

from __future__ import annotations

import time

from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.core.balancer import PREF_LIVENESS, Balancer
from orchestrator.core.events import FlowTableResync
from orchestrator.core.health import HealthEvent, HealthState, HealthView
from orchestrator.core.sessions import Session, State
from orchestrator.dataplane import handles, ops
from orchestrator.dataplane.netlink import decode, encode
from orchestrator.dataplane.records import hold_marker
from tests.unit.conftest import TRANSPORT, Node, ScriptedQueue, balancer_daemon, config, syn

AWARE = "10.0.1.11"  # a label-aware client, on-link on lan0
PLAIN = "10.0.1.12"
PERSISTENCE = 30.0  # the example's http service
LIVE = {
    "clients.label_aware": [f"{AWARE}/32"],
    "clients.label_aware_interfaces": ["lan0"],
    "labels.hold_down": "1s",
}


def _node() -> Node:
    node = Node(config(LIVE))
    node.packets(syn(AWARE), syn(PLAIN))
    return node


def _session(node: Node, client: str) -> Session:
    return next(s for s in node.core.table if s.key.value == client)


def _labelled(node: Node, session: Session, n: int, dev: str = "lan0") -> None:
    """`n` packets the client agent labelled [C2S] arrive on `dev` and are switched into the fabric."""
    for _ in range(n):
        fwd = node.kernel.receive_mpls([session.c2s], dev=dev)
        assert fwd is not None and fwd.labels == (TRANSPORT[session.server], session.c2s)


def _first_flow_ends(node: Node) -> None:
    """The balancer's conntrack forgets the first flows (their entries saw one packet each)."""
    node.core.on_flow_events([FlowTableResync(frozenset(), sweep=True)], node.now)


def _step(node: Node, seconds: float) -> list[int]:
    """Time passes; the daemon's tick: sessions past their persistence, then the liveness checks."""
    node.advance(seconds)
    return node.check_liveness()


def test_a_label_aware_session_gets_a_liveness_filter_on_its_interface_and_plain_ones_none() -> None:
    node = _node()
    aware, plain = _session(node, AWARE), _session(node, PLAIN)
    live = ops.FlowerFilter(
        "lan0",
        handles.filter_handle(aware.c2s, 0),
        ops.FlowerMatch(mpls_label=aware.c2s),
        (ops.Pass(),),
        direction=ops.Direction.INGRESS,
        pref=PREF_LIVENESS,
    )
    assert node.core.liveness_filters(aware) == [live] and live in [i.obj for i in node.kernel.dump()]
    assert node.core.liveness_filters(plain) == []
    ingress = [i.obj for i in node.kernel.dump() if getattr(i.obj, "direction", None) == ops.Direction.INGRESS]
    assert ingress == [live]  # one filter, the label-aware session's
    # It only counts: the labelled packet is switched on the C2S route as before.
    _labelled(node, aware, 3)
    assert node.kernel.filter_packets([live]) == [3]
    # A label-aware client on an interface outside clients.label_aware_interfaces (MPLS input is
    # off there: its labelled packets cannot arrive) gets none.
    other = Node(config({**LIVE, "clients.label_aware": [f"{AWARE}/32", "10.0.9.0/24"]}))
    other.kernel.add_ip_route("10.0.9.0/24", "lan1", via="10.0.1.10")
    other.packets(syn("10.0.9.1"))
    [far] = other.core.sessions()
    assert other.core.liveness_filters(far) == [] and other.kernel.receive_mpls([far.c2s]) is not None


def test_a_label_aware_session_lives_while_its_liveness_filter_counts() -> None:
    node = _node()
    aware = _session(node, AWARE)
    first = aware.view()
    _first_flow_ends(node)
    assert aware.state == State.DRAINING and aware.label_check_at == node.now
    assert _step(node, 0.25) == []  # the count as it drained: read, not judged
    assert aware.label_packets == 0 and aware.label_check_at == node.now + PERSISTENCE
    counts = []
    for _ in range(6):  # six persistence timeouts, the client sending all along
        for _ in range(10):
            _labelled(node, aware, 2)
            assert _step(node, PERSISTENCE / 10) == []
        counts.append(aware.label_packets)
        assert aware.state == State.SERVING and aware.ends_at is None
    assert counts == sorted(counts) and counts[-1] == 6 * 10 * 2 and len(set(counts)) == 6
    assert _session(node, AWARE) is aware and aware.view()["c2s_label"] == first["c2s_label"]
    assert aware.view()["id"] == first["id"] and aware.view()["server"] == first["server"]
    assert node.core.counters["liveness_kept"] == 6
    # The plain session beside it ended at its persistence, as ever.
    assert PLAIN not in {s.key.value for s in node.core.table}


def test_when_the_count_stops_the_session_ends_a_persistence_timeout_later() -> None:
    node = _node()
    aware = _session(node, AWARE)
    _first_flow_ends(node)
    _step(node, 0.25)
    _labelled(node, aware, 5)
    assert _step(node, PERSISTENCE) == [] and aware.state == State.SERVING  # counted: kept
    # Nothing more: ended at the next check, one persistence timeout on, not before.
    assert _step(node, PERSISTENCE - 1) == [] and len(node.core.table) == 1
    assert _step(node, 1) == [aware.id]
    assert not node.core.table and node.core.counters["liveness_ended"] == 1
    assert node.core.counters["ended:persistence timeout"] == 2  # with the plain session
    # Its objects went, the liveness filter with them; the pair is held down by its marker.
    assert node.kernel.receive_mpls([aware.c2s], dev="lan0") is None
    assert node.kernel.dump() == [
        ops.Installed(ops.ClsactQdisc("fab0")),
        ops.Installed(ops.ClsactQdisc("lan0")),
        ops.Installed(hold_marker(aware.s2c)),
    ]


def test_a_session_that_sent_nothing_after_its_first_flow_ends_at_its_persistence_as_any() -> None:
    node = _node()
    aware = _session(node, AWARE)
    _labelled(node, aware, 4)  # while its first flow lived
    _first_flow_ends(node)
    _step(node, 0.25)
    assert aware.label_packets == 4
    assert _step(node, PERSISTENCE - 0.5) == [] and aware.state == State.DRAINING
    assert _step(node, 0.5) == [aware.id]  # the count stood still since it drained


def test_a_count_the_kernel_cannot_give_keeps_the_session_and_checks_again() -> None:
    node = _node()
    aware = _session(node, AWARE)
    _first_flow_ends(node)
    due = node.core.liveness_due(node.now)
    operations, ended = node.core.on_liveness(due, [None], node.now)
    assert (operations, ended) == ([], []) and node.core.counters["liveness_unchecked"] == 1
    assert aware.label_packets is None and aware.label_check_at == node.now + PERSISTENCE
    assert _step(node, PERSISTENCE) == [] and aware.label_packets == 0  # read then
    assert _step(node, PERSISTENCE) == [aware.id]


def test_a_new_flow_of_the_session_takes_over_from_the_liveness_check() -> None:
    node = _node()
    aware = _session(node, AWARE)
    _first_flow_ends(node)
    node.packets(syn(AWARE, sport=40001))  # its agent fell back to plain IP: a queued first packet
    assert aware.state == State.SERVING and aware.flows
    assert node.core.liveness_due(node.now + 1) == {} and aware.label_check_at is None
    assert _step(node, 10 * PERSISTENCE) == [] and _session(node, AWARE) is aware


def test_a_restart_restores_the_liveness_filter_and_its_count() -> None:
    node = _node()
    aware = _session(node, AWARE)
    _labelled(node, aware, 7)
    fresh = Balancer(config(LIVE), node.now)
    assert fresh.restore(node.kernel.dump(), frozenset(), node.now) == []  # nothing stale
    assert fresh.fast_path_sync(node.kernel.dump_elements()) == []  # as the daemon does
    restored = _session_of(fresh, AWARE)
    assert restored.id == aware.id and restored.c2s == aware.c2s
    assert fresh.liveness_filters(restored) == node.core.liveness_filters(aware)
    assert sorted(map(str, restored.objects)) == sorted(map(str, aware.objects))
    # No flow came back: draining, judged against the dump's count a persistence timeout on.
    assert restored.state == State.DRAINING and restored.label_packets == 7
    node.core = fresh
    _labelled(node, restored, 1)
    assert _step(node, PERSISTENCE) == [] and restored.state == State.SERVING
    assert _step(node, PERSISTENCE) == [restored.id]  # and ends when the count stops
    assert not [i for i in node.kernel.dump() if isinstance(i.obj, ops.FlowerFilter)]


def _session_of(core: Balancer, client: str) -> Session:
    return next(s for s in core.table if s.key.value == client)


def test_a_restart_deletes_liveness_filters_of_no_label_aware_session() -> None:
    node = _node()
    aware, plain = _session(node, AWARE), _session(node, PLAIN)
    strays = [
        node.core.liveness_filter(plain, "lan0"),  # a plain session's label
        ops.FlowerFilter(  # a label no session has
            "lan0",
            handles.filter_handle(aware.c2s + 10, 0),
            ops.FlowerMatch(mpls_label=aware.c2s + 10),
            (ops.Pass(),),
            direction=ops.Direction.INGRESS,
            pref=PREF_LIVENESS,
        ),
    ]
    assert all(r.ok for r in node.kernel.apply([ops.Add(f) for f in strays]))
    fresh = Balancer(config(LIVE), node.now)
    stale = fresh.restore(node.kernel.dump(), frozenset(), node.now)
    assert sorted(map(str, stale)) == sorted(str(ops.Delete(f)) for f in strays)
    assert fresh.liveness_filters(_session_of(fresh, AWARE)) == node.core.liveness_filters(aware)
    assert fresh.liveness_filters(_session_of(fresh, PLAIN)) == []


def test_a_reassigned_session_counts_its_new_c2s() -> None:
    node = _node()
    aware = _session(node, AWARE)
    old_c2s = aware.c2s
    event = HealthEvent("web", aware.server, HealthState.UP, HealthState.DOWN, "refused", None, node.now)
    states = {"s1": HealthState.UP, "s2": HealthState.UP, "s3": HealthState.UP, aware.server: HealthState.DOWN}
    plan = node.core.on_health(HealthView(tuple(("web", s, st, None) for s, st in states.items())), [event], node.now)
    assert all(r.ok for r in node.kernel.apply(plan.ops))
    [live] = node.core.liveness_filters(aware)
    assert aware.c2s != old_c2s and live.match.mpls_label == aware.c2s
    assert live.handle == handles.filter_handle(aware.c2s, 0)
    _labelled(node, aware, 2)
    assert node.kernel.filter_packets([live]) == [2]
    assert not [
        i for i in node.kernel.dump() if isinstance(i.obj, ops.FlowerFilter) and i.obj.match.mpls_label == old_c2s
    ]


def test_the_daemon_checks_liveness_on_its_tick_and_adds_the_interfaces_qdisc() -> None:
    cfg = config({**LIVE, "services.http.persistence_timeout": "50ms"})
    node = Node(cfg)  # for its fake kernel's routes
    queue = ScriptedQueue()
    daemon = balancer_daemon(cfg, node.kernel, queue)
    daemon.add_qdiscs(cfg)  # as its setup does: lan0's is there already (no error)
    queue.script(QueuedPacket(0, 1, syn(AWARE), 0, None, 0))
    daemon.on_packets()
    [session] = daemon.core.sessions()
    daemon.core.on_flow_events([FlowTableResync(frozenset(), sweep=True)], time.monotonic())
    daemon.tick()  # reads the count as it drained
    assert session.label_packets == 0
    for _ in range(3):
        node.kernel.receive_mpls([session.c2s], dev="lan0")
        time.sleep(0.06)
        daemon.tick()
        assert daemon.core.table.by_id(session.id) is session, daemon.core.counters
    assert daemon.core.counters["liveness_kept"] == 3
    row = daemon.sessions({}, time.monotonic())["sessions"][0]
    assert row["label_packets"] == 3 and row["state"] == "serving" and row["label_check_at"] > time.time() - 1
    time.sleep(0.06)
    daemon.tick()
    assert len(daemon.core.table) == 0 and daemon.core.counters["liveness_ended"] == 1


def test_the_pass_action_encodes_and_decodes() -> None:
    live = ops.FlowerFilter(
        "lan0",
        handles.filter_handle(1001, 0),
        ops.FlowerMatch(mpls_label=1001),
        (ops.Pass(),),
        direction=ops.Direction.INGRESS,
        pref=PREF_LIVENESS,
    )
    _kind, _flags, body = encode.flower_filter(ops.Add(live), live, {"lan0": 3}.__getitem__)
    installed = decode.flower(memoryview(body), {3: "lan0"}.__getitem__)
    assert installed is not None and installed.obj == live
    assert live.describe().endswith("flower mpls_label 1001 action gact pass")
