"""Schedulers: rr, wrr (nginx smooth), lc, wlc, response-time, maglev, source-hash."""

from __future__ import annotations

from collections import Counter

import pytest

from orchestrator.core.schedulers import (
    Maglev,
    Scheduler,
    ServerState,
    key_hash,
    make_scheduler,
    register_scheduler,
    scheduler_names,
    smallest_prime_at_least,
)

ALL = ("rr", "wrr", "lc", "wlc", "response-time", "maglev", "source-hash")
KEYS = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]


def S(name, weight=1, sessions=0, rt=None, available=True) -> ServerState:
    return ServerState(name, weight, sessions, rt, available)


def picks(sched, servers, n, keys=None):
    return [sched.pick(keys[i] if keys else f"k{i}", servers) for i in range(n)]


def _prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


# -- registry ---------------------------------------------------------------------------------------


def test_registry():
    assert set(ALL) <= set(scheduler_names())
    for name in ALL:
        s = make_scheduler(name)
        assert isinstance(s, Scheduler) and s.name == name
    with pytest.raises(ValueError, match="unknown scheduler 'fastest'"):
        make_scheduler("fastest")
    with pytest.raises(ValueError):
        register_scheduler("rr", lambda: None)


@pytest.mark.parametrize("name", ALL)
def test_none_when_nothing_available(name):
    s = make_scheduler(name)
    assert s.pick("k", []) is None
    down = [S("a", available=False), S("b", available=False)]
    assert s.pick("k", down) is None
    # and it recovers when a server comes back
    assert s.pick("k", [S("a", available=False), S("b")]) == "b"


@pytest.mark.parametrize("name", ALL)
def test_deterministic_two_instances(name):
    servers = [S("s1", 3, 4, 0.020), S("s2", 1, 1, 0.010), S("s3", 2, 0, None), S("s4", 5, 9, 0.002)]
    a, b = make_scheduler(name), make_scheduler(name)
    assert picks(a, servers, 500, KEYS) == picks(b, servers, 500, KEYS)


def test_key_hash_is_stable_across_processes():
    # a pinned value: Python's hash() is salted per process; ours must never change
    assert key_hash("10.0.1.10") == key_hash(b"10.0.1.10") == 0x04BA53AAFC0A2975


# -- rr -----------------------------------------------------------------------------------------------


def test_rr_exact_rotation():
    rr = make_scheduler("rr")
    servers = [S("a"), S("b"), S("c")]
    assert picks(rr, servers, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_rr_skips_unavailable_and_keeps_order():
    rr = make_scheduler("rr")
    abc = [S("a"), S("b"), S("c")]
    b_down = [S("a"), S("b", available=False), S("c")]
    assert picks(rr, abc, 1) == ["a"]
    assert picks(rr, b_down, 4) == ["c", "a", "c", "a"]
    assert picks(rr, abc, 4) == ["b", "c", "a", "b"]  # b back in its place


def test_rr_removed_server_keeps_position():
    rr = make_scheduler("rr")
    assert picks(rr, [S("a"), S("b"), S("c"), S("d")], 2) == ["a", "b"]
    # b (last picked) leaves the configuration: c, now in b's slot, is next
    assert picks(rr, [S("a"), S("c"), S("d")], 4) == ["c", "d", "a", "c"]


# -- wrr ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights,cycle",
    [
        ((5, 1, 1), "aabacaa"),  # the sequence nginx documents for its smooth weighted round robin
        ((1, 1, 2), "cabc"),
        ((3, 2, 1), "abacba"),
        ((4, 3, 2, 1), "abcabdacba"),
        ((10, 10, 1), "ababababcabababababab"),
    ],
)
def test_wrr_nginx_sequence_and_exact_proportions(weights, cycle):
    servers = [S(n, w) for n, w in zip("abcd", weights)]
    wrr = make_scheduler("wrr")
    total = sum(weights)
    seq = picks(wrr, servers, total * 4)
    assert "".join(seq[:total]) == cycle
    for k in range(4):  # every cycle is the same, with exact proportions
        part = seq[k * total : (k + 1) * total]
        assert "".join(part) == cycle
        assert Counter(part) == {s.name: s.weight for s in servers}
    # smooth: at every prefix each server is within one pick of its exact share
    count = Counter()
    for k, name in enumerate(seq, 1):
        count[name] += 1
        for s in servers:
            assert abs(count[s.name] - k * s.weight / total) < 1


def test_wrr_1_1_2_never_repeats_within_a_cycle():
    # The heavy server c is spread out: c a b c. (Across cycle boundaries nginx does give c c:
    # the cycle ends and starts with c, which is still within one pick of its share.)
    seq = picks(make_scheduler("wrr"), [S("a", 1), S("b", 1), S("c", 2)], 4)
    assert all(x != y for x, y in zip(seq, seq[1:]))


