"""The lab's output: terminal tables and the attainment-vs-rate plot (matplotlib, optional)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from kvrouter.bench.report import grid
from kvrouter.errors import KvrouterError

SCHEMA = "kvrouter-simulate/1"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _grid(rows: List[Sequence[str]]) -> str:
    return "\n".join(grid(rows))


def table(results: Dict[str, dict]) -> str:
    """One row per policy: ``results[name] = {"summary": ..., "max_rate": ... | None}``."""
    rows: List[Sequence[str]] = [(
        "policy", "SLO att.", "TTFT att.", "TPOT att.", "goodput/s", "TTFT p50/p99 ms",
        "wakes (on path)", "cold starts", "GPU GB avg (GB*h)", "max rate @SLO",
        "misses by cause")]
    for name, res in results.items():
        s = res["summary"]
        mr = res.get("max_rate")
        rate = "-" if not mr else ("none" if mr["max_rate"] is None else
                                   f"{mr['max_rate']:.1f}/s")
        misses = ", ".join(f"{k} {v}" for k, v in list(s["misses"].items())[:3]) or "-"
        rows.append((name, _pct(s["attainment"]), _pct(s["ttft_attainment"]),
                     _pct(s["tpot_attainment"]), f"{s['goodput']:.2f}",
                     f"{_ms(s['ttft']['p50'])}/{_ms(s['ttft']['p99'])}",
                     f"{s['wakes']} ({s['wakes_on_request_path']} req)",
                     f"{s['cold_starts']} ({s['cold_starts_on_request_path']} req)",
                     f"{s['mean_gpu_memory_gb']:.1f} "
                     f"({s['gpu_memory_gb_seconds'] / 3600:.0f})", rate, misses))
    return _grid(rows)


def model_table(summary: dict) -> str:
    rows: List[Sequence[str]] = [("model", "requests", "SLO TTFT ms", "SLO TPOT ms", "SLO att.",
                                  "TTFT att.", "TPOT att.")]
    for name, m in summary["models"].items():
        rows.append((name, str(m["requests"]), _ms(m["slo_ttft"]), _ms(m["slo_tpot"]),
                     _pct(m["attainment"]), _pct(m["ttft_attainment"]),
                     _pct(m["tpot_attainment"])))
    return _grid(rows)


def require_plotting() -> None:
    """Fail now, not after a long run, when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise KvrouterError("--plot needs matplotlib: pip install 'kvrouter[plot]' (or "
                            "leave --plot out)")


def plot(curves: Dict[str, List[dict]], path: str, title: str = "",
         target: Optional[float] = None) -> None:
    """Attainment against request rate, one line per policy (PNG, SVG or PDF by suffix)."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        pts = sorted((c["rate"], c["attainment"] * 100) for c in curve)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
    if target is not None:
        ax.axhline(target * 100, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(max(0.0, min([c["attainment"] * 100 for cs in curves.values() for c in cs]
                             + [90.0]) - 1), 100.5)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
