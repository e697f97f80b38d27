"""Management routes (Flask): health, models, server info, traffic statistics, metrics."""
from __future__ import annotations

import time

from flask import Flask, Response, jsonify, request

from kvrouter import __version__
from kvrouter.control.states import State
from kvrouter.router import admin_sleep
from kvrouter.router.errors import envelope
from kvrouter.traffic import WINDOW_MAX


def _param(name: str, default: float, lo: float = 0.0, hi: float = float("inf")) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadParam(f"{name} must be a number, got {raw!r}") from None
    if value != value or value < lo or value > hi:
        raise BadParam(f"{name} must be between {lo:g} and {hi:g}, got {raw!r}")
    return value


class BadParam(Exception):
    pass


def create_app(ctx) -> Flask:
    """``ctx`` is the RouterContext: cfg, controller, traffic, proxy, metrics, started."""
    app = Flask("kvrouter")
    app.json.sort_keys = False
    cfg, controller, traffic = ctx.cfg, ctx.controller, ctx.traffic

    def entry_or_404(model):
        entry = ctx.proxy.routes.get(model)
        if entry is None:
            return None, (jsonify(envelope(404, f"The model `{model}` does not exist.",
                                           "invalid_request_error", "model", "model_not_found")),
                          404)
        return entry, None

    @app.errorhandler(BadParam)
    def _bad_param(err):
        return jsonify(envelope(400, str(err))), 400

    @app.errorhandler(404)
    def _not_found(err):
        return jsonify(envelope(404, f"no route {request.method} {request.path}")), 404

    @app.errorhandler(405)
    def _not_allowed(err):
        return jsonify(envelope(405, f"method {request.method} not allowed on {request.path}",
                                "invalid_request_error")), 405

    def model_health(entry) -> dict:
        return {"model": entry.name, "instance": entry.inst.name, "engine": entry.inst.engine,
                "endpoint": entry.inst.base_url, "state": entry.state.value,
                "healthy": entry.state is State.READY,
                "since_seconds": round(controller.clock() - entry.since, 3),
                "reason": entry.reason, "waiting_requests": entry.waiters,
                "requests_in_flight": traffic.models[entry.name].in_flight}

    @app.get("/health")
    def health():
        states = {}
        for entry in controller.entries.values():
            states[entry.state.value] = states.get(entry.state.value, 0) + 1
        return jsonify({"status": "ok", "version": __version__,
                        "uptime_seconds": round(time.time() - ctx.started, 3),
                        "models": len(controller.entries), "states": states})

    @app.get("/health/all")
    def health_all():
        return jsonify({"models": [model_health(e) for e in controller.entries.values()]})

    @app.get("/health/<path:model>")
    def health_model(model):
        entry, err = entry_or_404(model)
        if err:
            return err
        body = model_health(entry)
        return jsonify(body), (200 if body["healthy"] else 503)

    @app.get("/models")
    def models():
        return jsonify({"models": {e.name: {"endpoint": e.inst.base_url, "instance": e.inst.name,
                                            "engine": e.inst.engine,
                                            "aliases": list(e.inst.route_names[1:]),
                                            "state": e.state.value}
                                   for e in controller.entries.values()}})

    def model_card(name, entry):
        return {"id": name, "object": "model", "created": int(ctx.started),
                "owned_by": entry.inst.dialect if entry.inst.engine != "sim" else "kvrouter-sim",
                "root": entry.inst.model,
                "max_model_len": entry.info.get("max_model_len"),
                "state": entry.state.value}

    @app.get("/v1/models")
    def v1_models():
        return jsonify({"object": "list", "data": [model_card(n, e)
                                                   for n, e in ctx.proxy.routes.items()]})

    @app.get("/v1/models/<path:model>")
    def v1_model(model):
        entry, err = entry_or_404(model)
        return err if err else jsonify(model_card(model, entry))

    @app.get("/get_server_info")
    def server_info():
        return jsonify({"version": __version__, "config_file": cfg.source,
                        "started_at": ctx.started,
                        "uptime_seconds": round(time.time() - ctx.started, 3),
                        "router": {"host": cfg.router.router_host, "port": cfg.router.router_port,
                                   "auth": bool(cfg.router.api_keys),
                                   "admin_auth": bool(cfg.router.admin_token)},
                        "process_manager": cfg.process_manager,
                        "models": [model_health(e) for e in controller.entries.values()]})

    # --- traffic (both spellings from the seed) ------------------------------------------------
    def window_arg():
        return _param("window", 60.0, 1.0, WINDOW_MAX)

    def stats_all():
        window = window_arg()
        threshold = _param("threshold", cfg.sleep_manager.idle_threshold_seconds)
        return jsonify({"window_seconds": int(round(window)), "unrouted_requests":
                        traffic.unrouted, "models": {m: traffic.stats(m, window, threshold)
                                                     for m in traffic.models}})

    def stats_one(model):
        entry, err = entry_or_404(model)
        if err:
            return err
        window = window_arg()
        threshold = _param("threshold", cfg.sleep_manager.idle_threshold_seconds)
        return jsonify(traffic.stats(entry.name, window, threshold))

    def idle_models():
        threshold = _param("threshold", cfg.sleep_manager.idle_threshold_seconds)
        names = traffic.idle(threshold)
        return jsonify({"threshold_seconds": threshold, "count": len(names),
                        "models": {m: {"idle_time_seconds": round(traffic.idle_seconds(m), 3),
                                       "last_activity_time":
                                       traffic.models[m].last_end_wall} for m in names}})

    def active_models():
        threshold = _param("threshold", cfg.sleep_manager.idle_threshold_seconds)
        window = window_arg()
        names = traffic.active(threshold)
        return jsonify({"threshold_seconds": threshold, "window_seconds": int(round(window)),
                        "count": len(names),
                        "models": {m: traffic.stats(m, window, threshold) for m in names}})

    for prefix in ("/model/traffic", "/traffic"):
        app.add_url_rule(f"{prefix}/stats", f"stats_all{prefix}", stats_all)
        app.add_url_rule(f"{prefix}/stats/<path:model>", f"stats_one{prefix}", stats_one)
    app.add_url_rule("/model/traffic/idle", "idle_a", idle_models)
    app.add_url_rule("/models/idle", "idle_b", idle_models)
    app.add_url_rule("/model/traffic/active", "active_a", active_models)
    app.add_url_rule("/models/active", "active_b", active_models)

    admin_sleep.register(app, ctx, entry_or_404)

    @app.get("/metrics")
    def metrics():
        body, ctype = ctx.metrics.exposition()
        return Response(body, content_type=ctype)

    return app
