"""Static partitioning sized by load (``static-sized``), as an operator (or MuxServe's and
Prism's placement) would size it: each GPU's memory after the weights is split among its
models in proportion to the KV each is expected to hold, estimated from a history of
requests (Little's law: arrival rate x tokens held x time held), never from the future.

A model gets at least room for its largest request in the history (twice over), so that a
rare model can serve; the rest goes by expected occupancy.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from kvrouter.timing import GB, Timing

HISTORY_SHARE = 0.2   # the lab sizes from the first fifth of a trace


def history(rows: Sequence[dict], share: float = HISTORY_SHARE) -> list:
    """The first ``share`` of the trace, by time: what an operator knew beforehand."""
    end = max((r["time"] for r in rows), default=0.0) * share
    return [r for r in rows if r["time"] <= end]


def occupancy_bytes(rows: Sequence[dict], timings: Dict[str, Timing],
                    alias: Dict[str, str]) -> Dict[str, float]:
    """Mean KV bytes each model holds over the span of ``rows`` (served alone, unqueued)."""
    span = max((r["time"] for r in rows), default=0.0) or 1.0
    held: Dict[str, float] = {}
    for r in rows:
        model = alias.get(r["model"], r["model"])
        t = timings.get(model)
        if t is None:
            continue
        tokens = r["prompt_tokens"] + r["output_tokens"]
        seconds = t.prefill_seconds(r["prompt_tokens"]) + \
            max(0, r["output_tokens"] - 1) * t.step_seconds(1)
        held[model] = held.get(model, 0.0) + tokens * t.bytes_per_token * seconds
    return {m: v / span for m, v in held.items()}


def floor_bytes(rows: Sequence[dict], timings: Dict[str, Timing],
                alias: Dict[str, str]) -> Dict[str, float]:
    """Twice the largest request each model had; a model with none gets twice the largest
    request any model had (no history at all: one max-length sequence)."""
    seen: Dict[str, int] = {}
    for r in rows:
        model = alias.get(r["model"], r["model"])
        if model in timings:
            seen[model] = max(seen.get(model, 0), r["prompt_tokens"] + r["output_tokens"])
    largest = max(seen.values(), default=0)
    return {m: 2.0 * (seen.get(m) or largest or t.max_model_len / 2) * t.bytes_per_token
            for m, t in timings.items()}


def kv_shares(kv_gb_by_gpu: Dict[str, float], models_by_gpu: Dict[str, Sequence[str]],
              occupancy: Dict[str, float], floor: Dict[str, float]) -> Dict[str, float]:
    """KV GB per model: each GPU's ``kv_gb`` split by expected occupancy above the floors
    (a model on several GPUs gets its part on each)."""
    out: Dict[str, float] = {}
    for gpu, models in models_by_gpu.items():
        total = kv_gb_by_gpu[gpu] * GB
        floors = {m: min(floor.get(m, 0.0), total / len(models)) for m in models}
        rest = max(0.0, total - sum(floors.values()))
        weight = sum(occupancy.get(m, 0.0) for m in models)
        for m in models:
            part = occupancy.get(m, 0.0) / weight if weight > 0 else 1.0 / len(models)
            out[m] = out.get(m, 0.0) + (floors[m] + rest * part) / GB
    return out


def partition(engines: Sequence, budget: Dict[str, float], how: str,
              history: Sequence[dict]) -> None:
    """Set each lab engine's KV ``limit`` (bytes) for static partitioning: its GPUs split
    evenly (``how`` "even"), or the KV part by expected load ("load")."""
    by_gpu: Dict[str, List] = {}
    for e in engines:
        for g in e.gpus:
            by_gpu.setdefault(g, []).append(e)
    for e in engines:
        share = sum(budget.get(g, 0.0) / len(by_gpu[g]) for g in e.gpus)
        if share and share < e.t.weights_gb:
            raise ValueError(f"static partitioning: {e.name}'s weights ({e.t.weights_gb:g} "
                             f"GB) do not fit its share of GPU {','.join(e.gpus)} "
                             f"({share:.1f} GB)")
        if share:
            e.limit = int((share - e.t.weights_gb) * GB)
    if how != "load":
        return
    kv_gb = {g: budget[g] - sum(o.t.weights_gb / len(o.gpus) for o in on)
             for g, on in by_gpu.items() if g in budget}
    if any(v <= 0 for v in kv_gb.values()):
        raise ValueError("static partitioning: the weights alone fill GPU " +
                         ", ".join(g for g, v in kv_gb.items() if v <= 0))
    timings = {e.name: e.t for e in engines}
    alias = {a: e.name for e in engines for a in e.inst.route_names or (e.inst.model,)}
    replicas: Dict[str, int] = {}
    for e in engines:
        replicas[e.inst.model] = replicas.get(e.inst.model, 0) + 1
    model_of = {e.name: e.inst.model for e in engines}
    # a model's load is its replicas' in equal parts
    occupancy = {k: v / replicas[model_of[k]]
                 for k, v in occupancy_bytes(history, timings, alias).items()}
    shares = kv_shares(kv_gb, {g: [e.name for e in on] for g, on in by_gpu.items()
                               if g in kv_gb}, occupancy, floor_bytes(history, timings, alias))
    for e in engines:
        if e.name in shares:
            e.limit = int(shares[e.name] * GB)
