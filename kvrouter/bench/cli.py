"""``kvrouter bench``: run load, replay or generate traces, compare results."""
from __future__ import annotations

import json
import os

import click

from kvrouter.errors import KvrouterError


def _slo(ttft_ms, tpot_ms, e2e_ms) -> dict:
    slo = {}
    if ttft_ms is not None:
        slo["ttft"] = ttft_ms / 1000.0
    if tpot_ms is not None:
        slo["tpot"] = tpot_ms / 1000.0
    if e2e_ms is not None:
        slo["e2e"] = e2e_ms / 1000.0
    return slo


def _finish(gen, duration, config, output):
    from kvrouter.bench.report import table

    result = gen.result(duration, config)
    click.echo(table(result))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        click.echo(f"results: {output}")
    return result


_common = [
    click.option("--base-url", required=True, help="http://HOST:PORT/v1 of the router or engine."),
    click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="chat"),
    click.option("--stream/--no-stream", default=True),
    click.option("--concurrency", type=int, default=None, help="closed loop: requests in flight"),
    click.option("--timeout", type=float, default=600.0),
    click.option("--api-key", envvar="KVROUTER_API_KEY", default=None),
    click.option("--slo-ttft-ms", type=float, default=None),
    click.option("--slo-tpot-ms", type=float, default=None),
    click.option("--slo-e2e-ms", type=float, default=None),
    click.option("--output", default=None, help="write results as JSON here"),
    click.option("--seed", type=int, default=0),
]


def common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group("bench", invoke_without_command=True)
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
              help="compare two result files: --compare A.json B.json")
@click.pass_context
def bench(ctx, compare):
    """Load generator and benchmark tools."""
    if compare:
        from kvrouter.bench.report import compare as cmp
        from kvrouter.bench.report import load

        click.echo(cmp(load(compare[0]), load(compare[1])))
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@bench.command("run")
@common
@click.option("--model", "models", multiple=True, required=True, help="repeat for several")
@click.option("--num-prompts", type=int, default=200)
@click.option("--request-rate", type=float, default=None, help="open loop: requests/s")
@click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson")
@click.option("--duration", type=float, default=None, help="stop sending after this long")
@click.option("--prompt-tokens", type=int, default=128)
@click.option("--output-tokens", type=int, default=128)
@click.option("--output-dist", type=click.Choice(["fixed", "uniform"]), default="fixed",
              help="uniform: output length drawn from [1, 2*output-tokens)")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ShareGPT-format JSON file of prompts")
def run_cmd(base_url, endpoint, stream, concurrency, timeout, api_key, slo_ttft_ms,
            slo_tpot_ms, slo_e2e_ms, output, seed, models, num_prompts, request_rate, arrival,
            duration, prompt_tokens, output_tokens, output_dist, dataset):
    """Send NUM_PROMPTS requests (round robin over --model) and report per model."""
    import random

    from kvrouter.bench import prompts
    from kvrouter.bench.loadgen import Job, LoadGenerator, LoadSpec, arrival_times, spec_dict

    if concurrency is None and request_rate is None:
        concurrency = 1
    rng = random.Random(seed)
    texts = (prompts.sharegpt(dataset, num_prompts, seed) if dataset
             else prompts.synthetic(num_prompts, prompt_tokens, seed))
    times = arrival_times(num_prompts, request_rate, arrival, seed)
    jobs = []
    for i, ((text, ds_len), t) in enumerate(zip(texts, times)):
        out = ds_len or (output_tokens if output_dist == "fixed"
                         else rng.randint(1, max(1, 2 * output_tokens - 1)))
        jobs.append(Job(t, models[i % len(models)], text, out))
    spec = LoadSpec(base_url=base_url, endpoint=endpoint, stream=stream, concurrency=concurrency,
                    request_rate=request_rate, arrival=arrival, duration=duration,
                    timeout=timeout, api_key=api_key,
                    slo=_slo(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms))
    gen = LoadGenerator(spec)
    duration_s = gen.run(jobs, progress=True)
    result = _finish(gen, duration_s, spec_dict(spec, models=list(models),
                                                num_prompts=num_prompts,
                                                prompt_tokens=prompt_tokens,
                                                output_tokens=output_tokens, seed=seed), output)
    if result["total"]["completed"] == 0:
        raise KvrouterError("no request succeeded")


@bench.command("trace")
@common
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--speed", type=float, default=1.0, help="replay faster (2 = twice as fast)")
@click.option("--skip-unknown", is_flag=True,
              help="Leave out requests for models the endpoint does not serve (else an error).")
