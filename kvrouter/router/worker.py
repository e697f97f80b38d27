"""A router worker process (``router.workers`` > 1).

Workers accept on the router's port together (``SO_REUSEPORT``: the kernel spreads the
connections). A worker serves a ``POST /v1/...`` itself when the model is ready (one byte of
shared memory says so: no lock, no round trip), and hands everything else to the owner
process, which holds the controller: requests for a model that is not ready (so every
worker's requests join the owner's one wake), the management routes, ``/events``,
``/metrics`` and ``/v1/responses/{id}``. What a worker served reaches the owner's traffic
monitor and metrics in batches every ``FLUSH_SECONDS``; its requests in flight are counted
in its own slot of the shared memory, which the owner reads before it puts a model to sleep.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Dict, List, Optional
from urllib.parse import quote

import gevent
from gevent.event import Event

from kvrouter import logs
from kvrouter.config.schema import Config
from kvrouter.control.entry import ModelEntry
from kvrouter.control.policy import wake_for_load
from kvrouter.engines.adapters import adapter_for
from kvrouter.errors import ApiError, NotFound, ServiceUnavailable
from kvrouter.http.body import StreamBody
from kvrouter.http.client import UpstreamError, UpstreamPool
from kvrouter.http.messages import Response, StreamResponse
from kvrouter.http.sockio import raise_open_files_limit
from kvrouter.http.websocket import is_upgrade
from kvrouter.ports import EXIT_NO_PORT, cannot_listen
from kvrouter.router.errors import error_response
from kvrouter.router.listening import SECRET_HEADER, reuseport_listener, router_http_server
from kvrouter.router.proxy import Proxy, answered_whole
from kvrouter.router.realtime import REALTIME_PATH, forward_upgrade
from kvrouter.router.routes import RouteTable, model_route
from kvrouter.router.shared import SharedState
from kvrouter.traffic import TrafficMonitor

log = logging.getLogger("kvrouter.worker")
FLUSH_SECONDS = 0.05
DRAIN_SECONDS = 30.0
HOP = ("content-length", "transfer-encoding", "connection", "keep-alive", "host")


class Owner:
    """The owner process, as seen from a worker: its internal HTTP port."""

    def __init__(self, port: int, secret: str):
        self.pool = UpstreamPool("127.0.0.1", port)
        self.secret = secret

    def post(self, path: str, doc) -> None:
        body = json.dumps(doc).encode()
        try:
            self.pool.request("POST", path, {"Content-Type": "application/json",
                                             SECRET_HEADER: self.secret}, body).read()
        except UpstreamError as err:
            log.warning("owner process not reachable (%s): %s", path, err)


class WorkerGate:
    """The controller's place in a worker's Proxy: the worker only proxies ready models."""

    SCALE_SECONDS = 0.5   # a model's load is reported to the owner at most this often

    def __init__(self, shared: SharedState, owner: Owner, wake_at: int = 0,
                 clock=time.monotonic):
        self.shared = shared
        self.owner = owner
        self.wake_at = wake_at
        self.clock = clock
        self.scale_asked: Dict[str, float] = {}

    def is_ready(self, entry: ModelEntry) -> bool:
        return self.shared.ready(entry.name)

    def load(self, entry: ModelEntry) -> int:
        """Requests every worker has in flight on the engine (exact: shared memory)."""
        return self.shared.in_flight(entry.name)

    def scale(self, group, chooser=None) -> None:
        """The owner decides whether to wake another replica; a worker tells it when the
        owner's rule (``policy.wake_for_load``) would, on the states and counts it shares."""
        entries = group.entries
        if wake_for_load([self.shared.state(e.name) for e in entries],
                         [self.shared.in_flight(e.name) for e in entries],
                         group.min_ready, self.wake_at) is None:
            return
        now = self.clock()
        if now - self.scale_asked.get(group.model, -1e9) < self.SCALE_SECONDS:
            return
        self.scale_asked[group.model] = now
        gevent.spawn(self.owner.post, f"/internal/scale/{quote(group.model, safe='')}", {})

    def ensure_ready(self, entry: ModelEntry) -> float:
        if self.shared.ready(entry.name):
            return 0.0
        raise ServiceUnavailable(f"model {entry.name!r} is "
                                 f"{self.shared.state(entry.name).value}", code="model_not_ready",
                                 headers={"Retry-After": "1"})

    def upstream_failed(self, entry: ModelEntry, reason: str) -> None:
        gevent.spawn(self.owner.post, f"/internal/upstream-failed/{quote(entry.name, safe='')}",
                     {"reason": reason})


class WorkerTraffic(TrafficMonitor):
    """A worker's traffic: each request is counted in its engine's shared in-flight slot
    from its start (and moved with it to another replica) to its end (``Worker._ended``)."""

    shared: SharedState
    slot: int

    def start(self, model: str):
        self.shared.add(self.slot, model, 1)
        return super().start(model)

    def move(self, rec, model: str) -> None:
        old = rec.model.name
        super().move(rec, model)
        if old != model:
            self.shared.add(self.slot, model, 1)
            self.shared.add(self.slot, old, -1)


class WorkerProxy(Proxy):
    owner: Owner

    def remember_response(self, response_id: str, entry: ModelEntry) -> None:
        super().remember_response(response_id, entry)
        self.owner.post("/internal/response", {"id": response_id, "model": entry.name})


