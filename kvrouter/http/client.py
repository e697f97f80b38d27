"""Upstream HTTP/1.1 client: pooled keep-alive connections, streamed bodies, immediate abort.

Built on gevent sockets and the httptools response parser rather than
``requests``: a response body is handed on piece by piece as it arrives (no
read-ahead), and closing a response closes its socket at once, which is how an
engine learns that the client went away. Measured in docs/performance.md.
"""
from __future__ import annotations

import errno
import socket
import time
from typing import Dict, Iterator, List, Optional, Tuple, Union

import httptools

from kvrouter.http.body import StreamBody
from kvrouter.http.sockio import Deadline, send_all

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class UpstreamError(Exception):
    """The engine could not be reached or broke the response. ``phase`` says where."""

    def __init__(self, phase: str, message: str, errno_: Optional[int] = None):
        super().__init__(message)
        self.phase = phase  # "connect", "first_byte", "body"
        self.errno = errno_

    @property
    def local(self) -> bool:
        """This process ran out of descriptors: nothing is wrong with the engine."""
        return self.errno in _OUT_OF_DESCRIPTORS


class UpstreamTimeout(UpstreamError):
    pass


class _Parser:
    """One connection's response parser and read timer, kept with it in the pool for its
    next response."""
    __slots__ = ("status", "headers", "body", "headers_done", "complete", "keep", "extra",
                 "deadline", "_p")

    def __init__(self):
        self._p = httptools.HttpResponseParser(self)
        self.deadline = Deadline()
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: List[Tuple[str, str]] = []
        self.body: List[bytes] = []
        self.headers_done = False
        self.complete = False
        self.keep = False
        # bytes after the response (none may come unasked): not part of it, and the
        # connection is not used again
        self.extra = False

    def on_message_begin(self):
        if self.complete:
            self.extra = True

    def on_header(self, name: bytes, value: bytes):
        if not self.extra:
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        if self.extra:
            return
        self.headers_done = True
        self.status = self._p.get_status_code()
        # llhttp resets its flags after the message: read keep-alive now
        self.keep = self._p.should_keep_alive()

    def on_body(self, body: bytes):
        if not self.extra:
            self.body.append(body)

    def on_message_complete(self):
        self.complete = True

    def feed(self, data: bytes) -> None:
        self._p.feed_data(data)

    def keep_alive(self) -> bool:
        return self.keep and not self.extra