def trace_cmd(base_url, endpoint, stream, concurrency, timeout, api_key, slo_ttft_ms,
              slo_tpot_ms, slo_e2e_ms, output, seed, trace_file, speed, skip_unknown):
    """Replay TRACE_FILE against the endpoint and report per-model SLO attainment."""
    from kvrouter.bench import prompts, trace
    from kvrouter.bench.loadgen import Job, LoadGenerator, LoadSpec, spec_dict

    rows = trace.read(trace_file)
    if not rows:
        raise KvrouterError(f"{trace_file}: the trace has no requests")
    rows = trace.check_models(trace_file, rows, _served_models(base_url, api_key),
                              base_url, skip_unknown)
    def jobs():   # each prompt made when its time comes
        for i, r in enumerate(rows):
            if "blocks" in r:   # shared prefixes: equal block ids, equal text
                text = prompts.from_blocks(r["blocks"], r["prompt_tokens"], r["block_tokens"])
            else:
                text = prompts.synthetic(1, r["prompt_tokens"], seed + i)[0][0]
            yield Job(r["time"] / speed, r["model"], text, r["output_tokens"])

    spec = LoadSpec(base_url=base_url, endpoint=endpoint, stream=stream, concurrency=concurrency,
                    request_rate=1.0, timeout=timeout, api_key=api_key,
                    slo=_slo(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms))
    gen = LoadGenerator(spec)
    click.echo(f"replaying {len(rows)} requests over {rows[-1]['time'] / speed:.0f}s "
               f"against {base_url}", err=True)
    duration_s = gen.run(jobs(), progress=True, total=len(rows))
    _finish(gen, duration_s, spec_dict(spec, trace=trace_file, speed=speed, requests=len(rows)),
            output)


def _served_models(base_url: str, api_key) -> list:
    """The model ids ``GET {base_url}/models`` lists (what a trace may name)."""
    import urllib.error
    import urllib.request

    root = base_url.rstrip("/")
    root = root if root.endswith("/v1") else root + "/v1"
    req = urllib.request.Request(root + "/models", headers=(
        {"Authorization": f"Bearer {api_key}"} if api_key else {}))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.load(resp)
        return [m["id"] for m in body["data"]]
    except urllib.error.HTTPError as err:
        raise KvrouterError(f"{base_url}/models answered {err.code}: is --base-url the "
                            "router's /v1 (and --api-key right)?") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KvrouterError(f"cannot list the models of {base_url} ({err}): is the router "
                            "running, and --base-url its /v1?") from None


TOOL_MODULES = {"vllm": "vllm", "sglang": "sglang", "guidellm": "guidellm"}


@bench.command("external", context_settings={"ignore_unknown_options": True})
@click.option("--tool", type=click.Choice(sorted(TOOL_MODULES)), required=True)
@click.option("--python", "python", required=True, help="interpreter that has the tool")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def external_cmd(tool, python, args):
    """Run an external benchmark tool after checking it is installed (rendered programs)."""
    import subprocess

    module = TOOL_MODULES[tool]
    if not os.path.exists(python):
        raise KvrouterError(f"benchmark tool {tool!r}: {python} does not exist (set the "
                            "client's venv_path to the tool's virtualenv, or use tool: builtin)")
    probe = subprocess.run([python, "-c", "import importlib.util, sys; "
                            f"sys.exit(importlib.util.find_spec({module!r}) is None)"],
                           capture_output=True)
    if probe.returncode != 0:
        raise KvrouterError(f"benchmark tool {tool!r} is not installed for {python} (pip "
                            f"install {tool} there, or use tool: builtin)")
    os.execv(python, [python, *args])


@bench.command("import-trace")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(
    ["mooncake", "access-log", "azure", "burstgpt", "servegen"]))
@click.argument("source", type=click.Path(exists=True))
@click.option("--model", "models", multiple=True, help="a model to give requests to (repeat)")
@click.option("--models-from", "models_from", default=None, type=click.Path(dir_okay=False),
              metavar="CONFIG", help="every model of this config (with or instead of --model)")
@click.option("--assign", "rule", type=click.Choice(
    ["conversation", "stripe", "zipf", "windows", "client"]), default=None,
              help="how requests are given to models (docs/policy-lab.md, \"Public traces\"): "
              "conversation (mooncake's default): each conversation to one model; stripe: in "
              "turn; zipf (azure's, burstgpt's default): at random by power-law popularity; "
              "windows: consecutive windows of the trace overlaid, one per model; client "
              "(servegen's default): one client per model, busiest first")
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="zipf: popularity exponent")
@click.option("--start", type=float, default=0.0, show_default=True,
              help="servegen: from this second of the clients' traces")
@click.option("--duration", type=float, default=3600.0, show_default=True,
              help="servegen: seconds of the traces to replay")
@click.option("--rate", type=float, default=None,
              help="servegen: total mean requests/s (default: the clients' own)")
