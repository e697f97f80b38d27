"""Sleep management routes (both spellings from the seed), with the optional admin token."""
from __future__ import annotations

import hmac

import gevent

from flask import jsonify, request

from kvrouter.control import report
from kvrouter.control.states import TransitionError
from kvrouter.router.errors import envelope


def register(app, ctx, entry_or_404) -> None:
    cfg, controller = ctx.cfg, ctx.controller

    def authorized():
        token = cfg.router.admin_token
        if not token:
            return None
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if hmac.compare_digest(given.encode(), token.encode()):
            return None
        return jsonify(envelope(401, "admin token required (Authorization: Bearer ...)",
                                "authentication_error", None, "invalid_admin_token")), 401

    def level_arg():
        raw = request.args.get("level")
        if raw is None:
            return None
        if raw not in ("1", "2"):
            return "bad"
        return int(raw)

    def transition(model, op, result):
        """Run one admin transition: token, 404, then ``op(entry)`` (409 when refused)."""
        denied = authorized()
        if denied:
            return denied
        entry, err = entry_or_404(model)
        if err:
            return err
        try:
            # in a greenlet of its own: a client that goes away must not cut a transition
            gevent.spawn(op, entry).get()
        except TransitionError as e:
            body = envelope(409, str(e), "conflict_error", None, "invalid_transition")
            body["status"] = report.model_status(controller, entry)
            return jsonify(body), 409
        return jsonify({"result": result, "status": report.model_status(controller, entry)})

    def sleep_model(model):
        level = level_arg()
        if level == "bad":
            return jsonify(envelope(400, "level must be 1 or 2", param="level")), 400
        return transition(model, lambda e: controller.sleep(e, level, True, "manual (admin API)"),
                          "sleeping")

    def wake_model(model):
        return transition(model, lambda e: controller.wake(e, True), "ready")

    def sleep_status():
        return jsonify({"models": {e.name: report.model_status(controller, e)
                                   for e in controller.entries.values()},
                        "gpu_memory": report.gpu_memory(controller),
                        "policy": {"auto_sleep_enabled": cfg.sleep_manager.auto_sleep_enabled,
                                   "wakeup_on_request": cfg.sleep_manager.wakeup_on_request,
                                   "idle_threshold_seconds":
                                   cfg.sleep_manager.idle_threshold_seconds,
                                   "min_sleep_duration": cfg.sleep_manager.min_sleep_duration,
                                   "stop_after_seconds": cfg.sleep_manager.stop_after_seconds,
                                   "process_manager": controller.process.kind}})

    def candidates():
        return jsonify({"candidates": report.sleep_candidates(controller)})

    for path, view, name in (("/model/sleep/<path:model>", sleep_model, "sleep_a"),
                             ("/action/sleep/<path:model>", sleep_model, "sleep_b"),
                             ("/model/wake/<path:model>", wake_model, "wake_a"),
                             ("/action/wakeup/<path:model>", wake_model, "wake_b")):
        app.add_url_rule(path, name, view, methods=["POST"])
    for path, view, name in (("/model/sleep/status", sleep_status, "status_a"),
                             ("/sleep/status", sleep_status, "status_b"),
                             ("/model/sleep/candidates", candidates, "cand_a"),
                             ("/sleep/candidates", candidates, "cand_b")):
        app.add_url_rule(path, name, view, methods=["GET"])
