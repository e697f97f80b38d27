"""Management routes (Flask), one Blueprint each: health, models, traffic, sleep, ui.

Views reach the router's state through ``common.router()`` (the RouterContext the app
was created with), so a test can build an app around any context and call them.
"""
from __future__ import annotations

import logging

from flask import Flask, jsonify, request

from kvrouter.errors import ApiError, MethodNotAllowed, NotFound
from kvrouter.router.api import health, models, sleep, traffic, ui

log = logging.getLogger("kvrouter.admin")


def create_app(ctx) -> Flask:
    """``ctx`` is the RouterContext: cfg, controller, traffic, routes, proxy, metrics, started."""
    app = Flask("kvrouter")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["kvrouter"] = ctx
    for bp in (health.bp, models.bp, traffic.bp, sleep.bp, ui.bp):
        app.register_blueprint(bp)

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        if request.method == "POST":  # a refused admin action: one line, never a traceback
            log.warning("%s %s: %d %s", request.method, request.path, err.status, err.message)
        return jsonify(err.body()), err.status, err.headers

    @app.errorhandler(404)
    def _not_found(_err):
        return _api_error(NotFound(f"no route {request.method} {request.path}"))

    @app.errorhandler(405)
    def _not_allowed(_err):
        return _api_error(MethodNotAllowed(f"method {request.method} not allowed on "
                                           f"{request.path}"))

    return app
