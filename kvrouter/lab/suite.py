"""``make bench-policy``: every sleep policy against fair baselines, on a training set and
a held-out test set of traces (``lab/heldout.py``), simulated.

For each trace and policy: the run at the trace's own rate (SLO attainment, GPU memory in
GB x hours) and the attainment curve over rates (1/4x to 16x the trace's, each point with
its memory), with the highest rate at 99% attainment. Baselines: ``static`` (each GPU split
evenly, as labelled), ``static-sized`` (KV by expected load, sized from the trace's first
fifth), the timers (``lru`` at the configured 300 s, ``seed``, ``ttl``, ``ollama``), and
the best fixed timer in hindsight (``lru:T`` over a grid of T, the best per trace with its
T): the oracle to beat. The new policy's targets are checked on the test set only.

    python -m kvrouter.lab.suite [--out DIR] [--sets train,test] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from kvrouter.errors import KvrouterError
from kvrouter.lab import heldout
from kvrouter.lab import run as lab

NEW = "slo"
OURS = (NEW, "adaptive")
BASELINES = ("static", "static-sized", "lru", "seed", "ttl", "ollama")
GRID = (10, 30, 60, 120)        # lru:T, with lru itself (300 s): the fixed timers
ORACLE = "lru-best"
SCALES = [0.25, 0.5, 1.0, 2.0, 4.0, 16.0]
_CASES: Dict[str, Any] = {}


def timers() -> Tuple[str, ...]:
    return tuple(f"lru:{t}" for t in GRID) + ("lru",)


def _case(name: str):
    if name not in _CASES:
        sets = dict(heldout.TRAIN, **heldout.TEST)
        _CASES[name] = sets[name]()
    return _CASES[name]


def _job(args) -> tuple:
    """One policy on one trace (in a worker process)."""
    trace_name, policy = args
    case = _case(trace_name)
    slo = lab.slos_for(case.cfg, case.rows)
    cfg = lab.stating_slos(case.cfg, slo)
    started = time.monotonic()
    try:
        summary = lab.run(cfg, policy, case.rows, slo, timings=case.timings)[1]
        curve = lab.max_rate(cfg, policy, case.rows, slo, scales=SCALES, refine=3,
                             timings=case.timings, whole=True)
    except ValueError as err:   # static: the weights do not fit an even split
        return trace_name, policy, {"error": str(err)}
    small = {k: summary[k] for k in ("requests", "attainment", "gpu_memory_gb_seconds",
                                     "mean_gpu_memory_gb", "wakes", "cold_starts", "misses",
                                     "refused")}
    return trace_name, policy, {"summary": small, "max_rate": curve,
                                "seconds": time.monotonic() - started}


def run_suite(out: str, sets: List[str], only: Optional[List[str]] = None,
              jobs: int = 0) -> dict:
    chosen = {"train": heldout.TRAIN, "test": heldout.TEST}
    names = [(s, n) for s in sets for n in chosen[s] if not only or n in only]
    if not names:
        raise KvrouterError("no trace chosen")
    doc: Dict[str, dict] = {}
    policies = OURS + BASELINES + timers()
    for s, n in names:
        case = _case(n)
        doc[n] = {"set": s, "what": case.what, "models": len(case.cfg.instances),
                  "requests": len(case.rows), "rate": lab.base_rate(case.rows),
                  "results": {}}
    work = [(n, p) for _, n in names for p in policies]
    os.makedirs(out, exist_ok=True)
    with multiprocessing.Pool(jobs or os.cpu_count() or 1) as pool:
        for n, p, res in pool.imap_unordered(_job, work):
            doc[n]["results"][p] = res
            if "error" in res:
                print(f"{n} {p}: left out: {res['error']}", file=sys.stderr, flush=True)
                continue
            s = res["summary"]
            print(f"{n} {p}: {s['attainment'] * 100:.2f}% at the trace's rate, "
                  f"{s['gpu_memory_gb_seconds'] / 3600:.0f} GB*h, max "
                  f"{res['max_rate']['max_rate'] or 0:.1f} req/s ({res['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    for d in doc.values():
        d["oracle"] = oracle(d["results"])
        d["checks"] = checks(d["results"], d["oracle"])
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    text = markdown(doc)
    with open(os.path.join(out, "performance.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    return doc


def _ok(res: dict) -> bool:
    return "summary" in res


def _att(res: dict) -> float:
    return res["summary"]["attainment"] or 0.0 if _ok(res) else 0.0


def _mem(res: dict) -> float:
    return res["summary"]["gpu_memory_gb_seconds"] / 3600.0


def _max(res: dict) -> float:
    return (res["max_rate"]["max_rate"] or 0.0) if _ok(res) else 0.0


def oracle(results: Dict[str, dict]) -> dict:
    """The best fixed timer in hindsight: least memory at >= 99% at the trace's rate, and
    highest max rate, each with its threshold."""
    fixed = {p: results[p] for p in timers() if _ok(results.get(p, {}))}
    passing = [p for p in fixed if _att(fixed[p]) >= lab.TARGET]
    by_mem = min(passing, key=lambda p: _mem(fixed[p])) if passing else None
    by_rate = max(fixed, key=lambda p: _max(fixed[p])) if fixed else None
    return {"memory": by_mem, "memory_gb_h": _mem(fixed[by_mem]) if by_mem else None,
            "rate": by_rate, "max_rate": _max(fixed[by_rate]) if by_rate else None}


def checks(results: Dict[str, dict], best: dict) -> Dict[str, Optional[bool]]:
    """The new policy's targets on one trace (None: not applicable)."""
    new = results.get(NEW, {})
    if not _ok(new):
        return {}
    base = {p: results[p] for p in BASELINES + timers() if _ok(results.get(p, {}))}
    reaching = [p for p in base if _att(base[p]) >= lab.TARGET]
    least = min((_mem(base[p]) for p in reaching), default=None)
    return {
        "reaches_99_where_any_baseline_does": _att(new) >= lab.TARGET if reaching else None,
        "memory_within_10pct_of_best_baseline": (
            _att(new) >= lab.TARGET and _mem(new) <= 1.1 * least) if least else None,
        "memory_below_best_fixed_timer": (
            _att(new) >= lab.TARGET and _mem(new) < best["memory_gb_h"])
        if best["memory_gb_h"] else None,
        "max_rate_at_least_best_baseline": _max(new) >= max(_max(r) for r in base.values())
        - 1e-9 if base else None,
    }


