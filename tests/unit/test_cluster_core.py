"""Cluster mode's pure parts over the fake kernel: two balancer cores share sessions through
the rows one writes and the other receives as remote events (as the daemons do through etcd).
A session made on A gets the same filters, S2C route and fast-path elements on B; a deleted key
ends it there; an orphaned one (its owner's lease went) is adopted; flows through B take it
over; the store away refuses new sessions, counted; label blocks keep the members' pairs apart."""

from __future__ import annotations

from orchestrator.cluster import codec
from orchestrator.core.events import Action, FlowKey, FlowsEnded, FlowsStarted
from orchestrator.core.label_blocks import BlockAllocator, BlockLayout, next_block, wants_block
from orchestrator.core.remote import ClusterSession, RemoteDelete, RemotePut
from orchestrator.dataplane import ops, records
from orchestrator.dataplane.fake import Forwarding
from tests.unit.conftest import TRANSPORT, VIP, Node, config, syn

IPPROTO_TCP = 6


def member(name: str, block: int, changes: dict[str, object] | None = None) -> Node:
    node = Node(
        config(
            {
                "cluster": {"name": name, "endpoints": ["127.0.0.1:2379"], "label_block": 64},
                "labels.hold_down": 2,
                **(changes or {}),
            }
        )
    )
    node.core.add_label_block(block)
    return node


def deliver(node: Node, events: list[RemotePut | RemoteDelete]) -> None:
    """A member's watch: the events to the core, its operations to the kernel."""
    plan = node.core.on_remote(events, node.now)
    results = node.kernel.apply(plan.ops)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    commit = node.core.commit(plan, results, node.now)
    assert not commit.verdicts and not commit.failures
    assert all(r.ok for r in node.kernel.apply(commit.admit))


def puts(node: Node, rows: list[ClusterSession]) -> list[RemotePut | RemoteDelete]:
    clients = [c for r in rows for c in r.clients]
    hops = node.kernel.routes_to(clients)
    return [RemotePut(r, {c: h for c in r.clients if (h := hops.get(c)) is not None}) for r in rows]


def written(node: Node) -> dict[tuple[str, str], ClusterSession | None]:
    return node.core.take_changes()


def test_a_session_made_on_one_member_is_installed_on_the_other_under_the_same_labels() -> None:
    a, b = member("lb1", 0), member("lb2", 1)
    commit = a.packets(syn("10.0.1.1"), syn("10.0.1.2"))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT] * 2
    changes = written(a)
    assert len(changes) == 2  # one write for the whole batch
    rows = [r for r in changes.values() if r is not None]
    assert {r.owner for r in rows} == {"lb1"}
    assert all(r.c2s in range(*BlockLayout(1000, 99999, 64).bounds(0)) for r in rows)
    deliver(b, puts(b, rows))
    for client in ("10.0.1.1", "10.0.1.2"):
        assert b.labels_of(client) == a.labels_of(client) != ()
        session = b.core.table.get("http", client)
        assert session is not None and session.owner == "lb1"
        # the answers through B reach the client: its S2C label routed to it, popped
        s2c = session.s2c
        fwd = b.kernel.receive_mpls([s2c])
        assert fwd is not None and fwd.via == client and fwd.labels == ()
        # and B's kernel admits the client's next flows itself
        assert b.kernel.fast_path(client, VIP, "tcp", 80) is not None
    assert b.core.counters["cluster_remote_sessions"] == 2
    assert written(b) == {}  # B writes nothing of another member's sessions
    # the pairs are B's to know but never to hand out: B's own sessions come from its block
    b.packets(syn("10.0.2.1"))
    own = b.core.table.get("http", "10.0.2.1")
    assert own is not None and BlockLayout(1000, 99999, 64).block_of(own.c2s) == 1


