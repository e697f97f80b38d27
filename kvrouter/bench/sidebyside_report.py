"""What ``make bench``'s side-by-side rows print: figures, the ratios the targets are
stated in, and the medians of several runs (``--runs``). Pure: no process, no socket."""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional


def ratio(rows: Dict[str, dict], a: str, b: str, key: str) -> Optional[float]:
    if a in rows and b in rows and rows[b].get(key):
        return rows[a][key] / rows[b][key]
    return None


def medians(runs: List[dict]) -> dict:
    """One result of several runs of ``main_rows``: every figure the median over the runs
    (a row missing from a run is left out of its median), errors summed; ``runs`` keeps
    each run's."""
    def merge(docs: List[dict]) -> dict:
        out: dict = {}
        for key in docs[0]:
            values = [d[key] for d in docs if key in d]
            if all(isinstance(v, dict) for v in values):
                out[key] = merge(values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool)
                     for v in values):
                out[key] = sum(values) if key == "errors" else statistics.median(values)
            else:
                out[key] = values[0]
        return out
    merged = merge(runs) if len(runs) > 1 else dict(runs[0])
    merged["runs"] = runs if len(runs) > 1 else []
    return merged


def _ratio_line(r: dict, section: str, group: Optional[str], a: str, b: str,
                key: str) -> Optional[str]:
    """``a / b: median x`` over the runs' own ratios (with each run's), or of one run."""
    def rows_of(doc: dict) -> Dict[str, dict]:
        d = doc.get(section) or {}
        return d.get(group) or {} if group is not None else d
    each = [x for x in (ratio(rows_of(run), a, b, key) for run in r.get("runs") or [r])
            if x is not None]
    if not each:
        return None
    runs = f" (runs: {', '.join(f'{x:.2f}' for x in each)})" if len(each) > 1 else ""
    return f"{statistics.median(each):.2f}x{runs}"


def report(r: dict) -> List[str]:
    runs = len(r.get("runs") or []) or 1
    lines: List[str] = [f"(medians of {runs} runs; ratios: the median of the runs' own)"
                        if runs > 1 else "(one run: `--runs 3` gives medians)"]
    for backend, rows in r["non_stream"].items():
        lines += ["", f"non-streamed, {backend} backend      req/s     p50 ms   p99 ms   errors"]
        for name, v in rows.items():
            lines.append(f"  {name:<28} {v['rps']:>8.0f} {v['p50_ms'] or 0:>9.3f} "
                         f"{v['p99_ms'] or 0:>8.3f} {v['errors']:>8}")
        direct = rows.get("direct c=1", {}).get("p50_ms") or 0
        for name in [n[:-4] for n in rows if n.endswith(" c=1") and n != "direct c=1"]:
            lines.append(f"  {name} added p50 at c=1: "
                         f"{(rows[name + ' c=1']['p50_ms'] or 0) - direct:.3f} ms")
        for a, b in (("kvrouter", "aiohttp"), ("kvrouter", "vllm-router")) + tuple(
                (n[:-5], peer) for n in rows if " workers c=32" in n
                for peer in ("kvrouter", "vllm-router")):
            x = _ratio_line(r, "non_stream", backend, f"{a} c=32", f"{b} c=32", "rps")
            if x is not None:
                lines.append(f"  {a} / {b} at c=32: {x}")
    for kind, key in (("stream", "spaced, 100 events"), ("stream_burst", "bursty, 64 events")):
        rows = r.get(kind) or {}
        if not rows:
            continue
        lines += ["", f"streamed ({key})    events/s  streams/s  errors  TTFB p50 ms (c=1)"]
        for name, v in rows.items():
            lines.append(f"  {name:<24} {v['events_per_s']:>10.0f} {v['streams_per_s']:>10.0f} "
                         f"{v['errors']:>7} {v['ttfb_c1_p50_ms'] or 0:>18.3f}")
        for name in [n for n in rows if n != "direct"]:
            for peer in ("vllm-router", "kvrouter"):
                x = _ratio_line(r, kind, None, name, peer, "streams_per_s")
                if x is not None and name != peer:
                    lines.append(f"  {name} / {peer} streams/s: {x}")
    return lines
