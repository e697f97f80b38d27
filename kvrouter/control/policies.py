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
- ``ollama``: keep-alive 5 minutes then unload; at most 3 models loaded per GPU in all
  (``OLLAMA_MAX_LOADED_MODELS``' default: 3 x GPUs); the one with the shortest keep-alive
  left (the least recently used) goes first; while no loaded model is idle a request
  queues (``OLLAMA_MAX_QUEUE``) rather than fail.
- ``static``: nothing sleeps: every model resident, GPU memory split evenly among them.
- ``static-sized``: nothing sleeps; each GPU's KV memory split in proportion to each
  model's expected KV occupancy (the policy lab sizes it from the trace's first part).
- ``adaptive``: ski rental over each model's own idle-gap history: sleep once the idle
  time is past both what the model's requests normally leave between them and K times
  its wake cost, capped by the configured threshold; evict the model whose next request
  is predicted furthest away.
- ``slo``: sleeps as much as an SLO attainment target allows: the share of requests that
  may wait for a wake is 85% of the target's error budget; every model's idle threshold is
  the one that costs least memory for the late requests it causes (ski rental), all at
  one price per late request, the price chosen so that the predicted share meets the
  budget, and corrected by the share measured over the last 10 minutes.

A policy name may carry its parameter: ``lru:30`` and ``ttl:30`` (idle threshold, seconds),
``slo:0.995`` (attainment target).
"""
from __future__ import annotations

import math
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from kvrouter.control.names import policy_param_problem
from kvrouter.control.policy import Action, ModelView, Snapshot, decide, evictable, plan_room, sleep_candidate
from kvrouter.control.states import State


class Policy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    elastic_kv: ClassVar[bool] = True    # False: each model keeps a fixed share (static)
    sizing: ClassVar[str] = "even"       # static shares: "even", or "load" (static-sized)
    queue_when_full: ClassVar[bool] = False   # no room for a wake: wait (True) or refuse
    unloads: ClassVar[bool] = False      # a model not loaded has no process (Ollama, llama-swap)

    def __init__(self, param: Optional[float] = None, label: str = ""):
        self.param = param
        self.label = label or self.name   # as named in the config (with its parameter)

    def max_loaded(self, snap: Snapshot) -> Optional[int]:
        """Models resident at most, all GPUs together (None: no limit)."""
        return None

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
        return plan_room(snap, target, self.evict_order, self.max_loaded(snap))


class Lru(Policy):
    name = "lru"
    summary = "idle threshold from the config (lru:T: T seconds), least recently used " \
        "evicted first"

    def threshold(self, m: ModelView) -> Optional[float]:
        return m.idle_threshold if self.param is None else self.param


class Seed(Policy):
    name = "seed"
    summary = "the seed's timer: idle 300 s, checked every 60 s"

    def interval(self, configured: float) -> float:
        return 60.0

    def threshold(self, m: ModelView) -> Optional[float]:
        return 300.0


class Unload(Policy):
    """Unloading tools (llama-swap, Ollama): an idle model's process goes away."""

    unloads = True

    def interval(self, configured: float) -> float:
        return min(configured, 1.0)

    def stop_after(self, m: ModelView) -> Optional[float]:
        return 0.0


class Ttl(Unload):
    name = "ttl"
    summary = "llama-swap: unload after the TTL (idle threshold; ttl:T) since the last request"

    def threshold(self, m: ModelView) -> Optional[float]:
        return m.idle_threshold if self.param is None else self.param


class Ollama(Unload):
    name = "ollama"
    summary = "Ollama: keep-alive 5 min, at most 3 x GPUs loaded, requests queue when full"
    PER_GPU = 3
    queue_when_full = True

    def threshold(self, m: ModelView) -> Optional[float]:
        return 300.0

    def max_loaded(self, snap: Snapshot) -> Optional[int]:
        gpus = set(snap.gpu_budget_gb) | {g for m in snap.models for g in m.gpus}
        return self.PER_GPU * max(1, len(gpus))


class Static(Policy):
    name = "static"
    summary = "static partitioning: every model resident, memory split evenly"
    elastic_kv = False

    def threshold(self, m: ModelView) -> Optional[float]:
        return None

    def stop_after(self, m: ModelView) -> Optional[float]:
        return None


class StaticSized(Static):
    name = "static-sized"
    summary = "static partitioning: every model resident, KV split by expected load"
    sizing = "load"


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


def late_share(m: ModelView, wait: float) -> float:
    """The chance that a request of ``m`` that waits ``wait`` seconds for a wake misses its
    TTFT SLO: the share of its recent TTFTs as served that the wait would push past the
    SLO, with one more on each side (Laplace: a few samples on time do not make a wake
    free). No SLO, or a wait longer than it: 1."""
    slo = m.ttft_slo
    if slo is None or wait > slo:
        return 1.0
    over = sum(1 for x in m.ttfts if x > slo - wait)
    return (over + 1.0) / (len(m.ttfts) + 2.0)


def late_per_wake(m: ModelView) -> float:
    """Requests a wake makes late, counted on the model's recent arrivals: the one that
    starts it, and on average as many as followed an arrival within the wake time (clumped
    arrivals count as clumped, Poisson ones as rate x wake time). With a TTFT SLO, times
    the chance that the whole wake pushes the first request past it (those that follow
    wait less, but arrive together at an engine just woken)."""
    w = m.wake_seconds
    share = late_share(m, w)
    gaps = m.arrival_gaps
    if not gaps:
        return share
    follow = 0
    for i in range(len(gaps)):
        t = 0.0
        for g in gaps[i:]:
            t += g
            if t > w:
                break
            follow += 1
    return share * (1.0 + follow / len(gaps))


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
        return self.relieve(snap, decide(snap, lambda m: self.threshold(m, price),
                                         self.stop_after))

    def relieve(self, snap: Snapshot, actions: List[Action]) -> List[Action]:
        """``actions``, and sleeps of quiet models on GPUs where busier ones want KV."""
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


