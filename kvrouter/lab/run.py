"""Running policies over a trace: one run, and the highest rate a policy sustains.

Rates are scaled the way MuxServe, AlpaServe and Prism do: the trace's arrival times are
compressed (scale 2 = the same requests in half the time, twice the rate).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

from kvrouter.config.schema import Config
from kvrouter.control import policies
from kvrouter.errors import KvrouterError
from kvrouter.lab import outcome
from kvrouter.lab.world import World
from kvrouter.timing import Timing

TARGET = 0.99
FLOOR = 0.5


def scaled(rows: Sequence[dict], scale: float) -> List[dict]:
    return list(rows) if scale == 1 else [dict(r, time=r["time"] / scale) for r in rows]


def slos_for(cfg: Config, rows: Sequence[dict], ttft_scale: float = outcome.TTFT_SLO_SCALE,
             tpot_scale: float = outcome.TPOT_SLO_SCALE,
             profile: Optional[Dict[str, Timing]] = None) -> Dict[str, outcome.Slo]:
    timings = {i.model: (profile or {}).get(i.key or i.model) or i.timing
               for i in cfg.instances}
    # requests name a model by any of its route names
    alias = {a: i.model for i in cfg.instances for a in i.route_names or (i.model,)}
    named = [dict(r, model=alias.get(r["model"], r["model"])) for r in rows]
    return outcome.slos(timings, named, ttft_scale, tpot_scale)


def stating_slos(cfg: Config, slo: Dict[str, outcome.Slo]) -> Config:
    """``cfg`` with each engine stating the TTFT SLO it is judged by (``ttft_slo_ms``),
    where it states none: what an operator who knows the SLO writes in the config."""
    return dataclasses.replace(cfg, instances=tuple(
        i if i.ttft_slo_seconds is not None or i.model not in slo
        else dataclasses.replace(i, ttft_slo_seconds=slo[i.model].ttft)
        for i in cfg.instances))


def timings_from(cfg: Config, profiles: Dict[str, dict], where: str) -> Dict[str, Timing]:
    """Each engine's timing with its model's profile (by model or route name) laid over."""
    out: Dict[str, Timing] = {}
    used = set()
    for inst in cfg.instances:
        for name in (inst.model, *(inst.route_names or ())):
            if name in profiles:
                out[inst.key or inst.model] = dataclasses.replace(inst.timing,
                                                                  **profiles[name])
                used.add(name)
                break
    unknown = sorted(set(profiles) - used)
    if unknown:
        raise KvrouterError(f"{where}: profiles for models {cfg.source} lacks: "
                            f"{', '.join(unknown)}")
    return out


def run(cfg: Config, policy: str, rows: Sequence[dict], slo: Dict[str, outcome.Slo],
        scale: float = 1.0, timings: Optional[Dict[str, Timing]] = None) -> Tuple[World, dict]:
    world = World(cfg, policies.get(policy), scaled(rows, scale), timings=timings).run()
    return world, outcome.summary(world, slo)


def base_rate(rows: Sequence[dict]) -> float:
    span = max((r["time"] for r in rows), default=0.0)
    return len(rows) / span if span > 0 else 0.0


def max_rate(cfg: Config, policy: str, rows: Sequence[dict], slo: Dict[str, outcome.Slo],
             target: float = TARGET, scales: Optional[Sequence[float]] = None,
             refine: int = 5, timings: Optional[Dict[str, Timing]] = None,
             whole: bool = False) -> dict:
    """The highest rate at which ``policy`` meets ``target`` attainment, and the curve.

    Scales go up by sqrt(2) from 1/4 to 64 until two in a row miss the target after one met
    it (attainment is not monotonic: a policy that wakes models loses more at low rates) or
    attainment falls under FLOOR; the last passing scale is refined by bisection."""
    scales = list(scales) if scales else [2 ** (k / 2) for k in range(-4, 13)]
    curve: List[Tuple[float, float, float]] = []
    best: Optional[float] = None
    fail_above: Optional[float] = None
    misses = 0

    def point(s: float) -> float:
        summary = run(cfg, policy, rows, slo, s, timings)[1]
        att = summary["attainment"] or 0.0
        curve.append((s, att, summary["gpu_memory_gb_seconds"] / 3600.0))
        return att

    for s in scales:
        att = point(s)
        if att >= target:
            best, fail_above, misses = s, None, 0
        elif best is not None:
            fail_above = fail_above or s
            misses += 1
            if misses >= 2 and not whole:
                break
        if att < FLOOR and not whole:   # far below: higher rates only do worse
            break
    if best is not None and fail_above is not None:
        lo, hi = best, fail_above
        for _ in range(refine):
            mid = math.sqrt(lo * hi)
            if point(mid) >= target:
                lo = mid
            else:
                hi = mid
        best = lo
    rate = base_rate(rows)
    curve.sort()
    return {"target": target, "max_scale": best,
            "max_rate": best * rate if best is not None else None,
            "curve": [{"scale": s, "rate": s * rate, "attainment": a, "gpu_gb_h": m}
                      for s, a, m in curve]}
