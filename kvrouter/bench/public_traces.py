"""Public LLM traces with no models of their own, turned into multi-model replays
(``kvrouter bench import-trace azure|burstgpt|servegen``).

Formats (each documented by its publisher):

- **azure**: Azure LLM inference trace 2023 (``Azure/AzurePublicDataset``,
  ``data/AzureLLMInferenceTrace_code.csv`` and ``_conv.csv``; CC-BY 4.0): CSV with
  ``TIMESTAMP`` (``2023-11-16 18:17:03.9799600``), ``ContextTokens``, ``GeneratedTokens``.
- **burstgpt**: BurstGPT (``HPMLL/BurstGPT``; CC-BY 4.0): CSV with ``Timestamp`` (seconds),
  ``Model``, ``Request tokens``, ``Response tokens``, ``Total tokens``, ``Log Type``; rows
  with no response (failures) are left out.
- **servegen**: ServeGen (``alibaba/ServeGen``, ``data/<category>/<model>/``; Apache-2.0):
  per client, ``chunk-N-trace.csv`` rows ``window start (s), rate (req/s), CV, pattern
  (Gamma|Weibull|empty), shape, scale`` per 10-minute window over days, and optionally
  ``chunk-N-dataset.json``, the input and output token distributions per window. Arrivals
  are drawn per window from the pattern and scaled to the window's rate, as ServeGen's
  own generator does; tokens from the client's distributions (without them, the defaults).

Models are given requests by a documented rule, with a seed:

- ``zipf`` (single-stream traces; the default): each request to a model drawn with
  probability ``1 / rank**alpha`` (a power law of popularity, as the serving papers use);
- ``stripe``: requests dealt to the models in turn (AlpaServe's round robin);
- ``windows``: the trace cut into as many consecutive windows as models, each window the
  traffic of one model from time 0 (each model keeps a real stream's burstiness and lulls);
- ``client`` (ServeGen, BurstGPT): one client (BurstGPT: one of its ``Model`` values) per
  model, the busiest client to the first model.
"""
from __future__ import annotations

import ast
import bisect
import csv
import glob
import json
import os
import random
from datetime import datetime
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from kvrouter.errors import KvrouterError

RULES = ("zipf", "stripe", "windows", "client")
WINDOW = 600.0   # ServeGen's window


def _open(path: str):
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise KvrouterError(f"{path}: cannot read: {err.strerror}") from None


def _columns(path: str, reader, need: Sequence[str]) -> None:
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    if missing:
        raise KvrouterError(f"{path}: not the expected CSV: no column {', '.join(missing)} "
                            f"(found: {', '.join(reader.fieldnames or []) or 'nothing'})")


def azure(path: str) -> List[Tuple[float, str, int, int]]:
    """(seconds from the first request, "", prompt tokens, output tokens), by time."""
    out = []
    with _open(path) as fh:
        reader = csv.DictReader(fh)
        _columns(path, reader, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
        for n, row in enumerate(reader, 2):
            try:
                stamp = row["TIMESTAMP"].strip()
                day, _, frac = stamp.partition(".")
                t = datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp() + \
                    (float("0." + frac) if frac else 0.0)
                prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError) as err:
                raise KvrouterError(f"{path}:{n}: not an Azure LLM trace row ({err}); "
                                    "expected TIMESTAMP,ContextTokens,GeneratedTokens") from None
            out.append((t, "", max(1, prompt), max(1, output)))
    return _from_zero(path, out)


def burstgpt(path: str) -> List[Tuple[float, str, int, int]]:
    """(seconds from the first request, its Model, request tokens, response tokens)."""
    out = []
    with _open(path) as fh:
        reader = csv.DictReader(fh)
        _columns(path, reader, ("Timestamp", "Model", "Request tokens", "Response tokens"))
        for n, row in enumerate(reader, 2):
            try:
                t = float(row["Timestamp"])
                prompt, output = int(row["Request tokens"]), int(row["Response tokens"])
            except (ValueError, TypeError) as err:
                raise KvrouterError(f"{path}:{n}: not a BurstGPT row ({err})") from None
            if output <= 0:   # a failed request
                continue
            out.append((t, row["Model"] or "", max(1, prompt), output))
    return _from_zero(path, out)


def _from_zero(path: str, rows: List[Tuple[float, str, int, int]]):
    if not rows:
        raise KvrouterError(f"{path}: no requests")
    rows.sort()
    first = rows[0][0]
    return [(t - first, key, p, o) for t, key, p, o in rows]


def _pdf(text: str) -> Optional[Tuple[List[int], List[float]]]:
    """ServeGen's ``{value: probability}`` as (values, cumulative probabilities)."""
    try:
        pdf = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(pdf, dict) or not pdf:
        return None
    values: List[int] = []
    cum: List[float] = []
    total = 0.0
    for v, p in sorted(pdf.items()):
        total += float(p)
        values.append(max(1, int(v)))
        cum.append(total)
    if total <= 0:
        return None
    return values, [c / total for c in cum]