def test_a_deleted_key_ends_the_session_on_the_other_member_and_a_tick_never_does() -> None:
    a, b = member("lb1", 0), member("lb2", 1)
    a.packets(syn("10.0.1.1"))
    row = next(r for r in written(a).values() if r is not None)
    deliver(b, puts(b, [row]))
    session = b.core.table.get("http", "10.0.1.1")
    assert session is not None
    b.advance(3600)  # no flow on B, persistence long past: another member's session stays
    assert b.labels_of("10.0.1.1") == a.labels_of("10.0.1.1") != ()
    deliver(b, [RemoteDelete("http", "10.0.1.1", "lb1")])
    assert b.core.table.get("http", "10.0.1.1") is None
    assert b.labels_of("10.0.1.1") == ()
    assert b.kernel.fast_path("10.0.1.1", VIP, "tcp", 80) is None
    assert b.core.counters["cluster_remote_ended"] == 1
    # its S2C label is held down (marker), then gone
    assert b.kernel.mpls_lookup(row.c2s + 1) == ops.MplsRoute(row.c2s + 1, "lo")
    b.advance(3)
    assert b.kernel.mpls_lookup(row.c2s + 1) is None
    assert written(b) == {}


def test_the_owner_ending_a_session_deletes_its_key() -> None:
    a = member("lb1", 0)
    a.packets(syn("10.0.1.1"))
    written(a)
    a.core.on_flow_events([FlowsStarted(())], a.now)
    session = a.core.table.get("http", "10.0.1.1")
    assert session is not None
    a.core.on_flow_events([FlowsEnded(tuple(session.flows))], a.now)
    svc = a.core.service_of(session)
    assert svc is not None
    a.advance(svc.persistence_timeout + 1)
    assert written(a) == {("http", "10.0.1.1"): None}


def test_an_orphaned_session_is_adopted_and_written_under_the_survivor() -> None:
    a, b = member("lb1", 0), member("lb2", 1)
    a.packets(syn("10.0.1.1"))
    row = next(r for r in written(a).values() if r is not None)
    deliver(b, puts(b, [row]))
    deliver(b, [RemoteDelete("http", "10.0.1.1", "lb1", orphaned=True)])
    session = b.core.table.get("http", "10.0.1.1")
    assert session is not None and session.owner is None
    assert b.labels_of("10.0.1.1") == a.labels_of("10.0.1.1")  # nothing of it changed in the kernel
    adopted = written(b)[("http", "10.0.1.1")]
    assert adopted is not None and adopted.owner == "lb2" and (adopted.server, adopted.c2s) == (row.server, row.c2s)
    assert b.core.counters["cluster_adopted"] == 1


def test_flows_through_the_other_member_take_the_session_over_and_the_first_owner_follows() -> None:
    a, b = member("lb1", 0), member("lb2", 1)
    a.packets(syn("10.0.1.1"))
    row = next(r for r in written(a).values() if r is not None)
    deliver(b, puts(b, [row]))
    flow = FlowKey(IPPROTO_TCP, "10.0.1.1", VIP, 40001, 80)
    b.core.on_flow_events([FlowsStarted((flow,))], b.now)  # admitted by B's fast path
    taken = written(b)[("http", "10.0.1.1")]
    assert taken is not None and taken.owner == "lb2"
    deliver(a, puts(a, [taken]))
    session = a.core.table.get("http", "10.0.1.1")
    assert session is not None and session.owner == "lb2"
    assert a.core.counters["cluster_handed_over"] == 1
    a.advance(3600)  # A no longer ends it by its own timer
    assert a.core.table.get("http", "10.0.1.1") is not None
    assert written(a) == {}


