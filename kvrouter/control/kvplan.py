"""Dividing a GPU's KV memory among the models on it: a pure function of a snapshot.

Each GPU's memory left after the resident models' weights is shared by their kvcached
KV pools: every pool gets at least its floor, the rest goes where the demand is (bytes
wanted: KV in use plus what queued requests need), no pool above its ceiling, and the
limits never add up to more than there is. Small changes are not made (hysteresis), and
the changes come ordered for a safe application: shrink the donors first, and grow the
receivers only once the donors' use is under their new limit.

The controller builds the snapshot and applies the plan (``set_limit`` on each pool); the
policy here has no clock, no I/O and no engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

FLOOR_FRACTION = 1 / 8   # a pool's floor: room for one long request when it holds about eight


@dataclass(frozen=True)
class Pool:
    model: str
    limit: int        # the pool's limit now (bytes)
    used: int         # KV in use (bytes)
    demand: int       # what it would use now: in use plus what its queued requests need
    floor: int        # never less (unless the GPU cannot give every floor)
    ceiling: int      # never more


@dataclass(frozen=True)
class Change:
    model: str
    old: int
    new: int

    @property
    def shrink(self) -> bool:
        return self.new < self.old


def divide(available: int, pools: Sequence[Pool], min_change: float = 0.05,
           min_change_bytes: int = 64 << 20) -> List[Change]:
    """New limits for ``pools`` sharing ``available`` bytes, as changes: shrinks first
    (largest first), then grows. The new limits never add up to more than ``available``."""
    if not pools:
        return []
    available = max(0, available)
    target = _water_fill(available, pools)
    # hysteresis: a change smaller than min_change of the old limit (or min_change_bytes)
    # is skipped, unless skipping it would overcommit
    final: Dict[str, int] = {}
    for p in pools:
        step = max(min_change_bytes, int(min_change * p.limit))
        final[p.model] = p.limit if abs(target[p.model] - p.limit) < step else target[p.model]
    if sum(final.values()) > available:
        final = dict(target)
    changes = [Change(p.model, p.limit, final[p.model]) for p in pools
               if final[p.model] != p.limit]
    shrinks = sorted((c for c in changes if c.shrink), key=lambda c: c.new - c.old)
    grows = sorted((c for c in changes if not c.shrink), key=lambda c: c.old - c.new)
    return shrinks + grows


def _water_fill(available: int, pools: Sequence[Pool]) -> Dict[str, int]:
    floors = {p.model: min(p.floor, p.ceiling) for p in pools}
    total_floor = sum(floors.values())
    if total_floor >= available:  # not even the floors fit: share what there is by floor
        scale = available / total_floor if total_floor else 0.0
        return {m: int(f * scale) for m, f in floors.items()}
    out = dict(floors)
    left = available - total_floor
    # 1. demand above the floor, shared in proportion while it lasts (water filling)
    wants = {p.model: max(0, min(p.demand, p.ceiling) - out[p.model]) for p in pools}
    left = _share(out, wants, left)
    # 2. what is still free goes to every pool up to its ceiling, in proportion to its
    # room, so that a burst finds memory already there
    room = {p.model: max(0, p.ceiling - out[p.model]) for p in pools}
    _share(out, room, left)
    return out


def _share(out: Dict[str, int], wants: Dict[str, int], left: int) -> int:
    """Give ``left`` bytes to ``wants`` in proportion, no one more than it wants."""
    wanting: List[Tuple[str, int]] = [(m, w) for m, w in wants.items() if w > 0]
    total = sum(w for _, w in wanting)
    if left <= 0 or not total:
        return left
    share = min(1.0, left / total)
    given = 0
    for m, w in wanting:
        g = min(w, int(w * share))
        out[m] += g
        given += g
    return left - given
