"""Traffic statistics, idle and active models (both spellings from the seed).

Each view returns the seed's keys with the seed's meaning (``traffic_stats``,
``model_stats``, ``idle_models``, ...: only models that have had a request, as the seed's
monitor knows no others) beside kvrouter's own (``models``: every model)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from kvrouter.router.api.common import entries_for, number_arg, router
from kvrouter.traffic import WINDOW_MAX

bp = Blueprint("traffic", __name__)


def _window() -> float:
    return number_arg("window", 60.0, 1.0, WINDOW_MAX)


def _threshold() -> float:
    return number_arg("threshold", router().cfg.sleep_manager.idle_threshold_seconds)


def _stats(traffic, name: str, window: float, threshold: float) -> dict:
    """A model's figures; with several replicas, each replica's under ``replicas``."""
    stats = traffic.stats(name, window, threshold)
    kids = traffic.replicas(name)
    if kids:
        stats["replicas"] = {k: traffic.stats(k, window, threshold) for k in kids}
    return stats


def stats_all():
    traffic = router().traffic
    window, threshold = _window(), _threshold()
    stats = {m: _stats(traffic, m, window, threshold) for m in traffic.models_shown()}
    return jsonify({"traffic_stats": {m: stats[m] for m in traffic.with_activity()},
                    "window_seconds": int(round(window)), "unrouted_requests": traffic.unrouted,
                    "models": stats})


def stats_one(model):
    found = entries_for(model)
    name = found[0].model if len(found) > 1 else found[0].name
    stats = _stats(router().traffic, name, _window(), _threshold())
    return jsonify({"model_stats": {"model_name": name, **stats}, **stats})


def idle_models():
    traffic = router().traffic
    threshold = _threshold()
    names = traffic.idle(threshold)
    seen = [m for m in names if traffic.models[m].total]
    return jsonify({
        "idle_models": seen, "idle_threshold_seconds": threshold,
        "idle_model_details": {m: {"idle_time_seconds": round(traffic.idle_seconds(m), 3),
                                   "total_requests": traffic.models[m].total,
                                   "last_activity_time": traffic.models[m].last_start_wall}
                               for m in seen},
        "idle_models_count": len(seen),
        "threshold_seconds": threshold, "count": len(names),
        "models": {m: {"idle_time_seconds": round(traffic.idle_seconds(m), 3),
                       "last_activity_time": traffic.models[m].last_start_wall,
                       "last_end_time": traffic.models[m].last_end_wall} for m in names}})


def active_models():
    traffic = router().traffic
    threshold, window = _threshold(), _window()
    names = traffic.active(threshold)
    stats = {m: _stats(traffic, m, window, threshold) for m in names}
    seen = [m for m in names if traffic.models[m].total]
    return jsonify({
        "active_models": seen, "idle_threshold_seconds": threshold,
        "window_seconds": int(round(window)),
        "active_model_details": {m: {k: stats[m][k] for k in (
            "request_rate", "total_requests", "avg_response_time", "last_activity_time")}
            for m in seen},
        "active_models_count": len(seen),
        "threshold_seconds": threshold, "count": len(names), "models": stats})


for _prefix in ("/model/traffic", "/traffic"):
    bp.add_url_rule(f"{_prefix}/stats", f"stats_all{_prefix}", stats_all)
    bp.add_url_rule(f"{_prefix}/stats/<path:model>", f"stats_one{_prefix}", stats_one)
for _path, _view in (("/model/traffic/idle", idle_models), ("/models/idle", idle_models),
                     ("/model/traffic/active", active_models), ("/models/active", active_models)):
    bp.add_url_rule(_path, f"{_view.__name__}{_path}", _view)