def test_a_race_for_the_same_client_is_settled_the_same_way_on_both_members() -> None:
    a, b = member("lb1", 0), member("lb2", 1)
    a.packets(syn("10.0.1.1"))
    b.packets(syn("10.0.1.1"))  # the same client reached both before either write
    row_a = next(r for r in written(a).values() if r is not None)
    row_b = next(r for r in written(b).values() if r is not None)
    assert row_a.c2s != row_b.c2s
    # whatever order the rows arrive in, the lower member name's version stays on both
    deliver(b, puts(b, [row_a]))
    session = b.core.table.get("http", "10.0.1.1")
    assert session is not None and (session.server, session.c2s, session.owner) == (row_a.server, row_a.c2s, "lb1")
    assert b.core.counters["cluster_replaced"] == 1
    assert written(b) == {}  # B's own row is not written again
    deliver(b, puts(b, [row_b]))  # B's own write echoed after A's: nothing changes
    assert b.core.table.get("http", "10.0.1.1") is session
    deliver(a, puts(a, [row_b]))
    kept = a.core.table.get("http", "10.0.1.1")
    assert kept is not None and (kept.c2s, kept.owner) == (row_a.c2s, None)
    assert a.core.counters["cluster_race_kept"] == 1
    assert written(a) == {("http", "10.0.1.1"): row_a}  # written again: the table ends with it
    assert b.labels_of("10.0.1.1") == a.labels_of("10.0.1.1") == (TRANSPORT[row_a.server], row_a.c2s)


def test_store_down_refuses_new_sessions_counted_and_existing_ones_keep_forwarding() -> None:
    a = member("lb1", 0)
    a.packets(syn("10.0.1.1"))
    labels = a.labels_of("10.0.1.1")
    a.core.store_up = False
    commit = a.packets(syn("10.0.1.9"), syn("10.0.1.1", sport=40002))
    assert [v.action for v in commit.verdicts] == [Action.REFUSE, Action.ACCEPT]
    assert commit.verdicts[0].reason == "store-down"
    assert a.core.counters["refused:store-down"] == 1
    assert a.labels_of("10.0.1.1") == labels
    a.core.store_up = True
    assert a.packets(syn("10.0.1.9")).verdicts[0].action == Action.ACCEPT


def test_remote_sync_ends_sessions_the_table_lost_and_republishes_ours() -> None:
    a, b = member("lb1", 0), member("lb2", 1)
    a.packets(syn("10.0.1.1"), syn("10.0.1.2"))
    rows = [r for r in written(a).values() if r is not None]
    deliver(b, puts(b, rows))
    b.packets(syn("10.0.2.1"))
    written(b)
    keep = [r for r in rows if r.key == "10.0.1.2"]
    plan = b.core.remote_sync(puts(b, keep), b.now)  # type: ignore[arg-type]
    results = b.kernel.apply(plan.ops)
    b.core.commit(plan, results, b.now)
    assert b.core.table.get("http", "10.0.1.1") is None
    assert b.core.table.get("http", "10.0.1.2") is not None
    assert set(written(b)) == {("http", "10.0.2.1")}  # ours, missing from the table: written again


def test_no_label_block_no_session_and_blocks_keep_members_apart() -> None:
    a = Node(config({"cluster": {"name": "lb1", "endpoints": ["127.0.0.1:2379"], "label_block": 4}}))
    commit = a.packets(syn("10.0.1.1"))
    assert commit.verdicts[0].action == Action.REFUSE and commit.verdicts[0].reason == "labels-exhausted"
    layout = BlockLayout(1000, 99999, 4)
    assert layout.first_c2s == 1001 and layout.bounds(0) == (1001, 1008) and layout.bounds(1) == (1009, 1016)
    assert layout.block_of(1007) == 0 and layout.block_of(1009) == 1 and layout.block_of(1000) is None
    assert layout.count == (99999 - 1001 + 1) // 2 // 4
    # a dead member's block comes back only once no session uses it
    assert next_block(layout, held={0}, in_use=[1011]) == 2
    assert next_block(layout, held={0}, in_use=[]) == 1
    assert next_block(BlockLayout(1001, 1008, 4), held={0}, in_use=[]) is None
    assert wants_block(0, 64) and wants_block(15, 64) and not wants_block(16, 64)


