"""Sleep policy: pure functions of a snapshot. The controller applies what they return.

- ``decide``: which idle models to put to sleep, which sleeping ones to stop.
- ``plan_room``: before waking or starting a model, which idle models on its GPUs
  must sleep or stop so that its weights and KV cache fit the GPU budgets.

Both take the rules that differ between the named policies (``policies.py``) as
arguments: when a model is idle enough, when a sleeping one is stopped, which model is
evicted first, how many may be resident on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Callable, Dict, List, Optional, Sequence, Set, Tuple

from kvrouter.control.states import RESIDENT, State


@dataclass(frozen=True)
class ModelView:
    name: str
    state: State
    in_flight: int
    waiting: int
    idle_seconds: float         # since the end of the last request (0 while in flight)
    state_seconds: float        # time in the current state
    pinned: bool
    idle_threshold: float
    stop_after: Optional[float]
    level: int
    gpus: Tuple[str, ...]
    weights_gb: float
    kv_cache_gb: float
    last_used: float            # monotonic time of the last request end (LRU order)
    gaps: Tuple[float, ...] = ()  # recent idle gaps (end of a request to the next start)
    wake_seconds: float = 0.0   # what a wake costs (measured, else the engine's model)
    arrival_gaps: Tuple[float, ...] = ()  # between its last few request starts
    kv_wanted_gb: float = 0.0   # KV its queued requests need beyond its pool's limit
    group: str = ""             # the model, when this engine is one of its replicas
    min_ready: int = 1          # replicas of that model kept awake while it has traffic
    requests: int = 0           # requests it has had (since the router started)
    idle_arrivals: int = 0      # of them, those that found it idle (each ended an idle gap)
    ttft_slo: Optional[float] = None   # seconds a request may take to its first token
    ttfts: Tuple[float, ...] = ()      # its recent TTFTs as served (no wait for a wake)
    reserved: bool = False      # asleep, its room planned for a wake: its memory is spoken for

    @property
    def footprint_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb


@dataclass(frozen=True)
class Snapshot:
    models: Tuple[ModelView, ...]
    auto_sleep: bool
    gpu_budget_gb: Dict[str, float]
    recent_requests: int = 0      # requests ended lately (traffic.WAKE_WINDOW), all models
    recent_wake_waits: int = 0    # of them, those that waited for a wake or a start
    recent_late_waits: int = 0    # of those, late for it (traffic.late_for_wake; no SLO: all)


@dataclass(frozen=True)
class Action:
    kind: str      # "sleep" | "stop"
    model: str
    level: int = 1
    reason: str = ""


class NoRoom(Exception):
    """The model cannot fit its GPUs' budgets even after evicting every idle model."""


def evictable(m: ModelView) -> bool:
    """May be put to sleep now without touching a request (eviction ignores idle time)."""
    return m.state is State.READY and not m.pinned and m.in_flight == 0 and m.waiting == 0


Rule = Callable[[ModelView], Optional[float]]


def configured_threshold(m: ModelView) -> float:
    return m.idle_threshold


def configured_stop_after(m: ModelView) -> Optional[float]:
    return m.stop_after


def least_recent(m: ModelView) -> float:
    return m.last_used


def sleep_candidate(m: ModelView, threshold: Rule = configured_threshold) -> bool:
    """Idle long enough to be put to sleep (what /sleep/candidates lists)."""
    limit = threshold(m)
    return evictable(m) and limit is not None and m.idle_seconds >= limit


def decide(snap: Snapshot, threshold: Rule = configured_threshold,
           stop_after: Rule = configured_stop_after) -> List[Action]:
    """Sleep the models idle for ``threshold(m)`` (None: never); stop the models asleep
    for ``stop_after(m)`` (None: never); and while a GPU holds more than its budget (the
    engines came up together, all awake), sleep idle models on it until it fits."""
    actions = _decide(snap, threshold, stop_after)
    return actions + over_budget(snap, {a.model for a in actions if a.kind == "sleep"})


def _free(over: Dict[str, float], m: ModelView) -> None:
    """``m`` put to sleep: what each GPU is over its budget shrinks by its share (a GPU
    no longer over is dropped)."""
    for g in m.gpus:
        if g in over:
            over[g] -= m.footprint_gb / max(1, len(m.gpus))
            if over[g] <= 1e-9:
                del over[g]


