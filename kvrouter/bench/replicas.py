"""``make bench-replicas``: what replicas buy, in tables.

Each figure comes from the policy lab (``kvrouter simulate``'s world: the router's own
routing objects, the simulated engine's timing, its prefix cache), so it is exact for the
model and runs in seconds; one live run replays a replica trace through a real router and
simulated engines and compares its attainment with the lab's on the same trace.

1. **Scaling**: 1, 2 and 4 replicas of one model with bounded capacity: the highest rate
   each sustains at 99% SLO attainment (TTFT and TPOT within 5x unloaded, as Prism).
2. **Cache-aware vs least-outstanding** on the Mooncake conversation trace (its prefix
   block ids: equal ids, equal text): mean TTFT, share of prompt tokens served from the
   engines' prefix caches, max/min requests per replica.
3. **Elastic vs always awake** on a bursty trace: replica-seconds awake and attainment.
4. **Lab vs live**: one replica trace, attainment per model, both ways.

The Mooncake trace is read from ``--mooncake`` (default: bench-results/traces/
conversation_trace.jsonl, which ``make bench-replicas`` downloads once); without it the
shipped 10-line excerpt is used and the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence

from kvrouter.bench import importers
from kvrouter.bench.report import grid
from kvrouter.bench.trace import generate
from kvrouter.config import parse_config_text
from kvrouter.config.schema import Config
from kvrouter.lab import outcome
from kvrouter.lab import run as labrun
from kvrouter.lab.world import World

HERE = os.path.dirname(os.path.abspath(__file__))
EXCERPT = os.path.join(HERE, "..", "..", "tests", "unit", "data", "traces",
                       "mooncake-conversation-head.jsonl")
DEFAULT_MOONCAKE = os.path.join("bench-results", "traces", "conversation_trace.jsonl")
MODEL = "bench/replicated"


def config(replicas: int, policy: str = "least_outstanding", sim: str = "",
           sleep: str = "", routing: str = "", sizes: str = "") -> Config:
    """One model served by ``replicas`` simulated engines (one GPU each)."""
    gpus = ",".join(str(i) for i in range(replicas))
    return parse_config_text(
        f"sleep_manager: {{min_sleep_duration: 0{sleep}}}\n"
        f"routing: {{policy: {policy}{routing}}}\n"
        "instances:\n"
        f"  - {{name: r, model: {MODEL}, engine: sim, replicas: {replicas}, gpus: '{gpus}',"
        f" engine_args: ['--port 19000'], sim: {{dialect: vllm{sim}}}{sizes}}}\n")


def _world(cfg: Config, rows: Sequence[dict], scale: float = 1.0) -> World:
    return labrun.run(cfg, cfg.sleep_manager.policy, rows, labrun.slos_for(cfg, rows),
                      scale)[0]


# --- 1. scaling -------------------------------------------------------------------------------
SCALING_SIM = ", max_concurrency: 8, itl_ms: 20, prefill_ms_per_token: 0.05"


def scaling(seed: int = 0) -> List[dict]:
    rows = generate([MODEL], duration=600, total_rate=4.0, cv=1.0, off_seconds=0,
                    prompt_tokens=512, output_tokens=128, seed=seed)
    out = []
    base: Optional[float] = None
    for n in (1, 2, 4):
        cfg = config(n, sim=SCALING_SIM)
        slo = labrun.slos_for(cfg, rows)
        found = labrun.max_rate(cfg, cfg.sleep_manager.policy, rows, slo)
        rate = found["max_rate"] or 0.0
        base = base or rate
        out.append({"replicas": n, "max_rate": rate, "vs_one": rate / base if base else None})
    return out


# --- 2. cache-aware vs least-outstanding ---------------------------------------------------------
# a 7-8B model with grouped-query attention (32 KiB of KV per token), 60 GB of KV per GPU
CACHE_SIM = ", max_concurrency: 64, itl_ms: 20, prefill_ms_per_token: 0.1, " \
    "kv_bytes_per_token: 32768"
CACHE_SIZES = ", kv_cache_gb: 60, weights_gb: 16"


def mooncake_rows(path: str, limit: int) -> List[dict]:
    rows = []
    for row in importers.mooncake(path, [MODEL]):
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def cache_aware(path: str, limit: int = 4000, replicas: int = 4,
                scale: float = 1.0) -> List[dict]:
    rows = mooncake_rows(path, limit)
    out = []
    for policy in ("least_outstanding", "round_robin", "power_of_two", "cache_aware"):
        cfg = config(replicas, policy, sim=CACHE_SIM, sizes=CACHE_SIZES)
        world = _world(cfg, rows, scale)
        slo = labrun.slos_for(cfg, rows)
        summary = outcome.summary(world, slo)
        ttfts = [r.ttft for r in world.requests if r.ok and r.ttft is not None]
        served = [e.served for e in world.engines.values()]
        out.append({"policy": policy, "requests": len(rows),
                    "mean_ttft": statistics.fmean(ttfts) if ttfts else None,
                    "p99_ttft": sorted(ttfts)[int(0.99 * (len(ttfts) - 1))] if ttfts else None,
                    "cached_share": summary["cached_prompt_share"],
                    "attainment": summary["attainment"],
                    "max_min_load": max(served) / max(1, min(served))})
    return out


# --- 3. elastic vs always awake --------------------------------------------------------------
ELASTIC_SIM = ", max_concurrency: 8, itl_ms: 20, prefill_ms_per_token: 0.05"


def elastic(seed: int = 0, replicas: int = 4) -> List[dict]:
    rows = generate([MODEL], duration=1800, total_rate=0.6, cv=3.0, on_seconds=60,
                    off_seconds=240, prompt_tokens=512, output_tokens=128, seed=seed)
    out = []
    for label, sleep, routing in (
            ("always awake", "", ", wake_at_in_flight: 0"),
            ("elastic", ", auto_sleep_enabled: true, idle_threshold_seconds: 30, "
             "check_interval_seconds: 5", ", wake_at_in_flight: 2")):
        cfg = config(replicas, "least_outstanding", sim=ELASTIC_SIM, sleep=sleep,
                     routing=routing)
        world = _world(cfg, rows)
        slo = labrun.slos_for(cfg, rows)
        summary = outcome.summary(world, slo)
        out.append({"mode": label, "attainment": summary["attainment"],
                    "replica_seconds": summary["engine_seconds_awake"],
                    "wakes": summary["wakes"]})
    return out


def _fmt(v, pct=False, digits=3) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def live(results: Dict[str, object]) -> None:
    """The live part: a real router and simulated engines (``replicas_live.py``)."""
    from kvrouter.bench import replicas_live

    print("\n## 4. Live: wake to first token (2 replicas asleep, one streamed request; "
          "5 rounds)")
    w = replicas_live.wake_to_first_token()
    results["wake_to_first_token"] = w
    for line in grid([("TTFT median (s)", "wake median (s)", "TTFT - wake median (ms)",
                       "TTFT - wake max (ms)")] + [
            (_fmt(w["ttft_median"]), _fmt(w["wake_median"]),
             _fmt(1000 * w["ttft_minus_wake_median"] if w["ttft_minus_wake_median"] is not None
                  else None),
             _fmt(1000 * w["ttft_minus_wake_max"] if w["ttft_minus_wake_max"] is not None
                  else None))]):
        print(line)
    print("\n## 5. Live: one of 3 replicas SIGKILLed under streamed load (12 clients, 8 s)")
    k = replicas_live.killed_under_load()
    results["killed"] = k
    for line in grid([("requests", "ok", "failed before first byte", "broken mid-stream",
                       "out of rotation after (s)", "serving again after restart (s)")] + [
            (str(k["requests"]), str(k["ok"]), str(k["failed_before_first_byte"]),
             str(k["broken_mid_stream"]), _fmt(k["out_of_rotation_after_s"]),
             _fmt(k["serving_again_after_restart_s"]))]):
        print(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvrouter.bench.replicas")
    ap.add_argument("--mooncake", default=DEFAULT_MOONCAKE)
    ap.add_argument("--limit", type=int, default=4000, help="Mooncake requests replayed")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--no-live", action="store_true", help="the lab's figures only")
    args = ap.parse_args(argv)
    results: Dict[str, object] = {}

    print("## 1. Scaling: one model, bounded capacity (lab; max rate at 99% attainment)")
    rows = scaling()
    results["scaling"] = rows
    for line in grid([("replicas", "max rate (req/s)", "x one replica")] + [
            (str(r["replicas"]), _fmt(r["max_rate"]), _fmt(r["vs_one"])) for r in rows]):
        print(line)

    path = args.mooncake if os.path.exists(args.mooncake) else EXCERPT
    print(f"\n## 2. Routing on the Mooncake conversation trace ({os.path.basename(path)}, "
          f"first {args.limit} requests, 4 replicas; lab)")
    if path == EXCERPT:
        print("   (the full trace is missing: the 10-line excerpt says little)")
    rows = cache_aware(path, args.limit)
    results["cache_aware"] = rows
    lo = next(r for r in rows if r["policy"] == "least_outstanding")
    for line in grid([("policy", "mean TTFT (s)", "p99 TTFT (s)", "cached prompt",
                       "attainment", "max/min load", "TTFT vs least_outstanding")] + [
            (r["policy"], _fmt(r["mean_ttft"]), _fmt(r["p99_ttft"]),
             _fmt(r["cached_share"], True), _fmt(r["attainment"], True),
             _fmt(r["max_min_load"]),
             _fmt((r["mean_ttft"] / lo["mean_ttft"] - 1) if r["mean_ttft"] and lo["mean_ttft"]
                  else None, True)) for r in rows]):
        print(line)

    print("\n## 3. Elastic replicas vs all awake (bursty trace, 4 replicas; lab)")
    rows = elastic()
    results["elastic"] = rows
    awake = rows[0]["replica_seconds"] or 1.0
    for line in grid([("mode", "attainment", "replica-seconds awake", "vs all awake",
                       "wakes")] + [
            (r["mode"], _fmt(r["attainment"], True), f"{r['replica_seconds']:.0f}",
             _fmt(r["replica_seconds"] / awake - 1, True), str(r["wakes"])) for r in rows]):
        print(line)
    if not args.no_live:
        live(results)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
        print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
