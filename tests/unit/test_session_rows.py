"""Issue 15: the session table keeps sessions as packed rows (core.sessions, core.intmap): no Python
object per session in the steady state, its first flow in its row, views that see one row."""

from __future__ import annotations

import gc
import json
import random
from array import array

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


class CountedState(array):  # type: ignore[type-arg]
    """A state column that counts its reads one row at a time (a walk of the rows reads each)."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        CountedState.reads += 1
        return super().__getitem__(index)


def count_state_reads(table: SessionTable) -> None:
    state = table._columns["state"]
    counted = CountedState(state.typecode, state)
    table._columns["state"] = counted
    table._all_columns[table._all_columns.index(state)] = counted
    CountedState.reads = 0


def mixed_table(n: int) -> SessionTable:
    """`n` sessions of every shape a row can have, some removed (free rows), a row reused."""
    table = SessionTable()
    for i in range(1, n + 1):
        if i % 11 == 0:
            s = session(i, f"10.2.{i >> 8 & 255}.{i & 255}", SessionKeyKind.FIVE_TUPLE, f"6|{i}|80")
        elif i % 13 == 0:
            s = session(i, f"fd00:1::{i:x}")
        else:
            s = session(i, f"10.1.{i >> 8 & 255}.{i & 255}")
        s.embryonic_until = 5.0 if i % 3 == 0 else None
        s.label_packets, s.label_check_at = (7, 9.5) if i % 5 == 0 else (None, None)
        s.owner = "lb2" if i % 7 == 0 else None
        s.ends_at = 30.0 if i % 4 == 0 else None
        s.port = None if i % 17 == 0 else 80
        s.state = State.SERVING if i % 2 else State.DRAINING
        table.add(s)
        if i % 6 == 0:
            table.add_flow(s, FlowKey(6, s.key.client, VIP, 40000, 80), 1.0)
        if i % 9 == 0:
            table.add_flow(s, FlowKey(6, s.key.client, VIP, 40001, 80), 1.0)
        if i % 10 == 0:
            s.add_client("10.9.9.9")
        elif i % 8 == 0:
            s.clients = []
    for i in range(3, n, 19):  # free rows spread through the table
        found = table.by_id(i)
        assert found is not None
        table.remove(found)
    table.add(session(n + 1, "10.3.0.1"))  # takes the last freed row
    return table


def test_a_page_of_views_is_each_sessions_own_view_in_table_order() -> None:
    table = mixed_table(2000)
    walked = list(table)
    assert len(walked) == len(table) == 2000 - len(range(3, 2000, 19)) + 1
    for offset, limit in ((0, 1000), (500, 700), (1800, 1000), (len(table) - 1, 5), (len(table), 5), (0, None)):
        want = [s.view() for s in walked[offset : None if limit is None else offset + limit]]
        assert [s.view() for s in table.page(offset, limit)] == want
        assert table.page_views(offset, limit) == want  # the same values ...
        assert json.dumps(table.page_views(offset, limit)) == json.dumps(want)  # ... and the same JSON text


def test_a_page_reads_no_row_before_its_offset() -> None:
    """The last page at 500,000 sessions walked every row before it: this counts rows read."""
    plain = SessionTable()  # no free row: the offset is the row itself
    for i in range(1, 20_001):
        plain.add(session(i, ntop(0x0A400000 + i)))
    for table in (mixed_table(20_000), plain):
        offset = len(table) - 150
        want = [s.id for s in list(table)[offset : offset + 100]]
        assert len(want) == 100
        first, last = want[0], want[-1]
        rows = [r for r in range(len(table._columns["state"])) if table._columns["state"][r] != 255]
        span = rows[offset + 99] - rows[offset] + 1  # the page's rows and the free ones among them
        assert span < 120 and (table is plain) == (span == 100)
        count_state_reads(table)
        views = table.page_views(offset, 100)
        assert [s["id"] for s in views] == want and (views[0]["id"], views[-1]["id"]) == (first, last)
        assert CountedState.reads <= span + 100  # its span once, and each row's state for its view
        CountedState.reads = 0
        assert [s.id for s in table.page(offset, 100)] == want
        assert CountedState.reads <= span