def servegen(folder: str, start: float, duration: float, rng: random.Random,
             clients: int = 0, rate: Optional[float] = None, prompt_tokens: int = 256,
             output_tokens: int = 128) -> List[Tuple[float, str, int, int]]:
    """Requests of the ``clients`` busiest clients in ``folder`` (0: all) over
    [start, start + duration) seconds of their traces: (seconds from ``start``, "client N",
    prompt tokens, output tokens). ``rate``: their mean total requests/s over the span, every
    window's rate scaled alike (production clients send hundreds a second; burstiness,
    pattern and the clients' shares are kept), as ServeGen's generator scales to a target."""
    files = sorted(glob.glob(os.path.join(folder, "chunk-*-trace.csv")))
    if not files:
        raise KvrouterError(f"{folder}: no ServeGen client traces (chunk-N-trace.csv)")
    windows: Dict[str, List[Tuple[float, float, str, float, float]]] = {}
    for path in files:
        mine = windows.setdefault(path, [])
        with _open(path) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    ts, rate_s, _cv, pattern, a, b = line.strip().split(",")
                    row = (float(ts), float(rate_s), pattern, float(a or 0), float(b or 0))
                except ValueError:
                    raise KvrouterError(f"{path}:{n}: not a ServeGen trace row (start, rate, "
                                        "cv, pattern, shape, scale)") from None
                if not start <= row[0] < start + duration or row[1] <= 0 or not pattern:
                    continue
                if pattern not in ("Gamma", "Weibull") or row[3] <= 0 or row[4] <= 0:
                    raise KvrouterError(f"{path}:{n}: unknown arrival pattern {pattern!r} "
                                        "(Gamma or Weibull, positive shape and scale)")
                mine.append(row)
    volume = {p: sum(w[1] for w in ws) * WINDOW for p, ws in windows.items()}
    chosen = sorted((p for p in windows if volume[p] > 0), key=lambda p: (-volume[p], p))
    chosen = chosen[:clients] if clients else chosen
    total = sum(volume[p] for p in chosen)
    if not total:
        raise KvrouterError(f"{folder}: no requests between {start:g} s and "
                            f"{start + duration:g} s")
    factor = rate * duration / total if rate else 1.0
    out = []
    for path in chosen:
        client = os.path.basename(path).split("-")[1]
        lengths = _servegen_lengths(path.replace("-trace.csv", "-dataset.json"))
        for ts, rate_w, pattern, shape, scale in windows[path]:
            count = rng.random() + rate_w * factor * WINDOW   # rounded at random: no bias
            gaps = [rng.gammavariate(shape, scale) if pattern == "Gamma"
                    else rng.weibullvariate(scale, shape) for _ in range(int(count))]
            stretch = WINDOW / (sum(gaps) or 1.0)   # to the window's rate
            t = ts - start
            key = _floor_key(lengths, ts)
            window = lengths.get(key) if key is not None else None
            for g in gaps:
                t += g * stretch
                p = _draw(window[0], rng) if window and window[0] else prompt_tokens
                o = _draw(window[1], rng) if window and window[1] else output_tokens
                out.append((t, f"client {client}", p, o))
    out.sort()
    return out


def _floor_key(table: Dict[int, tuple], ts: float) -> Optional[int]:
    keys = sorted(table)
    i = bisect.bisect_right(keys, ts) - 1
    return keys[i] if i >= 0 else None


def _draw(cdf: Tuple[List[int], List[float]], rng: random.Random) -> int:
    values, cum = cdf
    return values[min(len(values) - 1, bisect.bisect_left(cum, rng.random()))]


def _servegen_lengths(path: str) -> Dict[int, tuple]:
    if not os.path.exists(path):
        return {}
    with _open(path) as fh:
        try:
            doc = json.load(fh)
        except ValueError as err:
            raise KvrouterError(f"{path}: not JSON ({err})") from None
    return {int(ts): (_pdf(f.get("input_tokens", "")), _pdf(f.get("output_tokens", "")))
            for ts, f in doc.items() if isinstance(f, dict)}


def assign(rows: Sequence[Tuple[float, str, int, int]], models: Sequence[str], rule: str,
           seed: int = 0, alpha: float = 1.0) -> Iterator[dict]:
    """kvrouter trace rows: each request given to one of ``models`` by ``rule``."""
    if not models:
        raise KvrouterError("import-trace: name the models (--model, or --models-from CONFIG)")
    if rule not in RULES:
        raise KvrouterError(f"import-trace: --assign {rule!r}: choose from {', '.join(RULES)}")
    rng = random.Random(seed)
    if rule == "client":
        load: Dict[str, int] = {}
        for _, key, _, _ in rows:
            load[key] = load.get(key, 0) + 1
        busiest = sorted(load, key=lambda k: (-load[k], k))
        if len(busiest) > len(models):   # more clients than models: the busiest ones
            busiest = busiest[:len(models)]
        to = dict(zip(busiest, models))
        for t, key, p, o in rows:
            if key in to:
                yield _row(t, to[key], p, o)
        return
    if rule == "windows":
        span = (rows[-1][0] if rows else 0.0) / len(models) or 1.0
        cut = sorted((t - span * min(len(models) - 1, int(t // span)),
                      models[min(len(models) - 1, int(t // span))], p, o) for t, _, p, o in rows)
        for t, model, p, o in cut:
            yield _row(t, model, p, o)
        return
    weights = [1.0 / (i + 1) ** alpha for i in range(len(models))]
    for n, (t, _, p, o) in enumerate(rows):
        model = models[n % len(models)] if rule == "stripe" else \
            rng.choices(models, weights)[0]
        yield _row(t, model, p, o)


def _row(t: float, model: str, prompt: int, output: int) -> dict:
    return {"time": round(t, 6), "model": model, "prompt_tokens": prompt,
            "output_tokens": output}
