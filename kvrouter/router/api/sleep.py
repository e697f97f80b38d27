"""Sleep management (both spellings from the seed); state changes need the admin token."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import gevent
from flask import Blueprint, jsonify, request

from kvrouter import kvpool
from kvrouter.control import report
from kvrouter.control.states import ASLEEP, State, TransitionError
from kvrouter.errors import BadRequest, Conflict
from kvrouter.router.api.common import admin_required, entries_for, entry_for, router

bp = Blueprint("sleep", __name__)
log = logging.getLogger("kvrouter.admin")


def _level() -> Optional[int]:
    raw = request.args.get("level")
    if raw is None:
        return None
    if raw not in ("1", "2"):
        raise BadRequest("level must be 1 or 2", param="level")
    return int(raw)


def _transition(model: str, op: Callable, result: str, verb: str, done_already: frozenset):
    """Run one admin transition: token, 404, then ``op(entry)`` (409 when refused).

    Idempotent, like ``systemctl start`` on a running unit: a model already in the asked
    state answers success with a message that nothing was done. The seed's keys
    (``model_name``, ``success``, ``message``) come with kvrouter's."""
    admin_required()
    found = entries_for(model)
    if len(found) > 1:
        return _each_replica(model, found, op, result, verb, done_already)
    entry = found[0]
    controller = router().controller
    if entry.state in done_already:
        return jsonify({"model_name": entry.name, "success": True,
                        "message": f"Model {entry.name} is already {entry.state.value}; "
                                   "nothing was done", "result": result, "changed": False,
                        "status": report.model_status(controller, entry)})

    def run():
        try:
            op(entry)
        except TransitionError as refusal:   # an answer, not a failure: no traceback
            return refusal
        return None

    # in a greenlet of its own: a client that goes away must not cut a transition
    err = gevent.spawn(run).get()
    if err is not None:
        log.info("%s of %s refused: %s", verb, entry.name, err)
        raise Conflict(str(err), code="invalid_transition", extra={
            "model_name": entry.name, "success": False,
            "message": f"Model {entry.name} {verb} request failed: {err}",
            "status": report.model_status(controller, entry)}) from None
    return jsonify({"model_name": entry.name, "success": True,
                    "message": f"Model {entry.name} {verb} request successful",
                    "result": result, "changed": True,
                    "status": report.model_status(controller, entry)})


def _each_replica(model: str, entries, op: Callable, result: str, verb: str,
                  done_already: frozenset):
    """A model with several replicas: the transition on each (at once); success when every
    replica is in the asked state after it."""
    controller = router().controller

    def run(entry):
        if entry.state in done_already:
            return None
        try:
            op(entry)
        except TransitionError as refusal:
            return str(refusal)
        return None

    jobs = [gevent.spawn(run, e) for e in entries]
    gevent.joinall(jobs)
    errors = {e.name: j.value for e, j in zip(entries, jobs) if j.value}
    for name, err in errors.items():
        log.info("%s of %s refused: %s", verb, name, err)
    replicas = [dict(report.model_status(controller, e), refused=errors.get(e.name))
                for e in entries]
    ok = not errors
    message = f"Model {model} {verb} request " + ("successful on every replica" if ok else
                                                   "failed on " + "; ".join(
                                                       f"{n}: {m}" for n, m in errors.items()))
    body = {"model_name": model, "success": ok, "message": message, "result": result,
            "replicas": replicas}
    if not ok:
        raise Conflict(message, code="invalid_transition", extra=body)
    return jsonify(body)


def sleep_model(model):
    level = _level()
    controller = router().controller
    return _transition(model, lambda e: controller.sleep(e, level, True, "manual (admin API)"),
                       "sleeping", "sleep", ASLEEP)


def wake_model(model):
    controller = router().controller
    return _transition(model, lambda e: controller.wake(e, True), "ready", "wake",
                       frozenset({State.READY}))


def restart_model(model):
    """POST /model/restart/{model}: drain the model, then restart its engine with the
    process manager's current definition (``kvrouter render --apply`` calls this for each
    engine whose command line changed)."""
    controller = router().controller
    return _transition(model, lambda e: controller.renew(e, "new command line"), "restarted",
                       "restart", frozenset())


