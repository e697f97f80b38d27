"""``kvrouter simulate``: replay a trace against the config's engines under each policy."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional, Sequence

import click

from kvrouter.bench import trace
from kvrouter.config.schema import Config
from kvrouter.control import policies
from kvrouter.errors import KvrouterError
from kvrouter.lab import outcome, report
from kvrouter.lab import run as lab


def simulate(cfg: Config, trace_file: str, names: Sequence[str], scale: float,
             find_max: bool, target: float, ttft_scale: float, tpot_scale: float,
             per_model: bool, json_out: Optional[str], out_dir: Optional[str],
             plot_out: Optional[str], skip_unknown: bool = False,
             timing_file: Optional[str] = None) -> Dict[str, dict]:
    for name in names:
        try:
            policies.check(name)
        except ValueError as err:
            raise KvrouterError(f"--policy {name}: {err}") from None
    if plot_out and not find_max:
        raise KvrouterError("--plot draws attainment against rate: add --max-rate")
    if plot_out:
        report.require_plotting()
    rows = trace.read(trace_file)
    if not rows:
        raise KvrouterError(f"{trace_file}: the trace has no requests")
    known = {a for i in cfg.instances for a in i.route_names or (i.model,)}
    rows = trace.check_models(trace_file, rows, known, cfg.source, skip_unknown)
    timings = None
    if timing_file:
        from kvrouter.bench import calibrate

        timings = lab.timings_from(cfg, calibrate.load(timing_file), timing_file)
    slo = lab.slos_for(cfg, rows, ttft_scale, tpot_scale, timings)
    results: Dict[str, dict] = {}
    for n, name in enumerate(names, 1):
        click.echo(f"[{n}/{len(names)}] {name}: replaying {len(rows)} requests"
                   f"{' and searching for the max rate' if find_max else ''} ...", err=True)
        started = time.monotonic()
        try:
            world, summary = lab.run(cfg, name, rows, slo, scale, timings)
        except ValueError as err:   # the deployment cannot run this way (static: no fit)
            if len(names) == 1:
                raise KvrouterError(f"policy {name}: {err}") from None
            click.echo(f"warning: policy {name} left out: {err}", err=True)
            continue
        results[name] = {"summary": summary,
                         "max_rate": lab.max_rate(cfg, name, rows, slo, target,
                                                  timings=timings) if find_max else None}
        click.echo(f"[{n}/{len(names)}] {name}: done in {time.monotonic() - started:.1f}s",
                   err=True)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as fh:
                json.dump(outcome.bench_result(world, slo, {
                    "simulated": True, "policy": name, "trace": trace_file, "scale": scale,
                    "config": cfg.source}), fh, indent=1)
    rate = lab.base_rate(rows) * scale
    click.echo(f"{len(rows)} requests, {rate:.2f} req/s over "
               f"{max(r['time'] for r in rows) / scale:.0f} s; SLO: TTFT {ttft_scale:g}x, TPOT "
               f"{tpot_scale:g}x the unloaded p99 of each model")
    click.echo(report.table(results))
    if per_model:
        for name, res in results.items():
            click.echo(f"\n[{name}]\n" + report.model_table(res["summary"]))
    doc = {"schema": report.SCHEMA, "trace": trace_file, "config": cfg.source, "scale": scale,
           "rate": rate, "target": target, "ttft_slo_scale": ttft_scale,
           "tpot_slo_scale": tpot_scale, "policies": results}
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        click.echo(f"results: {json_out}")
    if out_dir:
        click.echo(f"per-policy results (for `kvrouter bench --compare`): {out_dir}/")
    if plot_out and results:
        report.plot({n: r["max_rate"]["curve"] for n, r in results.items()}, plot_out,
                    title=os.path.basename(trace_file), target=target)
        click.echo(f"plot: {plot_out}")
    return results


def options(fn):
    opts = [
        click.option("--trace", "trace_file", required=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="JSON lines {time, model, prompt_tokens, output_tokens} "
                     "(`kvrouter bench gen-trace` writes them), or a .csv with those columns."),
        click.option("--policy", "names", multiple=True,
                     help=f"Repeat for several (default: all of {', '.join(policies.POLICIES)}); "
                     "lru:T and ttl:T take a threshold, slo:P a target."),
        click.option("--scale", type=float, default=1.0, show_default=True,
                     help="Rate scale: 2 replays the trace in half the time."),
        click.option("--max-rate", "find_max", is_flag=True,
                     help="Also find each policy's highest rate at the target attainment."),
        click.option("--target", type=click.FloatRange(0, 1), default=lab.TARGET,
                     show_default=True, help="SLO attainment for --max-rate."),
        click.option("--ttft-slo-scale", type=float, default=outcome.TTFT_SLO_SCALE,
                     show_default=True, help="TTFT SLO: this x the model's unloaded p99."),
        click.option("--tpot-slo-scale", type=float, default=outcome.TPOT_SLO_SCALE,
                     show_default=True, help="TPOT SLO: this x the model's unloaded TPOT."),
        click.option("--per-model", is_flag=True, help="Print each policy's per-model table."),
        click.option("--json", "json_out", default=None, help="Write every figure as JSON."),
        click.option("--out-dir", default=None,
                     help="Write POLICY.json per policy (kvrouter-bench/1, for bench --compare)."),
        click.option("--skip-unknown", is_flag=True,
                     help="Leave out the requests for models the config lacks (else an error)."),
        click.option("--timing", "timing", default=None,
                     type=click.Path(exists=True, dir_okay=False),
                     help="A timing profile (`kvrouter bench calibrate` writes one): its "
                     "models' timing instead of the config's."),
        click.option("--plot", "plot_out", default=None,
                     help="Attainment vs rate plot (.png/.svg; needs --max-rate, matplotlib)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn
