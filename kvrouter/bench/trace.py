"""Multi-model traces: a generator in the style of the Prism paper, and reading trace files.

Trace file: JSON lines ``{"time": s, "model": M, "prompt_tokens": n, "output_tokens": n}``,
or a CSV file (``.csv``) with those columns. A JSON line may also carry ``"blocks"``, the
ids of its prompt's blocks of ``"block_tokens"`` tokens (512 when not given): prompts with
the same leading ids share that leading text when replayed (``bench import-trace
mooncake`` writes them).

Generator: model popularity follows a power law (weight of the i-th model
``1 / i**alpha``); each model's arrivals are a gamma renewal process with the
given coefficient of variation (CV > 1 is burstier than Poisson, CV = 1 is
Poisson); each model alternates active and idle periods (exponential lengths),
arriving only while active, so models go idle long enough to sleep.
"""
from __future__ import annotations

import csv
import json
import math
import random
import sys
from typing import Any, Iterable, List, Tuple

from kvrouter.errors import KvrouterError


def generate(models: List[str], duration: float, total_rate: float, alpha: float = 1.0,
             cv: float = 2.0, on_seconds: float = 60.0, off_seconds: float = 60.0,
             prompt_tokens: int = 128, output_tokens: int = 128, length_jitter: float = 0.5,
             seed: int = 0) -> List[dict]:
    if not models:
        raise KvrouterError("trace generator: give at least one model")
    if cv <= 0 or total_rate <= 0 or duration <= 0:
        raise KvrouterError("trace generator: rate, duration and cv must be positive")
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(len(models))]
    norm = sum(weights)
    duty = on_seconds / (on_seconds + off_seconds) if off_seconds > 0 else 1.0
    shape = 1.0 / (cv * cv)
    rows = []
    for model, w in zip(models, weights):
        rate_on = total_rate * w / norm / duty  # rate while active keeps the mean rate
        t = 0.0
        active = rng.random() < duty
        period_end = rng.expovariate(1.0 / (on_seconds if active else off_seconds)) \
            if off_seconds > 0 else duration
        while t < duration:
            if not active:
                t = period_end
                active = True
                period_end = t + rng.expovariate(1.0 / on_seconds)
                continue
            gap = rng.gammavariate(shape, 1.0 / (rate_on * shape))
            if t + gap > period_end and off_seconds > 0:
                t = period_end
                active = False
                period_end = t + rng.expovariate(1.0 / off_seconds)
                continue
            t += gap
            if t >= duration:
                break

            def jitter(n):
                lo = max(1, int(n * (1 - length_jitter)))
                hi = max(lo, int(n * (1 + length_jitter)))
                return rng.randint(lo, hi)

            rows.append({"time": round(t, 6), "model": model,
                         "prompt_tokens": jitter(prompt_tokens),
                         "output_tokens": jitter(output_tokens)})
    rows.sort(key=lambda r: (r["time"], r["model"]))
    return rows


def write(rows: List[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


MAX_TIME = 1e8          # seconds (three years): past this a time is a mistake, not a trace
MAX_TOKENS = 10_000_000


def _number(r: dict, key: str) -> float:
    value = r[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return number


def _tokens(r: dict, key: str) -> int:
    number = _number(r, key)
    if number != int(number) or not 1 <= number <= MAX_TOKENS:
        raise ValueError(f"{key} must be a whole number from 1 to {MAX_TOKENS:,}, "
                         f"got {r[key]!r}")
    return int(number)


def _row(r: dict) -> dict:
    if not isinstance(r, dict):
        raise ValueError(f"a row is an object, got {type(r).__name__}")
    time = _number(r, "time")
    if not 0 <= time <= MAX_TIME:
        raise ValueError(f"time must be seconds from 0 to {MAX_TIME:g}, got {r['time']!r}")
    model = r["model"]
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string, got {model!r}")
    row = {"time": time, "model": sys.intern(model),
           "prompt_tokens": _tokens(r, "prompt_tokens"),
           "output_tokens": _tokens(r, "output_tokens")}
    if r.get("blocks") is not None:   # the prompt's block ids (equal ids: equal text)
        blocks = r["blocks"]
        if not isinstance(blocks, list) or len(blocks) > MAX_TOKENS or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise ValueError("blocks must be a list of whole numbers from 0")
        row["blocks"] = tuple(blocks)
        size = r.get("block_tokens", 512)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1 << 20:
            raise ValueError(f"block_tokens must be a whole number from 1, got {size!r}")
        row["block_tokens"] = size
    return row


def read(path: str) -> List[dict]:
    """JSON lines, or CSV with a header naming the same columns (``.csv``; more columns are
    ignored). Read a line at a time; each row is checked (finite times from 0, whole token
    counts from 1) and a bad one is an error naming its line."""
    rows: List[dict] = []
    expected = '{"time", "model", "prompt_tokens", "output_tokens"}'
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.endswith(".csv"):
                reader = csv.DictReader(fh)
                missing = {"time", "model", "prompt_tokens", "output_tokens"} - set(
                    reader.fieldnames or ())
                if missing:
                    raise KvrouterError(f"{path}:1: the header lacks {', '.join(sorted(missing))}"
                                        f"; expected the columns {expected}")
                records: Iterable[Tuple[int, Any]] = enumerate(reader, 2)
            else:
                records = ((n, line) for n, line in enumerate(fh, 1) if line.strip())
            for n, record in records:
                try:
                    rows.append(_row(record if isinstance(record, dict) else json.loads(record)))
                except KeyError as err:
                    raise KvrouterError(f"{path}:{n}: bad trace row (no {err}); expected "
                                        f"{expected}") from None
                except (ValueError, TypeError, AttributeError) as err:
                    raise KvrouterError(f"{path}:{n}: bad trace row: {err}") from None
    except OSError as err:
        raise KvrouterError(f"{path}: cannot read trace: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise KvrouterError(f"{path}: not a text trace ({err.reason})") from None
    rows.sort(key=lambda r: r["time"])
    return rows


def check_models(path: str, rows: List[dict], known: Iterable[str], where: str,
                 skip_unknown: bool = False) -> List[dict]:
    """The rows whose model ``where`` knows. A model it does not know is an error that lists
    what it knows (or, with ``skip_unknown``, its requests are left out with a warning)."""
    known = set(known)
    unknown = sorted({r["model"] for r in rows} - known)
    if not unknown:
        return rows
    listed = ", ".join(sorted(known)) or "none"
    if skip_unknown and len(unknown) < len({r["model"] for r in rows}):
        print(f"warning: {path}: {len(unknown)} model(s) not in {where}, their requests left "
              f"out: {', '.join(unknown[:10])}", file=sys.stderr)
        return [r for r in rows if r["model"] in known]
    raise KvrouterError(
        f"{path}: {len(unknown)} model(s) of the trace are not in {where}: "
        f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}. {where} has: "
        f"{listed}. Make a trace for them (kvrouter bench gen-trace --models-from CONFIG, or "
        "--model NAME for each) or pass --skip-unknown to leave those requests out.")
