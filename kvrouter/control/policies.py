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

from kvrouter.control.policy import Action, ModelView, Snapshot, decide, evictable, plan_room, sleep_candidate
from kvrouter.control.states import State


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


def ski_rental_threshold(gaps: Sequence[float], penalty: float) -> float:
    """The idle time after which sleeping costs least over these gaps, where a gap of g
    costs g (awake throughout) when g <= T, and T + ``penalty`` (awake T, then a wake)
    when it is longer: ski rental against the model's own gap distribution."""
    g = sorted(gaps)
    n = len(g)
    best_t, best_cost = 0.0, n * penalty          # sleep at once
    prefix = 0.0
    for i, x in enumerate(g):                     # T just above x: gaps up to x stay awake
        prefix += x
        cost = prefix + (n - i - 1) * (x + penalty)
        if cost < best_cost:
            best_t, best_cost = x, cost
    return best_t


def misses_per_wake(m: ModelView) -> float:
    """Requests a wake makes late: the one that starts it, and those that follow it within
    the wake time. Arrivals come in clumps (bursty traffic): with p the share of the
    model's recent inter-arrival gaps shorter than a wake, a clump continues past each
    arrival with probability p, so 1 / (1 - p) requests in all."""
    if not m.arrival_gaps:
        return 1.0
    p = sum(1 for g in m.arrival_gaps if g < m.wake_seconds) / len(m.arrival_gaps)
    return 1.0 / (1.0 - min(p, 0.95))


class Adaptive(Policy):
    """Ski rental with the model's learned idle-gap distribution, within a wake budget.

    Keeping an idle model awake costs its memory for as long as it idles; sleeping it costs
    a wake on the request path later: the request that wakes it and those arriving during
    the wake are late (``misses_per_wake``). A late request is priced in GB-seconds of idle
    memory, which turns a wake into idle seconds of this model (the ``penalty``); the
    threshold is the one that would have cost least over its recent gaps. The price follows
    the traffic: it is ``MISS_GB_SECONDS`` while the share of recent requests that waited for
    a wake is at ``WAKE_BUDGET``, and rises or falls in proportion as the share is above or
    below it, so sleep takes as much memory back as the budget allows and no more. Busy,
    costly-to-wake models stay up longer; rarely used big ones sleep soon after their usual
    gaps. The configured idle threshold stays the longest a model idles awake; with too
    little history (fewer than ``MIN_GAPS`` gaps) it applies as is.

    Under memory pressure (the busy models on a GPU want KV their kvcached pools cannot
    give) quiet idle models on that GPU sleep too, the most memory freed per late request
    first, until what they free covers the want.
    """

    name = "adaptive"
    summary = "ski rental on each model's idle gaps and wake cost, within a wake budget"
    MISS_GB_SECONDS = 500.0
    WAKE_BUDGET = 0.016         # share of waiting requests at which the price is MISS_GB_SECONDS
    MIN_GAPS = 8
    QUIET_SECONDS = 10.0
    QUIET_QUANTILE = 0.9

    def price(self, snap: Optional[Snapshot]) -> float:
        """GB-seconds one late request is worth now (see the class)."""
        if snap is None:
            return self.MISS_GB_SECONDS
        share = (snap.recent_wake_waits + 1) / (snap.recent_requests + 1 / self.WAKE_BUDGET)
        return self.MISS_GB_SECONDS * min(20.0, max(0.1, share / self.WAKE_BUDGET))

    def threshold(self, m: ModelView, price: Optional[float] = None) -> Optional[float]:
        if len(m.gaps) < self.MIN_GAPS:
            return m.idle_threshold
        cost = self.MISS_GB_SECONDS if price is None else price
        penalty = cost * misses_per_wake(m) / max(m.footprint_gb, 0.1)
        learned = ski_rental_threshold(m.gaps, penalty) * 1.05 + 2 * m.wake_seconds
        return min(learned, m.idle_threshold)

    def evict_order(self, m: ModelView) -> float:
        """Furthest predicted next request first: idle time past the model's threshold,
        in units of that threshold (a model well past its usual gaps went quiet)."""
        limit = self.threshold(m) or m.idle_threshold or 1.0
        return -m.idle_seconds / max(limit, 1e-3)

    def quiet(self, m: ModelView) -> bool:
        """Idle longer than nine in ten of its gaps (and twice its wake): likely between
        bursts rather than inside one."""
        usual = quantile(m.gaps, self.QUIET_QUANTILE) if len(m.gaps) >= self.MIN_GAPS \
            else self.QUIET_SECONDS
        return m.idle_seconds >= max(usual, 2 * m.wake_seconds)

    def decide(self, snap: Snapshot) -> List[Action]:
        price = self.price(snap)
        actions = decide(snap, lambda m: self.threshold(m, price), self.stop_after)
        if not snap.auto_sleep:
            return actions
        chosen = {a.model for a in actions}
        for gpu in sorted({g for m in snap.models for g in m.gpus}):
            here = [m for m in snap.models if gpu in m.gpus]
            wanted = sum(m.kv_wanted_gb / len(m.gpus) for m in here if m.state is State.READY)
            wanted -= sum(m.footprint_gb / len(m.gpus) for m in here if m.name in chosen)
            if wanted <= 0:
                continue
            # most memory freed per request its later wake delays first
            idle = sorted((m for m in here if m.name not in chosen and not m.pinned and
                           evictable(m) and self.quiet(m)),
                          key=lambda m: -m.footprint_gb / misses_per_wake(m))
            for m in idle:
                if wanted <= 0:
                    break
                actions.append(Action("sleep", m.name, m.level, f"GPU {gpu}: busier models "
                                      f"want {wanted:.1f} GB more KV"))
                chosen.add(m.name)
                wanted -= m.footprint_gb / len(m.gpus)
        return actions


POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls for cls in (Lru, Seed, Ttl, Ollama, Static, Adaptive)}


def get(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown sleep policy {name!r}; choose one of "
                       f"{', '.join(POLICIES)}") from None
