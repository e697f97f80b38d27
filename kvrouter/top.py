"""``kvrouter top``: the dashboard's per-model and per-GPU view in a terminal (for ssh)."""
from __future__ import annotations

import shutil
import time
from typing import List, Optional, Sequence

from kvrouter.bench.report import grid

BAR = 30


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _ago(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _grid(rows: List[Sequence[str]], width: int) -> List[str]:
    return [line[:width] for line in grid(rows)]


def spark(values: Sequence[Optional[float]]) -> str:
    """A one-line chart of ``values`` (None: no data)."""
    ticks = " ▁▂▃▄▅▆▇█"
    top = max([v for v in values if v is not None] or [0.0])
    if top <= 0:
        return "".join(" " if v is None else ticks[1] for v in values)
    return "".join(" " if v is None else ticks[max(1, round(v / top * 8))] for v in values)


def cluster_line(c: dict) -> str:
    """Who this router is among the routers, who leads, and whether Redis answers."""
    leads = "leader" if c.get("this_router_leads") else f"leader {c.get('leader') or 'none'}"
    line = (f"router {c['router_id']} ({leads})  routers {', '.join(c.get('routers', []))}  "
            f"Redis {c['redis']}")
    return line + (f"  DEGRADED: {c['degraded']}" if c.get("degraded") else "")


def render(state: dict, width: int = 120) -> str:
    """The screen for one /ui/state answer."""
    head = (f"kvrouter  policy {state['policy']}  auto sleep "
            f"{'on' if state['auto_sleep_enabled'] else 'off'}  {state['process_manager']}  "
            f"{time.strftime('%H:%M:%S', time.localtime(state['time']))}")
    cluster = state.get("cluster") or {}
    if cluster:
        head += "\n" + cluster_line(cluster)
    rows: List[Sequence[str]] = [("MODEL", "STATE", "FOR", "RUN/WAIT", "REQ/S", "TTFT p50/p99",
                                  "ITL p50", "WAKES", "LAST WAKE", "15 MIN REQ/S")]
    for m in state["models"]:
        st = m["state"] + (f" L{m['sleep_level']}" if m["sleep_level"] else "")
        wake = "-" if m["last_wake_seconds"] is None else f"{m['last_wake_seconds']:.2f}s"
        name = f"{m['replica_of']} [{m['model']}]" if m.get("replica_of") else m["model"]
        rows.append((name, st, _ago(m["since_seconds"]),
                     f"{m['in_flight']}/{m['waiting']}", f"{m['request_rate']:.2f}",
                     f"{_ms(m['ttft']['p50'])}/{_ms(m['ttft']['p99'])} ms",
                     f"{_ms(m['itl']['p50'])} ms", str(m["wakes"]), wake,
                     spark([h["rate"] for h in m["history"]])))
    lines = [head, ""] + _grid(rows, width) + [""]
    for g in state["gpus"]:
        total = g["total_gb"] or sum(m["weights_gb"] + m["kv_limit_gb"] for m in g["models"])
        bar = ""
        for m in g["models"]:
            used = min(m["kv_used_gb"] or 0.0, m["kv_limit_gb"])
            for ch, v in (("#", m["weights_gb"]), ("=", used), ("-", m["kv_limit_gb"] - used)):
                bar += ch * round(BAR * v / total) if total else ""
        bar = bar[:BAR].ljust(BAR, ".")
        src = {"config": "budget", "nvml": "NVML"}.get(g["total_source"] or "", "no budget")
        free = "" if g["free_gb"] is None else f", {g['free_gb']:.1f} GB free"
        names = ", ".join(m["model"] for m in g["models"] if m["weights_gb"] or m["kv_limit_gb"])
        lines.append(f"GPU {g['gpu']} [{bar}] {total or 0:.1f} GB ({src}){free}  {names}"[:width])
    lines.append("  # weights  = KV in use  - KV reserved  . free")
    recent = state.get("events", [])[-5:]
    if recent:
        lines += ["", "recent events:"]
        for e in reversed(recent):
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            lines.append(f"  {when} {e['model']} {e['kind']}: {e['reason']}"[:width])
    return "\n".join(lines)


def run(fetch, once: bool, interval: float, echo) -> None:
    """Print the view once, or redraw it every ``interval`` seconds until Ctrl-C."""
    while True:
        width = shutil.get_terminal_size((120, 40)).columns
        screen = render(fetch(), width)
        if once:
            echo(screen)
            return
        echo("\x1b[H\x1b[2J" + screen)
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return
