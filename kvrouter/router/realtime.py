"""WebSockets: ``GET /v1/realtime?model=...`` with ``Upgrade: websocket``, through the same key,
gate (a sleeping model is woken), replica choice and accounting as /v1. After the engine's
101 the router relays bytes both ways as they come (no frame is rebuilt); the session counts
as a request in flight until it ends, so a model with an open session is never idle. It ends
when either side closes; on router shutdown each side gets a close frame (1001, going away)
where no frame of the other's is half sent, then both connections close."""
from __future__ import annotations

import logging
from typing import Callable, Optional
from urllib.parse import parse_qsl, urlencode

import gevent
from gevent.lock import Semaphore

from kvrouter.errors import ApiError, BadRequest, ServiceUnavailable
from kvrouter.http.client import UpstreamError, UpstreamPool
from kvrouter.http.messages import Request, Response, Upgraded
from kvrouter.http.websocket import FrameCursor, close_frame, is_upgrade
from kvrouter.router import request_id
from kvrouter.router.auth import require_client_key
from kvrouter.router.errors import error_response, normalize_error_body

log = logging.getLogger("kvrouter.realtime")
REALTIME_PATH = "/v1/realtime"
# the handshake's headers the engine needs (the rest of the client's are not its business)
HANDSHAKE = ("upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
             "sec-websocket-protocol", "sec-websocket-extensions", "authorization", "origin",
             "openai-beta")
GRACE = 1.0   # seconds the peers have to answer a close before their sockets are closed


class Relay:
    """Bytes both ways between a client and an engine, one greenlet per direction; each
    direction's frames are followed (FrameCursor) so the router may add a close frame."""

    def __init__(self, upstream, upstream_early: bytes, on_end: Callable[[str], None]):
        self.upstream = upstream
        self.upstream_early = upstream_early
        self.on_end = on_end
        self.client = None
        self.to_engine, self.to_client = FrameCursor(), FrameCursor()
        self.locks = (Semaphore(), Semaphore())   # (to_engine, to_client) writers
        self.stopping = False

    def run(self, client, early: bytes) -> None:
        self.client = client
        outcome = "success"
        pumps = []
        try:
            self._send(self.upstream, early, self.to_engine, self.locks[0])
            self._send(client, self.upstream_early, self.to_client, self.locks[1])
            pumps = [gevent.spawn(self._pump, client, self.upstream, self.to_engine,
                                  self.locks[0]),
                     gevent.spawn(self._pump, self.upstream, client, self.to_client,
                                  self.locks[1])]
            gevent.wait(pumps, count=1)
            # one side closed: the other gets its close (already relayed) a moment to answer
            gevent.wait(pumps, timeout=GRACE)
        except OSError:
            outcome = "disconnect"
        finally:
            gevent.killall(pumps)
            for sock in (self.upstream, client):
                try:
                    sock.close()
                except OSError:
                    pass
            self.on_end("shutdown" if self.stopping else outcome)

    @staticmethod
    def _send(sock, data: bytes, cursor: FrameCursor, lock: Semaphore) -> None:
        if data:
            with lock:
                cursor.feed(data)
                sock.sendall(data)

    def _pump(self, src, dst, cursor: FrameCursor, lock: Semaphore) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._send(dst, data, cursor, lock)
        except OSError:
            pass
        try:
            dst.shutdown(1)   # SHUT_WR: the other side reads the end
        except OSError:
            pass

    def stop(self) -> None:
        """Router shutdown: a close frame (1001) to each side at a frame boundary."""
        self.stopping = True
        for sock, cursor, lock, mask in ((self.client, self.to_client, self.locks[1], False),
                                         (self.upstream, self.to_engine, self.locks[0], True)):
            if sock is None or cursor.closed or not lock.acquire(timeout=0.2):
                continue
            try:
                if cursor.at_boundary:
                    sock.sendall(close_frame(reason="router shutting down", mask=mask))
                    cursor.closed = True
            except OSError:
                pass
            finally:
                lock.release()


def _open(pool: UpstreamPool, path: str, req: Request, connect: float, timeout: float):
    headers = {k: v for k, v in req.headers.items() if k in HANDSHAKE}
    return pool.upgrade(path, headers, connect, timeout)


class RealtimeRoute:
    """``handle(req)`` for /v1/realtime on the proxy's collaborators."""

    def __init__(self, proxy):
        self.proxy = proxy

    def _group(self, req: Request):
        p = self.proxy
        require_client_key(req.headers, p.cfg.router.api_keys)
        if not is_upgrade(req.headers):
            raise BadRequest(f"{REALTIME_PATH} is a WebSocket: send Upgrade: websocket",
                             code="websocket_required")
        query = parse_qsl(req.query, keep_blank_values=True)
        model = next((v for k, v in query if k == "model"), "")
        group = p.routes.resolve(model, "name the model: /v1/realtime?model=...")
        query = [(k, group.upstream_model if k == "model" else v) for k, v in query]
        return group, REALTIME_PATH + ("?" + urlencode(query) if query else "")

    def handle(self, req: Request):
        p = self.proxy
        try:
            group, path = self._group(req)
        except ApiError as err:
            p.traffic.unrouted += 1
            return error_response(err)
        rid = req.headers.get("x-request-id") or request_id.new()
        entry = group.entries[0] if len(group.entries) == 1 else \
            p.chooser.pick(group) or p.chooser.waiting_on(group)
        rec = p.traffic.start(entry.name)
        refused, _ = p.await_ready(entry, rec)
        if refused is not None:
            return refused
        connect, first_byte, _ = p.timeouts
        try:
            sock, status, headers, rest = _open(p.pool_for(entry), path, req, connect,
                                                min(first_byte, 60.0))
        except UpstreamError as err:
            p.controller.upstream_failed(entry, str(err))
            p.traffic.end(rec, "upstream_error")
            return error_response(ServiceUnavailable(
                f"model {entry.name!r} is unreachable: {err}", code="model_unreachable",
                headers={"Retry-After": "2"}))
        rec.first_byte = p.clock()
        if sock is None:   # the engine refused the handshake: its answer, as for /v1
            p.traffic.end(rec, "client_error" if status < 500 else "upstream_error")
            p.access(req, group.model, status, len(rest), rec, rid)
            return Response(status, [("Content-Type", "application/json")],
                            normalize_error_body(status, rest))

        def ended(outcome: str) -> None:
            p.traffic.end(rec, outcome)
            p.access(req, group.model, 101, 0, rec, rid)

        relay = Relay(sock, rest, ended)
        passed = [(k, v) for k, v in headers if k.lower() not in ("content-length",)]
        return Upgraded(passed + [("X-Request-Id", rid)], relay.run, relay.stop)


def forward_upgrade(pool: UpstreamPool, req: Request, timeout: float) -> Optional[object]:
    """A worker's WebSocket, relayed to the owner process (which routes and counts it)."""
    try:
        sock, status, headers, rest = _open(
            pool, req.path + ("?" + req.query if req.query else ""), req, timeout, 60.0)
    except UpstreamError as err:
        return error_response(ServiceUnavailable(
            f"the router's owner process is not reachable: {err}", code="owner_unreachable"))
    if sock is None:
        return Response(status, [(k, v) for k, v in headers
                                 if k.lower() in ("content-type", "retry-after")], rest)
    relay = Relay(sock, rest, lambda outcome: None)
    return Upgraded(headers, relay.run, relay.stop)