def test_block_allocator_hands_out_only_held_blocks_and_claims_foreign_pairs() -> None:
    alloc = BlockAllocator(BlockLayout(1001, 1040, 2), hold_down=1)
    assert alloc.allocate("s1", 0) is None
    alloc.add_block(1)  # 1005, 1007
    assert alloc.claim(1001, "s2")  # another member's pair (block 0): known in use
    assert not alloc.claim(1001, "s2")
    assert [alloc.allocate("s1", 0), alloc.allocate("s1", 0), alloc.allocate("s1", 0)] == [1005, 1007, None]
    assert alloc.stats(0).in_use == 2 and alloc.free(now=0) == 0
    alloc.release(1005, 0)
    assert alloc.allocate("s1", 0.5) is None and alloc.allocate("s1", 1.0) == 1005
    alloc.release(1001, 0)  # a foreign pair goes without touching our blocks
    assert sorted(alloc.in_use()) == [1005, 1007]
    alloc.claim(1001, "s2")
    alloc.add_block(0)  # a block whose pairs are in use: they stay in use
    assert alloc.allocate("s1", 2) == 1003
    assert alloc.allocate("s1", 2) is None


def test_store_down_local_takes_pairs_of_the_reserve_only_and_writes_them_on_return() -> None:
    a = member("lb1", 0, {"cluster.when_store_down": "local"})
    b = member("lb2", 1)
    assert isinstance(a.core.labels, BlockAllocator)
    a.core.labels.set_reserve(2)
    layout = BlockLayout(1000, 99999, 64)
    a.packets(syn("10.0.1.1"))
    first = a.core.table.get("http", "10.0.1.1")
    assert first is not None and layout.block_of(first.c2s) == 0  # etcd up: the leased blocks
    table = [r for r in written(a).values() if r is not None]  # in etcd
    a.core.store_up = False
    commit = a.packets(syn("10.0.1.9"), syn("10.0.1.1", sport=40002))
    assert [v.action for v in commit.verdicts] == [Action.ACCEPT, Action.ACCEPT]
    local = a.core.table.get("http", "10.0.1.9")
    assert local is not None and layout.block_of(local.c2s) == 2  # the reserve, never block 0
    assert a.core.counters["sessions_local"] == 1 and a.core.counters["refused:store-down"] == 0
    # etcd back: the table lacks the local session; the re-read writes it, B installs it
    a.core.store_up = True
    plan = a.core.remote_sync(puts(a, table), a.now)  # type: ignore[arg-type]
    assert plan.ops == []
    rows = [r for r in written(a).values() if r is not None]
    assert [r.key for r in rows] == ["10.0.1.9"] and a.core.counters["cluster_reconciled"] >= 1
    deliver(b, puts(b, rows))
    assert b.labels_of("10.0.1.9") == a.labels_of("10.0.1.9") == (TRANSPORT[local.server], local.c2s)
    # the reserve used up: refused as `refuse` would, counted
    a.core.store_up = False
    for i in range(63):
        a.packets(syn(f"10.0.3.{i + 1}"))
    assert a.core.counters["sessions_local"] == 64
    refused = a.packets(syn("10.0.4.1")).verdicts[0]
    assert (refused.action, refused.reason) == (Action.REFUSE, "store-down")


