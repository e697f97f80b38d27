"""What a simulated run measured: SLOs, attainment, goodput, latencies, wakes, memory.

SLOs follow Prism (its benchmark's defaults): a request meets its SLO when its TTFT is
within ``ttft_scale`` x the model's unloaded p99 TTFT and its TPOT within ``tpot_scale`` x
the unloaded TPOT (one request alone on an awake engine). Results also come in the
``kvrouter-bench/1`` shape, so ``kvrouter bench --compare`` reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from kvrouter.bench.report import SCHEMA, Sample, stats, summarize
from kvrouter.lab.world import Req, World
from kvrouter.timing import Timing

TTFT_SLO_SCALE = 5.0   # Prism benchmark.py --ttft-slo-scale default
TPOT_SLO_SCALE = 5.0   # and --tpot-slo-scale


@dataclass(frozen=True)
class Slo:
    ttft: float
    tpot: float

    def meets(self, r: Req) -> bool:
        ttft = r.ttft
        return r.ok and ttft is not None and ttft <= self.ttft and (
            r.tpot is None or r.tpot <= self.tpot)


def slos(timings: Dict[str, Timing], rows: Sequence[dict], ttft_scale: float = TTFT_SLO_SCALE,
         tpot_scale: float = TPOT_SLO_SCALE) -> Dict[str, Slo]:
    """Per model: scale x its unloaded p99 TTFT (over its prompts in the trace) and TPOT."""
    prompts: Dict[str, List[int]] = {}
    for r in rows:
        prompts.setdefault(r["model"], []).append(r["prompt_tokens"])
    out = {}
    for model, t in timings.items():
        p = sorted(prompts.get(model) or [1])
        p99 = p[min(len(p) - 1, int(0.99 * len(p)))]
        out[model] = Slo(ttft_scale * t.prefill_seconds(p99), tpot_scale * t.step_seconds(1))
    return out


def miss_cause(r: Req, slo: Slo) -> str:
    if not r.ok:
        return r.cause or "refused"
    if r.ttft is not None and r.ttft > slo.ttft:
        return r.cause or "prefill"
    return "tpot (batch size)"


def _samples(reqs: Sequence[Req]) -> List[Sample]:
    out = []
    for r in reqs:
        s = Sample(r.model, r.t)
        s.ok = r.ok
        if r.ok:
            s.ttft = r.ttft
            s.e2e = (r.end or r.t) - r.t
            s.output_tokens = r.out
        else:
            s.error = "http_5xx"
        out.append(s)
    return out


def summary(world: World, slo: Dict[str, Slo]) -> dict:
    """The figures of one run of one policy."""
    reqs = [r for r in world.requests if r.model in world.routes]
    duration = max(world.duration, 1e-9)
    by_model: Dict[str, dict] = {}
    causes: Dict[str, int] = {}
    met_total = 0
    for name in sorted({r.model for r in reqs}):
        mine = [r for r in reqs if r.model == name]
        s = slo[world.routes[name].model]
        met = [r for r in mine if s.meets(r)]
        ttft_ok = sum(1 for r in mine if r.ok and r.ttft is not None and r.ttft <= s.ttft)
        tpot_ok = sum(1 for r in mine if r.ok and (r.tpot is None or r.tpot <= s.tpot))
        for r in mine:
            if not s.meets(r):
                c = miss_cause(r, s)
                causes[c] = causes.get(c, 0) + 1
        met_total += len(met)
        by_model[name] = {
            "requests": len(mine), "slo_ttft": s.ttft, "slo_tpot": s.tpot,
            "attainment": len(met) / len(mine), "ttft_attainment": ttft_ok / len(mine),
            "tpot_attainment": tpot_ok / len(mine)}
    engines = world.engines.values()
    ttfts = [r.ttft for r in reqs if r.ok and r.ttft is not None]
    n = len(reqs)
    return {
        "requests": n, "duration_seconds": world.duration,
        "rate": n / duration,
        "attainment": met_total / n if n else None,
        "ttft_attainment": (sum(m["ttft_attainment"] * m["requests"] for m in by_model.values())
                            / n if n else None),
        "tpot_attainment": (sum(m["tpot_attainment"] * m["requests"] for m in by_model.values())
                            / n if n else None),
        "goodput": met_total / duration,
        "ttft": stats(ttfts),
        "wakes": sum(e.wakes for e in engines),
        "cold_starts": sum(e.starts for e in engines),
        "sleeps": sum(e.sleeps for e in engines),
        "wakes_on_request_path": sum(1 for r in reqs if r.cause == "wake"),
        "cold_starts_on_request_path": sum(1 for r in reqs if r.cause == "cold start"),
        "refused": sum(1 for r in reqs if not r.ok),
        "gpu_memory_gb_seconds": world.mem_seconds,
        "mean_gpu_memory_gb": world.mem_seconds / duration,
        "misses": dict(sorted(causes.items(), key=lambda kv: -kv[1])),
        "models": by_model,
        "per_engine": {e.name: {"wakes": e.wakes, "cold_starts": e.starts, "sleeps": e.sleeps,
                                "served": e.served,
                                "awake_seconds": round(world.awake_seconds(e), 3)}
                       for e in engines},
        # replicas: engine-seconds awake, and prompt tokens served from prefix caches
        "engine_seconds_awake": sum(world.awake_seconds(e) for e in engines),
        "cached_prompt_share": (sum(r.cached for r in reqs if r.ok) /
                                max(1, sum(r.prompt for r in reqs if r.ok))),
    }


def bench_result(world: World, slo: Dict[str, Slo], config: dict) -> dict:
    """The run as a ``kvrouter-bench/1`` result (``bench --compare`` reads it)."""
    reqs = [r for r in world.requests if r.model in world.routes]
    duration = max(world.duration, 1e-9)
    samples = _samples(reqs)
    models: Dict[str, dict] = {}
    for name in sorted({r.model for r in reqs}):
        s = slo[world.routes[name].model]
        models[name] = summarize([x for x in samples if x.model == name], duration,
                                 {"ttft": s.ttft, "tpot": s.tpot})
    total = summarize(samples, duration, {})
    met = sum(1 for r in reqs if slo[world.routes[r.model].model].meets(r))
    total["goodput"] = {"slo": "per model", "requests_meeting_slo": met,
                        "attainment": met / len(reqs) if reqs else None,
                        "rate": met / duration}
    return {"schema": SCHEMA, "config": config, "started_at": 0.0,
            "duration_seconds": duration, "models": models, "total": total}