def kv_limit(model):
    """POST /model/kv/{model}?limit=8G: set the model's kvcached pool limit (admin token);
    the engine grows or shrinks its KV pool to it, as after `kvctl limit`."""
    admin_required()
    entry = entry_for(model)
    path = entry.inst.kv_pool_path
    if not path:
        raise Conflict(f"model {entry.name!r} does not run with kvcached (ENABLE_KVCACHED)",
                       code="no_kv_pool")
    raw = request.args.get("limit")
    if raw is None:
        raise BadRequest("limit is required, e.g. ?limit=8G (or auto)", param="limit")
    total: Optional[int] = None
    if raw.strip().lower() != "auto":
        try:
            total = kvpool.parse_size(raw)
        except ValueError as err:
            raise BadRequest(str(err), param="limit") from None
    try:
        info = router().controller.kv.pin(entry, total)
    except FileNotFoundError:
        raise Conflict(f"model {entry.name!r} has no kvcached pool yet (engine not started?)",
                       code="no_kv_pool") from None
    message = "KV pool limit back to the arbiter" if info is None else \
        f"KV pool limit set to {kvpool.human(info.total)}; it holds until limit=auto"
    return jsonify({"model_name": entry.name, "success": True, "message": message,
                    "kv_pool": report.kv_pool(entry)})


def sleep_status():
    ctx = router()
    controller, sm = ctx.controller, ctx.cfg.sleep_manager
    return jsonify({"sleeping_models": report.sleeping_models(controller),
                    "sleep_candidates": [c["model"] for c in report.sleep_candidates(controller)],
                    "auto_sleep_enabled": sm.auto_sleep_enabled,
                    "idle_threshold_seconds": sm.idle_threshold_seconds,
                    "wakeup_on_request": sm.wakeup_on_request,
                    "models": {e.name: report.model_status(controller, e)
                               for e in ctx.routes.entries()},
                    "gpu_memory": report.gpu_memory(controller),
                    "policy": {"name": controller.sleep_policy.name,
                               "auto_sleep_enabled": sm.auto_sleep_enabled,
                               "wakeup_on_request": sm.wakeup_on_request,
                               "idle_threshold_seconds": sm.idle_threshold_seconds,
                               "min_sleep_duration": sm.min_sleep_duration,
                               "stop_after_seconds": sm.stop_after_seconds,
                               "process_manager": controller.process.kind}})


def candidates():
    ctx = router()
    found = report.sleep_candidates(ctx.controller)
    traffic = ctx.traffic.models
    return jsonify({
        "sleep_candidates": [c["model"] for c in found],
        "candidate_details": {c["model"]: {"idle_time_seconds": c["idle_time_seconds"],
                                           "total_requests": traffic[c["model"]].total,
                                           "last_activity_time":
                                           traffic[c["model"]].last_start_wall,
                                           "can_sleep": True} for c in found},
        "idle_threshold_seconds": ctx.cfg.sleep_manager.idle_threshold_seconds,
        "auto_sleep_enabled": ctx.cfg.sleep_manager.auto_sleep_enabled,
        "candidates": found})


bp.add_url_rule("/model/kv/<path:model>", "kv_limit", kv_limit, methods=["POST"])
for _path, _view in (("/model/sleep/<path:model>", sleep_model),
                     ("/action/sleep/<path:model>", sleep_model),
                     ("/model/wake/<path:model>", wake_model),
                     ("/action/wakeup/<path:model>", wake_model),
                     ("/model/restart/<path:model>", restart_model)):
    bp.add_url_rule(_path, f"{_view.__name__}{_path}", _view, methods=["POST"])
for _path, _get in (("/model/sleep/status", sleep_status), ("/sleep/status", sleep_status),
                    ("/model/sleep/candidates", candidates), ("/sleep/candidates", candidates)):
    bp.add_url_rule(_path, f"{_get.__name__}{_path}", _get, methods=["GET"])