def tally(doc: Dict[str, dict], which: str) -> Dict[str, Tuple[int, int]]:
    """Per check: (traces where met, traces where it applies), over one set."""
    out: Dict[str, Tuple[int, int]] = {}
    for d in doc.values():
        if d["set"] != which:
            continue
        for k, v in d["checks"].items():
            met, n = out.get(k, (0, 0))
            if v is not None:
                out[k] = (met + int(v), n + 1)
    return out


def _gbh(v: Optional[float]) -> str:
    return f" ({v:.0f} GB*h)" if v else ""


def markdown(doc: Dict[str, dict]) -> str:
    lines = ["`make bench-policy` regenerates this section (`python -m kvrouter.lab.suite`).",
             ""]
    for which in ("test", "train"):
        t = tally(doc, which)
        if not t:
            continue
        lines += [f"#### {NEW}'s targets on the {which} set", "",
                  "| target | traces met / where it applies |", "|---|---|"]
        for k, (met, n) in t.items():
            lines.append(f"| {k.replace('_', ' ')} | {met} / {n} |")
        lines.append("")
    for name, d in doc.items():
        o = d["oracle"]
        lines += [f"#### {d['set']}: {name}: {d['what']}; {d['models']} models, "
                  f"{d['requests']} requests, {d['rate']:.1f} req/s", "",
                  f"Best fixed timer in hindsight: {o['memory'] or 'none'} for memory at 99%"
                  f"{_gbh(o['memory_gb_h'])}, {o['rate']} for max rate.", "",
                  "| policy | attainment at the trace's rate | GPU GB*h | max rate at 99% | "
                  "attainment at 1/4x, 1x, 4x, 16x the rate | top miss cause |",
                  "|---|---|---|---|---|---|"]
        for p, r in d["results"].items():
            if not _ok(r):
                lines.append(f"| {p} | left out: {r.get('error', '-')} | | | | |")
                continue
            curve = {c["scale"]: c["attainment"] for c in r["max_rate"]["curve"]}
            pts = ", ".join(f"{curve[s] * 100:.1f}%" if s in curve else "-"
                            for s in (0.25, 1.0, 4.0, 16.0))
            miss = next(iter(r["summary"]["misses"].items()), None)
            lines.append(f"| {p} | {_att(r) * 100:.2f}% | {_mem(r):.0f} | "
                         f"{_max(r):.1f} | {pts} | "
                         f"{f'{miss[0]} {miss[1]}' if miss else '-'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrouter.lab.suite", description=__doc__)
    p.add_argument("--out", default="bench-results/policy-lab")
    p.add_argument("--sets", default="test,train")
    p.add_argument("--only", action="append", help="a trace by name (repeat)")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: cores)")
    args = p.parse_args(argv)
    try:
        run_suite(args.out, args.sets.split(","), args.only, args.jobs)
    except KvrouterError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