@click.option("--seed", type=int, default=0)
@click.option("--out", "out_path", required=True)
def import_trace_cmd(fmt, source, models, models_from, rule, alpha, start, duration, rate,
                     seed, out_path):
    """Turn a trace into a kvrouter trace (JSON lines for `bench trace` and `simulate`):
    `mooncake` (kvcache-ai/Mooncake's, keeping its prompts' block ids so shared prefixes
    replay as shared text), `access-log` (this router's own access lines: the traffic it
    served, with its models and token counts), `azure` (Azure LLM inference trace 2023
    CSV), `burstgpt` (BurstGPT CSV), `servegen` (a folder of ServeGen client traces)."""
    import random

    from kvrouter.bench import importers, public_traces

    if fmt == "access-log":
        rows, missing = importers.access_log(source)
        _write_rows(rows, out_path)
        counts: dict = {}
        for row in rows:
            counts[row["model"]] = counts.get(row["model"], 0) + 1
        click.echo(f"wrote {len(rows)} requests over {rows[-1]['time']:.0f}s to {out_path}: " +
                   ", ".join(f"{m}={n}" for m, n in sorted(counts.items())) +
                   (f"; {missing} without token counts got the defaults" if missing else ""))
        return
    if models_from:
        from kvrouter.config import load_config

        models = tuple(models) + tuple(i.model for i in load_config(models_from).instances
                                       if i.model not in models)
    if fmt == "mooncake":
        out = list(importers.mooncake(source, list(models), rule or "conversation", seed))
    else:
        if rule == "conversation":
            raise click.UsageError(f"--assign conversation is for mooncake; {fmt} takes "
                                   "zipf, stripe, windows or client")
        if fmt == "servegen":
            reqs = public_traces.servegen(source, start, duration, random.Random(seed),
                                          len(models), rate)
        else:
            reqs = (public_traces.azure if fmt == "azure" else public_traces.burstgpt)(source)
        default = "client" if fmt == "servegen" else "zipf"
        out = list(public_traces.assign(reqs, list(models), rule or default, seed, alpha))
    out.sort(key=lambda r: r["time"])
    _write_rows(out, out_path)
    counts = {}
    for row in out:
        counts[row["model"]] = counts.get(row["model"], 0) + 1
    click.echo(f"wrote {len(out)} requests to {out_path}: " +
               ", ".join(f"{m}={counts.get(m, 0)}" for m in models))


def _write_rows(rows, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")


@bench.command("calibrate")
@click.option("--engine-url", required=True, help="the engine itself (http://HOST:PORT), "
              "not the router")
@click.option("--model", required=True, help="the model name the engine serves")
@click.option("--dialect", type=click.Choice(["vllm", "sglang"]), default="vllm",
              show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--long-prompt", "long", type=int, default=1024, show_default=True,
              help="words in the long prompt (the short one has 16)")
@click.option("--concurrency", type=int, default=4, show_default=True,
              help="streams at once for the batch slowdown")
@click.option("--sleep", "with_sleep", is_flag=True,
              help="also time a level-1 sleep and the wake (the engine sleeps meanwhile)")
@click.option("--out", "out_path", required=True, help="the profile (YAML)")
def calibrate_cmd(engine_url, model, dialect, rounds, long, concurrency, with_sleep,
                  out_path):
    """Measure a running engine's prefill, decode step, batch slowdown (and with --sleep
    its sleep and wake) and write a timing profile: the keys of a sim: block, read by
    `kvrouter simulate --timing`."""
    from kvrouter.bench import calibrate

    result = calibrate.measure(engine_url, model, dialect, rounds, long=long,
                               concurrency=concurrency, with_sleep=with_sleep)
    calibrate.write(out_path, model, engine_url, result)
    shown = dict(result["profile"], **result["measured"])
    click.echo(f"{model}: " + ", ".join(f"{k} {v:g}" for k, v in shown.items()) +
               f"\nprofile: {out_path}")


@bench.command("gen-trace")
@click.option("--model", "models", multiple=True, help="most popular first")
@click.option("--models-from", "models_from", default=None, type=click.Path(dir_okay=False),
              metavar="CONFIG", help="every model of this config, in its order (with or "
              "instead of --model)")
@click.option("--duration", type=float, default=600.0)
@click.option("--rate", type=float, default=2.0, help="mean total requests/s")
@click.option("--alpha", type=float, default=1.0, help="power-law popularity exponent")
@click.option("--cv", type=float, default=2.0, help="coefficient of variation of gaps")
@click.option("--on-seconds", type=float, default=60.0, help="mean active period")
@click.option("--off-seconds", type=float, default=60.0, help="mean idle period")
@click.option("--prompt-tokens", type=int, default=128)
@click.option("--output-tokens", type=int, default=128)
@click.option("--seed", type=int, default=0)
@click.option("--out", "out_path", required=True)
def gen_trace_cmd(models, models_from, duration, rate, alpha, cv, on_seconds, off_seconds,
                  prompt_tokens, output_tokens, seed, out_path):
    """Write a multi-model trace (power-law popularity, gamma arrivals, on/off activity)."""
    from kvrouter.bench import trace

    if models_from:
        from kvrouter.config import load_config

        models = tuple(models) + tuple(i.model for i in load_config(models_from).instances
                                       if i.model not in models)
    if not models:
        raise click.UsageError("name the models: --model NAME (repeat) or --models-from CONFIG")

    rows = trace.generate(list(models), duration, rate, alpha, cv, on_seconds, off_seconds,
                          prompt_tokens, output_tokens, seed=seed)
    trace.write(rows, out_path)
    counts: dict = {}
    for r in rows:
        counts[r["model"]] = counts.get(r["model"], 0) + 1
    click.echo(f"wrote {len(rows)} requests to {out_path}: " +
               ", ".join(f"{m}={counts.get(m, 0)}" for m in models))
