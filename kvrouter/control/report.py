"""What the admin API and `kvrouter status` show of the controller's models."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

from kvrouter import kvpool
from kvrouter.control import policy
from kvrouter.control.controller import Controller
from kvrouter.control.entry import ModelEntry
from kvrouter.control.states import ASLEEP, RESIDENT
from kvrouter.versions import dotted


def model_status(ctl: Controller, entry: ModelEntry) -> dict:
    inst = entry.inst
    resident = entry.state in RESIDENT
    asleep = entry.state in ASLEEP
    return {
        "model": entry.name, "instance": inst.name, "engine": inst.engine,
        "state": entry.state.value, "reason": entry.reason,
        "since_seconds": round(ctl.clock() - entry.since, 3),
        "sleep_level": entry.level if asleep else None,
        "configured_level": entry.level,
        "sleep_kind": (("manual" if entry.sleep_manual else "automatic")
                       if asleep else None),
        "pinned": inst.sleep.pinned,
        "last_sleep_seconds": entry.last_sleep_seconds,
        "last_wake_seconds": entry.last_wake_seconds,
        "sleeps": entry.sleeps, "wakes": entry.wakes,
        "waiting_requests": entry.waiters,
        "requests_in_flight": ctl.in_flight(entry),
        "memory": {"gpus": (inst.gpus or "0").split(","), "weights_gb": inst.weights_gb,
                   "kv_cache_gb": inst.kv_cache_gb,
                   "resident_gb": ((inst.weights_gb or 0) + (inst.kv_cache_gb or 0))
                   if resident else 0.0,
                   "source": "declared"},  # the config's figures (measured: kv_pool)
        "kv_pool": kv_pool(entry),
        "gpu_process_bytes": engine_gpu_bytes(ctl, entry),
        "engine_version": dotted(entry.adapter.version) or None,
    }


def kv_pool(entry: ModelEntry) -> Optional[dict]:
    """The engine's kvcached pool as measured (its segment), or None without kvcached."""
    path = entry.inst.kv_pool_path
    if not path:
        return None
    info = kvpool.read(path)
    if info is None:
        return {"segment": path, "source": "kvcached", "limit_bytes": None,
                "used_bytes": None, "prealloc_bytes": None}
    return {"segment": path, "source": "kvcached", "limit_bytes": info.total,
            "used_bytes": info.used, "prealloc_bytes": info.prealloc}


def gpu_memory(ctl: Controller) -> dict:
    """Per GPU: the budget and what the policy counts on it (declared figures, or the
    measured KV where kvcached pools are steered), and NVML's total/used where present."""
    budget = dict(ctl.cfg.sleep_manager.gpu_memory_gb)
    used = policy.gpu_usage(ctl.snapshot().models)
    measured = ctl.nvml.gpus()
    return {g: {"budget_gb": budget.get(g), "used_gb": round(used.get(g, 0.0), 3),
                "source": "declared", **({"nvml": measured[g]} if g in measured else {})}
            for g in sorted(set(budget) | set(used) | set(measured))}


def engine_gpu_bytes(ctl: Controller, entry: ModelEntry) -> Optional[int]:
    """What the engine's processes hold on the GPUs (NVML), None when it cannot be said."""
    if not ctl.nvml.ok:
        return None
    pid = ctl.process.pid(entry.inst)
    return ctl.nvml.used_by([pid]) if pid else None


def sleeping_models(ctl: Controller, wall: Callable[[], float] = time.time) -> Dict[str, dict]:
    """The seed's ``sleeping_models``: since when (wall clock), how long, manual or not."""
    now_mono, now_wall = ctl.clock(), wall()
    out = {}
    for e in ctl.entries.values():
        if e.state in ASLEEP:
            started = e.slept_at if e.slept_at is not None else e.since
            out[e.name] = {"sleep_start_time": now_wall - (now_mono - started),
                           "sleep_duration": round(now_mono - started, 3),
                           "manual_sleep": e.sleep_manual}
    return out


def sleep_candidates(ctl: Controller) -> List[dict]:
    """Models idle past their threshold (the policy's, which may learn it per model)."""
    out = []
    chosen = ctl.sleep_policy
    for m in ctl.snapshot().models:
        if chosen.candidate(m):
            out.append({"model": m.name, "idle_time_seconds": round(m.idle_seconds, 3),
                        "idle_threshold_seconds": chosen.threshold(m), "level": m.level})
    return out
