"""Command-line options of the simulated engine.

It accepts the real engines' flag names where they mean the same thing and
ignores the GPU-only flags a real config carries, so a real engine's
engine_args work unchanged.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass(frozen=True)
class SimConfig:
    dialect: str = "vllm"
    model: str = "sim-model"
    served_model_names: Tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    ttft_ms: float = 30.0
    prefill_ms_per_token: float = 0.02
    itl_ms: float = 20.0
    batch_slowdown: float = 0.0001  # extra step time per running request, as a fraction
    startup_seconds: float = 1.0
    max_concurrency: int = 256
    max_model_len: int = 4096
    min_output_tokens: int = 16
    max_output_tokens: int = 256
    embedding_dim: int = 64
    weights_gb: float = 2.0
    kv_cache_gb: float = 4.0
    wake_bandwidth_gbps: float = 25.0
    disk_bandwidth_gbps: float = 2.0
    seed: int = 0
    version: str = ""
    enable_sleep_mode: bool = False
    dev_mode: bool = False
    enable_memory_saver: bool = False
    weights_cpu_backup: bool = False
    crash_on_sleeping_request: bool = False
    health_generates: bool = True
    ignored: Tuple[str, ...] = ()

    @property
    def names(self) -> Tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def served_name(self) -> str:
        return self.names[0]

    @property
    def sleep_endpoints(self) -> bool:
        if self.dialect == "vllm":
            return self.dev_mode and self.enable_sleep_mode
        return self.enable_memory_saver


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrouter sim-engine", description=(
        "Simulated vLLM/SGLang engine: the real HTTP APIs, timing and quirks, no GPU."))
    p.add_argument("--dialect", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--model", "--model-path", dest="model", default="sim-model")
    p.add_argument("--served-model-name", nargs="+", default=[])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ttft-ms", type=float, default=30.0, help="time to first token at a short prompt")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.02)
    p.add_argument("--itl-ms", type=float, default=20.0, help="inter-token latency at batch 1")
    p.add_argument("--batch-slowdown", type=float, default=0.0001,
                   help="extra step time per running request (fraction of itl)")
    p.add_argument("--startup-seconds", type=float, default=1.0, help="simulated load time")
    p.add_argument("--max-concurrency", "--max-num-seqs", "--max-running-requests",
                   dest="max_concurrency", type=int, default=256)
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int,
                   default=4096)
    p.add_argument("--min-output-tokens", type=int, default=16)
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--weights-gb", type=float, default=2.0)
    p.add_argument("--kv-cache-gb", type=float, default=4.0)
    p.add_argument("--wake-bandwidth-gbps", type=float, default=25.0)
    p.add_argument("--disk-bandwidth-gbps", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version-string", dest="version", default="")
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--enable-weights-cpu-backup", dest="weights_cpu_backup", action="store_true")
    p.add_argument("--crash-on-sleeping-request", action="store_true",
                   help="old vLLM: a request to a sleeping engine kills it (default: it hangs)")
    return p


def parse_sim_args(argv: List[str], environ: Optional[dict] = None) -> SimConfig:
    environ = os.environ if environ is None else environ
    args, unknown = _parser().parse_known_args(argv)
    ignored = tuple(a for a in unknown)
    dev = environ.get("VLLM_SERVER_DEV_MODE", "0").lower() in ("1", "true")
    health_gen = environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower() \
        not in ("0", "false")
    version = args.version or ("0.32.0" if args.dialect == "vllm" else "0.5.15")
    return SimConfig(
        dialect=args.dialect, model=args.model,
        served_model_names=tuple(args.served_model_name), host=args.host, port=args.port,
        ttft_ms=args.ttft_ms, prefill_ms_per_token=args.prefill_ms_per_token,
        itl_ms=args.itl_ms, batch_slowdown=args.batch_slowdown,
        startup_seconds=args.startup_seconds, max_concurrency=args.max_concurrency,
        max_model_len=args.max_model_len, min_output_tokens=args.min_output_tokens,
        max_output_tokens=args.max_output_tokens, embedding_dim=args.embedding_dim,
        weights_gb=args.weights_gb, kv_cache_gb=args.kv_cache_gb,
        wake_bandwidth_gbps=args.wake_bandwidth_gbps,
        disk_bandwidth_gbps=args.disk_bandwidth_gbps, seed=args.seed, version=version,
        enable_sleep_mode=args.enable_sleep_mode, dev_mode=dev,
        enable_memory_saver=args.enable_memory_saver,
        weights_cpu_backup=args.weights_cpu_backup,
        crash_on_sleeping_request=args.crash_on_sleeping_request,
        health_generates=health_gen, ignored=ignored)
