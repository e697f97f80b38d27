"""The named sleep policies (``sleep_manager.policy``): pure, no clock, no I/O.

The live controller and ``kvrouter simulate`` call the same objects: ``decide`` every
``interval`` seconds, ``plan_room`` before a wake. Each is a set of rules over
``policy.decide`` and ``policy.plan_room``:

- ``lru`` (default): sleep after the configured idle threshold; evict the least recently
  used idle model when a wake needs room.
- ``seed``: the seed's timer: idle 300 s, checked every 60 s (LRU eviction under budgets,
  which the seed did not have: without it a wake that needs room would fail).
- ``ttl``: llama-swap: unload (sleep, then stop the process) once the model has had no
  request for its TTL (the idle threshold), checked every second.
- ``ollama``: keep-alive 5 minutes then unload; at most 3 models loaded per GPU; the one
  with the shortest keep-alive left (the least recently used) goes first.
- ``static``: nothing sleeps: every model resident, GPU memory split evenly among them.
- ``adaptive``: ski rental over each model's own idle-gap history: sleep once the idle
  time is past both what the model's requests normally leave between them and K times
  its wake cost, capped by the configured threshold; evict the model whose next request
  is predicted furthest away.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Sequence, Type

from kvrouter.control.policy import Action, ModelView, Snapshot, decide, plan_room, sleep_candidate


class Policy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    elastic_kv: ClassVar[bool] = True    # False: each model keeps an even share (static)
    max_resident: ClassVar[Optional[int]] = None   # models loaded per GPU at most

    def interval(self, configured: float) -> float:
        """Seconds between two ``decide`` calls."""
        return configured

    def threshold(self, m: ModelView) -> Optional[float]:
        """Idle seconds before ``m`` sleeps (None: never)."""
        return m.idle_threshold

    def stop_after(self, m: ModelView) -> Optional[float]:
        """Seconds asleep before ``m``'s process is stopped (None: never)."""
        return m.stop_after

    def evict_order(self, m: ModelView) -> float:
        """Lowest first when a wake needs room."""
        return m.last_used

    def candidate(self, m: ModelView) -> bool:
        return sleep_candidate(m, self.threshold)

    def decide(self, snap: Snapshot) -> List[Action]:
        return decide(snap, self.threshold, self.stop_after)

    def plan_room(self, snap: Snapshot, target: str) -> List[Action]:
        return plan_room(snap, target, self.evict_order, self.max_resident)


class Lru(Policy):
    name = "lru"
    summary = "idle threshold from the config, least recently used evicted first"


class Seed(Policy):
    name = "seed"
    summary = "the seed's timer: idle 300 s, checked every 60 s"

    def interval(self, configured: float) -> float:
        return 60.0

    def threshold(self, m: ModelView) -> Optional[float]:
        return 300.0


class Unload(Policy):
    """Unloading tools (llama-swap, Ollama): an idle model's process goes away."""

    def interval(self, configured: float) -> float:
        return min(configured, 1.0)

    def stop_after(self, m: ModelView) -> Optional[float]:
        return 0.0


class Ttl(Unload):
    name = "ttl"
    summary = "llama-swap: unload after the TTL (idle threshold) since the last request"


class Ollama(Unload):
    name = "ollama"
    summary = "Ollama: keep-alive 5 min, at most 3 loaded per GPU"
    max_resident = 3

    def threshold(self, m: ModelView) -> Optional[float]:
        return 300.0


class Static(Policy):
    name = "static"
    summary = "static partitioning: every model resident, memory split evenly"
    elastic_kv = False

    def threshold(self, m: ModelView) -> Optional[float]:
        return None

    def stop_after(self, m: ModelView) -> Optional[float]:
        return None


def quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


class Adaptive(Policy):
    """Ski rental with a learned idle-gap distribution.

    Keeping a model awake costs memory for as long as it idles; a sleep costs a wake on the
    request path later (its TTFT, and that of the requests that arrive meanwhile). A gap
    longer than the model's usual ones (``GAP_FACTOR`` x its ``QUANTILE`` gap) says it went
    quiet; ``K`` x its wake cost keeps cheap-to-keep, costly-to-wake models up longer. The
    configured idle threshold stays the longest a model idles awake. With too little history
    (fewer than ``MIN_GAPS`` gaps) the configured threshold applies.
    """

    name = "adaptive"
    summary = "ski rental on each model's idle-gap history and wake cost"
    K = 20.0
    QUANTILE = 0.95
    GAP_FACTOR = 2.0
    MIN_GAPS = 8

    def threshold(self, m: ModelView) -> Optional[float]:
        if len(m.gaps) < self.MIN_GAPS:
            return m.idle_threshold
        learned = max(self.GAP_FACTOR * quantile(m.gaps, self.QUANTILE), self.K * m.wake_seconds)
        return min(learned, m.idle_threshold)

    def evict_order(self, m: ModelView) -> float:
        """Furthest predicted next request first: idle time past the model's threshold,
        in units of that threshold (a model well past its usual gaps went quiet)."""
        limit = self.threshold(m) or m.idle_threshold or 1.0
        return -m.idle_seconds / max(limit, 1e-3)


POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls for cls in (Lru, Seed, Ttl, Ollama, Static, Adaptive)}


def get(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown sleep policy {name!r}; choose one of "
                       f"{', '.join(POLICIES)}") from None
