"""The dashboard (``GET /ui``: files shipped in the package, no build step, no CDN), the
state it shows (``/ui/state``), the event stream (``/events``) and program log tails."""
from __future__ import annotations

import json
import os
from typing import Iterator

from flask import Blueprint, Response, jsonify, request

from kvrouter.control import report
from kvrouter.control.process import ProcessControlError
from kvrouter.errors import NotFound, ServiceUnavailable
from kvrouter.router.api.common import admin_required, entry_for, number_arg, router

bp = Blueprint("ui", __name__)
UI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "ui")
ASSETS = {"app.js": "text/javascript", "app.css": "text/css",
          "index.html": "text/html; charset=utf-8"}
KEEPALIVE_SECONDS = 15.0


def _file(name: str) -> Response:
    with open(os.path.join(UI_DIR, name), "rb") as fh:
        body = fh.read()
    return Response(body, content_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@bp.route("/ui")
@bp.route("/ui/")
def page():
    return _file("index.html")


@bp.route("/ui/<name>")
def asset(name: str):
    if name not in ASSETS:
        raise NotFound(f"no dashboard file {name!r}")
    return _file(name)


@bp.route("/ui/state")
def state():
    ctx = router()
    return jsonify(report.overview(ctx.controller, ctx.traffic, ctx.routes.entries()))


@bp.route("/events")
def events():
    """Server-sent events: one ``state`` event per model state change (sleep, wake, stop,
    start, failure, restart), the recent ones first (after ``Last-Event-ID`` or
    ``?since=ID`` when given), then live."""
    log = router().controller.events
    since = request.headers.get("Last-Event-ID") or request.args.get("since")
    try:
        asked = int(since) if since is not None else None
    except ValueError:
        asked = None
    last = log.resume_from(asked)

    def stream() -> Iterator[bytes]:
        nonlocal last
        yield b"retry: 2000\n\n"
        while True:
            found = log.next(last, KEEPALIVE_SECONDS)
            if not found:
                yield b": keep-alive\n\n"
            for ev in found:
                last = ev["id"]
                yield f"id: {ev['id']}\nevent: state\ndata: {json.dumps(ev)}\n\n".encode()

    return Response(stream(), content_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


ROUTER_NAMES = ("router", "kvrouter", "kvrouter.service")   # the program and unit names


@bp.route("/ui/logs/<path:name>")
def logs(name: str):
    """The end of a program's log: the router (``router`` or its program name), or a
    model's engine (any of its names)."""
    admin_required()
    ctx = router()
    nbytes = int(number_arg("bytes", 16384, 1, 1 << 20))
    if name == "router" or (name in ROUTER_NAMES and ctx.routes.get(name) is None):
        program, unit = "kvrouter", "kvrouter.service"
    else:
        inst = entry_for(name).inst
        program, unit = inst.supervisor_name, inst.unit_name
    try:
        text = ctx.controller.process.log_tail(program, unit, nbytes)
    except ProcessControlError as err:
        raise ServiceUnavailable(str(err), code="logs_unavailable") from None
    return jsonify({"program": program, "unit": unit, "source": ctx.controller.process.kind,
                    "text": text})
