"""Request bodies that are not held whole: read from the client as the handler asks for them
(``BodyReader``, what the server hands an upload's handler) and sent to the engine as they
are read (``StreamBody``, what the upstream client sends)."""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional


class BodyReader:
    """The body of a request whose handler started once its headers were in. Iterating
    reads the client's socket only as far as the handler consumes (so an upload passes
    through in pieces, never whole); ``ClientGone`` if the client leaves or stalls, an
    ApiError (413, malformed) if the body breaks the server's limits. ``conn``: the server's
    connection (``read_more``, ``hold``, ``body_read``)."""

    def __init__(self, conn, length: Optional[int]):
        self.conn = conn
        self.length = length           # Content-Length, None when sent chunked
        self.parts: List[bytes] = []   # parsed, not yet handed on
        self.done = False              # the parser saw the body's end
        self.received = 0

    def add(self, data: bytes) -> None:
        self.parts.append(data)
        self.received += len(data)

    def hold(self, n: int) -> None:
        """``n`` more bytes kept in memory by the handler (e.g. until a form field is found):
        taken from the server's budget for request bodies, released when the request ends."""
        self.conn.hold(n)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            if self.parts:
                parts, self.parts = self.parts, []
                yield from parts
                continue
            if self.done:
                self.conn.body_read()
                return
            self.conn.read_more()


class StreamBody:
    """A request body sent upstream as it is read: ``head`` (bytes in hand) then ``rest``.
    ``length``: sent as Content-Length when known, else the body goes chunked. Once a byte
    of ``rest`` was taken (``started``), the body cannot be sent again."""

    def __init__(self, head: bytes, rest: Iterable[bytes], length: Optional[int]):
        self.head = head
        self.rest = rest
        self.length = length
        self.started = False

    @classmethod
    def of(cls, req) -> "bytes | StreamBody":
        """A request's body to send on: its bytes, or, when it is being read as it is
        used (``req.stream``), a StreamBody that passes it on as it arrives."""
        if req.stream is None:
            return req.body
        return cls(b"", req.stream, req.stream.length)

    def pieces(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        self.started = True
        for chunk in self.rest:
            if chunk:
                yield chunk
