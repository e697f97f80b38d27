"""Command lines of the programs kvrouter renders: engines, the router, benchmark clients."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from typing import List

from kvrouter.config.schema import BenchClient, Config, Instance, SimOptions, host_url


@dataclass(frozen=True)
class Interpreters:
    """Which pythons the rendered commands use; injected so golden files are stable."""

    kvrouter: str = sys.executable
    system: str = shutil.which("python3") or "/usr/bin/python3"


def engine_python(inst: Instance, py: Interpreters) -> str:
    if inst.engine == "sim":
        return py.kvrouter
    if inst.using_venv and inst.venv_path:
        return os.path.join(inst.venv_path, "bin", "python")
    return py.system


def engine_argv(inst: Instance, py: Interpreters) -> List[str]:
    python = engine_python(inst, py)
    if inst.engine == "vllm":
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", inst.model,
                *inst.argv_args]
    if inst.engine == "sglang":
        return [python, "-m", "sglang.launch_server", "--model-path", inst.model,
                *inst.argv_args]
    # every option of the `sim:` block is a sim-engine flag of the same name, with the same
    # default: only the ones the config changes are written out
    args = ["--dialect", inst.sim.dialect, "--model", inst.model]
    defaults = SimOptions()
    for f in dataclasses.fields(inst.sim):
        value = getattr(inst.sim, f.name)
        if f.name != "dialect" and value != getattr(defaults, f.name):
            args += ["--" + f.name.replace("_", "-"),
                     f"{value:g}" if isinstance(value, float) else str(value)]
    if inst.weights_gb is not None:
        args += ["--weights-gb", f"{inst.weights_gb:g}"]
    if inst.kv_cache_gb is not None:
        args += ["--kv-cache-gb", f"{inst.kv_cache_gb:g}"]
    return [python, "-m", "kvrouter", "sim-engine", *args, *inst.argv_args]


def router_argv(cfg: Config, py: Interpreters) -> List[str]:
    node = ["--cluster-host", cfg.node] if cfg.node else []
    return [py.kvrouter, "-m", "kvrouter", "serve", cfg.source, *node]


def router_url(cfg: Config) -> str:
    return host_url(cfg.router.router_host, cfg.router.router_port)


def bench_argv(cfg: Config, client: BenchClient, py: Interpreters) -> List[str]:
    base = router_url(cfg)
    result = os.path.join(cfg.benchmark.results_dir, f"{client.name}.json")
    if client.tool == "builtin":
        args = [py.kvrouter, "-m", "kvrouter", "bench", "run", "--base-url", base + "/v1",
                "--model", client.model, "--endpoint", client.endpoint,
                "--num-prompts", str(client.num_prompts),
                "--prompt-tokens", str(client.prompt_tokens),
                "--output-tokens", str(client.output_tokens), "--output", result]
        if client.concurrency is not None:
            args += ["--concurrency", str(client.concurrency)]
        if client.request_rate is not None:
            args += ["--request-rate", f"{client.request_rate:g}"]
        if client.duration_seconds is not None:
            args += ["--duration", f"{client.duration_seconds:g}"]
        if client.dataset_path:
            args += ["--dataset", client.dataset_path]
        args.append("--stream" if client.stream else "--no-stream")
        return args + list(client.extra_args)
    python = (os.path.join(client.venv_path, "bin", "python") if client.venv_path
              else py.system)
    # external tools run through `kvrouter bench external`, which checks that the tool is
    # installed and says so clearly instead of a Python traceback
    guard = [py.kvrouter, "-m", "kvrouter", "bench", "external", "--tool", client.tool,
             "--python", python, "--"]
    return guard + _external_args(cfg, client, base, result)


def _external_args(cfg: Config, client: BenchClient, base: str, result: str) -> List[str]:
    if client.tool == "vllm":
        backend = "openai-chat" if client.endpoint == "chat" else "openai"
        endpoint = "/v1/chat/completions" if client.endpoint == "chat" else "/v1/completions"
        args = ["-m", "vllm.entrypoints.cli.main", "bench", "serve",
                "--backend", backend, "--base-url", base, "--endpoint", endpoint,
                "--model", client.model, "--num-prompts", str(client.num_prompts),
                "--save-result", "--result-dir", cfg.benchmark.results_dir,
                "--result-filename", f"{client.name}.json"]
        if client.dataset_path:
            args += ["--dataset-name", "sharegpt", "--dataset-path", client.dataset_path]
        else:
            args += ["--dataset-name", "random", "--random-input-len", str(client.prompt_tokens),
                     "--random-output-len", str(client.output_tokens)]
        if client.request_rate is not None:
            args += ["--request-rate", f"{client.request_rate:g}"]
        if client.concurrency is not None:
            args += ["--max-concurrency", str(client.concurrency)]
        return args + list(client.extra_args)
    if client.tool == "sglang":
        backend = "vllm-chat" if client.endpoint == "chat" else "vllm"
        args = ["-m", "sglang.bench_serving", "--backend", backend,
                "--base-url", base, "--model", client.model,
                "--num-prompts", str(client.num_prompts), "--output-file", result]
        if client.dataset_path:
            args += ["--dataset-name", "sharegpt", "--dataset-path", client.dataset_path]
        else:
            args += ["--dataset-name", "random", "--random-input-len", str(client.prompt_tokens),
                     "--random-output-len", str(client.output_tokens), "--random-range-ratio", "1"]
        if client.request_rate is not None:
            args += ["--request-rate", f"{client.request_rate:g}"]
        if client.concurrency is not None:
            args += ["--max-concurrency", str(client.concurrency)]
        return args + list(client.extra_args)
    # guidellm
    rate_type = "concurrent" if client.concurrency else ("constant" if client.request_rate
                                                         else "synchronous")
    args = ["-m", "guidellm", "benchmark", "--target", base, "--model", client.model,
            "--rate-type", rate_type,
            "--data", f"prompt_tokens={client.prompt_tokens},output_tokens={client.output_tokens}",
            "--max-requests", str(client.num_prompts), "--output-path", result]
    if client.concurrency:
        args += ["--rate", str(client.concurrency)]
    elif client.request_rate:
        args += ["--rate", f"{client.request_rate:g}"]
    return args + list(client.extra_args)
