"""The policy lab's trace sets (``make bench-policy``): a training set, on which the
policies' constants were chosen, and a held-out test set, on which they are judged and
from which alone the README's claims come.

The test set spans what the training set does not: arrival CV 1 to 8, 8 to 48 models,
a diurnal swing, long idle periods, wakes and starts 2 and 3 times slower than the timing
model's, and public traces nobody here wrote (Azure LLM inference 2023, code and
conversation; ServeGen's production clients; Mooncake's conversations when downloaded).
Each entry builds its (config, trace, timing profile) from a seed: the same run gives the
same figures.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional

import yaml

from kvrouter.bench import importers, public_traces, trace
from kvrouter.config.load import load_config
from kvrouter.config.schema import Config
from kvrouter.timing import Timing

BASE_CONFIG = "etc/lab/prism-24.yaml"
DURATION = 900.0
# Prism-style traces: power-law popularity, gamma arrivals, models active about a quarter
# of the time (on 60 s / off 180 s), prompts and outputs about 8..512 tokens
GEN = dict(rate=20.0, alpha=1.0, cv=2.0, on_seconds=60.0, off_seconds=180.0,
           prompt_tokens=260, output_tokens=260, length_jitter=0.97)
TRACES_DIR = "bench-results/traces"       # where `make bench-policy` downloads public traces
SERVEGEN = "etc/lab/traces/servegen-m-mid-day2"
DAY2 = 86400.0


class Case(NamedTuple):
    name: str
    what: str
    cfg: Config
    rows: List[dict]
    timings: Optional[Dict[str, Timing]]


def deployment(models: int, base: str = BASE_CONFIG) -> Config:
    """The lab's deployment with ``models`` models, four per 80 GB GPU (the base config's
    mix of 8B, 3B and 1B models, repeated)."""
    with open(base, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    if models == len(doc["instances"]):
        return load_config(base)
    gpus = max(1, models // 4)
    src = doc["instances"]
    out = []
    for i in range(models):
        inst = dict(src[i % len(src)])
        n = f"m{i + 1:02d}"
        inst["name"] = n
        inst["model"] = "lab/" + n + "-" + inst["model"].split("-", 1)[1]
        inst["gpus"] = str(i % gpus)
        inst["kvcached_env"] = [f"KVCACHED_IPC_NAME=kvr-lab-{n}"]
        inst["engine_args"] = [f"--port {19100 + i + 1}", "--enable-sleep-mode"]
        out.append(inst)
    doc["instances"] = out
    doc["sleep_manager"]["gpu_memory_gb"] = {str(g): 80 for g in range(gpus)}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(doc, tmp)
    try:
        return load_config(tmp.name)
    finally:
        os.unlink(tmp.name)


def slower(cfg: Config, factor: float) -> Dict[str, Timing]:
    """Timing profiles with wakes, sleeps and starts ``factor`` times slower."""
    out = {}
    for i in cfg.instances:
        t = i.timing
        out[i.key or i.model] = dataclasses.replace(
            t, wake_bandwidth_gbps=t.wake_bandwidth_gbps / factor,
            wake_overhead_seconds=t.wake_overhead_seconds * factor,
            disk_bandwidth_gbps=t.disk_bandwidth_gbps / factor,
            startup_seconds=t.startup_seconds * factor)
    return out


def diurnal(rows: List[dict], depth: float, period: float) -> List[dict]:
    """The same requests with time warped so the rate swings by +-``depth`` around its mean
    over ``period`` seconds (a day squeezed into the trace)."""
    def warp(t: float) -> float:   # inverse of the cumulative intensity, by bisection
        lo, hi = 0.0, t * 2 + period
        for _ in range(50):
            mid = (lo + hi) / 2
            cum = mid - depth * period / (2 * math.pi) * (math.cos(2 * math.pi * mid / period) - 1)
            lo, hi = (mid, hi) if cum < t else (lo, mid)
        return lo
    return sorted((dict(r, time=round(warp(r["time"]), 6)) for r in rows),
                  key=lambda r: r["time"])


def _generated(name: str, what: str, models: int = 24, wake: float = 1.0,
               transform: Optional[Callable] = None, **params) -> Callable[[], Case]:
    def build() -> Case:
        cfg = deployment(models)
        p = dict(GEN, **params)
        seed = p.pop("seed")
        rate = p.pop("rate")
        rows = trace.generate([i.model for i in cfg.instances], DURATION, rate, p["alpha"],
                              p["cv"], p["on_seconds"], p["off_seconds"], p["prompt_tokens"],
                              p["output_tokens"], p["length_jitter"], seed=seed)
        if transform:
            rows = transform(rows)
        return Case(name, what, cfg, rows, slower(cfg, wake) if wake != 1 else None)
    return build


def _public(name: str, what: str, load: Callable[[List[str]], List[dict]]
            ) -> Callable[[], Case]:
    def build() -> Case:
        cfg = deployment(24)
        return Case(name, what, cfg, load([i.model for i in cfg.instances]), None)
    return build


def _azure(kind: str) -> Callable[[List[str]], List[dict]]:
    def load(models: List[str]) -> List[dict]:
        path = os.path.join(TRACES_DIR, f"AzureLLMInferenceTrace_{kind}.csv")
        if not os.path.exists(path):
            path = f"etc/lab/traces/AzureLLMInferenceTrace_{kind}-head.csv"
        return list(public_traces.assign(public_traces.azure(path), models, "zipf", seed=7))
    return load


def _servegen(start: float, hours: float, rate: float) -> Callable[[List[str]], List[dict]]:
    def load(models: List[str]) -> List[dict]:
        reqs = public_traces.servegen(SERVEGEN, start, hours * 3600, random.Random(5),
                                      len(models), rate)
        return list(public_traces.assign(reqs, models, "client"))
    return load


def _mooncake(models: List[str]) -> List[dict]:
    path = os.path.join(TRACES_DIR, "conversation_trace.jsonl")
    return list(importers.mooncake(path, models, "conversation", seed=3))


TRAIN = {
    "train-cv2-s1": _generated("train-cv2-s1", "CV 2, seed 1", cv=2.0, seed=1),
    "train-cv4-s1": _generated("train-cv4-s1", "CV 4, seed 1", cv=4.0, seed=1),
    "train-cv2-s2": _generated("train-cv2-s2", "CV 2, seed 2", cv=2.0, seed=2),
    "train-cv4-s2": _generated("train-cv4-s2", "CV 4, seed 2", cv=4.0, seed=2),
    "train-cv6": _generated("train-cv6", "CV 6", cv=6.0, seed=201),
    "train-models-36": _generated("train-models-36", "36 models on 9 GPUs", models=36,
                                  seed=202),
    "train-wake-1.5x": _generated("train-wake-1.5x", "wakes 1.5x slower, CV 3", wake=1.5,
                                  cv=3.0, seed=203),
    "train-off-600": _generated("train-off-600", "on 60 s / off 600 s", off_seconds=600.0,
                                rate=10.0, seed=204),
    # long prompts (retrieval, code): the TTFT SLO leaves room for a wake
    "train-long-prompts": _generated("train-long-prompts", "prompts of ~2000 tokens, CV 2",
                                     prompt_tokens=2000, output_tokens=200, rate=8.0,
                                     seed=205),
}
TEST = {
    "cv1": _generated("cv1", "Poisson arrivals (CV 1)", cv=1.0, seed=101),
    "cv8": _generated("cv8", "CV 8", cv=8.0, seed=102),
    "models-8": _generated("models-8", "8 models on 2 GPUs", models=8, seed=103),
    "models-48": _generated("models-48", "48 models on 12 GPUs", models=48, seed=104),
    "diurnal": _generated("diurnal", "rate swings +-80% over the trace", seed=105,
                          transform=lambda rows: diurnal(rows, 0.8, DURATION)),
    "long-idle": _generated("long-idle", "on 60 s / off 1200 s", seed=106,
                            off_seconds=1200.0, rate=6.0),
    "wake-2x": _generated("wake-2x", "wakes and starts 2x slower", wake=2.0, seed=107),
    "wake-3x": _generated("wake-3x", "wakes and starts 3x slower, CV 4", wake=3.0, cv=4.0,
                          seed=108),
    "azure-code": _public("azure-code", "Azure LLM inference 2023, code (zipf over 24)",
                          _azure("code")),
    "azure-conv": _public("azure-conv", "Azure LLM inference 2023, conversation (zipf "
                          "over 24)", _azure("conv")),
    "servegen-am": _public("servegen-am", "ServeGen m-mid, 24 busiest clients, day 2 "
                           "07:00-08:00, 5 req/s", _servegen(DAY2 + 7 * 3600, 1, 5.0)),
    "servegen-pm": _public("servegen-pm", "ServeGen m-mid, 24 busiest clients, day 2 "
                           "21:00-22:00, 5 req/s", _servegen(DAY2 + 21 * 3600, 1, 5.0)),
}
if os.path.exists(os.path.join(TRACES_DIR, "conversation_trace.jsonl")):
    TEST["mooncake"] = _public("mooncake", "Mooncake conversations (one model each)",
                               _mooncake)
