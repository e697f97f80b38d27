"""Dividing a GPU's KV memory: floors, ceilings, demand, never overcommitted, hysteresis,
shrink before grow."""
import pytest

from kvrouter.control.kvplan import Change, Pool, divide

G = 1 << 30


def pool(model, limit, demand, used=0, floor=1 * G, ceiling=20 * G):
    return Pool(model, limit * G if limit < 1000 else limit, used * G, demand * G, floor,
                ceiling)


def limits(pools, changes):
    out = {p.model: p.limit for p in pools}
    out.update({c.model: c.new for c in changes})
    return out


def test_memory_follows_demand_and_never_overcommits():
    pools = [pool("a", 15, 2), pool("b", 15, 12)]
    got = limits(pools, divide(30 * G, pools))
    assert sum(got.values()) <= 30 * G
    assert got["b"] >= 12 * G and got["a"] >= 2 * G  # demand met for both
    assert got["b"] > got["a"]


def test_scarce_memory_is_shared_by_demand_above_the_floors():
    pools = [pool("a", 10, 30), pool("b", 10, 10)]
    got = limits(pools, divide(20 * G, pools))
    assert sum(got.values()) <= 20 * G
    assert got["a"] > got["b"] >= 1 * G
    # floors first: a model with no demand keeps its floor
    pools = [pool("a", 10, 0), pool("b", 10, 50)]
    got = limits(pools, divide(20 * G, pools))
    assert got["a"] == 1 * G and got["b"] == 19 * G


def test_ceilings_hold_and_spare_memory_is_spread_by_room():
    pools = [pool("a", 4, 1, ceiling=6 * G), pool("b", 4, 1, ceiling=30 * G)]
    got = limits(pools, divide(40 * G, pools))
    assert got["a"] == 6 * G and got["b"] <= 30 * G and sum(got.values()) <= 40 * G


def test_when_floors_do_not_fit_they_shrink_in_proportion():
    pools = [pool("a", 1, 5, floor=2 * G), pool("b", 1, 5, floor=6 * G)]
    got = limits(pools, divide(4 * G, pools))
    assert sum(got.values()) <= 4 * G and got["b"] == 3 * got["a"]


def test_hysteresis_skips_small_moves():
    pools = [pool("a", 10, 10), pool("b", 10, 10)]
    assert divide(20 * G, pools) == []
    almost = [pool("a", 10 * G + (10 << 20), 10), pool("b", 10 * G - (10 << 20), 10)]
    assert divide(20 * G, almost) == []  # 10 MiB apart: not worth a change


def test_a_small_move_is_made_when_skipping_it_would_overcommit():
    pools = [pool("a", 10 * G + (10 << 20), 10), pool("b", 10 * G, 10)]
    got = limits(pools, divide(20 * G, pools))
    assert sum(got.values()) <= 20 * G


def test_donors_shrink_before_receivers_grow():
    pools = [pool("a", 12, 1), pool("b", 4, 15), pool("c", 4, 3)]
    changes = divide(20 * G, pools)
    kinds = [c.shrink for c in changes]
    assert kinds == sorted(kinds, reverse=True)  # every shrink before every grow
    assert changes[0] == Change("a", 12 * G, changes[0].new) and changes[0].shrink
    assert any(c.model == "b" and not c.shrink for c in changes)


@pytest.mark.parametrize("available", [0, 1, 3 * G, 7 * G + 12345, 100 * G])
def test_never_more_than_available(available):
    pools = [pool(m, 5, d) for m, d in (("a", 9), ("b", 0), ("c", 40), ("d", 3))]
    got = limits(pools, divide(available, pools))
    assert sum(got.values()) <= available
    assert all(v >= 0 for v in got.values())