def test_wrr_skips_unavailable_and_weight_zero():
    wrr = make_scheduler("wrr")
    servers = [S("a", 2), S("b", 1, available=False), S("c", 0), S("d", 1)]
    seq = picks(wrr, servers, 30)
    assert Counter(seq) == {"a": 20, "d": 10}


# -- lc / wlc -----------------------------------------------------------------------------------------


def test_lc_fewest_sessions_ties_by_order():
    lc = make_scheduler("lc")
    assert lc.pick("k", [S("a", sessions=5), S("b", sessions=2), S("c", sessions=2)]) == "b"
    assert lc.pick("k", [S("a", sessions=5), S("b", sessions=2, available=False), S("c", sessions=3)]) == "c"
    assert lc.pick("k", [S("a", 9, sessions=1), S("b", 1, sessions=0)]) == "b"  # weight ignored


def test_wlc_sessions_per_weight():
    wlc = make_scheduler("wlc")
    # 10/5 = 2 < 3/1 = 3
    assert wlc.pick("k", [S("a", 1, 3), S("b", 5, 10)]) == "b"
    # ties by order: 2/1 == 4/2
    assert wlc.pick("k", [S("a", 1, 2), S("b", 2, 4)]) == "a"
    assert wlc.pick("k", [S("b", 2, 4), S("a", 1, 2)]) == "b"
    # weight 0 excluded even when marked available (0 sessions would otherwise win)
    assert wlc.pick("k", [S("z", 0, 0), S("a", 1, 7)]) == "a"
    assert wlc.pick("k", [S("z", 0, 0)]) is None
    # all empty: first in order
    assert wlc.pick("k", [S("a", 1), S("b", 3)]) == "a"


def test_wlc_converges_to_weights():
    wlc = make_scheduler("wlc")
    weights = {"a": 1, "b": 2, "c": 5}
    sessions = Counter()
    for _ in range(800):
        name = wlc.pick("k", [S(n, w, sessions[n]) for n, w in weights.items()])
        sessions[name] += 1
    assert sessions == {"a": 100, "b": 200, "c": 500}


# -- response time ------------------------------------------------------------------------------------


def test_response_time():
    rt = make_scheduler("response-time")
    assert rt.pick("k", [S("a", rt=0.030), S("b", rt=0.010), S("c", rt=0.020)]) == "b"
    # unmeasured first (so they get measured), fewest sessions among them
    assert rt.pick("k", [S("a", rt=0.001), S("b", sessions=3), S("c", sessions=1)]) == "c"
    # ties broken by least connections, then order
    assert rt.pick("k", [S("a", sessions=4, rt=0.01), S("b", sessions=2, rt=0.01), S("c", sessions=2, rt=0.01)]) == "b"
    assert rt.pick("k", [S("a", rt=0.001, available=False), S("b", rt=0.5)]) == "b"


# -- source hash --------------------------------------------------------------------------------------


def test_source_hash_order_independent_and_spread():
    sh = make_scheduler("source-hash")
    servers = [S("s1"), S("s2"), S("s3")]
    first = picks(sh, servers, 3000, KEYS)
    assert picks(sh, list(reversed(servers)), 3000, KEYS) == first
    c = Counter(first)
    assert set(c) == {"s1", "s2", "s3"} and min(c.values()) > 900
    # only available servers take keys
    assert set(picks(sh, [S("s1"), S("s2", available=False), S("s3")], 1000, KEYS)) == {"s1", "s3"}


# -- maglev -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 37, 100])
def test_maglev_table_size_is_smallest_prime_at_least_100n(n):
    m = Maglev()
    assert m.rebuild([S(f"s{i}") for i in range(n)]) is None  # first build
    assert _prime(m.size) and m.size >= 100 * n and m.size >= 101
    assert not any(_prime(k) for k in range(max(101, 100 * n), m.size))
    assert len(m.table) == m.size


def test_smallest_prime():
    assert [smallest_prime_at_least(k) for k in (100, 101, 200, 500, 1000)] == [101, 101, 211, 503, 1009]


@pytest.mark.parametrize("weights", [(1, 1, 1, 1, 1), (1, 2, 3, 4, 5), (10, 1, 3)])
def test_maglev_distribution_follows_weights(weights):
    servers = [S(f"s{i}", w) for i, w in enumerate(weights)]
    m = make_scheduler("maglev")
    m.rebuild(servers)
    table_share = Counter(m.table)
    got = Counter(picks(m, servers, len(KEYS), KEYS))
    total = sum(weights)
    for s in servers:
        want = s.weight / total
        assert abs(got[s.name] / len(KEYS) / want - 1) < 0.05, (s, got)
        assert abs(table_share[s.name] / m.size / want - 1) < 0.02