class UpstreamResponse:
    """A response being received. Iterate ``chunks()``; ``close()`` aborts, ``finish`` pools."""

    def __init__(self, pool: "UpstreamPool", sock, parser: _Parser, idle_timeout: float):
        self.pool = pool
        self.sock = sock
        self.parser = parser
        self.status = parser.status
        self.headers = parser.headers
        self.idle_timeout = idle_timeout
        self.done = False

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def at_hand(self) -> bool:
        """Body bytes came with the head: the first of ``chunks()`` needs no read."""
        return bool(self.parser.body)

    def complete(self) -> bool:
        """The whole response is read (so the piece ``chunks()`` gave last is its last)."""
        return self.parser.complete

    def chunks(self) -> Iterator[bytes]:
        """Body bytes as they arrive. Raises UpstreamError if the engine breaks off."""
        parser = self.parser
        sock = self.sock
        if parser.body:
            pending, parser.body = parser.body, []
            yield b"".join(pending)
        if parser.complete:
            self._finish()
            return
        deadline, idle = parser.deadline, self.idle_timeout
        while True:
            try:
                data = deadline.recv(sock, 65536, idle)
            except socket.timeout:
                self.close()
                raise UpstreamTimeout("body", f"no data from the engine for "
                                      f"{self.idle_timeout:g}s") from None
            except OSError as err:
                self.close()
                raise UpstreamError("body", f"engine connection broke: {err}") from None
            except BaseException:  # e.g. the client went away: abort the engine's work now
                self.close()
                raise
            if not data:
                self.close()
                raise UpstreamError("body", "engine closed the connection mid-response")
            try:
                parser.feed(data)
            except httptools.HttpParserError as err:
                self.close()
                raise UpstreamError("body", f"malformed response from engine: {err}") from None
            if parser.body:
                pending, parser.body = parser.body, []
                yield pending[0] if len(pending) == 1 else b"".join(pending)
            if parser.complete:
                self._finish()
                return

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.parser.keep_alive():
            self.pool.put(self.sock, self.parser)
        else:
            self.sock.close()
        self.sock = None

    def close(self) -> None:
        """Abort: close the socket now (the engine sees the client gone)."""
        if self.sock is not None and not self.done:
            self.done = True
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def _send_body(sock, body: StreamBody) -> None:
    chunked = body.length is None
    for piece in body.pieces():
        send_all(sock, b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        send_all(sock, b"0\r\n\r\n")


class UpstreamPool:
    """Keep-alive connections to one engine (LIFO, so warm sockets are reused first)."""

    CHECK_AFTER = 0.5

    def __init__(self, host: str, port: int, max_idle: int = 256):
        self.host = host
        self.port = port
        self.max_idle = max_idle
        # (socket, its parser, when it was pooled)
        self.idle: List[Tuple[socket.socket, _Parser, float]] = []
        # Resolve once: gevent resolves names in a thread pool, too slow per connection.
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.family, self.address = info[0], info[4]

    def put(self, sock, parser: _Parser) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append((sock, parser, time.monotonic()))
        else:
            sock.close()

    def _take_idle(self):
        """A pooled socket the engine has not closed meanwhile, or None. One pooled for more
        than ``CHECK_AFTER`` seconds is checked without blocking (a closed one reads EOF at
        once); a busy pool skips the check: engines close idle connections after seconds."""
        while self.idle:
            sock, parser, since = self.idle.pop()
            parser.reset()
            if time.monotonic() - since < self.CHECK_AFTER:
                return sock, parser
            try:
                sock.setblocking(False)
                sock.recv(1, socket.MSG_PEEK)  # data or EOF: not a clean idle connection
            except BlockingIOError:
                return sock, parser    # nothing to read: open and idle
            except OSError:
                pass
            sock.close()               # EOF, reset, or bytes nobody asked for
        return None, None

    def refuses(self, timeout: float = 0.5, tries: int = 3, gap: float = 0.05) -> bool:
        """The engine's port refuses a connection now: its process is gone (what it was
        sent died with it, and nothing it read can still be answered or billed). Asked a
        few times over a tenth of a second: a process being killed may still hold its
        listening socket for a moment after its connections broke."""
        for attempt in range(tries):
            if attempt:
                time.sleep(gap)
            try:
                self._connect(timeout).close()
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
        return False

    def _connect(self, timeout: float):
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _dial(self, timeout: float):
        """A new connection, or the UpstreamError (phase "connect") that says why not."""
        try:
            return self._connect(timeout)
        except socket.timeout:
            raise UpstreamTimeout("connect", f"connect to {self.host}:{self.port} timed out "
                                  f"after {timeout:g}s") from None
        except OSError as err:
            raise UpstreamError("connect", f"cannot connect to {self.host}:{self.port}: "
                                f"{err.strerror or err}", err.errno) from None

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop()[0].close()

    def upgrade(self, path: str, headers: Dict[str, str], connect_timeout: float = 5.0,
                timeout: float = 60.0):
        """Ask the engine to switch protocols (a WebSocket handshake) on a connection of its
        own: (socket, status, headers, bytes after the head). On a status other than 101,
        the socket is None and the last item is the engine's answer body."""
        lines = [f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        sock = self._dial(connect_timeout)
        try:
            sock.settimeout(timeout)
            send_all(sock, ("".join(lines) + "\r\n").encode("latin-1"))
            data = b""
            while b"\r\n\r\n" not in data:
                got = sock.recv(65536)
                if not got or len(data) > 65536:
                    raise ConnectionResetError("closed before the handshake's answer")
                data += got
            head, rest = data.split(b"\r\n\r\n", 1)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            out = [(k.strip(), v.strip()) for k, v in
                   (line.split(":", 1) for line in header_lines if ":" in line)]
            if status == 101:
                sock.settimeout(None)
                return sock, status, out, rest
            length = next((int(v) for k, v in out if k.lower() == "content-length"), 0)
            while len(rest) < min(length, 65536):
                got = sock.recv(65536)
                if not got:
                    break
                rest += got
            sock.close()
            return None, status, out, rest[:length]
        except socket.timeout:
            sock.close()
            raise UpstreamTimeout("first_byte", f"no handshake answer from the engine within "
                                  f"{timeout:g}s") from None
        except (OSError, ValueError, IndexError) as err:
            sock.close()
            raise UpstreamError("first_byte", f"engine handshake failed: {err}") from None
        except BaseException:
            sock.close()
            raise

    def request(self, method: str, path: str, headers: Dict[str, str],
                body: Union[bytes, StreamBody] = b"", connect_timeout: float = 5.0,
                first_byte_timeout: float = 600.0,
                idle_timeout: float = 300.0, whole: bool = False) -> UpstreamResponse:
        """``body``: bytes, or a StreamBody sent as it is read (Content-Length when its
        length is known, else chunked). ``whole``: the answer is not streamed, so nothing
        of it can come before the engine has generated all of it: the first read waits for
        the socket before reading (one read that finds nothing saved: +10% non-streamed
        req/s at c=32). A streamed answer is read first, as gevent does: waiting first
        measured 10% fewer events/s on streams, for no cause found (it almost never finds
        bytes there: 4-8% of first reads under load)."""
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"]
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n")
        if isinstance(body, StreamBody):
            lines.append(f"Content-Length: {body.length}\r\n" if body.length is not None
                         else "Transfer-Encoding: chunked\r\n")
        elif body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        payload = "".join(lines).encode("latin-1")
        if not isinstance(body, StreamBody):
            payload += body
        # A pooled connection is checked before reuse. If it still fails, the request is sent
        # again on a fresh connection only when it cannot have been processed: the engine
        # closed before the whole request was written (or it is a GET). Once written, a POST
        # is never resent (the engine may have read it: a generation billed twice, a sleep
        # done twice).
        for attempt in (0, 1):
            sock, parser = self._take_idle() if attempt == 0 else (None, None)
            reused = sock is not None
            if sock is None or parser is None:
                sock, parser = self._dial(connect_timeout), _Parser()
            written = False
            try:
                send_all(sock, payload, first_byte_timeout)
                if isinstance(body, StreamBody):
                    if body.started:   # its first pieces went on a connection that broke
                        raise UpstreamError("first_byte", "engine connection failed while "
                                            "the request body was sent")
                    sock.settimeout(first_byte_timeout)
                    _send_body(sock, body)
                written = True
                wait = whole
                while not parser.headers_done:
                    data = parser.deadline.recv(sock, 65536, first_byte_timeout, wait)
                    wait = False
                    if not data:
                        raise ConnectionResetError("closed before the response")
                    parser.feed(data)
            except socket.timeout:
                sock.close()
                raise UpstreamTimeout("first_byte", f"no response from the engine within "
                                      f"{first_byte_timeout:g}s") from None
            except (OSError, httptools.HttpParserError) as err:
                sock.close()
                if reused and (not written or method in ("GET", "HEAD")):
                    continue
                raise UpstreamError("first_byte", f"engine connection failed: {err}") from None
            except BaseException:  # the client went away while the engine worked: abort it
                sock.close()
                raise
            return UpstreamResponse(self, sock, parser, idle_timeout)
        raise UpstreamError("first_byte", "engine connection failed")  # pragma: no cover
