"""``make bench-kv``: the KV arbiter against a static equal split, side by side.

Three simulated models share one simulated GPU through kvcached pools: 15 GB budget, 1 GB
of weights each, 12 GB for KV (ceilings 8 GB each). The same skewed, bursty trace (the
trace generator: power-law popularity, gamma arrivals, on/off periods) is replayed through
the router twice: once with the pools fixed at an equal 4 GB each (static partitioning,
``kv_rebalance_seconds: 0``), once with the arbiter dividing the 12 GB by demand. A
request whose KV does not fit its pool waits in its engine, so a pool too small for a
burst shows as TTFT. Prints p50/p99 TTFT and SLO attainment per model; nothing asserted.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Dict, List  # noqa: E402

from kvrouter import kvpool  # noqa: E402
from kvrouter.bench import harness, prompts, trace  # noqa: E402
from kvrouter.bench.loadgen import Job, LoadGenerator, LoadSpec  # noqa: E402

MODELS = ["kv/alpha", "kv/beta", "kv/gamma"]
SIM = ["--kv-cache-gb", "8", "--max-model-len", "4096", "--itl-ms", "10", "--ttft-ms", "5",
       "--weights-gb", "1", "--max-concurrency", "512"]
GB = 1 << 30


def _pct(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_mode(mode: str, rows: List[dict], slo_ttft: float) -> Dict[str, dict]:
    ipc = {m: f"kvr_bench_{uuid.uuid4().hex[:8]}" for m in MODELS}
    ports = {m: harness.free_port() for m in MODELS}
    children = [harness.Child([sys.executable, "-m", "kvrouter", "sim-engine", "--model", m,
                             "--port", str(ports[m]), *SIM],
                            env={"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": ipc[m]})
                for m in MODELS]
    rp = harness.free_port()
    rebalance = 0.5 if mode == "arbiter" else 0
    text = ("router: {router_host: 127.0.0.1, router_port: %d, access_log: false}\n"
            "sleep_manager: {gpu_memory_gb: {\"0\": 15}, kv_rebalance_seconds: %g}\n"
            "instances:\n" % (rp, rebalance))
    for i, m in enumerate(MODELS):
        text += (f"  - {{name: m{i}, model: {m}, engine: sim, weights_gb: 1, kv_cache_gb: 8,"
                 f" gpus: 0, kvcached_env: [ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipc[m]}],"
                 f" engine_args: ['--host 127.0.0.1 --port {ports[m]}']}}\n")
    folder = tempfile.mkdtemp(prefix="kvr-kvbench-")
    path = os.path.join(folder, "kvrouter.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    router = harness.Child([sys.executable, "-m", "kvrouter", "serve", path])
    try:
        for m in MODELS:
            harness.wait_port(ports[m], "/health")
        harness.wait_port(rp, "/health")
        if mode == "static":
            for m in MODELS:
                kvpool.set_limit(kvpool.segment_path(ipc[m]), 4 * GB)
        time.sleep(1.5)  # the router adopts the engines (and, with the arbiter, divides)
        jobs = [Job(r["time"], r["model"],
                    prompts.synthetic(1, r["prompt_tokens"], i)[0][0], r["output_tokens"])
                for i, r in enumerate(rows)]
        spec = LoadSpec(base_url=f"http://127.0.0.1:{rp}/v1", endpoint="completions",
                        stream=True, request_rate=1.0, timeout=300)
        gen = LoadGenerator(spec)
        gen.run(jobs)
    finally:
        router.stop()
        for c in children:
            c.stop()
    out: Dict[str, dict] = {}
    for m in MODELS + ["all"]:
        samples = [s for s in gen.samples if m == "all" or s.model == m]
        ttfts = [s.ttft for s in samples if s.ok and s.ttft is not None]
        good = sum(1 for s in samples if s.ok and s.ttft is not None and s.ttft <= slo_ttft)
        out[m] = {"requests": len(samples), "errors": sum(1 for s in samples if not s.ok),
                  "ttft_p50_s": _pct(ttfts, 0.5), "ttft_p99_s": _pct(ttfts, 0.99),
                  "slo_attainment": good / len(samples) if samples else float("nan")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=14.0, help="mean requests/s, all models")
    ap.add_argument("--slo-ttft-ms", type=float, default=500.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default="bench-results/kv-arbiter.json")
    args = ap.parse_args(argv)
    params = dict(duration=args.duration, total_rate=args.rate, alpha=0.5, cv=2.0,
                  on_seconds=10.0, off_seconds=20.0, prompt_tokens=256, output_tokens=300,
                  seed=args.seed)
    rows = trace.generate(MODELS, **params)
    results = {"trace": params, "requests": len(rows), "slo_ttft_ms": args.slo_ttft_ms}
    for mode in ("static", "arbiter"):
        print(f"replaying {len(rows)} requests with the {mode} split ...", flush=True)
        results[mode] = run_mode(mode, rows, args.slo_ttft_ms / 1000)
    print(f"\nKV arbiter vs static split (1 GPU, 12 GB of KV, 3 models; trace {params})")
    print(f"{'model':<10} {'':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'SLO att.':>9} {'errors':>7}")
    for m in MODELS + ["all"]:
        for mode in ("static", "arbiter"):
            r = results[mode][m]
            print(f"{m:<10} {mode:>8} {r['ttft_p50_s'] * 1000:8.0f}ms "
                  f"{r['ttft_p99_s'] * 1000:8.0f}ms {r['slo_attainment']:9.1%} "
                  f"{r['errors']:7d}")
    s, a = results["static"]["all"]["ttft_p99_s"], results["arbiter"]["all"]["ttft_p99_s"]
    results["p99_ttft_ratio"] = s / a if a else None
    print(f"\np99 TTFT, all models: static / arbiter = {s / a:.1f}x" if a else "")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"(raw figures: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
