"""One client connection of the HTTP server (``http/server.py``): parse requests with
httptools, run the handler, write responses; the client-gone watcher, pipelining, lingering
close, and bodies read as the handler asks (``http/body.py``)."""
from __future__ import annotations

import logging
import socket
from http import HTTPStatus
from typing import Any, Callable, List, Optional
from urllib.parse import unquote_to_bytes

import gevent
import httptools

from kvrouter.errors import ApiError, InternalError, api_error
from kvrouter.http.body import BodyReader
from kvrouter.http.limits import BodyBudget, ServerLimits
from kvrouter.http.messages import (
    ClientGone,
    Headers,
    Request,
    Response,
    StreamResponse,
    Upgraded,
)
from kvrouter.http.sockio import Deadline, send_all
from kvrouter.http.websocket import is_upgrade

log = logging.getLogger("kvrouter.http")

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_INTERNAL_ERROR = InternalError("internal server error").to_json()
WATCH_AFTER = 0.02  # seconds a handler runs before its client's socket is watched
BODY_READ = 256 * 1024   # bytes asked of the socket at once for a body read as it is used


class Connection:
    """One client connection: parse requests, run the handler, write responses."""

    def __init__(self, sock, addr, handler, limits: ServerLimits,
                 precheck: Optional[Callable[[Request], None]] = None,
                 budget: Optional[BodyBudget] = None, idle: Optional[dict] = None,
                 stream_body: Optional[Callable[[Request], bool]] = None,
                 sessions: Optional[set] = None):
        self.sock = sock
        self.sessions = sessions if sessions is not None else set()   # Upgraded, running
        self.upgraded = False
        self.stream_body = stream_body
        self.stream_req: Optional[Request] = None   # headers in, handler not started yet
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
        self._serving: Optional[Request] = None
        self.loop = gevent.get_hub().loop
        self.deadline = Deadline(self.loop)
        # armed per request served; repeating, so that ``again`` arms it for WATCH_AFTER
        # every time (``start`` after it once fired would fire at once: libev keeps what
        # was left of the period, 0, as the next one)
        self.watch_timer = self.loop.timer(WATCH_AFTER, WATCH_AFTER)

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
        if self.stream_body is not None and self.stream_req is None and self.stream_body(req):
            req.stream = BodyReader(self, int(length) if length is not None else None)
            self.stream_req = req   # served now; its body is read as the handler asks
        elif length is not None:
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
        stream = self.cur.stream
        if stream is not None:
            stream.add(body)
            return
        if self._body_len > self.reserved:  # chunked: no length was announced
            self._reserve(self._body_len - self.reserved)
        self._body_parts.append(body)

    def on_message_complete(self):
        req = self.cur
        if req.stream is not None:   # its handler runs already
            req.stream.done = True
            self.cur = None
            self._expect_continue = False
            return
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
        except httptools.HttpParserUpgrade as up:
            req = self.ready[-1] if self.ready else None
            if req is None or not is_upgrade(req.headers):
                raise api_error(400, "protocol upgrade is not supported") from None
            req.body = data[up.args[0]:]   # the first bytes of the new protocol
            self.upgraded = True           # nothing more is parsed on this connection
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
                    waiting = self.cur is None  # between requests: may be closed to make room
                    try:
                        if waiting:   # keep-alive: a read of the same length every time
                            self.idle[self] = self.loop.now()
                            data = self.deadline.recv(sock, 65536, timeout, wait=True)
                        else:
                            sock.settimeout(timeout)
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
                while (self.ready or self.stream_req) and not self.closed:
                    if self.upgraded and len(self.ready) == 1:
                        self._serve_upgrade(self.ready.pop(0))
                        return
                    if self.ready:
                        req = self.ready.pop(0)
                    else:
                        req, self.stream_req = self.stream_req, None   # type: ignore[assignment]
                        req.remote = self.addr
                    if not self._serve(req):
                        return
        except ClientGone:
            return
        finally:
            self.closed = True
            self.release()
            self.deadline.close()
            self.watch_timer.close()
            try:
                sock.close()
            except OSError:
                pass

    # --- a body read as the handler asks (BodyReader) --------------------------------------
    def read_more(self) -> None:
        """Read and parse what the client sent next; ClientGone if it left or stalled."""
        self.sock.settimeout(self.limits.header_timeout)
        try:
            data = self.sock.recv(BODY_READ)
        except (socket.timeout, OSError):
            data = b""
        if not data:
            self.closed = True
            raise ClientGone()
        self._feed(data)

    def hold(self, n: int) -> None:
        self._reserve(n)

    def body_read(self) -> None:
        """The handler has the whole body: from now on, watch for the client leaving."""
        if self.watcher is None and not self.closed:
            self._start_watch(gevent.getcurrent())

    def _watch_due(self, target) -> None:
        self.watch_timer.stop()   # (a repeating timer: once is enough)
        self._start_watch(target)

    def _start_watch(self, target) -> None:
        if self.watcher is not None:
            return
        stream = getattr(self._serving, "stream", None)
        if stream is not None and not stream.done:
            return   # its handler reads the socket: body_read() starts the watch
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

    def _serve_upgrade(self, req: Request) -> None:
        """An upgrade request: its handler's Upgraded takes the connection over; anything
        else it answers is written and the connection closed."""
        self.served += 1
        self._serving = req
        timer = self.loop.timer(WATCH_AFTER)
        timer.start(self._start_watch, gevent.getcurrent())
        try:
            try:
                resp = self.handler(req)
            finally:
                timer.stop()
                timer.close()
                if self.watcher is not None:
                    self.watcher.kill(block=True)
                    self.watcher = None
            if not isinstance(resp, Upgraded):
                self._write_fixed(req, resp, False)
                return
            early = req.body + b"".join(self.pending)   # what the watcher read meanwhile
            self.pending = []
            self.sock.settimeout(None)
            send_all(self.sock, self._head(resp.status, resp.headers, True, ""))
            self.sessions.add(resp)
            try:
                resp.run(self.sock, early)
            finally:
                self.sessions.discard(resp)
        except (ClientGone, OSError):
            pass
        except Exception:
            log.exception("unhandled error serving the upgrade %s", req.path)

    def _serve(self, req: Request) -> bool:
        """Run the handler for one request and write its response; False closes the connection."""
        self.served += 1
        self._serving = req
        # Watch for the client going away only once the handler has run a while: a quick
        # request then costs no extra syscalls (the watcher's read registers the socket),
        # and only the start and stop of the connection's libev timer, not a greenlet.
        timer = self.watch_timer
        timer.again(self._watch_due, gevent.getcurrent())
        resp = None
        try:
            try:
                resp = self.handler(req)
            except ClientGone:
                return False
            except ApiError as err:   # e.g. a streamed body over a limit
                resp = Response(err.status, [("Content-Type", "application/json")] +
                                list(err.headers.items()), err.to_json())
            except Exception:
                log.exception("unhandled error serving %s %s", req.method, req.path)
                resp = Response(500, [("Content-Type", "application/json")],
                                _INTERNAL_ERROR)
            unread = req.stream is not None and not req.stream.done
            keep = req.keep_alive and not self.closed and self.limits.keep_alive and not unread
            if isinstance(resp, StreamResponse):
                return self._write_stream(req, resp, keep)
            self._write_fixed(req, resp, keep)
            if unread:   # answered before its body was read (refused): let the client see it
                self._linger()
            return keep
        except ClientGone:
            return False
        except OSError:
            self.closed = True
            return False
        finally:
            self.release()
            timer.stop()
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
        send_all(self.sock, head + body if req.method != "HEAD" else head,
                 self.limits.write_timeout)

    def _write_stream(self, req: Request, resp: StreamResponse, keep: bool) -> bool:
        sock = self.sock
        sock.settimeout(self.limits.write_timeout)
        chunked = req.version != "1.0"
        if not chunked:
            keep = False
        head = self._head(resp.status, resp.headers, keep,
                          "Transfer-Encoding: chunked\r\n" if chunked else "")
        if req.method == "HEAD":
            send_all(sock, head)
            return keep
        pending = head   # sent with the first piece when that is at hand, else now
        if not resp.first_ready:
            send_all(sock, head)
            pending = b""
        ended = resp.ended
        terminated = not chunked
        for chunk in resp.chunks:
            if not chunk:
                continue
            if chunked:
                out = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                if ended is not None and ended():   # the last piece: the body's end with it
                    out += b"0\r\n\r\n"
                    terminated = True
            else:
                out = chunk
            send_all(sock, pending + out if pending else out)
            pending = b""
        if pending or not terminated:
            send_all(sock, pending + (b"" if terminated else b"0\r\n\r\n"))
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