def test_maglev_input_order_does_not_matter():
    servers = [S(f"s{i}", i + 1) for i in range(5)]
    a, b = Maglev(), Maglev()
    a.rebuild(servers)
    b.rebuild(list(reversed(servers)))
    assert a.table == b.table


def test_maglev_removing_one_of_five_moves_about_its_share():
    five = [S(f"s{i}") for i in range(5)]
    four = five[:2] + five[3:]
    m = Maglev()
    m.rebuild(five)
    before = picks(m, five, len(KEYS), KEYS)
    old_table = m.table
    moved_share = m.rebuild(four)
    assert m.size == len(old_table)  # M does not shrink, so slots stay comparable
    assert moved_share == sum(a != b for a, b in zip(old_table, m.table)) / m.size
    after = picks(m, four, len(KEYS), KEYS)
    share = 1 / 5
    moved = sum(x != y for x, y in zip(before, after)) / len(KEYS)
    assert share <= moved_share < 1.5 * share
    assert share * 0.95 < moved < 1.5 * share
    assert all(y != "s2" for y in after)
    print(f"\nmaglev: removing 1 of 5 moved {moved:.4f} of keys (table {moved_share:.4f}, share {share})")


def test_maglev_unavailable_server_spreads_without_moving_others():
    five = [S(f"s{i}") for i in range(5)]
    m = Maglev()
    before = picks(m, five, 50_000, KEYS)
    s2_down = [s if s.name != "s2" else S("s2", available=False) for s in five]
    during = picks(m, s2_down, 50_000, KEYS)
    for x, y in zip(before, during):
        assert y == x if x != "s2" else y != "s2"  # nobody else's key moves
    spread = Counter(y for x, y in zip(before, during) if x == "s2")
    assert len(spread) == 4 and min(spread.values()) > 0.15 * sum(spread.values())
    assert picks(m, five, 50_000, KEYS) == before  # back: everything returns


def test_maglev_weight_change_reports_table_diff():
    servers = [S(f"s{i}") for i in range(5)]
    m = Maglev()
    m.rebuild(servers)
    before = picks(m, servers, len(KEYS), KEYS)
    old_table = m.table
    heavier = [s if s.name != "s0" else S("s0", 3) for s in servers]
    moved_share = m.rebuild(heavier)
    diff = sum(a != b for a, b in zip(old_table, m.table)) / m.size
    assert moved_share == diff
    after = picks(m, heavier, len(KEYS), KEYS)
    moved = sum(x != y for x, y in zip(before, after)) / len(KEYS)
    assert abs(moved - moved_share) < 0.01
    # s0 goes from 1/5 to 3/7 of the space: at least that difference had to move
    assert moved_share >= 3 / 7 - 1 / 5
    assert m.rebuild(heavier) == 0.0  # no change, nothing moves


def test_maglev_size_change_share_matches_keys():
    one = [S("a")]
    m = Maglev()
    m.rebuild([S("a"), S("b")])
    before = picks(m, [S("a"), S("b")], len(KEYS), KEYS)
    three = [S("a"), S("b"), S("c"), S("d")]
    moved_share = m.rebuild(three)  # M 211 -> 401: slots are not comparable
    assert m.size == 401
    after = picks(m, three, len(KEYS), KEYS)
    moved = sum(x != y for x, y in zip(before, after)) / len(KEYS)
    assert abs(moved - moved_share) < 0.01
    assert m.rebuild(one) < 1 and m.size == 401  # shrinking keeps M


def test_maglev_capacity_fixes_the_table_across_restarts():
    # with capacity, the table depends only on the current servers: a restarted daemon that
    # starts with 4 servers builds exactly the table a long-running one has after losing one of 5
    five = [S(f"s{i}") for i in range(5)]
    running = make_scheduler("maglev", capacity=8)
    running.rebuild(five)
    running.rebuild(five[:4])
    restarted = make_scheduler("maglev", capacity=8)
    restarted.rebuild(five[:4])
    assert running.size == restarted.size == 809
    assert running.table == restarted.table
    with pytest.raises(ValueError):
        Maglev(capacity=-1)


def test_maglev_pick_rebuilds_on_its_own_and_weight_zero_is_out():
    m = Maglev()
    servers = [S("a"), S("b", 0), S("c")]
    assert m.pick("k", servers) in {"a", "c"}
    assert set(m.table) == {"a", "c"}
    assert m.pick("k", [S("b", 0)]) is None and m.table == ()
    assert m.rebuild([S("b", 0)]) == 0.0
    assert m.rebuild([S("a")]) == 1.0
    # an explicit rebuild for other servers, then a pick with the earlier list: back to it
    m.pick("k", servers)
    m.rebuild([S("x")])
    assert m.pick("k", servers) in {"a", "c"} and set(m.table) == {"a", "c"}
