"""LabelAllocator: odd C2S / even S2C pairs, per-server blocks, hold-down, claim, exhaustion."""

from __future__ import annotations

import math
import random
import time
from collections import deque

import pytest

from orchestrator.core.labels import LabelAllocator, LabelStats, c2s_of, s2c_of


def test_pairs_are_odd_c2s_even_s2c_and_never_below_16():
    a = LabelAllocator(0, 40, hold_down=0)
    got = []
    while (c2s := a.allocate("s1", now=0)) is not None:
        got.append(c2s)
    assert got == list(range(17, 40, 2))  # (17,18) .. (39,40); 0-15 and 16 alone never used
    for c2s in got:
        assert c2s % 2 == 1 and s2c_of(c2s) == c2s + 1 and s2c_of(c2s) % 2 == 0
        assert c2s_of(c2s + 1) == c2s
    with pytest.raises(ValueError):
        s2c_of(1000)
    with pytest.raises(ValueError):
        s2c_of(15)
    with pytest.raises(ValueError):
        c2s_of(1001)


@pytest.mark.parametrize(
    "first,last,pairs",
    [
        (17, 20, [17, 19]),
        (17, 19, [17]),
        (18, 21, [19]),
        (16, 18, [17]),
        (1000, 1003, [1001]),
    ],
)
def test_pair_must_lie_wholly_in_range(first, last, pairs):
    a = LabelAllocator(first, last, hold_down=0)
    assert a.stats(0).total == len(pairs)
    assert [a.allocate("s", 0) for _ in pairs] == pairs
    assert a.allocate("s", 0) is None


@pytest.mark.parametrize("first,last", [(0, 16), (18, 18), (20, 10), (-1, 100), (16, 1 << 20)])
def test_bad_range(first, last):
    with pytest.raises(ValueError):
        LabelAllocator(first, last, hold_down=0)


def test_negative_hold_down_rejected():
    with pytest.raises(ValueError):
        LabelAllocator(16, 100, hold_down=-1)


def test_blocks_keep_each_server_in_its_own_block():
    a = LabelAllocator(1000, 1999, hold_down=0, blocks={"s1": (1000, 1010), "s2": (1100, 1199)})
    s1 = [a.allocate("s1", 0) for _ in range(5)]
    assert s1 == [1001, 1003, 1005, 1007, 1009]
    assert a.allocate("s1", 0) is None  # s1's block is exhausted ...
    assert a.allocate("s2", 0) == 1101  # ... s2's is not
    st = a.stats(0)
    assert st.blocks["s1"] == LabelStats(total=5, in_use=5, held_down=0, free=0)
    assert st.blocks["s2"] == LabelStats(total=49, in_use=1, held_down=0, free=48)  # 1101..1197
    assert (st.total, st.in_use, st.free) == (54, 6, 48)
    assert st.blocks["s1"].exhausted and not st.exhausted
    assert a.free("s1", now=0) == 0 and a.free("s2", now=0) == 48 and a.free(now=0) == 48
    assert a.owner(1003) == "s1" and a.owner(1101) == "s2" and a.owner(1103) is None
    assert dict(a.blocks) == {"s1": (1000, 1010), "s2": (1100, 1199)}
    assert a.c2s_range("s1") == (1001, 1009) and a.c2s_range("s2") == (1101, 1197)
    with pytest.raises(ValueError, match="name the server"):
        a.c2s_range()
    assert st.to_dict()["blocks"]["s1"] == {"total": 5, "in_use": 5, "held_down": 0, "free": 0}
    with pytest.raises(ValueError, match="s3"):
        a.allocate("s3", 0)
    with pytest.raises(ValueError, match="s3"):
        a.free("s3", now=0)


def test_overlapping_blocks_are_named():
    with pytest.raises(ValueError, match=r"'a' 1000-1099 and 'b' 1050-1200 overlap at 1050-1099"):
        LabelAllocator(1000, 1999, 0, blocks={"b": (1050, 1200), "a": (1000, 1099)})
    with pytest.raises(ValueError, match="overlap at 1010-1010"):
        LabelAllocator(1000, 1999, 0, blocks={"a": (1000, 1010), "b": (1010, 1020)})


@pytest.mark.parametrize("block", [(900, 1010), (1990, 2000), (1020, 1010), (1002, 1002)])
def test_blocks_outside_range_or_empty(block):
    with pytest.raises(ValueError, match="'x'"):
        LabelAllocator(1000, 1999, 0, blocks={"x": block})


def test_hold_down_boundary_is_exact():
    a = LabelAllocator(1001, 1002, hold_down=5.0)  # one pair
    assert a.allocate("s", now=0.0) == 1001
    a.release(1001, now=10.0)
    assert a.is_held_down(1001)
    just_before = math.nextafter(15.0, 0.0)
    assert a.allocate("s", now=just_before) is None
    assert a.free(now=just_before) == 0
    assert a.stats(just_before) == LabelStats(total=1, in_use=0, held_down=1, free=0)
    assert a.stats(15.0) == LabelStats(total=1, in_use=0, held_down=0, free=1)
    assert a.allocate("s", now=15.0) == 1001


