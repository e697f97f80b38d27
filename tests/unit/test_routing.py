"""Routing among a model's replicas (control/routing.py): exact picks under a seeded
random source, and invariants over many seeds rather than counts over a few draws."""
import random

import pytest

from kvrouter.control import routing
from kvrouter.control.routing import Choice, ReplicaLoad, RouteKey


def replica(i, load=0, routable=True, weight=1.0):
    return ReplicaLoad(i, load, routable, weight)


def key(session=None, blocks=()):
    return RouteKey(session, tuple(blocks))


def test_least_outstanding_picks_the_fewest_per_weight_lowest_index_on_ties():
    p = routing.get("least_outstanding")
    rng = random.Random(0)
    assert p.choose([replica(0, 3), replica(1, 1), replica(2, 1)], key(), rng).replica == 1
    assert p.choose([replica(0, 4, weight=2), replica(1, 3)], key(), rng).replica == 0
    assert p.choose([replica(0, 0, routable=False), replica(1, 9)], key(), rng).replica == 1
    assert p.choose([replica(0, 0, routable=False)], key(), rng) is None
    assert p.choose([replica(0), replica(1)], key(), rng, exclude=frozenset({0})).replica == 1


def test_round_robin_goes_round_the_routable_ones():
    p = routing.get("round_robin")
    group = [replica(0), replica(1, routable=False), replica(2)]
    picks = []
    for _ in range(4):
        c = p.choose(group, key(), random.Random(0))
        p.observe(c, key())
        picks.append(c.replica)
    assert picks == [0, 2, 0, 2]


def test_power_of_two_never_picks_the_busier_of_its_two():
    p = routing.get("power_of_two")
    for seed in range(200):
        loads = random.Random(seed).sample(range(100), 5)
        group = [replica(i, load) for i, load in enumerate(loads)]
        rng = random.Random(seed)
        c = p.choose(group, key(), rng)
        rng2 = random.Random(seed)   # the two it drew
        i = rng2.randrange(5)
        j = rng2.randrange(4)
        a, b = group[i], group[j if j < i else j + 1]
        assert c.replica in (a.replica, b.replica) and loads[c.replica] == min(a.in_flight, b.in_flight)
    assert p.choose([replica(0, 5)], key(), random.Random(0)) == Choice(0, "only one")


def test_session_keeps_a_session_on_one_replica_until_it_passes_the_bound():
    p = routing.get("session")
    group = [replica(i, 2) for i in range(4)]
    home = p.choose(group, key("alice"), random.Random(0)).replica
    for seed in range(20):   # the same answer whatever the random source
        assert p.choose(group, key("alice"), random.Random(seed)).replica == home
    # sessions spread over the replicas
    homes = {p.choose(group, key(f"user{i}"), random.Random(0)).replica for i in range(64)}
    assert homes == {0, 1, 2, 3}
    # its home overloaded past ceil(1.25 x mean): the next one in its ranking, not the least
    loaded = [replica(i, 30 if i == home else 2) for i in range(4)]
    moved = p.choose(loaded, key("alice"), random.Random(0))
    assert moved.replica != home and "moved" in moved.reason
    # removing another replica leaves this session where it was (rendezvous hashing)
    other = next(i for i in range(4) if i != home)
    rest = [r for r in group if r.replica != other]
    assert p.choose(rest, key("alice"), random.Random(0)).replica == home
    # no session: least outstanding
    assert p.choose([replica(0, 5), replica(1, 1)], key(), random.Random(0)).replica == 1


def test_cache_aware_follows_the_prefix_and_balances_when_imbalanced():
    p = routing.get("cache_aware")
    rng = random.Random(0)
    group = [replica(0, 3), replica(1, 1)]
    convo = key(blocks=range(10))
    first = p.choose(group, convo, rng)
    assert first.replica == 1 and first.reason == "least"
    p.observe(first, convo)
    # the next turn shares the first 10 blocks: it goes where they are, though busier now
    busy = [replica(0, 1), replica(1, 3)]
    again = p.choose(busy, key(blocks=list(range(10)) + [77, 78]), rng)
    assert again.replica == 1 and again.reason.startswith("prefix")
    # too little in common (<= 30%): least loaded
    assert p.choose(busy, key(blocks=[0, 1, 2] + list(range(100, 107))), rng).replica == 0
    # imbalanced (max - min > 64 and max > 1.5 x min): least loaded whatever the prefix
    skewed = [replica(0, 10), replica(1, 100)]
    c = p.choose(skewed, convo, rng)
    assert c.replica == 0 and c.reason.startswith("imbalanced")
    # an excluded or unroutable holder is not chosen for its prefix
    assert p.choose(busy, convo, rng, exclude=frozenset({1})).replica == 0
    p.forget(1)
    assert p.choose(busy, convo, rng).reason == "least"


def test_choose_changes_nothing():
    for name in routing.ROUTING:
        p = routing.get(name)
        group = [replica(0, 1), replica(1, 2), replica(2, 0)]
        k = key("s", range(5))
        picks = {p.choose(group, k, random.Random(3)) for _ in range(5)}
        assert len(picks) == 1, name


def test_an_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="choose from least_outstanding, round_robin"):
        routing.get("random")