def test_a_local_session_the_table_holds_under_another_member_is_replaced_by_the_tables_row() -> None:
    a = member("lb1", 0, {"cluster.when_store_down": "local"})  # lb1 < lb2: a live race would keep A's
    b = member("lb2", 1)
    assert isinstance(a.core.labels, BlockAllocator)
    a.core.labels.set_reserve(2)
    a.core.store_up = False
    a.packets(syn("10.0.1.1"), syn("10.0.1.2"))
    mine = a.core.table.get("http", "10.0.1.1")
    assert mine is not None
    old_c2s = mine.c2s
    b.packets(syn("10.0.1.1"))  # meanwhile B, which etcd still answered, made the same client's
    row_b = next(r for r in written(b).values() if r is not None)
    assert row_b.c2s != old_c2s
    a.core.store_up = True
    plan = a.core.remote_sync(puts(a, [row_b]), a.now)  # type: ignore[arg-type]
    results = a.kernel.apply(plan.ops)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    a.core.commit(plan, results, a.now)
    assert a.core.counters["cluster_reconcile_conflicts"] == 1
    now = a.core.table.get("http", "10.0.1.1")
    assert now is not None and (now.server, now.c2s, now.owner) == (row_b.server, row_b.c2s, "lb2")
    assert a.labels_of("10.0.1.1") == b.labels_of("10.0.1.1") == (TRANSPORT[row_b.server], row_b.c2s)
    # the kernel keeps nothing of the replaced session: one filter for the client (the row's),
    # the replaced pair's S2C label only on its hold marker
    filters = [i.obj for i in a.kernel.dump() if isinstance(i.obj, ops.FlowerFilter)]
    assert [f.actions for f in filters if f.match.src == "10.0.1.1/32"] == [
        ops.push_stack((TRANSPORT[row_b.server], row_b.c2s))
    ]
    assert old_c2s in a.core.markers
    changes = written(a)
    assert set(changes) == {("http", "10.0.1.2")}  # the other local one written; B's row left alone


def test_the_reserve_is_apart_from_the_leased_blocks_and_dropping_blocks_keeps_pairs_in_use() -> None:
    alloc = BlockAllocator(BlockLayout(1001, 1040, 2), hold_down=1)
    alloc.add_block(0)  # 1001, 1003
    alloc.set_reserve(1)  # 1005, 1007
    assert alloc.held_blocks == (0,) and alloc.reserve == 1
    assert alloc.free(now=0) == 2 and alloc.reserve_free(0) == 2
    assert [alloc.allocate("s1", 0), alloc.allocate("s1", 0), alloc.allocate("s1", 0)] == [1001, 1003, None]
    assert alloc.allocate_reserved("s1", 0) == 1005
    assert alloc.stats(0).in_use == 3
    alloc.release(1005, 0, hold_down=False)
    assert alloc.reserve_free(0) == 2
    again = alloc.allocate_reserved("s2", 0)
    assert again in (1005, 1007)
    alloc.drop_blocks()  # a leave: no block, the pairs still in use known as foreign
    assert alloc.held_blocks == () and alloc.reserve is None
    assert sorted(alloc.in_use()) == [1001, 1003, again]
    assert alloc.allocate("s1", 0) is None and alloc.allocate_reserved("s1", 0) is None


def test_a_leaving_member_hands_its_sessions_out_takes_none_back_and_no_new_one() -> None:
    a = member("lb1", 0)
    clients = [f"10.0.1.{i}" for i in range(1, 41)]
    a.packets(*(syn(c) for c in clients))
    before = {s.key.value: (s.server, s.c2s) for s in a.core.table}
    written(a)
    a.core.leaving = True
    rows = a.core.hand_over(["lb2", "lb3"])
    assert {r.key: (r.server, r.c2s) for r in rows} == before  # same server and labels
    owners = {r.key: r.owner for r in rows}
    assert {s.key.value: s.owner for s in a.core.table} == owners
    spread = {m: sum(1 for o in owners.values() if o == m) for m in ("lb2", "lb3")}
    assert sum(spread.values()) == 40 and min(spread.values()) >= 10, spread  # both get a share
    assert written(a) == {}  # the rows go through the hand-over, not the journal
    # the clients' packets still forward here, but no session comes back, none is new
    labels = a.labels_of("10.0.1.1")
    commit = a.packets(syn("10.0.1.1", sport=40002), syn("10.0.9.9"))
    assert [(v.action, v.reason) for v in commit.verdicts] == [(Action.ACCEPT, ""), (Action.REFUSE, "leaving")]
    assert a.core.table.get("http", "10.0.1.1").owner == owners["10.0.1.1"]  # type: ignore[union-attr]
    assert a.labels_of("10.0.1.1") == labels and written(a) == {}
    a.core.release_label_blocks()
    assert a.core.labels.held_blocks == ()  # type: ignore[union-attr]
    assert sorted(a.core.labels.in_use()) == sorted(c2s for _, c2s in before.values())  # type: ignore[union-attr]
    # a member that receives a row naming it owns the session and writes it under its own lease
    b = member("lb2", 1)
    deliver(b, puts(b, [replace_owner(r, "lb1") for r in rows]))
    deliver(b, puts(b, rows))
    mine = {s.key.value for s in b.core.table if s.owner is None}
    assert mine == {k for k, o in owners.items() if o == "lb2"}
    assert b.core.counters["cluster_received"] == len(mine) and set(written(b)) == {("http", k) for k in mine}


