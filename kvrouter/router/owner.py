"""``router.workers`` > 1: the owner process and its workers (``worker.py``).

The owner is the router as with one process (controller, policy, process control, traffic,
metrics, management routes), listening on an internal loopback port; it also holds the
router's listening sockets, and each worker accepts on one of them. The owner starts the
workers, replaces one that dies (its slot of in-flight counts is cleared, the others'
connections are untouched), replaces all of them after a reload (SIGHUP: new workers
first, each old one drains once its replacement serves; reloads one at a time), and on
SIGTERM lets the workers drain before it stops. Workers die with their owner, however it
dies; a new owner removes the shared memory a dead one left.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, List, Set

import gevent
from flask import Blueprint, abort, jsonify, request

from kvrouter import logs
from kvrouter.config.schema import Config
from kvrouter.control.process import process_control_for
from kvrouter.control.states import State
from kvrouter.errors import KvrouterError
from kvrouter.http.sockio import raise_open_files_limit
from kvrouter.ports import EXIT_NO_PORT, cannot_listen, in_use
from kvrouter.router.listening import SECRET_HEADER, reuseport_listener
from kvrouter.router.server import RouterContext, build_server, coalesced
from kvrouter.router.shared import MAX_WORKERS, SharedState
from kvrouter.router.shared import SIZE as SHARED_SIZE
from kvrouter.router.worker import die_with_parent

log = logging.getLogger("kvrouter")
WATCH_SECONDS = 0.2
CRASH_SECONDS = 2.0


def worker_count(cfg: Config) -> int:
    return min(MAX_WORKERS // 2, cfg.router.workers or os.cpu_count() or 1)


def internal_routes(ctx: RouterContext, secret: str,
                    ready: Dict[str, Callable[[int, int], None]]) -> Blueprint:
    """What workers tell the owner; answered only with the secret the owner gave them
    (``ready["mark"]``: what to call when a worker says it serves)."""
    bp = Blueprint("internal", __name__)

    @bp.route("/internal/ready", methods=["POST"])
    def worker_ready():
        doc = request.get_json(force=True)
        mark = ready.get("mark")
        if mark is not None:
            mark(int(doc["slot"]), int(doc["pid"]))
        return jsonify({"ok": True})

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

    @bp.route("/internal/scale/<path:model>", methods=["POST"])
    def scale(model):
        group = ctx.routes.get(model)
        if group is not None:   # the workers' requests are in the shared counts it reads
            ctx.controller.scale(group)
        return jsonify({"ok": True})

    @bp.route("/internal/upstream-failed/<path:model>", methods=["POST"])
    def upstream_failed(model):
        entry = ctx.controller.entries.get(model)
        if entry is not None:
            ctx.controller.upstream_failed(entry, request.get_json(force=True)["reason"])
        return jsonify({"ok": True})

    return bp


class Workers:
    """``n`` worker processes, each accepting on one of the owner's ``n`` listening sockets
    (SO_REUSEPORT spreads the connections among them). The owner keeps the sockets: a
    worker that stops or dies drops nothing waiting in the backlog, and its replacement
    accepts from the same queue.

    Every worker has a slot of in-flight counts in the shared memory; a slot is given to a
    new worker only once the process that had it is gone (and its counts cleared), so a
    worker still draining keeps its counts whatever reloads come.

    A reload (SIGHUP) starts a new worker per socket with the new config; each old one is
    told to drain only once its replacement says it serves."""

    READY_SECONDS = 60.0

    def __init__(self, ctx: RouterContext, owner_port: int, secret: str, shared: SharedState,
                 listeners: List[socket.socket]):
        self.ctx = ctx
        self.owner_port = owner_port
        self.secret = secret
        self.shared = shared
        self.listeners = listeners
        self.n = len(listeners)
        self.procs: Dict[int, subprocess.Popen] = {}   # slot -> every live worker
        self.serving: Dict[int, int] = {}              # socket index -> the slot serving it
        self.retiring: Set[int] = set()                # slots draining after a reload
        self.ready: Set[int] = set()                   # slots whose worker said it serves
        self.started_at: Dict[int, float] = {}
        self.hold: Dict[int, float] = {}   # socket index -> not before (a crashing worker)
        self.stopping = False
        shared.slots = 0   # grows with the slots given out

    def spawn(self, index: int) -> int:
        """A worker on socket ``index``, in the lowest free slot; its slot."""
        cfg = self.ctx.cfg
        slot = next(s for s in range(MAX_WORKERS) if s not in self.procs)
        fd = self.listeners[index].fileno()
        argv = [sys.executable, "-m", "kvrouter", "worker", cfg.source, "--slot", str(slot),
                "--owner-port", str(self.owner_port), "--shared", self.shared.path,
                "--host", cfg.router.router_host, "--port", str(cfg.router.router_port),
                "--listen-fd", str(fd)] + (["--cluster-host", cfg.node] if cfg.node else [])
        self.shared.reset_slot(slot)
        self.shared.slots = max(self.shared.slots, slot + 1)
        self.procs[slot] = subprocess.Popen(
            argv, pass_fds=(fd,), preexec_fn=die_with_parent,
            env=dict(os.environ, KVROUTER_OWNER_SECRET=self.secret,
                     KVROUTER_OWNER_PID=str(os.getpid())))
        self.started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot, self.procs[slot].pid)
        return slot

    def mark_ready(self, slot: int, pid: int) -> None:
        proc = self.procs.get(slot)
        if proc is not None and proc.pid == pid:
            self.ready.add(slot)

    def start(self) -> None:
        for index in range(self.n):
            self.serving[index] = self.spawn(index)
        gevent.spawn(self.watch)

    def watch(self) -> None:
        while not self.stopping:
            gevent.sleep(WATCH_SECONDS)
            self._reap()

    def _reap(self) -> None:
        now = time.monotonic()
        for slot, p in list(self.procs.items()):
            code = p.poll()
            if code is None:
                continue
            del self.procs[slot]
            self.ready.discard(slot)
            self.shared.reset_slot(slot)   # its requests ended with its connections
            if slot in self.retiring:
                self.retiring.discard(slot)
                continue
            index = next((i for i, s in self.serving.items() if s == slot), None)
            if index is None or self.stopping:
                continue   # a new worker that died before it served: the reload says so
            log.warning("worker %d (pid %d) exited (%s): starting another", slot, p.pid,
                        code if code >= 0 else signal.Signals(-code).name)
            del self.serving[index]
            if now - self.started_at.get(slot, 0.0) < CRASH_SECONDS:   # crashing: no storm
                self.hold[index] = now + CRASH_SECONDS
        for index in range(self.n):
            if index not in self.serving and not self.stopping and \
                    now >= self.hold.get(index, 0.0):
                self.hold.pop(index, None)
                self.serving[index] = self.spawn(index)

    def reload(self) -> None:
        """New workers with the config now in force (the caller runs one at a time)."""
        fresh = {index: self.spawn(index) for index in range(self.n)}
        deadline = time.monotonic() + self.READY_SECONDS
        while time.monotonic() < deadline and any(
                slot not in self.ready and slot in self.procs for slot in fresh.values()):
            gevent.sleep(0.05)
        for index, slot in fresh.items():
            if slot in self.ready:
                old = self.serving.get(index)
                self.serving[index] = slot
                if old is not None and old in self.procs:
                    self.retiring.add(old)
                    self.procs[old].terminate()   # it drains: nothing new reaches it
                continue
            log.error("a new worker (slot %d) did not come up within %.0fs: the one before "
                      "it keeps serving socket %d with the previous config (see its log)",
                      slot, self.READY_SECONDS, index)
            if slot in self.procs:
                self.procs[slot].kill()

    def stop(self, timeout: float = 35.0) -> None:
        self.stopping = True
        everyone = list(self.procs.values())
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


def clean_stale_segments(folder: str = "/dev/shm") -> None:
    """Shared-memory files of owners that died without cleaning up (SIGKILL, a crash)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        parts = name.split("-")   # kvrouter-PORT-PID, and the size of ours only
        if len(parts) != 3 or parts[0] != "kvrouter" or not parts[1].isdigit() or \
                not parts[2].isdigit():
            continue
        try:
            if os.path.getsize(os.path.join(folder, name)) != SHARED_SIZE:
                continue
        except OSError:
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, name))
                log.info("removed %s/%s, left by a router that is gone", folder, name)
            except OSError:
                pass
        except PermissionError:
            pass