def test_zero_hold_down_reuses_at_once():
    a = LabelAllocator(1001, 1002, hold_down=0)
    c = a.allocate("s", 1.0)
    a.release(c, 1.0)
    assert a.allocate("s", 1.0) == c


def test_released_pairs_are_reused_last():
    a = LabelAllocator(1001, 1010, hold_down=1)
    got = [a.allocate("s", 0) for _ in range(3)]  # 1001 1003 1005
    a.release(got[1], 0.0)
    a.release(got[0], 0.5)
    assert [a.allocate("s", 2) for _ in range(4)] == [1007, 1009, 1003, 1001]


def test_exhaustion_is_none_and_visible_in_stats():
    a = LabelAllocator(2001, 2010, hold_down=30)
    got = [a.allocate("s", 0) for _ in range(5)]
    assert None not in got
    assert a.allocate("s", 0) is None
    st = a.stats(0)
    assert st.exhausted and st == LabelStats(5, 5, 0, 0)
    a.release(got[2], now=1)
    assert a.allocate("s", 2) is None  # held down: still exhausted
    assert a.stats(2) == LabelStats(5, 4, 1, 0)
    assert a.allocate("s", 31) == got[2]


def test_claim_for_reconciliation():
    a = LabelAllocator(1000, 1099, hold_down=10, blocks={"s1": (1000, 1049), "s2": (1050, 1099)})
    assert a.claim(1003, "s1")
    assert not a.claim(1003, "s1")  # already in use
    assert not a.claim(1004, "s1")  # even: an S2C label
    assert not a.claim(1051, "s1")  # another server's block
    assert not a.claim(999, "s1") and not a.claim(2001, "s1")  # outside
    assert not a.claim(1049, "s1")  # its S2C 1050 is in s2's block
    assert not a.claim(1051, "nobody")
    assert a.owner(1003) == "s1"
    # allocation skips the claimed pair
    assert [a.allocate("s1", 0) for _ in range(3)] == [1001, 1005, 1007]
    # a claimed pair releases like an allocated one
    a.release(1003, now=0)
    assert a.stats(0).blocks["s1"] == LabelStats(24, 3, 1, 20)
    # claiming a held-down pair (the kernel says it is used) ends its hold-down for good
    assert a.claim(1003, "s1")
    assert a.stats(100).blocks["s1"] == LabelStats(24, 4, 0, 20)
    assert list(a.allocations()) == [(1001, "s1"), (1003, "s1"), (1005, "s1"), (1007, "s1")]
    # claiming a recycled free pair takes it out of the free list
    a.release(1005, now=0)
    assert a.free("s1", now=10) == 21
    assert a.claim(1005, "s1")
    seen = {a.allocate("s1", 10) for _ in range(20)}
    assert 1005 not in seen and None not in seen and a.allocate("s1", 10) is None


def test_claim_without_blocks():
    a = LabelAllocator(100, 199, hold_down=0)
    assert a.claim(151, "anyone") and a.claim(153, "other")
    assert not a.claim(99, "x") and not a.claim(199, "x") and not a.claim(15, "x")
    assert a.owner(153) == "other"
    assert a.c2s_range() == a.c2s_range("anyone") == (101, 197) and dict(a.blocks) == {}
    got = [a.allocate("s", 0) for _ in range(47)]  # 49 pairs 101..197, 2 claimed
    assert 151 not in got and 153 not in got and None not in got
    assert a.allocate("s", 0) is None


def test_release_errors():
    a = LabelAllocator(1000, 1099, hold_down=10)
    with pytest.raises(ValueError, match="1001 is not allocated"):
        a.release(1001, now=0)
    c = a.allocate("s", 0)
    a.release(c, now=1)
    with pytest.raises(ValueError, match="held down"):
        a.release(c, now=2)
    with pytest.raises(ValueError):
        a.release(c + 1, now=2)  # an S2C label is never allocated itself


