"""Benchmark results: per-model summaries, the printed table, JSON, comparison.

JSON schema (``schema: kvrouter-bench/1``)::

    {"schema": "kvrouter-bench/1", "config": {...the run's options...},
     "started_at": unix time, "duration_seconds": float,
     "models": {MODEL: {
        "requests": int, "completed": int, "errors": {CLASS: int},
        "request_throughput": req/s, "output_token_throughput": tokens/s,
        "ttft": STATS, "itl": STATS, "tpot": STATS, "e2e": STATS,   # seconds
        "goodput": {"slo": {...}, "requests_meeting_slo": int, "rate": req/s} | null}},
     "total": {same keys as a model}}

where STATS is ``{"mean", "p50", "p90", "p99", "count"}`` (null values when empty).
Error classes: ``http_4xx``, ``http_5xx``, ``connect``, ``timeout``, ``stream_error``.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

SCHEMA = "kvrouter-bench/1"


def stats(values: List[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}
    v = sorted(values)
    n = len(v)

    def q(p):
        return v[min(n - 1, int(p * n))]

    return {"mean": sum(v) / n, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "count": n}


class Sample:
    __slots__ = ("model", "ok", "error", "ttft", "itls", "e2e", "output_tokens", "start")

    def __init__(self, model: str, start: float):
        self.model = model
        self.start = start
        self.ok = False
        self.error: Optional[str] = None
        self.ttft: Optional[float] = None
        self.itls: List[float] = []
        self.e2e = 0.0
        self.output_tokens = 0

    @property
    def tpot(self) -> Optional[float]:
        """Time per output token after the first (None without a TTFT or a second token)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def summarize(samples: List[Sample], duration: float, slo: dict) -> dict:
    ok = [s for s in samples if s.ok]
    errors: Dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error or "unknown"] = errors.get(s.error or "unknown", 0) + 1
    tpot = [t for t in (s.tpot for s in ok) if t is not None]
    out_tokens = sum(s.output_tokens for s in ok)
    good = None
    if slo:
        def meets(s):
            if slo.get("ttft") is not None and (s.ttft is None or s.ttft > slo["ttft"]):
                return False
            if slo.get("tpot") is not None and s.tpot is not None and s.tpot > slo["tpot"]:
                return False
            if slo.get("e2e") is not None and s.e2e > slo["e2e"]:
                return False
            return True

        n_good = sum(1 for s in ok if meets(s))
        good = {"slo": slo, "requests_meeting_slo": n_good,
                "attainment": n_good / len(samples) if samples else None,
                "rate": n_good / duration if duration > 0 else None}
    return {
        "requests": len(samples), "completed": len(ok), "errors": errors,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_token_throughput": out_tokens / duration if duration > 0 else None,
        "ttft": stats([s.ttft for s in ok if s.ttft is not None]),
        "itl": stats([x for s in ok for x in s.itls]),
        "tpot": stats(tpot),
        "e2e": stats([s.e2e for s in ok]),
        "goodput": good,
    }


def build(samples: List[Sample], duration: float, config: dict, started: float,
          slo: dict) -> dict:
    models = sorted({s.model for s in samples})
    return {"schema": SCHEMA, "config": config, "started_at": started,
            "duration_seconds": duration,
            "models": {m: summarize([s for s in samples if s.model == m], duration, slo)
                       for m in models},
            "total": summarize(samples, duration, slo)}


def grid(rows: Sequence[Sequence[str]]) -> List[str]:
    """Rows of cells as aligned text lines (two spaces between columns)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _ms(v):
    return "-" if v is None else f"{v * 1000:.1f}"


def table(result: dict) -> str:
    rows = [("model", "ok/sent", "req/s", "tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms",
             "TPOT mean ms", "E2E p50/p99 ms", "errors")]
    for name, m in list(result["models"].items()) + [("TOTAL", result["total"])]:
        errs = ",".join(f"{k}={v}" for k, v in sorted(m["errors"].items())) or "-"
        good = m.get("goodput")
        if good and name != "TOTAL":
            errs += f" goodput={good['requests_meeting_slo']}"
        rows.append((name, f"{m['completed']}/{m['requests']}",
                     f"{m['request_throughput'] or 0:.1f}",
                     f"{m['output_token_throughput'] or 0:.1f}",
                     f"{_ms(m['ttft']['p50'])}/{_ms(m['ttft']['p99'])}",
                     f"{_ms(m['itl']['p50'])}/{_ms(m['itl']['p99'])}",
                     _ms(m["tpot"]["mean"]),
                     f"{_ms(m['e2e']['p50'])}/{_ms(m['e2e']['p99'])}", errs))
    return "\n".join(grid(rows))


def compare(a: dict, b: dict) -> str:
    """Side by side totals and per-model figures of two result files (B relative to A)."""
    lines = ["metric                         A            B        change"]

    def row(label, va, vb, scale=1.0, unit=""):
        if va is None or vb is None:
            return
        change = f"{(vb - va) / va * 100:+.1f}%" if va else "-"
        lines.append(f"{label:<28} {va * scale:>10.2f}{unit} {vb * scale:>10.2f}{unit}  {change}")

    for name in ["total"] + sorted(set(a["models"]) & set(b["models"])):
        ma = a["total"] if name == "total" else a["models"][name]
        mb = b["total"] if name == "total" else b["models"][name]
        lines.append(f"[{name}]")
        row("  requests/s", ma["request_throughput"], mb["request_throughput"])
        row("  output tokens/s", ma["output_token_throughput"], mb["output_token_throughput"])
        for key in ("ttft", "itl", "e2e"):
            row(f"  {key} p50 (ms)", ma[key]["p50"], mb[key]["p50"], 1000)
            row(f"  {key} p99 (ms)", ma[key]["p99"], mb[key]["p99"], 1000)
    return "\n".join(lines)


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("schema") != SCHEMA:
        from kvrouter.errors import KvrouterError

        raise KvrouterError(f"{path}: not a kvrouter bench result (schema {SCHEMA})")
    return data
