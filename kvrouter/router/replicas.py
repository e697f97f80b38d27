"""Choosing one of a model's replicas for a request, and trusting them less when they fail.

The policy (``control/routing.py``, pure) picks among the replicas that are ready and not
ejected; this module builds its input from what the router knows (the gate's view of each
replica's state and load), applies its breaker decisions (``control/ejection.py``) and says
which replica a request waits on when none is ready. A model with one engine never reaches
the policy: one code path, no extra work.
"""
from __future__ import annotations

import logging
from typing import Callable, FrozenSet, List, Optional

from kvrouter.control.ejection import Breaker
from kvrouter.control.entry import ModelEntry, ModelGroup
from kvrouter.control.routing import ReplicaLoad, RouteKey
from kvrouter.control.states import wake_order

log = logging.getLogger("kvrouter.replicas")


class Chooser:
    """``ready(entry)`` and ``load(entry)`` come from the gate (the controller in the owner,
    the shared memory in a worker); ``on_breaker(group, entry, old, new, why)`` is told of
    every breaker move (the event log)."""

    def __init__(self, ready: Callable[[ModelEntry], bool], load: Callable[[ModelEntry], int],
                 clock: Callable[[], float], on_breaker: Optional[Callable] = None):
        self.ready = ready
        self.load = load
        self.clock = clock
        self.on_breaker = on_breaker

    def routable(self, group: ModelGroup, entry: ModelEntry) -> bool:
        """Ready, and its breaker lets a request through."""
        return self._routable(group, entry, self.clock())

    def _routable(self, group: ModelGroup, entry: ModelEntry, now: float) -> bool:
        if not self.ready(entry):
            return False
        ej = group.ejections.get(entry.name)
        if ej is None or ej.breaker is Breaker.CLOSED:
            return True
        if ej.due(now):   # its time out is over: the next request tries it
            self._set(group, entry, ej.half_open(), "ejection over: trying it again")
            return True
        return ej.breaker is Breaker.HALF_OPEN

    def pick(self, group: ModelGroup, key: RouteKey,
             exclude: FrozenSet[str] = frozenset()) -> Optional[ModelEntry]:
        """The replica the policy chooses among the routable ones, or None."""
        entries = group.entries
        if len(entries) == 1:
            e = entries[0]
            return e if e.name not in exclude and self.ready(e) else None
        now = self.clock()
        loads = [ReplicaLoad(i, self.load(e), self._routable(group, e, now))
                 for i, e in enumerate(entries)]
        skip = frozenset(i for i, e in enumerate(entries) if e.name in exclude)
        choice = group.policy.choose(loads, key, group.rng, skip)
        if choice is None:
            return None
        group.policy.observe(choice, key)
        return entries[choice.replica]

    def waiting_on(self, group: ModelGroup, exclude: FrozenSet[str] = frozenset()) -> ModelEntry:
        """The replica a request waits on when none is routable: one already on its way
        back first, then one asleep (the first in config order)."""
        order = [e for e in group.entries if e.name not in exclude] or group.entries
        return min(order, key=lambda e: (wake_order(e.state), group.entries.index(e)))

    def ejected(self, group: ModelGroup) -> Optional[str]:
        """Why no replica may be tried although some are ready (every ready one ejected),
        else None."""
        ready = [e for e in group.entries if self.ready(e)]
        if not ready or len(group.entries) == 1:
            return None
        now = self.clock()
        if any(self._routable(group, e, now) for e in ready):
            return None
        return "; ".join(f"{e.name} ejected after {group.ejections[e.name].failures} "
                         f"failures, tried again in "
                         f"{max(0.0, group.ejections[e.name].open_until - now):.0f}s"
                         for e in ready)

    def outcome(self, group: ModelGroup, entry: ModelEntry, ok: bool, why: str = "") -> None:
        """What a request sent to ``entry`` got before any byte reached its client."""
        if len(group.entries) == 1:
            return
        ej = group.ejections.get(entry.name)
        if ej is None:
            return
        new = ej.record(ok, self.clock(), group.ejection_cfg, group.rng)
        if new.breaker is not ej.breaker:
            reason = why if not ok else "a request passed"
            if new.breaker is Breaker.OPEN:
                reason = f"{new.failures} failures in a row ({why}): ejected for " \
                    f"{new.open_until - self.clock():.0f}s"
            self._set(group, entry, new, reason)
        else:
            group.ejections[entry.name] = new

    def _set(self, group: ModelGroup, entry: ModelEntry, new, reason: str) -> None:
        old = group.ejections[entry.name]
        group.ejections[entry.name] = new
        level = logging.WARNING if new.breaker is Breaker.OPEN else logging.INFO
        log.log(level, "%s (replica of %s): breaker %s -> %s: %s", entry.name, group.model,
                old.breaker.value, new.breaker.value, reason)
        if self.on_breaker is not None:
            self.on_breaker(group, entry, old.breaker, new.breaker, reason)


def breakers(group: ModelGroup) -> List[dict]:
    """Each replica's breaker, for the views."""
    return [{"replica": e.name, "breaker": group.ejections[e.name].breaker.value,
             "failures": group.ejections[e.name].failures,
             "ejections": group.ejections[e.name].ejections} for e in group.entries]
