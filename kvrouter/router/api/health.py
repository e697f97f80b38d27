"""Health: the router, one model, every model; server info."""
from __future__ import annotations

import time

from flask import Blueprint, jsonify

from kvrouter import __version__
from kvrouter.control.states import ANSWERING, State
from kvrouter.router.api.common import entry_for, router

bp = Blueprint("health", __name__)


def model_health(entry) -> dict:
    ctx = router()
    return {"model": entry.name, "instance": entry.inst.name, "engine": entry.inst.engine,
            "endpoint": entry.inst.base_url, "state": entry.state.value,
            "healthy": entry.state is State.READY,
            "since_seconds": round(ctx.controller.clock() - entry.since, 3),
            "reason": entry.reason, "waiting_requests": entry.waiters,
            "requests_in_flight": ctx.traffic.models[entry.name].in_flight}


@bp.get("/health")
def health():
    ctx = router()
    counts: dict = {}
    for entry in ctx.routes.entries():
        counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
    body = {"status": "healthy", "version": __version__,
            "uptime_seconds": round(time.time() - ctx.started, 3),
            "models": len(ctx.routes.entries()), "states": counts}
    cluster = ctx.controller.coord.status()
    if cluster:
        body["cluster"] = cluster
        if "degraded" in cluster:   # still serving: 200, for the load balancer
            body["status"] = "degraded"
            body["message"] = cluster["degraded"]
    return jsonify(body)


def engine_answers(entry) -> dict:
    """The seed's ``health``: {engine URL: whether the engine answers its health check}
    (a sleeping engine answers; a starting, stopped or failed one does not)."""
    return {entry.inst.base_url: entry.state in ANSWERING}


@bp.get("/health/all")
def health_all():
    entries = router().routes.entries()
    return jsonify({"model": "all", "health": {e.name: engine_answers(e) for e in entries},
                    "models": [model_health(e) for e in entries]})


@bp.get("/health/<path:model>")
def health_model(model):
    entry = entry_for(model)
    body = model_health(entry)
    body["health"] = engine_answers(entry)
    return jsonify(body), (200 if body["healthy"] else 503)


@bp.get("/get_server_info")
def server_info():
    ctx = router()
    cfg = ctx.cfg
    return jsonify({"version": __version__, "config_file": cfg.source,
                    "started_at": ctx.started,
                    "uptime_seconds": round(time.time() - ctx.started, 3),
                    "router": {"host": cfg.router.router_host, "port": cfg.router.router_port,
                               "auth": bool(cfg.router.api_keys),
                               "admin_auth": bool(cfg.router.admin_token)},
                    "process_manager": cfg.process_manager,
                    "models": [model_health(e) for e in ctx.routes.entries()]})
