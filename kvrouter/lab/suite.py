"""``make bench-policy``: the policy lab's figures for docs/performance.md, in one command.

Generates the Prism-style traces (parameters and seeds below), runs every policy on each at
the trace's own rate and searches each policy's highest rate at 99% SLO attainment, checks
the targets, and writes a markdown section, JSON and plots.

    python -m kvrouter.lab.suite [CONFIG] [--out DIR] [--duration SECONDS]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, List

from kvrouter.bench import trace
from kvrouter.config.load import load_config
from kvrouter.errors import KvrouterError
from kvrouter.lab import report
from kvrouter.lab import run as lab

NEW = "adaptive"
BASELINES = ("static", "seed", "ttl", "ollama", "lru")
# Prism-style traces: power-law popularity over 24 models, gamma arrivals (CV 2 and 4, as
# Prism's benchmarks), models active about a quarter of the time (on 60 s / off 180 s on
# average: mostly idle, and a model's rate jumps from 0 to its peak within a minute),
# prompt and output lengths uniform over about 8..512 tokens (Prism's input/output ranges).
TRACE: Dict[str, Any] = dict(rate=20.0, alpha=1.0, on_seconds=60.0, off_seconds=180.0,
                             prompt_tokens=260, output_tokens=260, length_jitter=0.97)
TRACES: Dict[str, Dict[str, Any]] = {"cv2-seed1": dict(cv=2.0, seed=1), "cv4-seed1": dict(cv=4.0, seed=1),
          "cv2-seed2": dict(cv=2.0, seed=2), "cv4-seed2": dict(cv=4.0, seed=2)}


def _job(args) -> tuple:
    """One policy on one trace (a worker process): its run at the trace's rate, its max rate."""
    config, label, path, name = args
    cfg = load_config(config)
    rows = trace.read(path)
    slo = lab.slos_for(cfg, rows)
    started = time.monotonic()
    _, summary = lab.run(cfg, name, rows, slo)
    seconds = time.monotonic() - started
    return label, name, {"summary": summary, "seconds": seconds,
                         "max_rate": lab.max_rate(cfg, name, rows, slo)}


def run_suite(config: str, out: str, duration: float, jobs: int = 0) -> dict:
    cfg = load_config(config)
    models = [i.model for i in cfg.instances]
    os.makedirs(out, exist_ok=True)
    doc: Dict[str, dict] = {}
    work = []
    for label, params in TRACES.items():
        rows = trace.generate(models, duration, TRACE["rate"], TRACE["alpha"], params["cv"],
                              TRACE["on_seconds"], TRACE["off_seconds"],
                              TRACE["prompt_tokens"], TRACE["output_tokens"],
                              TRACE["length_jitter"], seed=params["seed"])
        path = os.path.join(out, f"{label}.jsonl")
        trace.write(rows, path)
        doc[label] = {"trace": dict(TRACE, **params, duration=duration, models=len(models),
                                    requests=len(rows), rate=lab.base_rate(rows)),
                      "results": {}}
        work += [(config, label, path, name) for name in (NEW,) + BASELINES]
    with multiprocessing.Pool(jobs or os.cpu_count() or 1) as pool:
        for label, name, result in pool.imap_unordered(_job, work):
            doc[label]["results"][name] = result
            print(f"{label} {name}: {result['summary']['attainment'] * 100:.2f}% at the "
                  f"trace's rate, max {result['max_rate']['max_rate'] or 0:.1f} req/s "
                  f"({result['seconds']:.1f} s a run)", file=sys.stderr, flush=True)
    for label, d in doc.items():
        d["results"] = {n: d["results"][n] for n in (NEW,) + BASELINES}
        d["checks"] = checks(d["results"])
        t = d["trace"]
        report.plot({n: r["max_rate"]["curve"] for n, r in d["results"].items()},
                    os.path.join(out, f"{label}.png"), title=f"{label}: {t['models']} models, "
                    f"{duration:.0f} s, {t['rate']:.1f} req/s", target=lab.TARGET)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    text = markdown(doc, config)
    with open(os.path.join(out, "performance.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    return doc


def checks(results: Dict[str, dict]) -> List[dict]:
    """The targets of the policy lab, each with the figures behind it."""
    def rate(name):
        return results[name]["max_rate"]["max_rate"] or 0.0

    new, static = rate(NEW), rate("static")
    best = max(BASELINES, key=rate)
    s_new, s_seed = results[NEW]["summary"], results["seed"]["summary"]
    both = (s_new["attainment"] or 0) >= lab.TARGET and (s_seed["attainment"] or 0) >= lab.TARGET
    saving = 1 - s_new["gpu_memory_gb_seconds"] / s_seed["gpu_memory_gb_seconds"]
    return [
        {"target": f"{NEW} sustains >= 4x the rate of static at 99% SLO attainment",
         "value": f"{new / static:.2f}x ({new:.1f} vs {static:.1f} req/s)" if static else "-",
         "met": bool(static) and new >= 4 * static},
        {"target": f"at the trace's rate, both at >= 99% attainment, {NEW} uses >= 30% fewer "
         "GPU memory-seconds than seed",
         "value": f"{saving * 100:.0f}% fewer ({s_new['attainment'] * 100:.2f}% vs "
         f"{s_seed['attainment'] * 100:.2f}% attainment)", "met": both and saving >= 0.30},
        {"target": f"{NEW} is not worse than the best baseline ({best})",
         "value": f"{new:.1f} vs {rate(best):.1f} req/s", "met": new >= rate(best) - 1e-9},
    ]


def markdown(doc: Dict[str, dict], config: str) -> str:
    lines = [f"Config `{config}`; `make bench-policy` regenerates this section.", ""]
    for label, d in doc.items():
        t = d["trace"]
        lines += [f"#### Trace {label}: {t['models']} models, {t['duration']:.0f} s, "
                  f"{t['requests']} requests ({t['rate']:.1f} req/s), CV {t['cv']:g}, "
                  f"seed {t['seed']}", "",
                  "| policy | SLO attainment | TTFT p99 ms | wakes (requests waiting) | cold "
                  "starts | GPU memory GB (mean) | max rate at 99% | top miss causes |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in d["results"].items():
            s = r["summary"]
            mr = r["max_rate"]["max_rate"]
            causes = ", ".join(f"{k} {v}" for k, v in list(s["misses"].items())[:2]) or "-"
            lines.append(
                f"| {name} | {s['attainment'] * 100:.2f}% | {s['ttft']['p99'] * 1000:.0f} | "
                f"{s['wakes']} ({s['wakes_on_request_path']}) | {s['cold_starts']} | "
                f"{s['mean_gpu_memory_gb']:.0f} | "
                f"{'none' if mr is None else f'{mr:.1f} req/s'} | {causes} |")
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for c in d["checks"]:
            lines.append(f"| {c['target']} | {c['value']} | {'yes' if c['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrouter.lab.suite", description=__doc__)
    p.add_argument("config", nargs="?", default="etc/lab/prism-24.yaml")
    p.add_argument("--out", default="bench-results/policy-lab")
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: cores)")
    args = p.parse_args(argv)
    try:
        run_suite(args.config, args.out, args.duration, args.jobs)
    except KvrouterError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