def replace_owner(row: ClusterSession, owner: str) -> ClusterSession:
    from dataclasses import replace

    return replace(row, owner=owner)


# -- issue 16: a new session's first answers through another member ------------------------------
# Each member routes the S2C labels of the other members' label blocks to their holder (under the
# holder's own member label) until the session's row arrives; the row's real route replaces that
# route, the session's end puts it back, a block released takes them away; a restart recognises
# them (exact restore).

FABRIC, FABRIC_HOP = "fab0", "10.255.0.2"  # the example's fabric device and first label switch
LABELS = {"lb1": 201, "lb2": 202}  # cluster.member_label of each
LAYOUT = BlockLayout(1000, 99999, 64)


def apply(node: Node, batches: list[list[ops.Operation]]) -> None:
    for batch in batches:
        results = node.kernel.apply(batch)
        assert all(r.ok for r in results), [str(r) for r in results if not r.ok]


def answer(node: Node, s2c: int) -> Forwarding | None:
    """Where an answer under `s2c` arriving from the fabric leaves this node (labels, next hop)."""
    return node.kernel.receive_mpls([s2c], dev=FABRIC)


def two_members() -> tuple[Node, Node]:
    lb1 = member("lb1", 0, {"cluster.member_label": LABELS["lb1"]})
    lb2 = member("lb2", 1, {"cluster.member_label": LABELS["lb2"]})
    apply(lb1, lb1.core.forward_blocks({1: LABELS["lb2"]}))
    apply(lb2, lb2.core.forward_blocks({0: LABELS["lb1"]}))
    return lb1, lb2


def test_an_answer_reaches_lb2_through_lb1_before_the_row_arrives_and_the_session_route_after() -> None:
    lb1, lb2 = two_members()
    lo, hi = LAYOUT.bounds(1)
    assert lb1.core.counters["forward_routes"] == 64  # every pair of lb2's block, none of its own
    assert answer(lb1, LAYOUT.bounds(0)[0] + 1) is None  # its own block's free pairs: nothing
    commit = lb2.packets(syn("10.0.1.7"))
    assert commit.verdicts[0].action == "accept"
    session = lb2.core.table.get("http", "10.0.1.7")
    assert session is not None and lo <= session.c2s <= hi
    # the row is not written yet: lb1 sends the answer to lb2 under lb2's own label, S2C under it
    assert answer(lb1, session.s2c) == Forwarding((LABELS["lb2"], session.s2c), FABRIC_HOP, FABRIC)
    # and lb2, once the fabric popped its label, answers the client
    assert answer(lb2, session.s2c) == Forwarding((), "10.0.1.7", "lan0")
    rows = [r for r in written(lb2).values() if r is not None]
    deliver(lb1, puts(lb1, rows))  # the row arrives: the real route replaced the forwarding one
    assert answer(lb1, session.s2c) == Forwarding((), "10.0.1.7", "lan0")
    assert lb1.core.counters["forward_routes"] == 63
    # the session ends on lb2: its key's delete puts the forwarding route back on lb1
    deliver(lb1, [RemoteDelete("http", "10.0.1.7", "lb2")])
    assert answer(lb1, session.s2c) == Forwarding((LABELS["lb2"], session.s2c), FABRIC_HOP, FABRIC)
    assert lb1.core.markers == {}  # lb2 holds the pair down, not lb1
    assert lb1.core.counters["forward_routes"] == 64


