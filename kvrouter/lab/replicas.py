"""The lab's replicas: a model's engines, the routing policy that spreads its requests
(``control/routing.py``, the router's own objects, with a seeded random source), and each
engine's prefix cache (the simulated engine's model: whole blocks of the prompt kept
within the KV pool, least recently used out first; a hit skips that part of prefill).

A trace row may carry ``blocks`` (ids of its prompt's blocks in order, equal ids for equal
prefixes, as Mooncake's ``hash_ids``), ``block_tokens`` and ``session``; without blocks
no prefix is shared and the cache never hits.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

from kvrouter.config.schema import Config
from kvrouter.control import routing
from kvrouter.control.policy import wake_for_load
from kvrouter.control.routing import ReplicaLoad, RouteKey
from kvrouter.control.states import State, wake_order

EMPTY = RouteKey()


class PrefixCache:
    """Block ids an engine holds, least recently used first."""

    def __init__(self) -> None:
        self.blocks: "OrderedDict[int, None]" = OrderedDict()

    def hit(self, blocks: Sequence[int]) -> int:
        """Leading blocks held (they become the most recently used)."""
        n = 0
        for b in blocks:
            if b not in self.blocks:
                break
            self.blocks.move_to_end(b)
            n += 1
        return n

    def keep(self, blocks: Sequence[int], capacity: int) -> None:
        for b in blocks:
            self.blocks[b] = None
            self.blocks.move_to_end(b)
        while len(self.blocks) > max(0, capacity):
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()


def cached_tokens(cache: PrefixCache, blocks: Sequence[int], block_tokens: int,
                  prompt: int) -> int:
    """Prompt tokens a request finds cached (whole blocks, never its last token)."""
    if not blocks or prompt <= 1:
        return 0
    return min(cache.hit(blocks) * block_tokens, prompt - 1)


class LabGroup:
    """One model's engines (``Engine`` objects of ``world.py``) in config order."""

    def __init__(self, engines: Sequence, cfg: Config, seed: int = 0):
        self.engines = list(engines)
        first = self.engines[0].inst
        self.model = first.model
        self.min_ready = first.min_ready if first.min_ready is not None else \
            cfg.routing.min_ready
        self.wake_at = cfg.routing.wake_at_in_flight
        self.policy = routing.from_settings(first.routing_policy or cfg.routing.policy,
                                            cfg.routing)
        self.rng = random.Random(seed)

    def choose(self, session: Optional[str], blocks: Tuple[int, ...]):
        """The engine the router would send this request to, or None (none ready)."""
        engines = self.engines
        if len(engines) == 1:
            e = engines[0]
            return e if e.state is State.READY else None
        loads = [ReplicaLoad(i, e.in_flight, e.state is State.READY)
                 for i, e in enumerate(engines)]
        key = RouteKey(session, blocks) if self.policy.needs_key else EMPTY
        choice = self.policy.choose(loads, key, self.rng)
        if choice is None:
            return None
        self.policy.observe(choice, key)
        return engines[choice.replica]

    def waiting_on(self):
        """The engine a request waits for when none is ready (as the router's chooser)."""
        return min(self.engines, key=lambda e: (wake_order(e.state), self.engines.index(e)))

    def to_wake(self):
        """Elastic replicas: the engine to wake for load now, or None."""
        if len(self.engines) == 1:
            return None
        i = wake_for_load([e.state for e in self.engines], [e.in_flight for e in self.engines],
                          self.min_ready, self.wake_at)
        return None if i is None else self.engines[i]


def groups_of(engines: Sequence, cfg: Config, seed: int = 0) -> List[LabGroup]:
    by_model: "OrderedDict[str, list]" = OrderedDict()
    for e in engines:
        by_model.setdefault(e.inst.model, []).append(e)
    return [LabGroup(es, cfg, seed + i) for i, es in enumerate(by_model.values())]
