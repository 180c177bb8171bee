"""Issue 15: the session table keeps sessions as packed rows (core.sessions, core.intmap): no Python
object per session in the steady state, its first flow in its row, views that see one row."""

from __future__ import annotations

import gc
import random

from orchestrator.analyze.keys import SessionKey, SessionKeyKind
from orchestrator.core.events import FlowKey
from orchestrator.core.intmap import IntMap
from orchestrator.core.sessions import KNOWN, NOT_TAKEN, TAKEN, Session, SessionTable, State, ntop, v4

VIP = "10.0.0.100"


def session(i: int, client: str, kind: SessionKeyKind = SessionKeyKind.CLIENT_IP, value: str | None = None) -> Session:
    key = SessionKey(kind, client if value is None else value, client)
    return Session(i, "http", key, VIP, "tcp", 80, "s1", 1000 + 2 * i, 0.0, 0.0, addresses=client, sport=40000)


def test_intmap_agrees_with_a_dict_through_puts_pops_and_growth() -> None:
    m, d = IntMap(4), {}
    rnd = random.Random(15)
    for _ in range(50_000):
        k = rnd.randrange(3000) * 7919 + (rnd.randrange(3) << 32)
        op = rnd.random()
        if op < 0.5:
            v = rnd.randrange(1 << 30)
            m.put(k, v)
            d[k] = v
        elif op < 0.8:
            assert m.pop(k) == d.pop(k, -1)
        else:
            assert m.get(k) == d.get(k, -1)
        assert len(m) == len(d)
    assert all(m.get(k) == v for k, v in d.items())


def test_v4_takes_only_inet_ntops_form() -> None:
    assert v4("10.64.0.1") == 0x0A400001 and ntop(0x0A400001) == "10.64.0.1"
    assert [v4(t) for t in ("010.0.0.1", "1.2.3", "1.2.3.256", "fd00::1", "iid:0:0:0:1", " 1.2.3.4")] == [-1] * 6


def test_rows_hold_the_fields_and_no_view_outlives_its_holders() -> None:
    table = SessionTable()
    for i in range(1, 101):
        table.add(session(i, f"10.1.0.{i}"))
    gc.collect()
    assert len(table) == 100 and len(table._views) == 0  # no object per session once nobody holds one
    s = table.get("http", "10.1.0.7")
    assert s is not None and s is table.by_id(7) and s.key.value == "10.1.0.7" and s.c2s == 1014
    assert s.clients == ["10.1.0.7"] and table._addresses == {}  # the key's client: no side entry
    s.server, s.ends_at, s.owner = "s2", 5.0, "lb2"
    assert table.by_id(7) is s and (s.server, s.ends_at, s.owner) == ("s2", 5.0, "lb2")
    s.ends_at, s.owner = None, None
    assert (s.ends_at, s.owner) == (None, None)


def test_a_sessions_first_flow_is_kept_in_its_row_and_others_beside_it() -> None:
    table = SessionTable()
    s = session(1, "10.1.0.1")
    table.add(s)
    first = FlowKey(6, "10.1.0.1", VIP, 40000, 80)
    second = FlowKey(6, "10.1.0.1", VIP, 40001, 80)
    table.add_flow(s, first, 1.0)
    assert table._by_flow == {} and table.by_flow(first) is s and s.flows == {first}
    table.add_flow(s, second, 2.0)
    assert table._by_flow == {second: s._r} and s.flows == {first, second} and s.flows_total == 2
    assert sorted(table.flows(), key=lambda f: f.sport or 0) == [first, second]
    assert table.end_flow(first) is s and s.flows == {second} and table.by_flow(first) is None
    assert table.take("http", first, 3.0) == TAKEN and s.flows == {first, second} and s.flows_total == 3
    assert table.take("http", first, 3.0) == KNOWN and table.take("http", second, 3.0) == KNOWN
    assert table.take("http", FlowKey(6, "10.1.0.9", VIP, 1, 80), 3.0) == NOT_TAKEN


def test_other_keys_live_beside_the_rows() -> None:
    table = SessionTable()
    five = session(1, "10.1.0.1", SessionKeyKind.FIVE_TUPLE, "6|10.1.0.1|40000|10.0.0.100|80")
    six = session(2, "fd00:1::1")
    table.add(five)
    table.add(six)
    assert table.get("http", "6|10.1.0.1|40000|10.0.0.100|80") is five and table.get("http", "fd00:1::1") is six
    flow = FlowKey(6, "fd00:1::1", VIP, 40000, 80)
    table.add_flow(six, flow, 1.0)
    assert table.by_flow(flow) is six and six.key == SessionKey(SessionKeyKind.CLIENT_IP, "fd00:1::1", "fd00:1::1")


def test_a_removed_session_keeps_its_fields_and_its_row_is_reused() -> None:
    table = SessionTable()
    a = session(1, "10.1.0.1")
    table.add(a)
    table.add_flow(a, FlowKey(6, "10.1.0.1", VIP, 40000, 80), 1.0)
    row = a._r
    table.remove(a)
    assert a._t is None and a.state == State.CLOSING and a.flows == frozenset() and a.c2s == 1002
    assert table.get("http", "10.1.0.1") is None and table.by_id(1) is None and len(table) == 0
    b = session(2, "10.1.0.2")
    table.add(b)
    assert b._r == row and a.key.value == "10.1.0.1" and b.key.value == "10.1.0.2" and b.flows == frozenset()
    assert table.by_state() == {"opening": 1} and table.count(server="s1") == 1


def test_flows_now_reads_each_rows_flow_when_asked() -> None:
    """A sweep's snapshot of the table's flows: a row's flow as it is when read (None once it
    ended), the flows beside the rows as they were."""
    table = SessionTable()
    a, b = session(1, "10.1.0.1"), session(2, "10.1.0.2")
    table.add(a)
    table.add(b)
    fa, fb = FlowKey(6, "10.1.0.1", VIP, 40000, 80), FlowKey(6, "10.1.0.2", VIP, 40000, 80)
    more = FlowKey(6, "10.1.0.2", VIP, 40001, 80)
    for s, f in ((a, fa), (b, fb), (b, more)):
        table.add_flow(s, f, 1.0)
    now = table.flows_now()
    assert len(now) == 3
    table.end_flow(fa)
    assert now.slice(0, 3) == [None, fb, more] and now.slice(1, 2) == [fb] and now.slice(2, 10) == [more]


def test_a_flow_from_another_address_with_the_same_ports_is_another_flow() -> None:
    table = SessionTable()
    s = session(1, "10.1.0.1")
    table.add(s)
    first = FlowKey(6, "10.1.0.1", VIP, 40000, 80)
    moved = FlowKey(6, "10.1.0.2", VIP, 40000, 80)  # a new address of the session, same ports
    table.add_flow(s, first, 1.0)
    table.add_flow(s, moved, 1.0)
    assert s.flows == {first, moved} and s.flows_total == 2 and table.by_flow(moved) is s
