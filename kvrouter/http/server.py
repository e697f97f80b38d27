"""A small, complete HTTP/1.1 server on gevent's StreamServer with the httptools (llhttp) parser.

Why not pywsgi: on the hot path it spends most of its time in Python header
parsing and WSGI plumbing; see docs/performance.md for the measurements. The
management routes still run as a WSGI app (Flask) through ``http/wsgi.py``.

What it does:
- keep-alive and pipelining, HTTP/1.0 and 1.1; request bodies by Content-Length
  or chunked; ``Expect: 100-continue``; limits on header and body size (431, 413);
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
from http import HTTPStatus
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gevent.pool import Pool

from kvrouter.errors import ApiError, InternalError, api_error
from kvrouter.http.admission import AcceptServer, ClientShares
from kvrouter.http.limits import BodyBudget, ServerLimits
from kvrouter.http.messages import ClientGone, Headers, Request, Response, StreamResponse
from kvrouter.http.sockio import send_all

log = logging.getLogger("kvrouter.http")

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_INTERNAL_ERROR = InternalError("internal server error").to_json()
WATCH_AFTER = 0.02  # seconds a handler runs before its client's socket is watched


class _Connection:
    """One client connection: parse requests, run the handler, write responses."""

    def __init__(self, sock, addr, handler, limits: ServerLimits,
                 precheck: Optional[Callable[[Request], None]] = None,
                 budget: Optional[BodyBudget] = None, idle: Optional[dict] = None):
        self.sock = sock
        self.idle = idle if idle is not None else {}  # the server's idle connections
        self.addr = addr
        self.handler = handler
        self.limits = limits
        self.precheck = precheck
        self.budget = budget or BodyBudget(limits.max_pending_body_bytes)
        self.reserved = 0              # of the budget, for the request being received
        self.served = 0                # requests answered on this connection
        self.header_deadline = 0.0
        self.headers_done = False
        self.parser = httptools.HttpRequestParser(self)
        self.ready: List[Request] = []
        self.cur: Any = None  # the Request being parsed (None between requests)
        self._url_parts: list = []
        self._body_parts: list = []
        self._body_len = 0
        self._header_bytes = 0
        self._expect_continue = False
        self._sent_continue = False
        self.pending: List[bytes] = []   # read while a request was served (pipelined)
        self.pending_bytes = 0
        self.closed = False
        self.watcher: Optional[gevent.Greenlet] = None
        self.loop = gevent.get_hub().loop

    # --- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self):
        self.cur = Request()
        self.headers_done = False
        self.header_deadline = self.loop.now() + self.limits.header_timeout
        self._url_parts = []
        self._body_parts = []
        self._body_len = 0
        self._header_bytes = 0
        self._expect_continue = False
        self._sent_continue = False

    def on_url(self, url: bytes):
        self._url_parts.append(url)
        self._header_bytes += len(url)
        if self._header_bytes > self.limits.max_header_bytes:
            raise api_error(414, "request line too long")

    def on_header(self, name: bytes, value: bytes):
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.limits.max_header_bytes:
            raise api_error(431, "request headers too large")
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        headers = self.cur.headers
        if key in headers:
            headers[key] = headers[key] + ", " + val
        else:
            headers[key] = val

    def on_headers_complete(self):
        req = self.cur
        req.method = self.parser.get_method().decode("ascii")
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        url = b"".join(self._url_parts)
        req.url = url
        qpos = url.find(b"?")
        raw_path = url if qpos < 0 else url[:qpos]
        req.query = "" if qpos < 0 else url[qpos + 1:].decode("latin-1")
        req.path = unquote_to_bytes(raw_path).decode("latin-1") if b"%" in raw_path \
            else raw_path.decode("latin-1")
        length = req.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.limits.max_body_bytes:
                    raise api_error(413, f"request body over {self.limits.max_body_bytes} bytes")
            except ValueError:
                raise api_error(400, "invalid Content-Length") from None
        self.headers_done = True
        if self.precheck is not None:
            self.precheck(req)  # e.g. the API key: refused before any body byte is read
        if length is not None:
            self._reserve(int(length))
        if req.headers.get("expect", "").lower() == "100-continue":
            self._expect_continue = True

    def _reserve(self, n: int) -> None:
        self.budget.take(n)
        self.reserved += n

    def release(self) -> None:
        self.budget.used -= self.reserved
        self.reserved = 0

    def on_body(self, body: bytes):
        self._body_len += len(body)
        if self._body_len > self.limits.max_body_bytes:
            raise api_error(413, f"request body over {self.limits.max_body_bytes} bytes")
        if self._body_len > self.reserved:  # chunked: no length was announced
            self._reserve(self._body_len - self.reserved)
        self._body_parts.append(body)

    def on_message_complete(self):
        req = self.cur
        parts = self._body_parts
        req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        req.remote = self.addr
        self.ready.append(req)
        self.cur = None
        self._expect_continue = False

    # --- I/O -----------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except ApiError:
            raise
        except httptools.HttpParserUpgrade:
            raise api_error(400, "protocol upgrade is not supported") from None
        except httptools.HttpParserError as err:
            cause = err.__context__
            if isinstance(cause, ApiError):
                raise cause from None
            raise api_error(400, f"malformed HTTP request: {err}") from None

    def _read_timeout(self) -> float:
        if self.cur is None:
            return self.limits.keepalive_timeout
        if not self.headers_done:  # one deadline for the whole header block
            return self.header_deadline - self.loop.now()
        return self.limits.header_timeout  # between two pieces of a body

    def run(self) -> None:
        sock = self.sock
        try:
            while not self.closed:
                if self.pending:
                    data = b"".join(self.pending)
                    self.pending, self.pending_bytes = [], 0
                else:
                    timeout = self._read_timeout()
                    if timeout <= 0:
                        return
                    sock.settimeout(timeout)
                    waiting = self.cur is None  # between requests: may be closed to make room
                    if waiting:
                        self.idle[self] = self.loop.now()
                    try:
                        data = sock.recv(65536)
                    except (socket.timeout, OSError):
                        return
                    finally:
                        if waiting:
                            self.idle.pop(self, None)
                    if not data:
                        return
                try:
                    self._feed(data)
                except ApiError as err:
                    self._send_error(err)
                    return
                if self._expect_continue and not self._sent_continue and self.cur is not None:
                    self._sent_continue = True
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                while self.ready and not self.closed:
                    req = self.ready.pop(0)
                    if not self._serve(req):
                        return
        except ClientGone:
            return
        finally:
            self.closed = True
            self.release()
            try:
                sock.close()
            except OSError:
                pass

    def _start_watch(self, target) -> None:
        self.watcher = gevent.spawn(self._watch, target)

    def _watch(self, target) -> None:
        """Read while a handler runs: keep pipelined bytes (bounded), raise ClientGone in it
        on EOF, or when the client sends more than ``max_pipeline_bytes`` meanwhile."""
        sock = self.sock
        limit = self.limits.max_pipeline_bytes
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if data:
                self.pending.append(data)
                self.pending_bytes += len(data)
                if self.pending_bytes <= limit:
                    continue
                log.warning("%s: closing: sent %d bytes while its request was served (limit "
                            "%d)", self.addr[0] if self.addr else "client", self.pending_bytes,
                            limit)
                self.pending, self.pending_bytes = [], 0
            self.closed = True
            gevent.kill(target, ClientGone)
            return

    def _serve(self, req: Request) -> bool:
        """Run the handler for one request and write its response; False closes the connection."""
        self.served += 1
        # Watch for the client going away only once the handler has run a while: a quick
        # request then costs no extra syscalls (the watcher's read registers the socket),
        # and only a libev timer, not a greenlet.
        timer = self.loop.timer(WATCH_AFTER)
        timer.start(self._start_watch, gevent.getcurrent())
        resp = None
        try:
            try:
                resp = self.handler(req)
            except ClientGone:
                return False
            except Exception:
                log.exception("unhandled error serving %s %s", req.method, req.path)
                resp = Response(500, [("Content-Type", "application/json")],
                                _INTERNAL_ERROR)
            keep = req.keep_alive and not self.closed and self.limits.keep_alive
            if isinstance(resp, StreamResponse):
                return self._write_stream(req, resp, keep)
            self._write_fixed(req, resp, keep)
            return keep
        except ClientGone:
            return False
        except OSError:
            self.closed = True
            return False
        finally:
            self.release()
            timer.stop()
            timer.close()
            if self.watcher is not None:
                self.watcher.kill(block=True)
                self.watcher = None
            if isinstance(resp, StreamResponse):
                close = getattr(resp.chunks, "close", None)
                if close is not None:
                    close()

    def _head(self, status: int, headers: Headers, keep: bool, extra: str) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        for k, v in headers:
            lines.append(f"{k}: {v}\r\n")
        lines.append(extra)
        if not keep:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _write_fixed(self, req: Request, resp: Response, keep: bool) -> None:
        body = resp.body
        head = self._head(resp.status, resp.headers, keep, f"Content-Length: {len(body)}\r\n")
        self.sock.settimeout(self.limits.write_timeout)
        send_all(self.sock, head + body if req.method != "HEAD" else head)

    def _write_stream(self, req: Request, resp: StreamResponse, keep: bool) -> bool:
        sock = self.sock
        sock.settimeout(self.limits.write_timeout)
        chunked = req.version != "1.0"
        if not chunked:
            keep = False
        head = self._head(resp.status, resp.headers, keep,
                          "Transfer-Encoding: chunked\r\n" if chunked else "")
        send_all(sock, head)
        if req.method == "HEAD":
            return keep
        for chunk in resp.chunks:
            if not chunk:
                continue
            if chunked:
                send_all(sock, b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                send_all(sock, chunk)
        if chunked:
            send_all(sock, b"0\r\n\r\n")
        return keep

    def _send_error(self, err: ApiError) -> None:
        body = err.to_json()
        try:
            headers = [("Content-Type", "application/json")] + list(err.headers.items())
            self.sock.sendall(self._head(err.status, headers, False,
                                         f"Content-Length: {len(body)}\r\n") + body)
            self._linger()
        except OSError:
            pass

    def _linger(self, seconds: float = 2.0, max_bytes: int = 64 * 1024 * 1024) -> None:
        """Lingering close: stop writing, then drain what the client still sends for a while,
        so a client that is still uploading (e.g. after a 413) reads the response, not a reset."""
        sock = self.sock
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        drained = 0
        with gevent.Timeout(seconds, False):  # type: ignore[arg-type]  # False: no exception
            while drained < max_bytes:
                data = sock.recv(65536)
                if not data:
                    break
                drained += len(data)


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
    in and may raise an ApiError: it is answered at once and the body is never read."""

    FRESH_GRACE = 0.5

    def __init__(self, listener, handler: Callable, limits: Optional[ServerLimits] = None,
                 backlog: int = 2048, precheck: Optional[Callable[[Request], None]] = None):
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.precheck = precheck
        self.budget = BodyBudget(self.limits.max_pending_body_bytes)
        self.pool = Pool(self.limits.max_connections)
        # connections waiting for their next request, oldest first: closed when room is short
        self.idle: Dict[_Connection, float] = {}   # connection -> idle since (loop time)
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
            _Connection(sock, addr, self.handler, self.limits, self.precheck, self.budget,
                        self.idle).run()
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
        if self._reaper is not None:
            self._reaper.kill(block=False)
        self.server.stop(timeout=timeout)

    def drain(self, timeout: float) -> None:
        """Stop accepting, close idle connections, answer the requests being served with
        ``Connection: close`` (a kept-alive client reconnects to a listener that serves),
        and wait for them at most ``timeout`` seconds."""
        self.limits.keep_alive = False
        self.drain_idle(1 << 30)
        self.stop(timeout=timeout)
