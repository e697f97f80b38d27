"""Routing among a model's replicas: which ready engine gets the next request.

Pure, like the sleep policies: standard library only, no clock, no randomness of its own
(the caller passes an ``Rng``: the router a ``random.Random``, the lab a seeded one), no
I/O. The router and the policy lab run these same objects.

A policy's input is cheap to build per request: one ``ReplicaLoad`` per replica (its
position in the group, requests in flight, whether it may be chosen, its weight) and a
``RouteKey`` (a session id, the prompt's block hashes) built only when ``needs_key``.
``choose`` changes nothing; ``observe`` (after a dispatch) updates the policy's own memory
(a cursor, a prefix tree); ``forget`` drops what it knew of a replica.

| policy | rule |
|---|---|
| round_robin | the next routable replica after the last one chosen |
| least_outstanding | the fewest requests in flight per unit of weight; lowest position on ties |
| power_of_two | two distinct routable replicas drawn at random: the less loaded |
| session | rendezvous hash of the session over the routable replicas, skipping any above
  ceil(1.25 x mean load) (bounded load); no session: least_outstanding |
| cache_aware | when the group is imbalanced (max - min > 64 and max > 1.5 x min): the least
  loaded; else the replica holding the longest prefix of the prompt if it matches more than
  30% of its blocks; else the least loaded (SGLang's gateway's defaults) |
"""
from __future__ import annotations

import hashlib
import math
from typing import (
    ClassVar,
    Dict,
    FrozenSet,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Type,
)

from kvrouter.control.prefix import PrefixTree


class Rng(Protocol):
    def randrange(self, start: int, stop: Optional[int] = ..., step: int = ...) -> int: ...
    def random(self) -> float: ...


class ReplicaLoad(NamedTuple):
    replica: int                # its position in the group (stable across reloads)
    in_flight: int              # requests sent to it and not finished
    routable: bool = True       # READY, and its breaker lets traffic through
    weight: float = 1.0         # relative capacity


class RouteKey(NamedTuple):
    session: Optional[str] = None      # x-session-id header, or the body's "user"
    blocks: Tuple[int, ...] = ()       # hashes of the prompt in fixed chunks, in order


class Choice(NamedTuple):
    replica: int
    reason: str


def _load(r: ReplicaLoad) -> float:
    return r.in_flight / (r.weight or 1.0)


def _candidates(replicas: Sequence[ReplicaLoad], exclude: FrozenSet[int]):
    return [r for r in replicas if r.routable and r.replica not in exclude]


def least_loaded(replicas: Sequence[ReplicaLoad],
                 exclude: FrozenSet[int] = frozenset()) -> Optional[ReplicaLoad]:
    found = _candidates(replicas, exclude)
    return min(found, key=lambda r: (_load(r), r.replica)) if found else None


class RoutingPolicy:
    name: ClassVar[str] = ""
    needs_key: ClassVar[bool] = False

    def choose(self, replicas: Sequence[ReplicaLoad], key: RouteKey, rng: Rng,
               exclude: FrozenSet[int] = frozenset()) -> Optional[Choice]:
        raise NotImplementedError

    def observe(self, choice: Choice, key: RouteKey) -> None:
        """A request was sent where ``choice`` said."""

    def forget(self, replica: int) -> None:
        """Replica ``replica`` is gone (or lost its cache)."""


class LeastOutstanding(RoutingPolicy):
    name = "least_outstanding"

    def choose(self, replicas, key, rng, exclude=frozenset()):
        best = least_loaded(replicas, exclude)
        return Choice(best.replica, f"least {best.in_flight}") if best else None


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self.last = -1

    def choose(self, replicas, key, rng, exclude=frozenset()):
        found = sorted(_candidates(replicas, exclude), key=lambda r: r.replica)
        if not found:
            return None
        after = [r for r in found if r.replica > self.last]
        pick = after[0] if after else found[0]
        return Choice(pick.replica, "next")

    def observe(self, choice, key):
        self.last = choice.replica