class Worker:
    def __init__(self, cfg: Config, slot: int, owner: Owner, shared: SharedState):
        self.cfg = cfg
        self.slot = slot
        self.owner = owner
        self.shared = shared
        self.traffic = traffic = WorkerTraffic.for_config(cfg, on_end=self._ended)
        assert isinstance(traffic, WorkerTraffic)
        traffic.shared, traffic.slot = shared, slot
        now = time.monotonic()
        self.routes = RouteTable([ModelEntry(i, adapter_for(i), now) for i in cfg.instances],
                                 cfg.routing)
        gate = self.gate = WorkerGate(shared, owner, cfg.routing.wake_at_in_flight)
        self.proxy = WorkerProxy(cfg, gate, self.traffic,  # type: ignore
                                 self.routes)
        self.proxy.owner = owner
        self.batch: List[list] = []
        self.tag = f"{slot}/{os.getpid()}"   # answers say which worker served them
        r = cfg.router
        self.forward_timeouts = (r.connect_timeout_seconds, r.request_timeout_seconds +
                                 cfg.sleep_manager.wake_timeout_seconds +
                                 r.ready_timeout_seconds, r.stream_idle_timeout_seconds)

    def _ended(self, model, outcome, rec, latency, prompt, completion, itl) -> None:
        self.shared.add(self.slot, model, -1)
        self.batch.append([model, rec.start, rec.start + latency, outcome, rec.wait,
                           rec.first_byte, rec.stream, prompt, completion, itl])

    def flush(self) -> None:
        if self.batch:
            batch, self.batch = self.batch, []
            self.owner.post("/internal/records", batch)

    def _flush_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:
                log.exception("pushing traffic records failed")

    def handle(self, req):
        resp = self._handle(req)
        resp.headers.append(("X-Kvrouter-Worker", self.tag))
        return resp

    def _handle(self, req):
        path = req.path
        if path.startswith("/internal/"):
            return error_response(NotFound(f"no route {req.method} {path}"))
        if path == REALTIME_PATH and is_upgrade(req.headers):   # the owner routes and counts
            return forward_upgrade(self.owner.pool, req, self.forward_timeouts[0])
        if model_route(req.method, path) and req.stream is None:   # (an upload: the owner's)
            try:
                group, payload, body = self.proxy._parse(req)
            except ApiError:
                return self.forward(req)   # the owner answers (and counts) what is wrong
            # a replica is counted (WorkerTraffic.start) before its state is read again
            # (WorkerGate.ensure_ready): the owner sets DRAINING before it reads the counts,
            # so a sleep never starts under a request a worker let through
            if any(self.shared.ready(e.name) for e in group.entries):
                return self.proxy._run(req, group, payload,
                                       key=self.proxy.route_key(group, req, body),
                                       whole=answered_whole(body))
            if len(group.entries) > 1:
                self.gate.scale(group)
        return self.forward(req)

    def forward(self, req):
        """The request, as it came, to the owner process; its answer streamed back."""
        headers = {k: v for k, v in req.headers.items() if k not in HOP}
        target = req.path + ("?" + req.query if req.query else "")
        connect, first_byte, idle = self.forward_timeouts
        try:
            resp = self.owner.pool.request(req.method, target, headers, StreamBody.of(req),
                                           connect_timeout=connect,
                                           first_byte_timeout=first_byte, idle_timeout=idle)
        except UpstreamError as err:
            return error_response(ServiceUnavailable(
                f"the router's owner process is not reachable: {err}", code="owner_unreachable"))
        out = [(k, v) for k, v in resp.headers if k.lower() not in HOP]
        if resp.header("content-length") is not None:
            return Response(resp.status, out, resp.read())
        return StreamResponse(resp.status, out, resp.chunks())


def run_worker(cfg: Config, slot: int, owner_port: int, shared_path: str,
               listen_fd: Optional[int] = None) -> None:
    """Serve on the owner's listening socket ``listen_fd`` (inherited: the owner keeps it
    open, so a worker that stops never drops a connection waiting in its backlog), or on a
    SO_REUSEPORT socket of its own."""
    owner_pid = int(os.environ.pop("KVROUTER_OWNER_PID", "0") or 0)
    if owner_pid and os.getppid() != owner_pid:
        sys.exit(0)   # the owner died before this worker could ask to die with it
    logs.setup(cfg.router.log_level)
    raise_open_files_limit()
    secret = os.environ.pop("KVROUTER_OWNER_SECRET", "")
    owner = Owner(owner_port, secret)
    shared = SharedState(shared_path)
    worker = Worker(cfg, slot, owner, shared)
    r = cfg.router
    try:
        if listen_fd is not None:
            listener = socket.socket(fileno=listen_fd)
            listener.setblocking(False)
        else:
            listener = reuseport_listener(r.router_host, r.router_port)
    except OSError as err:
        log.error("worker %d: %s", slot, cannot_listen(r.router_host, r.router_port, err,
                                                       cfg.source))
        sys.exit(EXIT_NO_PORT)
    server = router_http_server(listener, worker.handle, lambda: cfg)
    server.start()
    gevent.spawn(worker._flush_loop)
    gevent.spawn(logs.flush_forever)
    log.info("worker %d (pid %d) serving %s:%d", slot, os.getpid(), r.router_host,
             r.router_port)
    owner.post("/internal/ready", {"slot": slot, "pid": os.getpid()})

    stopping = Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    stopping.wait()
    # stop accepting (the others take the new connections, from the same queue); finish
    # what is being served, each answer closing its connection
    server.drain(timeout=DRAIN_SECONDS)
    worker.flush()
    logs.ACCESS.flush()


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()   # looked up here: nothing is imported between fork and exec


def die_with_parent() -> None:
    """In a worker, between fork and exec (``preexec_fn``): Linux sends it SIGTERM when the
    owner dies, however it dies (PR_SET_PDEATHSIG survives exec), so no worker outlives
    its owner, not even one still importing when the owner is killed."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