class Slo(Adaptive):
    """Sleep as much as an attainment target allows, and no more.

    A late request is one that waits for a wake and, where the model states its TTFT SLO
    (``ttft_slo_ms``), misses it for that wait (a wake shorter than the SLO's slack makes
    few requests late, so such a model sleeps sooner; a wake longer than the SLO makes all
    its waiters late, as without one). The share of requests that may be late is
    ``WAKE_SHARE`` of the target's error budget (1 - target); the rest is left for what sleep
    does not cause (queues, long prompts). For each model, a threshold T costs memory while
    it idles up to T in each of its recent idle gaps, and makes late the requests that end a
    gap longer than T (``late_per_wake`` of them a wake: those that arrive within the wake
    time, counted on its recent arrivals). Below the configured threshold each T is charged
    one wake more than its history shows (a gap longer than any seen can come). One price
    per late request, the same for every model, turns this into ski rental per model (the
    threshold that costs least over its gaps); the price is the lowest at which the late
    requests predicted over all models' histories stay within the budget: memory goes
    where a late request costs least. What was measured over the last 10 minutes is fed
    back once every 1/budget requests: more late than budgeted, the budget tightens by
    the square root of the excess, cumulatively (never looser than planned).

    Lower traffic lengthens gaps and lowers the budget in requests, so thresholds lengthen.
    Models with fewer than ``MIN_GAPS`` gaps borrow the rest from all models' gaps; a model
    with no request keeps the configured threshold (also the longest any idles). The
    constants were chosen on the policy lab's training set (``lab/heldout.py``).
    """

    name = "slo"
    summary = "sleeps as much as an SLO attainment target allows (ski rental at one price)"
    TARGET = 0.99
    WAKE_SHARE = 0.85
    MIN_GAPS = 16

    def __init__(self, param: Optional[float] = None, label: str = ""):
        super().__init__(param, label)
        self.target = self.TARGET if param is None else param
        self.thresholds: Dict[str, float] = {}
        self._hulls: Dict[str, tuple] = {}
        self._plan_key: Optional[tuple] = None
        self._correction = 1.0      # budget x this: what was measured fed back
        self._corrected_at = 0

    @property
    def budget(self) -> float:
        return (1 - self.target) * self.WAKE_SHARE

    def _hull(self, m: ModelView, prior: Tuple[float, ...]) -> List[Tuple[float, float, float]]:
        """(threshold, memory-seconds per gap, wakes per gap) of the thresholds that can be
        best at some price over the model's gaps and ``prior`` ones: the lower convex hull
        of (wakes, memory), fewest wakes last."""
        cap = m.idle_threshold
        key = (m.gaps, prior, cap)
        hit = self._hulls.get(m.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        g = sorted(x for x in m.gaps + prior if x < cap)
        longer = len(m.gaps) + len(prior) - len(g)   # gaps the configured threshold covers
        n = len(g) + longer
        # a gap longer than any seen is always possible: below the configured threshold,
        # each threshold is charged one wake more than its history shows (Laplace)
        points = [(0.0, 0.0, (n + 1.0) / (n + 1))]
        prefix = 0.0
        for i, x in enumerate(g):          # awake through gaps up to x
            prefix += x
            left = n - i - 1
            points.append((x, (prefix + left * x) / n, (left + 1.0) / (n + 1)))
        points.append((cap, (prefix + longer * cap) / n, longer / (n + 1.0)))
        hull: List[Tuple[float, float, float]] = []
        for p in points:                   # wakes fall, memory rises: keep the convex part
            while len(hull) >= 2:
                (_, m1, w1), (_, m2, w2) = hull[-2], hull[-1]
                # slope (memory per wake saved) must rise along the hull
                if (m2 - m1) * (w1 - p[2]) >= (p[1] - m1) * (w1 - w2):
                    hull.pop()
                else:
                    break
            if not hull or p[2] < hull[-1][2]:
                hull.append(p)
        self._hulls[m.name] = (key, hull)
        return hull

    def _plan(self, snap: Snapshot) -> None:
        learned = [m for m in snap.models if m.requests]
        total = sum(m.requests for m in snap.models)
        key = (snap.recent_requests // 50, snap.recent_late_waits,
               tuple((m.name, len(m.gaps), m.gaps[-1:], m.idle_arrivals // 20) for m in learned))
        if key == self._plan_key:
            return
        self._plan_key = key
        if total >= self._corrected_at + 1 / self.budget:   # once per 1/budget requests
            self._corrected_at = total
            measured = (snap.recent_late_waits + 1) / (snap.recent_requests + 1 / self.budget)
            self._correction = min(1.0, max(0.02, self._correction * math.sqrt(
                self.budget / measured)))
        budget = self.budget * self._correction * total
        # a model with few gaps of its own borrows the others' (quantiles of all gaps seen)
        pooled = sorted(g for m in learned for g in m.gaps)
        if not pooled:
            self.thresholds = {}
            return

        def prior(m: ModelView) -> Tuple[float, ...]:
            k = self.MIN_GAPS - len(m.gaps)
            if k <= 0 or not pooled:
                return ()
            return tuple(pooled[min(len(pooled) - 1, int((i + 0.5) / k * len(pooled)))]
                         for i in range(k))

        spread = [(m, self._hull(m, prior(m)), max(1, m.idle_arrivals) * late_per_wake(m),
                   max(m.footprint_gb, 0.1)) for m in learned]

        def choose(price: float) -> Tuple[Dict[str, float], float]:
            out, late = {}, 0.0
            for m, hull, weight, gb in spread:
                # least memory-seconds x GB + price x late requests, per gap
                per_gap = weight / max(1, m.idle_arrivals)
                best = min(hull, key=lambda p: p[1] * gb + price * p[2] * per_gap)
                out[m.name] = best[0]
                late += best[2] * weight
            return out, late

        lo, hi = 1e-3, 1e9
        chosen, late = choose(hi)
        if late <= budget:
            for _ in range(40):
                mid = math.sqrt(lo * hi)
                trial, late = choose(mid)
                if late <= budget:
                    hi, chosen = mid, trial
                else:
                    lo = mid
                if hi / lo < 1.05:
                    break
        self.thresholds = chosen

    def threshold(self, m: ModelView, price: Optional[float] = None) -> Optional[float]:
        t = self.thresholds.get(m.name)
        if t is None:
            return m.idle_threshold
        return min(m.idle_threshold, t * 1.05 + 1.0 + m.wake_seconds)

    def decide(self, snap: Snapshot) -> List[Action]:
        self._plan(snap)
        return self.relieve(snap, decide(snap, self.threshold, self.stop_after))


POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls for cls in (Lru, Seed, Ttl, Ollama, Static, StaticSized, Adaptive, Slo)}


def check(name: str) -> None:
    """Raise ValueError, saying why, unless ``name`` is a policy (with a valid parameter)."""
    base = name.partition(":")[0]
    if base not in POLICIES:
        raise ValueError(f"unknown sleep policy {name!r}; choose one of {', '.join(POLICIES)}")
    problem = policy_param_problem(name) if ":" in name else None
    if problem:
        raise ValueError(problem)


def get(name: str) -> Policy:
    try:
        check(name)
    except ValueError as err:
        raise KeyError(str(err)) from None
    base, sep, raw = name.partition(":")
    return POLICIES[base](float(raw) if sep else None, name)
