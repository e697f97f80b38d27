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
    """A response whose body is produced piece by piece; ``chunks`` is closed when done."""

    __slots__ = ("status", "headers", "chunks")

    def __init__(self, status: int, headers: Headers, chunks: Iterable[bytes]):
        self.status = status
        self.headers = headers
        self.chunks = chunks


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
