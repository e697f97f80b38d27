"""A small, complete HTTP/1.1 server on gevent's StreamServer with the httptools (llhttp) parser.

Why not pywsgi: on the hot path it spends most of its time in Python header
parsing and WSGI plumbing; see docs/performance.md for the measurements. The
management routes still run as a WSGI app (Flask) through ``http/wsgi.py``.

What it does:
- keep-alive and pipelining, HTTP/1.0 and 1.1; request bodies by Content-Length
  or chunked; ``Expect: 100-continue``; limits on header and body size (431, 413);
- a handler may start once its request's headers are in (``stream_body``: uploads), its
  body read from the socket only as the handler consumes it (``http/body.py``);
- responses with Content-Length, or streamed with chunked encoding (each chunk is
  sent as it is produced, no buffering); HTTP/1.0 streams end by closing;
- TCP_NODELAY on every connection;
- client gone: while a handler runs, a watcher greenlet reads the socket; on EOF
  or reset it raises ``ClientGone`` in the handler at once (like nginx without
  proxy_ignore_client_abort, a half-closed client counts as gone), so an upstream
  request is closed without waiting for the next write;
- idle keep-alive connections and slow header senders time out.
"""
from __future__ import annotations

import fcntl
import logging
import socket
import sys
import termios
from typing import Callable, Dict, Optional

import gevent
from gevent.pool import Pool

from kvrouter.http.admission import AcceptServer, ClientShares
from kvrouter.http.connection import Connection
from kvrouter.http.limits import BodyBudget, ServerLimits
from kvrouter.http.messages import Request

log = logging.getLogger("kvrouter.http")


def _set_nodelay(sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _bytes_waiting(sock) -> int:
    """Bytes in the socket's receive buffer (FIONREAD: no read, no wait)."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder)


class HTTPServer:
    """Serve ``handler(Request) -> Response | StreamResponse`` on a gevent StreamServer.

    At most ``limits.max_connections`` connections are served at once (more wait in the
    listen backlog). ``precheck(request)``, when given, runs once a request's headers are
    in and may raise an ApiError: it is answered at once and the body is never read.
    ``stream_body(request)``, when given and true, serves the request at once with its body
    in ``request.stream`` (a BodyReader) rather than ``request.body``."""

    FRESH_GRACE = 0.5

    def __init__(self, listener, handler: Callable, limits: Optional[ServerLimits] = None,
                 backlog: int = 2048, precheck: Optional[Callable[[Request], None]] = None,
                 stream_body: Optional[Callable[[Request], bool]] = None):
        self.handler = handler
        self.stream_body = stream_body
        self.sessions: set = set()   # upgraded connections (WebSockets) being relayed
        self.limits = limits or ServerLimits()
        self.precheck = precheck
        self.budget = BodyBudget(self.limits.max_pending_body_bytes)
        self.pool = Pool(self.limits.max_connections)
        # connections waiting for their next request, oldest first: closed when room is short
        self.idle: Dict[Connection, float] = {}   # connection -> idle since (loop time)
        self.server = AcceptServer(listener, self._handle, spawn=self.pool,
                                    backlog=None if hasattr(listener, "accept") else backlog)
        self.server.drain = self.drain_idle
        self._reaper: Optional[gevent.Greenlet] = None
        self.shares = ClientShares(self.limits)

    def drain_idle(self, n: int) -> int:
        """Close up to ``n`` idle connections (nginx does the same when it runs short of
        connections): a client that waits for nothing yields its slot to one with a request.
        Keep-alive connections that were served go first, oldest first; a connection that
        never sent a request only after ``FRESH_GRACE`` seconds; one whose request bytes
        have already arrived (not read yet) never."""
        now = self.server.loop.now()
        kept = sorted((c for c in self.idle if c.served), key=self.idle.__getitem__)
        fresh = sorted((c for c in self.idle if not c.served
                        and now - self.idle[c] >= self.FRESH_GRACE), key=self.idle.__getitem__)
        closed = 0
        for conn in kept + fresh:
            if closed >= n:
                break
            if _bytes_waiting(conn.sock):
                continue
            self.idle.pop(conn, None)
            conn.closed = True
            try:
                conn.sock.close()
            except OSError:
                pass
            closed += 1
        return closed

    def _handle(self, sock, addr) -> None:
        _set_nodelay(sock)
        client = addr[0] if isinstance(addr, tuple) and addr else ""
        if not self.shares.admit(client):
            self.shares.refuse(sock, client, self.server.loop.now())
            return
        try:
            if self.pool.free_count() == 0:
                self.drain_idle(1)  # this connection took the last slot: free one for the next
            Connection(sock, addr, self.handler, self.limits, self.precheck, self.budget,
                        self.idle, self.stream_body, self.sessions).run()
        finally:
            self.shares.release(client)

    @property
    def address(self):
        return self.server.address

    def start(self) -> None:
        self.server.init_socket()
        _set_nodelay(self.server.socket)
        self.server.start()
        self._reaper = gevent.spawn(self._reap)

    def _reap(self) -> None:
        """While every slot is taken (new clients wait in the listen backlog), close idle
        connections a few at a time, so a client with a request gets in."""
        while True:
            gevent.sleep(0.25)
            if self.pool.free_count() == 0:
                self.drain_idle(max(1, self.limits.max_connections // 16))

    def serve_forever(self) -> None:
        if not self.server.started:
            self.start()
        self.server._stop_event.wait()  # type: ignore[attr-defined]

    def stop(self, timeout: Optional[float] = None) -> None:
        for session in list(self.sessions):   # a WebSocket ends with a close of its own
            session.stop()
        if self._reaper is not None:
            self._reaper.kill(block=False)
        self.server.stop(timeout=timeout)

    def drain(self, timeout: float) -> None:
        """Stop accepting, close idle connections, answer the requests being served with
        ``Connection: close`` (a kept-alive client reconnects to a listener that serves),
        ask upgraded sessions to end, and wait for them at most ``timeout`` seconds."""
        self.limits.keep_alive = False
        self.drain_idle(1 << 30)
        self.stop(timeout=timeout)
