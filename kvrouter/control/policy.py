"""Sleep policy: pure functions of a snapshot. The controller applies what they return.

- ``decide``: which idle models to put to sleep, which sleeping ones to stop.
- ``plan_room``: before waking or starting a model, which idle models on its GPUs
  must sleep or stop so that its weights and KV cache fit the GPU budgets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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

    @property
    def footprint_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb


@dataclass(frozen=True)
class Snapshot:
    models: Tuple[ModelView, ...]
    auto_sleep: bool
    gpu_budget_gb: Dict[str, float]


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


def sleep_candidate(m: ModelView) -> bool:
    """Idle long enough to be put to sleep (what /sleep/candidates lists)."""
    return evictable(m) and m.idle_seconds >= m.idle_threshold


def decide(snap: Snapshot) -> List[Action]:
    actions: List[Action] = []
    for m in snap.models:
        if m.pinned:
            continue
        if snap.auto_sleep and sleep_candidate(m):
            actions.append(Action("sleep", m.name, m.level,
                                  f"idle {m.idle_seconds:.0f}s >= {m.idle_threshold:g}s"))
        elif (m.state is State.SLEEPING and m.stop_after is not None and m.waiting == 0
              and m.state_seconds >= m.stop_after):
            actions.append(Action("stop", m.name, m.level,
                                  f"asleep {m.state_seconds:.0f}s >= {m.stop_after:g}s"))
    return actions


def gpu_usage(models: Sequence[ModelView]) -> Dict[str, float]:
    used: Dict[str, float] = {}
    for m in models:
        if m.state in RESIDENT:
            share = m.footprint_gb / max(1, len(m.gpus))
            for g in m.gpus:
                used[g] = used.get(g, 0.0) + share
    return used


def plan_room(snap: Snapshot, target: str) -> List[Action]:
    """Actions that make room for ``target`` (empty when it fits or there is no budget)."""
    if not snap.gpu_budget_gb:
        return []
    by_name = {m.name: m for m in snap.models}
    t = by_name[target]
    need = t.footprint_gb / max(1, len(t.gpus))
    others = [m for m in snap.models if m.name != target]
    used = gpu_usage(others)
    over = {g: used.get(g, 0.0) + need - snap.gpu_budget_gb[g]
            for g in t.gpus if g in snap.gpu_budget_gb}
    over = {g: v for g, v in over.items() if v > 1e-9}
    if not over:
        return []
    candidates = sorted(
        (m for m in others if evictable(m) and set(m.gpus) & set(over)),
        key=lambda m: m.last_used)
    actions = []
    for m in candidates:
        if not over:
            break
        actions.append(Action("sleep", m.name, m.level,
                              f"make room for {target} on GPU {','.join(sorted(over))}"))
        share = m.footprint_gb / max(1, len(m.gpus))
        for g in m.gpus:
            if g in over:
                over[g] -= share
                if over[g] <= 1e-9:
                    del over[g]
    if over:
        detail = ", ".join(f"GPU {g} short by {v:.1f} GB" for g, v in sorted(over.items()))
        raise NoRoom(f"no room for {target}: {detail} even after sleeping every idle, "
                     "unpinned model on it")
    return actions
