"""What the admin API and `kvrouter status` show of the controller's models."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

from kvrouter import kvpool
from kvrouter.control import policy
from kvrouter.control.controller import Controller
from kvrouter.control.entry import ModelEntry
from kvrouter.control.states import ASLEEP, RESIDENT
from kvrouter.engines.routes import client_routes
from kvrouter.versions import dotted


def model_status(ctl: Controller, entry: ModelEntry) -> dict:
    inst = entry.inst
    resident = entry.state in RESIDENT
    asleep = entry.state in ASLEEP
    return {
        "model": entry.name, "instance": inst.name, "engine": inst.engine,
        "replica_of": entry.model if inst.replica_of > 1 else None,
        "state": entry.state.value, "reason": entry.reason,
        "since_seconds": round(ctl.clock() - entry.since, 3),
        "sleep_level": entry.level if asleep else None,
        "configured_level": inst.sleep_level,
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
    info = kvpool.read_pool(path)
    groups = len(kvpool.group_paths(path)) if info is not None else 0
    common = {"segment": path, "source": "kvcached", "groups": groups,
              "set_by_hand": entry.kv_pinned is not None}
    if info is None:
        return dict(common, limit_bytes=None, used_bytes=None, prealloc_bytes=None)
    return dict(common, limit_bytes=info.total, used_bytes=info.used,
                prealloc_bytes=info.prealloc)


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


GB = 1024 ** 3


def _last_event(ctl: Controller, model: str, kinds) -> Optional[float]:
    for e in reversed(ctl.events.events):
        if e["model"] == model and e["kind"] in kinds:
            return e["time"]
    return None


def gpu_bars(ctl: Controller) -> List[dict]:
    """Per GPU, what is resident on it: each model's weights, KV in use and KV limit (the
    kvcached pool where measured, the config's figures where not), and what is free of
    the budget (``gpu_memory_gb``, else NVML's total)."""
    budgets = dict(ctl.cfg.sleep_manager.gpu_memory_gb)
    measured = ctl.nvml.gpus()
    per_gpu: Dict[str, List[dict]] = {}
    for e in ctl.entries.values():
        gpus = (e.inst.gpus or "0").split(",")
        share = 1 / len(gpus)
        pool = kv_pool(e) if e.state in RESIDENT else None
        resident = e.state in RESIDENT
        if pool and pool["limit_bytes"] is not None:
            kv_used, kv_limit, source = pool["used_bytes"] / GB, pool["limit_bytes"] / GB, \
                "kvcached"
        else:
            kv_used, kv_limit, source = None, (e.inst.kv_cache_gb or 0.0), "config"
        for g in gpus:
            per_gpu.setdefault(g, []).append({
                "model": e.name, "state": e.state.value,
                "weights_gb": round((e.inst.weights_gb or 0.0) * share, 3) if resident else 0.0,
                "kv_used_gb": None if kv_used is None or not resident else
                round(kv_used * share, 3),
                "kv_limit_gb": round(kv_limit * share, 3) if resident else 0.0,
                "source": source})
    out = []
    for g in sorted(set(per_gpu) | set(budgets) | set(measured)):
        models = per_gpu.get(g, [])
        held = sum(m["weights_gb"] + m["kv_limit_gb"] for m in models)
        nvml = measured.get(g)
        total = budgets.get(g) or (nvml["total_bytes"] / GB if nvml else None)
        out.append({"gpu": g, "total_gb": total,
                    "total_source": "config" if g in budgets else "nvml" if nvml else None,
                    "free_gb": round(total - held, 3) if total is not None else None,
                    "nvml": nvml, "models": models})
    return out


def overview(ctl: Controller, traffic, entries) -> dict:
    """Everything the dashboard and `kvrouter top` show, in one answer."""
    models = []
    for e in entries:
        st = model_status(ctl, e)
        tr = traffic.stats(e.name, window=60.0)
        models.append({
            "model": e.name, "instance": e.inst.name, "replica_of": st["replica_of"],
            "engine": e.inst.engine if e.inst.engine != "sim" else f"sim ({e.inst.dialect})",
            "aliases": [a for a in e.inst.route_names if a not in (e.name, e.model)],
            "routes": client_routes(e.inst.dialect),
            "state": st["state"], "reason": st["reason"], "since_seconds": st["since_seconds"],
            "sleep_level": st["sleep_level"], "pinned": st["pinned"],
            "in_flight": st["requests_in_flight"], "waiting": st["waiting_requests"],
            "request_rate": tr["request_rate"], "total_requests": tr["total_requests"],
            "ttft": tr["time_to_first_token"], "itl": tr["inter_token_latency"],
            "idle_seconds": tr["idle_time_seconds"],
            "last_wake_time": _last_event(ctl, e.name, ("wake", "start")),
            "last_wake_seconds": st["last_wake_seconds"], "wakes": st["wakes"],
            "sleeps": st["sleeps"], "memory": st["memory"], "kv_pool": st["kv_pool"],
            "gpu_process_bytes": st["gpu_process_bytes"],
            "history": traffic.history(e.name)})
    return {"time": time.time(), "policy": ctl.sleep_policy.name,
            "auto_sleep_enabled": ctl.cfg.sleep_manager.auto_sleep_enabled,
            "admin_token_required": bool(ctl.cfg.router.admin_token),
            "process_manager": ctl.process.kind, "models": models, "gpus": gpu_bars(ctl),
            "events": list(ctl.events.events)[-50:], "cluster": ctl.coord.status()}