def test_random_churn_matches_a_naive_model():
    """Seeded random allocate/release/claim against a brute-force model of the same rules."""
    rng = random.Random(20240601)
    blocks = {"a": (1000, 1039), "b": (1040, 1099)}
    a = LabelAllocator(1000, 1099, hold_down=3.0, blocks=blocks)
    owner: dict[int, str] = {}
    held: dict[int, float] = {}
    now = 0.0
    for _ in range(5000):
        now += rng.choice([0.0, 0.5, 1.0])
        server = rng.choice("ab")
        lo, hi = blocks[server]
        pairs = [c for c in range(lo + 1, hi, 2)]
        free = [c for c in pairs if c not in owner and (c not in held or held[c] <= now)]
        op = rng.random()
        if op < 0.5:
            c = a.allocate(server, now)
            if free:
                assert c in free
                owner[c] = server
                held.pop(c, None)
            else:
                assert c is None
        elif op < 0.9 and owner:
            c = rng.choice(sorted(owner))
            a.release(c, now)
            del owner[c]
            held[c] = now + 3.0
        else:
            c = rng.choice(pairs)
            ok = c not in owner
            assert a.claim(c, server) is ok
            if ok:
                owner[c] = server
                held.pop(c, None)
        st = a.stats(now)
        for name, (lo, hi) in blocks.items():
            mine = range(lo + 1, hi, 2)
            in_use = sum(1 for c in mine if c in owner)
            hd = sum(1 for c in mine if c not in owner and c in held and held[c] > now)
            assert st.blocks[name] == LabelStats(len(mine), in_use, hd, len(mine) - in_use - hd)
    assert dict(a.allocations()) == owner


def test_speed_50k_pairs_100k_alloc_release():
    a = LabelAllocator(16, 16 + 2 * 50_000 + 1, hold_down=1.0)
    assert a.stats(0).total == 50_000
    live: deque[int] = deque()
    t0 = time.perf_counter()
    now = 0.0
    for _ in range(100_000):
        now += 0.0001  # 20k live sessions, hold-down 1 s = 10k releases: a full mix of states
        c = a.allocate("s", now)
        assert c is not None
        live.append(c)
        if len(live) > 20_000:
            a.release(live.popleft(), now)
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    fill = LabelAllocator(16, 16 + 2 * 50_000 + 1, hold_down=0)
    got = [fill.allocate("s", 0) for _ in range(50_000)]
    assert fill.allocate("s", 0) is None and len(set(got)) == 50_000
    for c in got:
        fill.release(c, 1)
    assert fill.free(now=1) == 50_000
    elapsed_fill = time.perf_counter() - t1
    print(
        f"\nlabels: 100k allocate + 80k release with 50k pairs, hold-down active: "
        f"{elapsed:.3f}s; exhaust 50k + release 50k: {elapsed_fill:.3f}s"
    )


def test_a_pair_released_without_hold_down_is_free_at_once() -> None:
    """A session whose objects never reached the kernel had nothing in flight."""
    a = LabelAllocator(1001, 1006, hold_down=30)
    c2s = a.allocate("s1", now=0)
    a.release(c2s, now=0, hold_down=False)
    assert not a.is_held_down(c2s) and a.stats(0).free == 3
    assert [a.allocate("s1", now=0) for _ in range(3)] == [1003, 1005, c2s]


def test_hold_puts_a_free_pair_in_hold_down_from_now() -> None:
    """A restart found the pair's hold marker: held down again, its timer restarted."""
    a = LabelAllocator(1001, 1006, hold_down=30)
    assert a.hold(1003, now=100) and a.is_held_down(1003)
    assert a.stats(129.9).held_down == 1 and a.stats(130).held_down == 0
    assert not a.hold(1002, now=100) and not a.hold(2001, now=100)  # an S2C label, out of range
    c2s = a.allocate("s1", now=0)
    assert not a.hold(c2s, now=0)  # in use
    assert sorted(a.allocate("s1", now=101) for _ in range(1)) == [1005]  # never the held pair


def test_the_allocators_state_is_kept_per_pair_in_arrays_not_dict_entries() -> None:
    """Issue 15 (memory): generations and owners sit in arrays indexed by pair, which grow to the
    highest pair touched only; they read as the dicts they replaced."""
    from orchestrator.core.labels import _Owners, _Pairs

    pairs = _Pairs(1001, 1999)
    assert 1001 not in pairs and pairs.get(1001) is None and list(pairs) == []
    pairs[1001] = 1
    pairs[1201] = 7
    assert pairs[1201] == 7 and pairs.get(1002) is None and 1003 not in pairs
    assert list(pairs) == [1001, 1201]
    assert pairs.pop(1201) == 7 and pairs.pop(1201) is None and list(pairs) == [1001]
    with pytest.raises(ValueError):
        pairs[2001] = 1  # past the range
    with pytest.raises(ValueError):
        pairs[1002] = 1  # no C2S label
    owners = _Owners(1001, 1999)
    allocator = LabelAllocator(1001, 1999, 2.0)
    c2s = [allocator.allocate(s, 0.0) for s in ("s1", "s2", "s1")]
    assert [allocator.owner(c) for c in c2s] == ["s1", "s2", "s1"]
    assert list(allocator.allocations()) == [(c2s[0], "s1"), (c2s[1], "s2"), (c2s[2], "s1")]
    entry = ("s1", allocator._shared)
    owners[1001] = entry  # type: ignore[assignment]
    assert owners.get(1001) is entry and owners.pop(1001) is entry and owners.get(1001) is None
