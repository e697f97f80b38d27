"""``router.workers`` > 1: the owner process and its workers (``worker.py``).

The owner is the router as with one process (controller, policy, process control, traffic,
metrics, management routes), listening on an internal loopback port; the workers listen on
the router's port. The owner starts the workers, replaces one that dies (its slot of
in-flight counts is cleared, the others' connections are untouched), replaces all of them
after a reload (SIGHUP: new workers first, then the old ones drain), and on SIGTERM lets
the workers drain before it stops.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List

import gevent
from flask import Blueprint, abort, jsonify, request

from kvrouter import logs
from kvrouter.config.schema import Config
from kvrouter.control.process import process_control_for
from kvrouter.control.states import State
from kvrouter.errors import KvrouterError
from kvrouter.http.sockio import raise_open_files_limit
from kvrouter.ports import EXIT_NO_PORT, cannot_listen, in_use
from kvrouter.router.listening import SECRET_HEADER
from kvrouter.router.server import RouterContext, build_server
from kvrouter.router.shared import MAX_WORKERS, SharedState

log = logging.getLogger("kvrouter")
WATCH_SECONDS = 0.2
CRASH_SECONDS = 2.0


def worker_count(cfg: Config) -> int:
    return min(MAX_WORKERS // 2, cfg.router.workers or os.cpu_count() or 1)


def internal_routes(ctx: RouterContext, secret: str) -> Blueprint:
    """What workers tell the owner; answered only with the secret the owner gave them."""
    bp = Blueprint("internal", __name__)

    @bp.before_request
    def _only_workers():
        if request.headers.get(SECRET_HEADER) != secret:
            abort(404)

    @bp.route("/internal/records", methods=["POST"])
    def records():
        replay = ctx.traffic.replay
        for (model, start, end, outcome, wait, first_byte, stream, prompt, completion,
             itl) in request.get_json(force=True):
            replay(model, start, end, outcome, wait, first_byte, stream, prompt, completion,
                   itl)
        return jsonify({"ok": True})

    @bp.route("/internal/response", methods=["POST"])
    def response():
        doc = request.get_json(force=True)
        entry = ctx.controller.entries.get(doc["model"])
        if entry is not None:
            ctx.proxy.remember_response(doc["id"], entry)
        return jsonify({"ok": True})

    @bp.route("/internal/upstream-failed/<path:model>", methods=["POST"])
    def upstream_failed(model):
        entry = ctx.controller.entries.get(model)
        if entry is not None:
            ctx.controller.upstream_failed(entry, request.get_json(force=True)["reason"])
        return jsonify({"ok": True})

    return bp


class Workers:
    def __init__(self, ctx: RouterContext, owner_port: int, secret: str, shared: SharedState):
        self.ctx = ctx
        self.owner_port = owner_port
        self.secret = secret
        self.shared = shared
        self.n = worker_count(ctx.cfg)
        shared.slots = 2 * self.n
        self.procs: Dict[int, subprocess.Popen] = {}
        self.started_at: Dict[int, float] = {}
        self.hold: Dict[int, float] = {}   # slot -> not before (a worker that crashed at once)
        self.retiring: List[subprocess.Popen] = []
        self.stopping = False
        self.generation = 0    # slots 0..n-1 or n..2n-1: a reload starts the other half
        self.on_no_port: Callable[[], None] = lambda: None   # no worker could listen

    def spawn(self, slot: int) -> None:
        cfg = self.ctx.cfg
        argv = [sys.executable, "-m", "kvrouter", "worker", cfg.source, "--slot", str(slot),
                "--owner-port", str(self.owner_port), "--shared", self.shared.path,
                "--host", cfg.router.router_host, "--port", str(cfg.router.router_port)] + (
                    ["--cluster-host", cfg.node] if cfg.node else [])
        self.shared.reset_slot(slot)
        self.procs[slot] = subprocess.Popen(argv, env=dict(os.environ,
                                                           KVROUTER_OWNER_SECRET=self.secret))
        self.started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot, self.procs[slot].pid)

    def start(self) -> None:
        for slot in range(self.n):
            self.spawn(slot)
        gevent.spawn(self.watch)

    def watch(self) -> None:
        while not self.stopping:
            gevent.sleep(WATCH_SECONDS)
            now = time.monotonic()
            for slot, p in list(self.procs.items()):
                code = p.poll()
                if code is None or self.stopping or now < self.hold.get(slot, 0.0):
                    continue
                if code == EXIT_NO_PORT:    # it said why; another would fail the same way
                    del self.procs[slot]
                    if not self.procs:
                        self.on_no_port()
                    continue
                if slot not in self.hold:
                    log.warning("worker %d (pid %d) exited (%s): starting another", slot, p.pid,
                                code if code >= 0 else signal.Signals(-code).name)
                    if now - self.started_at[slot] < CRASH_SECONDS:   # crashing: no storm
                        self.hold[slot] = now + CRASH_SECONDS
                        continue
                self.hold.pop(slot, None)
                self.spawn(slot)
            self.retiring = [p for p in self.retiring if p.poll() is None]

    def replace_all(self) -> None:
        """After a reload: a new worker per slot of the other half, then the old ones drain."""
        old = self.procs
        self.generation ^= 1
        self.procs = {}
        for i in range(self.n):
            self.spawn(i + self.generation * self.n)
        gevent.sleep(1.0)   # the new ones listen before the old ones stop accepting
        for p in old.values():
            p.terminate()
            self.retiring.append(p)

    def stop(self, timeout: float = 35.0) -> None:
        self.stopping = True
        everyone = list(self.procs.values()) + self.retiring
        for p in everyone:
            if p.poll() is None:
                p.terminate()
        waited = 0.0
        while waited < timeout and any(p.poll() is None for p in everyone):
            gevent.sleep(0.1)
            waited += 0.1
        for p in everyone:
            if p.poll() is None:
                p.kill()


def serve_with_workers(cfg: Config, shape: Callable[[Config], Config] = lambda c: c) -> None:
    logs.setup(cfg.router.log_level)
    raise_open_files_limit()
    secret = os.urandom(16).hex()
    shared = SharedState(f"/dev/shm/kvrouter-{cfg.router.router_port}-{os.getpid()}",
                         create=True)
    shared.register([i.model for i in cfg.instances])
    ctx = RouterContext(cfg, process_control_for(cfg), shape)
    ctx.traffic.external = shared.in_flight
    ctx.controller.events.listeners.append(
        lambda ev: shared.set_state(ev["model"], State(ev["to"])))
    ctx.app.register_blueprint(internal_routes(ctx, secret))
    r = cfg.router
    try:
        ctx.preflight()
    except KvrouterError as err:
        log.error("%s", err)
        shared.close(unlink=True)
        sys.exit(EXIT_NO_PORT)
    if in_use(r.router_host, r.router_port, reuseport=True):
        log.error("%s", cannot_listen(r.router_host, r.router_port,
                                      OSError(errno.EADDRINUSE, "in use"), cfg.source))
        shared.close(unlink=True)
        sys.exit(EXIT_NO_PORT)
    server = build_server(ctx, listener=("127.0.0.1", 0))
    server.start()
    ctx.start()
    workers = Workers(ctx, server.address[1], secret, shared)
    workers.start()
    log.info("kvrouter on http://%s:%d with %d workers routing %s (config %s; owner on "
             "127.0.0.1:%d)", cfg.router.router_host, cfg.router.router_port, workers.n,
             ", ".join(ctx.routes.names()), cfg.source, server.address[1])

    def _stop(*_):
        log.info("shutting down: the workers drain")
        workers.stop()
        ctx.stop()
        server.stop(timeout=5)
        shared.close(unlink=True)
        sys.exit(0)

    def _reload():
        if ctx.reload_from_file():
            shared.register([i.model for i in ctx.cfg.instances])
            for e in ctx.controller.entries.values():
                shared.set_state(e.name, e.state)
            workers.replace_all()

    def _no_port():
        log.error("no worker can listen on %s:%d: stopping", r.router_host, r.router_port)
        ctx.stop()
        shared.close(unlink=True)
        os._exit(EXIT_NO_PORT)

    workers.on_no_port = _no_port
    gevent.signal_handler(signal.SIGTERM, _stop)
    gevent.signal_handler(signal.SIGINT, _stop)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(_reload))
    gevent.spawn(logs.flush_forever)
    server.serve_forever()
