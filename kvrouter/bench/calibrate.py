"""``kvrouter bench calibrate``: measure a running engine and write a timing profile.

Against the engine's own URL (not the router: its gate and warm-up would be measured too):

- prefill: the time of a 1-token completion at a short and a long prompt (the fastest of
  ``rounds``; each prompt starts with its own word, so the engine's prefix cache serves
  none of it); the line through them gives ``ttft_ms`` (the time at 0 tokens) and
  ``prefill_ms_per_token``, the prompt sizes from the engine's own usage;
- decode: a ``tokens``-token completion (``ignore_eos``) less a 1-token one, per step
  after the first: ``itl_ms``; then ``concurrency`` at once: ``batch_slowdown`` (how much a
  step grows per extra running request). Times are to the end of each stream, never
  between streamed tokens (see ``_stream``);
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
            timeout: float) -> Tuple[float, int, int]:
    """(seconds until the stream ended, tokens streamed, prompt tokens).

    The end of the stream, not each token's arrival: on a busy machine (a CPU engine on
    two cores) the client reads tokens in bunches, and their arrival times say more about
    the client's scheduling than the engine's steps (a median gap of 0.008 ms was measured
    so); the end comes when the engine's last step does."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    tokens = texts = prompt_tokens = 0
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
                    texts += 1
                usage = doc.get("usage") or {}
                prompt_tokens = usage.get("prompt_tokens") or prompt_tokens
                tokens = usage.get("completion_tokens") or tokens
    except requests.RequestException as err:
        raise KvrouterError(f"{base}: {err}") from None
    # the engine's count (a token that ends inside a character streams no text of its own)
    tokens = tokens or texts
    if not tokens:
        raise KvrouterError(f"{base}/v1/completions streamed no token")
    return time.monotonic() - started, tokens, prompt_tokens


def prefill(base: str, model: str, rounds: int, short: int, long: int,
            timeout: float) -> Tuple[float, float]:
    """(ttft_ms at 0 tokens, ms per prompt token): the fastest of ``rounds`` one-token
    completions at each prompt size (noise on a shared machine only adds time)."""
    points = []
    for words in (short, long):
        best, tokens = float("inf"), 0
        for _ in range(rounds):
            took, _, tokens = _stream(base, model, _prompt(words), 1, timeout)
            best = min(best, took)
        points.append((tokens or words, best))
    (n1, t1), (n2, t2) = points
    per_token = max(0.0, (t2 - t1) / max(1, n2 - n1))
    return max(0.0, (t1 - per_token * n1) * 1000), per_token * 1000


def _step(base: str, model: str, tokens: int, first: float, timeout: float) -> float:
    """Seconds per decode step of one ``tokens``-token completion: its time less a
    one-token completion's (``first``), over the steps after the first token."""
    took, streamed, _ = _stream(base, model, _prompt(8), tokens, timeout)
    return max(0.0, took - first) / max(1, streamed - 1)


def decode(base: str, model: str, rounds: int, tokens: int, concurrency: int,
           timeout: float) -> Tuple[float, float]:
    """(itl_ms at batch 1, batch_slowdown)."""
    first = min(_stream(base, model, _prompt(8), 1, timeout)[0] for _ in range(rounds))
    itl = min(_step(base, model, tokens, first, timeout) for _ in range(rounds))
    together: List[float] = []
    errors: List[Exception] = []

    def one():
        try:
            together.append(_step(base, model, tokens, first, timeout))
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


def _awake(base: str, timeout: float) -> None:
    """Refuse an engine that is asleep (vLLM holds requests to a sleeping engine until it
    wakes: calibrate would wait out its timeout), saying what to do."""
    try:
        r = requests.get(base + "/is_sleeping", timeout=min(timeout, 10))
        asleep = r.ok and bool(r.json().get("is_sleeping"))
    except (requests.RequestException, ValueError, AttributeError):
        return   # no such route (SGLang, or vLLM without VLLM_SERVER_DEV_MODE)
    if asleep:
        raise KvrouterError(f"{base}: the engine is asleep; wake it first (a request through "
                            "the router, or POST /wake_up), and keep the router from "
                            "putting it back to sleep while calibrating (pin it)")


def measure(base: str, model: str, dialect: str = "vllm", rounds: int = 5, short: int = 16,
            long: int = 1024, tokens: int = 64, concurrency: int = 4,
            with_sleep: bool = False, timeout: float = 120.0) -> dict:
    base = base.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    _awake(base, timeout)
    for _ in range(2):   # the first requests pay for compilation and warm caches
        _stream(base, model, _prompt(4), 2, timeout)
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