def over_budget(snap: Snapshot, leaving: Set[str]) -> List[Action]:
    """Sleeps that bring every GPU within its budget: idle models, least recently used
    first (on a tie, the later in the config first, as the lab places them). A model
    draining is on its way to sleep: its memory counts as freed (else the next tick, while
    its sleep still runs, would sleep another); one being woken holds its own."""
    if not snap.gpu_budget_gb:
        return []
    staying = [m for m in snap.models if m.name not in leaving]
    used = gpu_usage(staying, holds_planned)
    over = {g: used.get(g, 0.0) - b for g, b in snap.gpu_budget_gb.items()
            if used.get(g, 0.0) - b > 1e-9}
    if not over:
        return []
    order = {m.name: i for i, m in enumerate(snap.models)}
    actions = []
    for m in sorted((m for m in staying if evictable(m) and set(m.gpus) & set(over)),
                    key=lambda m: (m.last_used, -order[m.name])):
        if not over:
            break
        if not set(m.gpus) & set(over):
            continue
        actions.append(Action("sleep", m.name, m.level,
                              f"GPU {','.join(sorted(set(m.gpus) & set(over)))} holds more "
                              "than its budget"))
        _free(over, m)
    return actions


def _decide(snap: Snapshot, threshold: Rule, stop_after: Rule) -> List[Action]:
    actions: List[Action] = []
    for m in snap.models:
        if m.pinned:
            continue
        if snap.auto_sleep and sleep_candidate(m, threshold):
            actions.append(Action("sleep", m.name, m.level,
                                  f"idle {m.idle_seconds:.0f}s >= {threshold(m):.3g}s"))
        elif m.state is State.SLEEPING and m.waiting == 0:
            after = stop_after(m)
            if after is not None and m.state_seconds >= after:
                actions.append(Action("stop", m.name, m.level,
                                      f"asleep {m.state_seconds:.0f}s >= {after:g}s"))
    return actions


def keep_min_ready(snap: Snapshot, actions: List[Action]) -> List[Action]:
    """Sleeps that would leave a model with fewer than ``min_ready`` ready replicas while
    another of its replicas still serves traffic are dropped: the surplus replicas sleep
    when idle, the last ones only when the whole model is idle."""
    by_name = {m.name: m for m in snap.models}
    sleeping = {a.model for a in actions if a.kind == "sleep"}
    groups: Dict[str, List[ModelView]] = {}
    for m in snap.models:
        if m.group:
            groups.setdefault(m.group, []).append(m)
    dropped = set()
    for members in groups.values():
        ready = [m for m in members if m.state is State.READY]
        going = [m for m in ready if m.name in sleeping]
        if not going:
            continue
        if all(m.name in sleeping for m in ready):
            continue   # the whole model is idle
        keep = max(0, members[0].min_ready - (len(ready) - len(going)))
        # keep the most recently used of those going
        for m in sorted(going, key=lambda m: -m.last_used)[:keep]:
            dropped.add(m.name)
    return [a for a in actions if not (a.kind == "sleep" and a.model in dropped
                                       and a.model in by_name)]


def wake_for_load(states: Sequence[State], loads: Sequence[int], min_ready: int,
                  wake_at: int) -> Optional[int]:
    """Elastic replicas: the replica to wake now (its position), or None. One wake at a time
    per model; a sleeping replica is woken when fewer than ``min_ready`` are ready, or when
    the ready ones carry ``wake_at`` requests in flight each (0: never for load)."""
    if any(s in (State.WAKING, State.STARTING) for s in states):
        return None
    asleep = [i for i, s in enumerate(states) if s in (State.SLEEPING, State.STOPPED)]
    if not asleep:
        return None
    ready = [i for i, s in enumerate(states) if s is State.READY]
    if len(ready) < min_ready:
        return asleep[0]
    if wake_at and ready and sum(loads[i] for i in ready) >= wake_at * len(ready):
        return asleep[0]
    return None


def holds_now(m: ModelView) -> bool:
    """Holds its GPU memory now (every resident state, draining included)."""
    return m.state in RESIDENT


