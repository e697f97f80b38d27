"""``kvrouter bench calibrate``: measure a running engine and write a timing profile.

Against the engine's own URL (not the router: its gate and warm-up would be measured too):

- prefill: time to the first streamed token of a 1-token completion at a short and a long
  prompt (medians of ``rounds``; each prompt starts with its own word, so the engine's
  prefix cache serves none of it); the line through them gives ``ttft_ms`` (the time at 0
  tokens) and ``prefill_ms_per_token``, the prompt sizes from the engine's own usage;
- decode: the median gap between streamed tokens of one completion (``ignore_eos``), then
  of ``concurrency`` at once: ``itl_ms`` and ``batch_slowdown`` (how much a step grows per
  extra running request);
- sleep and wake (``--sleep``; vLLM with ``VLLM_SERVER_DEV_MODE=1``, or SGLang): a level-1
  sleep and the wake, each until the engine says so, the wake up to its first token again.

The profile's keys are those of an instance's ``sim:`` block (``timing.py``): paste them
there to make the simulated engine behave like the one measured, or give the file to
``kvrouter simulate --timing`` to replay traces with it. A wake is written as its measured
time (``wake_bandwidth_gbps: 0``, the time less the first token's in
``wake_overhead_seconds``: the lab adds the router's warm-up); the lab charges a sleep the
same time.
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import fields
from typing import Dict, List, Optional, Tuple

import requests
import yaml

from kvrouter.errors import KvrouterError
from kvrouter.timing import WARM_UP_PROMPT_TOKENS, Timing

WORD = "hello "
_SEQ = iter(range(1 << 62))


def _prompt(words: int) -> str:
    """``words`` words, the first unique: no prefix cache serves a part of it."""
    return f"n{next(_SEQ)} " + WORD * max(0, words - 1)
KEYS = ("ttft_ms", "prefill_ms_per_token", "itl_ms", "batch_slowdown",
        "wake_bandwidth_gbps", "wake_overhead_seconds")


def _stream(base: str, model: str, prompt: str, max_tokens: int,
            timeout: float) -> Tuple[float, List[float], int]:
    """(seconds to the first token, arrival times of the tokens, prompt tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    times: List[float] = []
    prompt_tokens = 0
    try:
        with requests.post(f"{base}/v1/completions", json=body, stream=True,
                           timeout=timeout) as r:
            if r.status_code != 200:
                raise KvrouterError(f"{base}/v1/completions: HTTP {r.status_code}: "
                                    f"{r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if doc.get("choices") and doc["choices"][0].get("text"):
                    times.append(time.monotonic())
                usage = doc.get("usage") or {}
                prompt_tokens = usage.get("prompt_tokens") or prompt_tokens
    except requests.RequestException as err:
        raise KvrouterError(f"{base}: {err}") from None
    if not times:
        raise KvrouterError(f"{base}/v1/completions streamed no token")
    return times[0] - started, times, prompt_tokens


def _gaps(times: List[float]) -> List[float]:
    return [b - a for a, b in zip(times, times[1:])]


def prefill(base: str, model: str, rounds: int, short: int, long: int,
            timeout: float) -> Tuple[float, float]:
    """(ttft_ms at 0 tokens, ms per prompt token)."""
    points = []
    for words in (short, long):
        ttfts, tokens = [], 0
        for _ in range(rounds):
            ttft, _, tokens = _stream(base, model, _prompt(words), 1, timeout)
            ttfts.append(ttft)
        points.append((tokens or words, statistics.median(ttfts)))
    (n1, t1), (n2, t2) = points
    per_token = max(0.0, (t2 - t1) / max(1, n2 - n1))
    return max(0.0, (t1 - per_token * n1) * 1000), per_token * 1000


def decode(base: str, model: str, rounds: int, tokens: int, concurrency: int,
           timeout: float) -> Tuple[float, float]:
    """(itl_ms at batch 1, batch_slowdown)."""
    alone = []
    for _ in range(rounds):
        alone += _gaps(_stream(base, model, _prompt(8), tokens, timeout)[1])
    itl = statistics.median(alone)
    together: List[float] = []
    errors: List[Exception] = []

    def one():
        try:
            together.extend(_gaps(_stream(base, model, _prompt(8), tokens, timeout)[1]))
        except (KvrouterError, ValueError) as err:   # reported below
            errors.append(err)
    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise KvrouterError(str(errors[0]))
    slowdown = 0.0
    if concurrency > 1 and together and itl > 0:
        slowdown = max(0.0, (statistics.median(together) / itl - 1) / (concurrency - 1))
    return itl * 1000, slowdown


def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise KvrouterError(f"{what}: not within {timeout:g}s")
        time.sleep(0.01)


def sleep_wake(base: str, model: str, dialect: str, timeout: float) -> Tuple[float, float]:
    """(seconds to sleep, seconds from the wake call to the first token after it)."""
    def post(path: str, body: Optional[dict] = None) -> None:
        r = requests.post(base + path, json=body, timeout=timeout)
        if r.status_code >= 300:
            raise KvrouterError(f"{base}{path}: HTTP {r.status_code}: {r.text[:200]} (vLLM "
                                "needs --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1)")

    def asleep() -> bool:
        r = requests.get(base + "/is_sleeping", timeout=timeout)
        return bool(r.ok and r.json().get("is_sleeping"))

    started = time.monotonic()
    if dialect == "vllm":
        post("/sleep?level=1")
        _until(asleep, timeout, "sleep")
    else:
        post("/release_memory_occupation", {"tags": None})
    slept = time.monotonic() - started
    started = time.monotonic()
    if dialect == "vllm":
        post("/wake_up")
        _until(lambda: not asleep(), timeout, "wake")
    else:
        post("/resume_memory_occupation", {"tags": None})
    _stream(base, model, _prompt(2), 1, timeout)
    return slept, time.monotonic() - started


def measure(base: str, model: str, dialect: str = "vllm", rounds: int = 5, short: int = 16,
            long: int = 1024, tokens: int = 64, concurrency: int = 4,
            with_sleep: bool = False, timeout: float = 120.0) -> dict:
    base = base.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    _stream(base, model, _prompt(4), 2, timeout)   # a first request pays for compilation
    ttft_ms, per_token = prefill(base, model, rounds, short, long, timeout)
    itl_ms, slowdown = decode(base, model, rounds, tokens, concurrency, timeout)
    profile = {"ttft_ms": round(ttft_ms, 3), "prefill_ms_per_token": round(per_token, 5),
               "itl_ms": round(itl_ms, 3), "batch_slowdown": round(slowdown, 4)}
    measured: Dict[str, float] = {}
    if with_sleep:
        slept, woke = sleep_wake(base, model, dialect, timeout)
        measured = {"sleep_seconds": round(slept, 3), "wake_seconds": round(woke, 3)}
        # the lab adds the router's warm-up (a prefill of a few tokens) to a wake: the
        # measured time, which ends at a first token, already holds one
        warm = (ttft_ms + per_token * WARM_UP_PROMPT_TOKENS) / 1000
        profile.update(wake_bandwidth_gbps=0,
                       wake_overhead_seconds=round(max(0.0, woke - warm), 3))
    return {"profile": profile, "measured": measured}


def write(path: str, model: str, base: str, result: dict) -> None:
    doc = {"profiles": {model: result["profile"]}}
    if result["measured"]:
        doc["measured"] = {model: result["measured"]}
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"# kvrouter timing profile: `kvrouter bench calibrate` against {base}, "
                 f"{time.strftime('%Y-%m-%d %H:%M')}\n# profiles.MODEL: keys of an "
                 "instance's sim: block; give the file to `kvrouter simulate --timing`\n")
        yaml.safe_dump(doc, fh, sort_keys=False)


def load(path: str) -> Dict[str, dict]:
    """A profile file's ``profiles``: model -> Timing fields (checked, with where)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as err:
        raise KvrouterError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise KvrouterError(f"{path}: not YAML: {err}") from None
    profiles = doc.get("profiles") if isinstance(doc, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise KvrouterError(f"{path}: expected a mapping `profiles:` of model -> timing")
    known = {f.name for f in fields(Timing)}
    for model, values in profiles.items():
        if not isinstance(values, dict):
            raise KvrouterError(f"{path}: profiles.{model}: expected a mapping")
        for key, value in values.items():
            if key not in known:
                raise KvrouterError(f"{path}: profiles.{model}.{key}: unknown; known: "
                                    f"{', '.join(sorted(known))}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise KvrouterError(f"{path}: profiles.{model}.{key}: expected a number "
                                    f">= 0, found {value!r}")
    return profiles