class PowerOfTwo(RoutingPolicy):
    name = "power_of_two"

    def choose(self, replicas, key, rng, exclude=frozenset()):
        found = _candidates(replicas, exclude)
        if len(found) <= 1:
            return Choice(found[0].replica, "only one") if found else None
        i = rng.randrange(len(found))
        j = rng.randrange(len(found) - 1)
        a, b = found[i], found[j if j < i else j + 1]
        pick = a if (_load(a), a.replica) <= (_load(b), b.replica) else b
        return Choice(pick.replica, f"p2c {a.in_flight}/{b.in_flight}")


def _score(session: str, replica: int) -> int:
    digest = hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Session(RoutingPolicy):
    """A session stays on one replica (rendezvous hashing: removing a replica moves only its
    own sessions) until that replica carries more than ``bound`` x the mean load."""

    name = "session"
    needs_key = True

    def __init__(self, bound: float = 1.25):
        self.bound = bound

    def choose(self, replicas, key, rng, exclude=frozenset()):
        found = _candidates(replicas, exclude)
        if not found:
            return None
        if not key.session:
            best = least_loaded(found)
            return Choice(best.replica, "no session: least") if best else None
        total = sum(r.in_flight for r in found) + 1   # with this request
        cap = math.ceil(self.bound * total / len(found))
        ranked = sorted(found, key=lambda r: _score(key.session or "", r.replica), reverse=True)
        for rank, r in enumerate(ranked):
            if r.in_flight + 1 <= cap:
                return Choice(r.replica, "session" if rank == 0 else f"session, moved {rank}")
        return Choice(ranked[0].replica, "session")


class CacheAware(RoutingPolicy):
    name = "cache_aware"
    needs_key = True

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, max_tree_blocks: int = 1 << 16):
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_blocks = max_tree_blocks
        self.tree = PrefixTree()

    def choose(self, replicas, key, rng, exclude=frozenset()):
        found = _candidates(replicas, exclude)
        if not found:
            return None
        loads = [r.in_flight for r in found]
        hi, lo = max(loads), min(loads)
        least = least_loaded(found)
        assert least is not None
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            return Choice(least.replica, f"imbalanced {hi}/{lo}: least")
        if key.blocks:
            allowed = {r.replica for r in found}
            matched = {i: n for i, n in self.tree.matched_by(key.blocks).items()
                       if i in allowed}
            if matched:
                best = max(matched, key=lambda i: (matched[i], -i))
                share = matched[best] / len(key.blocks)
                if share > self.cache_threshold:
                    return Choice(best, f"prefix {share:.2f}")
        # a miss: the least loaded, the first on a tie (packing: at low load the last
        # replicas stay idle, and the sleep policy can put them away; measured as good for
        # the cache as spreading misses to the replica caching least, on Mooncake's trace)
        return Choice(least.replica, "least")

    def observe(self, choice, key):
        if key.blocks:
            self.tree.insert(key.blocks, choice.replica)
            if self.tree.sizes.get(choice.replica, 0) > self.max_tree_blocks * 1.25:
                self.tree.evict(self.max_tree_blocks)   # amortised: a quarter at a time

    def forget(self, replica):
        self.tree.remove(replica)


ROUTING: Dict[str, Type[RoutingPolicy]] = {p.name: p for p in (
    LeastOutstanding, RoundRobin, PowerOfTwo, Session, CacheAware)}


def from_settings(name: str, settings) -> RoutingPolicy:
    """A fresh policy ``name`` with the thresholds of ``settings`` (a RoutingConfig)."""
    if name == "cache_aware":
        return CacheAware(settings.cache_threshold, settings.balance_abs_threshold,
                          settings.balance_rel_threshold, settings.max_tree_blocks)
    return get(name)


def get(name: str) -> RoutingPolicy:
    """A fresh policy object by name (each model's replicas get their own)."""
    try:
        return ROUTING[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from "
                         f"{', '.join(ROUTING)}") from None