def owner_listeners(cfg: Config, n: int) -> List[socket.socket]:
    """The router's ``n`` listening sockets (raises OSError when the port is taken, also by
    another router's SO_REUSEPORT sockets: two routers never share a port unnoticed)."""
    if in_use(cfg.router.router_host, cfg.router.router_port):
        raise OSError(errno.EADDRINUSE, "in use")
    out: List[socket.socket] = []
    try:
        for _ in range(n):
            out.append(reuseport_listener(cfg.router.router_host, cfg.router.router_port))
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


def serve_with_workers(cfg: Config, shape: Callable[[Config], Config] = lambda c: c) -> None:
    logs.setup(cfg.router.log_level)
    raise_open_files_limit()
    secret = os.urandom(16).hex()
    clean_stale_segments()
    shared = SharedState(f"/dev/shm/kvrouter-{cfg.router.router_port}-{os.getpid()}",
                         create=True)
    shared.register([i.key for i in cfg.instances])
    ctx = RouterContext(cfg, process_control_for(cfg), shape)
    ctx.traffic.external = shared.in_flight
    ctx.controller.events.listeners.append(
        lambda ev: shared.set_state(ev["model"], State(ev["to"])))
    ready: Dict[str, Callable[[int, int], None]] = {}
    ctx.app.register_blueprint(internal_routes(ctx, secret, ready))
    r = cfg.router
    try:
        ctx.preflight()
        listeners = owner_listeners(cfg, worker_count(cfg))
    except KvrouterError as err:
        log.error("%s", err)
        shared.close(unlink=True)
        sys.exit(EXIT_NO_PORT)
    except OSError as err:
        log.error("%s", cannot_listen(r.router_host, r.router_port, err, cfg.source))
        shared.close(unlink=True)
        sys.exit(EXIT_NO_PORT)
    server = build_server(ctx, listener=("127.0.0.1", 0))
    server.start()
    ctx.start()
    workers = Workers(ctx, server.address[1], secret, shared, listeners)
    ready["mark"] = workers.mark_ready
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
            shared.register([i.key for i in ctx.cfg.instances])
            for e in ctx.controller.entries.values():
                shared.set_state(e.name, e.state)
            if worker_count(ctx.cfg) != workers.n:
                log.warning("reload: router.workers changed; it takes effect when the router "
                            "restarts")
            workers.reload()

    gevent.signal_handler(signal.SIGTERM, _stop)
    gevent.signal_handler(signal.SIGINT, _stop)
    reload = coalesced(_reload)
    gevent.signal_handler(signal.SIGHUP, logs.flushed(lambda: gevent.spawn(reload)))
    gevent.spawn(logs.flush_forever)
    server.serve_forever()
