"""Command-line options of the simulated engine.

It accepts the real engines' flag names where they mean the same thing and
ignores the GPU-only flags a real config carries, so a real engine's
engine_args work unchanged.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kvrouter.config.schema import DIALECTS, SimOptions
from kvrouter.timing import DEFAULT_KV_CACHE_GB, DEFAULT_MAX_MODEL_LEN, DEFAULT_WEIGHTS_GB, Timing

_YAML = SimOptions()  # the options a config's `sim:` block sets share their defaults


def opt(default: Any, help: str = "", flags: Tuple[str, ...] = (),
        choices: Optional[Tuple[str, ...]] = None) -> Any:
    """One command-line option: its flag is ``--field-name`` unless ``flags`` names them."""
    return field(default=default, metadata={"cli": True, "help": help, "flags": flags,
                                            "choices": choices})


@dataclass(frozen=True)
class SimConfig:
    """Every option of the simulated engine, declared once: the parser is built from it."""

    dialect: str = opt(_YAML.dialect, "which engine to imitate", choices=DIALECTS)
    model: str = opt("sim-model", "model id", flags=("--model", "--model-path"))
    served_model_names: Tuple[str, ...] = opt((), "names the model is served as",
                                              flags=("--served-model-name",))
    host: str = opt("127.0.0.1")
    port: int = opt(8000)
    ttft_ms: float = opt(_YAML.ttft_ms, "time to first token at a short prompt")
    prefill_ms_per_token: float = opt(_YAML.prefill_ms_per_token)
    itl_ms: float = opt(_YAML.itl_ms, "inter-token latency at batch 1")
    batch_slowdown: float = opt(_YAML.batch_slowdown)
    startup_seconds: float = opt(_YAML.startup_seconds, "simulated load time")
    max_concurrency: int = opt(_YAML.max_concurrency, "requests decoded at once", flags=(
        "--max-concurrency", "--max-num-seqs", "--max-running-requests"))
    max_model_len: int = opt(DEFAULT_MAX_MODEL_LEN, flags=("--max-model-len", "--context-length"))
    min_output_tokens: int = opt(16)
    max_output_tokens: int = opt(256)
    embedding_dim: int = opt(64)
    weights_gb: float = opt(DEFAULT_WEIGHTS_GB)
    kv_cache_gb: float = opt(DEFAULT_KV_CACHE_GB)
    wake_bandwidth_gbps: float = opt(_YAML.wake_bandwidth_gbps)
    disk_bandwidth_gbps: float = opt(_YAML.disk_bandwidth_gbps)
    kv_bytes_per_token: int = opt(_YAML.kv_bytes_per_token)
    wake_overhead_seconds: float = opt(_YAML.wake_overhead_seconds)
    kv_groups: int = opt(_YAML.kv_groups, "KV groups: kvcached segments <name>, <name>_g1, ...")
    seed: int = opt(0)
    version: str = opt("", "version to report (default: a recent one of the dialect)",
                       flags=("--version-string",))
    runner: str = opt("generate", "vLLM: `generate` serves completions and chat, `pooling` "
                      "serves /v1/embeddings only (vLLM registers routes by the model's tasks)",
                      choices=("generate", "pooling"))
    enable_sleep_mode: bool = opt(False)
    enable_memory_saver: bool = opt(False)
    weights_cpu_backup: bool = opt(False, flags=("--enable-weights-cpu-backup",))
    no_prefix_caching: bool = opt(False, "turn the prefix cache off (it is on by default, as "
                                  "in vLLM and SGLang)", flags=("--no-enable-prefix-caching",
                                                                "--disable-radix-cache"))
    prompt_tokens_details: bool = opt(
        False, "report usage.prompt_tokens_details.cached_tokens (vLLM and SGLang do only "
        "with this flag)", flags=("--enable-prompt-tokens-details", "--enable-cache-report"))
    block_size: int = opt(16, "tokens per KV block: the prefix cache's unit")
    crash_on_sleeping_request: bool = opt(
        False, "old vLLM: a request to a sleeping engine kills it (default: it hangs)")
    # From the environment, as the real engines read them.
    dev_mode: bool = False                 # VLLM_SERVER_DEV_MODE
    health_generates: bool = True          # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
    ignored: Tuple[str, ...] = ()          # flags of the real engines the simulator ignores

    @property
    def names(self) -> Tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def served_name(self) -> str:
        return self.names[0]

    @property
    def timing(self) -> Timing:
        return Timing.of(self)

    @property
    def sleep_endpoints(self) -> bool:
        if self.dialect == "vllm":
            return self.dev_mode and self.enable_sleep_mode
        return self.enable_memory_saver


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrouter sim-engine", description=(
        "Simulated vLLM/SGLang engine: the real HTTP APIs, timing and quirks, no GPU."))
    for f in fields(SimConfig):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        kw: Dict[str, Any] = {"dest": f.name, "help": meta["help"] or None}
        if isinstance(f.default, bool):
            kw["action"] = "store_true"
        elif isinstance(f.default, tuple):
            kw.update(nargs="+", default=list(f.default))
        else:
            kw.update(type=type(f.default), default=f.default, choices=meta["choices"])
        p.add_argument(*flags, **kw)
    return p


def parse_sim_args(argv: List[str], environ: Optional[Mapping[str, str]] = None) -> SimConfig:
    environ = os.environ if environ is None else environ
    args, unknown = _parser().parse_known_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(SimConfig) if f.metadata.get("cli")}
    values["served_model_names"] = tuple(values["served_model_names"])
    values["version"] = values["version"] or ("0.32.0" if args.dialect == "vllm" else "0.5.15")
    return SimConfig(
        **values,
        dev_mode=environ.get("VLLM_SERVER_DEV_MODE", "0").lower() in ("1", "true"),
        health_generates=environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION",
                                     "true").lower() not in ("0", "false"),
        ignored=tuple(unknown))
