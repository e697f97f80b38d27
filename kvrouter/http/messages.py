"""What a handler gets and returns: the request, a fixed or a streamed response, and the
exception raised in a handler whose client went away."""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Tuple

Headers = List[Tuple[str, str]]


class ClientGone(BaseException):
    """Raised inside a handler when its client disconnected (BaseException: not swallowed)."""


class Request:
    __slots__ = ("method", "url", "path", "query", "headers", "body", "version",
                 "keep_alive", "remote", "stream")

    def __init__(self):
        self.method = ""
        self.url = b""
        self.path = ""
        self.query = ""
        self.headers: dict = {}
        self.body = b""
        self.version = "1.1"
        self.keep_alive = True
        self.remote = None
        self.stream = None   # a BodyReader when the body is read as the handler asks
        # (an upgrade request's ``body``: what the client sent after its handshake)

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return self.headers.get(name, default)


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, headers: Optional[Headers] = None, body: bytes = b""):
        self.status = status
        self.headers = headers or []
        self.body = body


class StreamResponse:
    """A response whose body is produced piece by piece; ``chunks`` is closed when done.

    Two hints let the server write fewer, fuller packets (one ``send`` instead of three for
    an answer that came whole): ``first_ready``, the first piece is at hand (the head waits
    for it, not for anything still to come); ``ended()``, asked after each piece, True when
    it was the last (the end of the chunked body goes with it)."""

    __slots__ = ("status", "headers", "chunks", "first_ready", "ended")

    def __init__(self, status: int, headers: Headers, chunks: Iterable[bytes],
                 first_ready: bool = False, ended: Optional[Callable[[], bool]] = None):
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.first_ready = first_ready
        self.ended = ended


class Upgraded:
    """A switch of protocols (a WebSocket): the server writes ``status`` (101) and
    ``headers``, then ``run(sock, early)`` owns the connection until it returns (``early``:
    bytes the client sent after its handshake); ``stop()`` asks it to end now (the server
    is shutting down). The connection is closed after it."""

    __slots__ = ("status", "headers", "run", "stop")

    def __init__(self, headers: Headers, run: Callable[[Any, bytes], None],
                 stop: Callable[[], None], status: int = 101):
        self.status = status
        self.headers = headers
        self.run = run
        self.stop = stop
