"""Health: the router, one model, every model; server info."""
from __future__ import annotations

import time

from flask import Blueprint, jsonify

from kvrouter import __version__
from kvrouter.control.states import ANSWERING, State, group_state
from kvrouter.router.api.common import entries_for, router
from kvrouter.router.replicas import breakers

bp = Blueprint("health", __name__)


def model_health(entry) -> dict:
    ctx = router()
    body = {"model": entry.name, "instance": entry.inst.name, "engine": entry.inst.engine,
            "endpoint": entry.inst.base_url, "state": entry.state.value,
            "healthy": entry.state is State.READY,
            "since_seconds": round(ctx.controller.clock() - entry.since, 3),
            "reason": entry.reason, "waiting_requests": entry.waiters,
            "requests_in_flight": ctx.traffic.models[entry.name].in_flight}
    if entry.inst.replica_of > 1:
        body["replica_of"] = entry.model
    return body


def group_health(group) -> dict:
    """A model: its own line, with each replica's under ``replicas`` when it has several."""
    if len(group.entries) == 1:
        return model_health(group.entries[0])
    ctx = router()
    replicas = [dict(model_health(e), **breaker) for e, breaker in
                zip(group.entries, breakers(group))]
    state = group_state(e.state for e in group.entries)
    return {"model": group.model, "instance": None, "engine": group.entries[0].inst.engine,
            "endpoint": None, "state": state.value, "healthy": state is State.READY,
            "reason": f"{sum(1 for r in replicas if r['healthy'])} of {len(replicas)} "
                      "replicas ready",
            "waiting_requests": sum(e.waiters for e in group.entries),
            "requests_in_flight": ctx.traffic.models[group.model].in_flight,
            "routing_policy": group.policy_name, "min_ready": group.min_ready,
            "replicas": replicas}


@bp.get("/health")
def health():
    ctx = router()
    counts: dict = {}
    groups = ctx.routes.groups()
    for group in groups:
        state = group_state(e.state for e in group.entries).value
        counts[state] = counts.get(state, 0) + 1
    body = {"status": "healthy", "version": __version__,
            "uptime_seconds": round(time.time() - ctx.started, 3),
            "models": len(groups), "states": counts}
    engines = len(ctx.routes.entries())
    if engines != len(groups):
        body["engines"] = engines
    cluster = ctx.controller.coord.status()
    if cluster:
        body["cluster"] = cluster
        if "degraded" in cluster:   # still serving: 200, for the load balancer
            body["status"] = "degraded"
            body["message"] = cluster["degraded"]
    return jsonify(body)


def engine_answers(entries) -> dict:
    """The seed's ``health``: {engine URL: whether the engine answers its health check}
    (a sleeping engine answers; a starting, stopped or failed one does not), one URL per
    replica."""
    return {e.inst.base_url: e.state in ANSWERING for e in entries}


@bp.get("/health/all")
def health_all():
    groups = router().routes.groups()
    return jsonify({"model": "all",
                    "health": {g.model: engine_answers(g.entries) for g in groups},
                    "models": [group_health(g) for g in groups]})


@bp.get("/health/<path:model>")
def health_model(model):
    found = entries_for(model)
    group = router().routes.get(model)
    body = group_health(group) if group is not None and len(found) > 1 else \
        model_health(found[0])
    body["health"] = engine_answers(found)
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