def holds_planned(m: ModelView) -> bool:
    """Holds memory as a plan counts it: a draining model's is freed (its sleep is under
    way: a wake that counts on it waits for it, ``room_held``), a model being woken
    (``reserved``) holds its own."""
    return (m.state in RESIDENT and m.state is not State.DRAINING) or m.reserved


def gpu_usage(models: Sequence[ModelView],
              holds: Callable[[ModelView], bool] = holds_now) -> Dict[str, float]:
    """GB per GPU that the models for which ``holds`` is true hold."""
    used: Dict[str, float] = {}
    for m in models:
        if holds(m):
            share = m.footprint_gb / max(1, len(m.gpus))
            for g in m.gpus:
                used[g] = used.get(g, 0.0) + share
    return used


def room_held(snap: Snapshot, target: str, freed: AbstractSet[str] = frozenset()) -> bool:
    """Whether ``target`` fits its GPUs' budgets with the memory the other models hold now
    (a draining one's until its sleep ends) or are being woken into, but those in ``freed``
    (asleep by then): a wake whose plan counted on a draining model's memory waits until
    this holds."""
    t = next(m for m in snap.models if m.name == target)
    used = gpu_usage([m for m in snap.models if m.name != target and m.name not in freed],
                     lambda m: holds_now(m) or m.reserved)
    share = t.footprint_gb / max(1, len(t.gpus))
    return all(used.get(g, 0.0) + share <= snap.gpu_budget_gb[g] + 1e-9
               for g in t.gpus if g in snap.gpu_budget_gb)


def could_fit(snap: Snapshot, target: str) -> bool:
    """Whether ``target`` would fit its GPUs' budgets once every unpinned model there slept
    (else no wait for room can help)."""
    t = next(m for m in snap.models if m.name == target)
    pinned = gpu_usage([m for m in snap.models if m.pinned and m.name != target])
    share = t.footprint_gb / max(1, len(t.gpus))
    return all(pinned.get(g, 0.0) + share <= snap.gpu_budget_gb[g] + 1e-9
               for g in t.gpus if g in snap.gpu_budget_gb)


def plan_room(snap: Snapshot, target: str, order: Callable[[ModelView], float] = least_recent,
              max_loaded: Optional[int] = None) -> List[Action]:
    """Actions that make room for ``target`` (empty when it fits or there is no budget):
    idle models are put to sleep, lowest ``order`` first, until its footprint fits the
    budgets of its GPUs and (``max_loaded``) fewer than that many models are resident in all
    (a victim for memory is on one of its GPUs; for the count, anywhere)."""
    by_name = {m.name: m for m in snap.models}
    t = by_name[target]
    others = [m for m in snap.models if m.name != target]
    over: Dict[str, float] = {}
    if snap.gpu_budget_gb:
        need = t.footprint_gb / max(1, len(t.gpus))
        used = gpu_usage(others, holds_planned)
        over = {g: used.get(g, 0.0) + need - snap.gpu_budget_gb[g]
                for g in t.gpus if g in snap.gpu_budget_gb}
        over = {g: v for g, v in over.items() if v > 1e-9}
    crowded = 0
    if max_loaded is not None:
        crowded = max(0, sum(1 for m in others if holds_planned(m)) - max_loaded + 1)
    if not over and not crowded:
        return []
    idle = sorted((m for m in others if evictable(m)), key=order)
    # first those that free memory where it is needed (they count too), then any for the count
    candidates = [m for m in idle if set(m.gpus) & set(over)] + \
        [m for m in idle if not set(m.gpus) & set(over)]
    actions = []
    for m in candidates:
        frees = bool(set(m.gpus) & set(over))
        if not (frees or crowded):
            continue
        why = f"GPU {','.join(sorted(over))}" if over else f"{max_loaded} models loaded"
        actions.append(Action("sleep", m.name, m.level, f"make room for {target} ({why})"))
        _free(over, m)
        crowded = max(0, crowded - 1)
        if not over and not crowded:
            break
    if over or crowded:
        detail = ", ".join([f"GPU {g} short by {v:.1f} GB" for g, v in sorted(over.items())] +
                           ([f"{max_loaded} models loaded already"] if crowded else []))
        raise NoRoom(f"no room for {target}: {detail} even after sleeping every idle, "
                     "unpinned model")
    return actions