def test_one_batch_per_block_and_only_what_changed() -> None:
    lb1 = member("lb1", 0, {"cluster.member_label": LABELS["lb1"]})
    batches = lb1.core.forward_blocks({1: 202, 2: 203})
    assert [len(b) for b in batches] == [64, 64]
    assert {LAYOUT.block_of(op.obj.label - 1) for op in batches[1] if isinstance(op.obj, ops.MplsRoute)} == {2}
    apply(lb1, batches)
    assert lb1.core.forward_blocks({1: 202, 2: 203}) == []  # nothing changed, nothing sent
    moved = lb1.core.forward_blocks({1: 202, 2: 204})  # block 2's holder changed
    assert len(moved) == 1 and all(isinstance(op, ops.Replace) and op.obj.out_labels[0] == 204 for op in moved[0])
    apply(lb1, moved)
    released = lb1.core.forward_blocks({1: 202})  # block 2 released: its routes go
    assert len(released) == 1 and all(isinstance(op, ops.Delete) for op in released[0]) and len(released[0]) == 64
    apply(lb1, released)
    assert answer(lb1, LAYOUT.bounds(2)[0] + 1) is None
    # a block lb1 claims (its former holder gone): the routes go before lb1 hands its pairs out
    lb1.core.add_label_block(1)
    apply(lb1, lb1.core.forward_blocks({}))
    assert lb1.core.forwarding == {} and answer(lb1, LAYOUT.bounds(1)[0] + 1) is None
    lb1.packets(*(syn(f"10.0.3.{i}") for i in range(1, 70)))  # past block 0 into block 1
    assert any(LAYOUT.block_of(s.c2s) == 1 for s in lb1.core.table)


def test_a_session_row_replaces_a_forwarding_route_of_a_block_not_yet_known_as_ours() -> None:
    """A route still there when a session takes its pair is replaced, never refused (EEXIST)."""
    lb1, lb2 = two_members()
    lb2.packets(syn("10.0.1.8"))
    rows = [r for r in written(lb2).values() if r is not None]
    deliver(lb1, puts(lb1, rows))
    session = lb1.core.table.get("http", "10.0.1.8")
    assert session is not None
    assert lb1.kernel.mpls_lookup(session.s2c) == ops.MplsRoute(session.s2c, "lan0", via="10.0.1.8")


def test_a_restart_recognises_the_forwarding_routes_and_changes_nothing() -> None:
    lb1, lb2 = two_members()
    lb2.packets(syn("10.0.1.9"))
    deliver(lb1, puts(lb1, [r for r in written(lb2).values() if r is not None]))
    installed = lb1.kernel.dump()
    assert sum(isinstance(i.obj, ops.MplsRoute) and records.is_forward_route(i.obj) for i in installed) == 63
    again = member("lb1", 0, {"cluster.member_label": LABELS["lb1"]})
    again.kernel = lb1.kernel
    stale = again.core.restore(installed, frozenset(), again.now)
    assert stale == []  # the session's filter and route, and every forwarding route, are ours
    assert again.core.forward_blocks({1: LABELS["lb2"]}) == []  # exactly as before
    assert again.core.table.get("http", "10.0.1.9") is not None
    # shutdown without keep: the forwarding routes go with everything else
    drops = again.core.drop_markers()
    assert len([op for op in drops if isinstance(op.obj, ops.MplsRoute) and records.is_forward_route(op.obj)]) == 63


def test_no_member_label_no_forwarding_route_and_the_member_record_reads_back() -> None:
    assert codec.decode_member(codec.encode_member(7, None)) == (7, None)
    assert codec.encode_member(7, None) == b"7"  # as before member labels
    assert codec.decode_member(codec.encode_member(7, 202)) == (7, 202)
    assert codec.decode_member(b"{") is None and codec.decode_member(b'{"lease":"x"}') is None
    single = Node()
    assert single.core.forward_blocks({1: 202}) == []  # one balancer: no blocks, nothing to do
