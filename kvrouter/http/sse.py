"""An incremental server-sent-events decoder (the WHATWG "event stream" rules).

Feed it bytes as they arrive; it yields each complete event. Lines end in CRLF, LF or
CR; ``data:`` with or without one leading space; several ``data`` lines join with LF;
lines starting with ``:`` are comments; an event is dispatched at a blank line, and
one without data is dropped (as browsers do). Used by the load generator, the
benchmark and the tests, so every reader of a stream reads it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional


@dataclass
class Event:
    data: str
    event: str = "message"
    id: Optional[str] = None
    retry: Optional[int] = None


class SSEDecoder:
    def __init__(self):
        self._buf = b""
        self._cr_pending = False   # the last chunk ended in CR: a following LF is not a line
        self._data: List[str] = []
        self._event = ""
        self._id: Optional[str] = None
        self._retry: Optional[int] = None

    def feed(self, chunk: bytes) -> List[Event]:
        """The events that ``chunk`` completes (possibly none)."""
        if self._cr_pending and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr_pending = False
        buf = self._buf + chunk
        out: List[Event] = []
        if b"\r" not in buf:  # the common case (LF only): split in C
            *lines, self._buf = buf.split(b"\n")
            for raw in lines:
                event = self._line(raw.decode("utf-8", "replace"))
                if event is not None:
                    out.append(event)
            return out
        start = 0
        n = len(buf)
        while True:
            cr, lf = buf.find(b"\r", start), buf.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            line = buf[start:end]
            if buf[end:end + 1] == b"\r":
                if end + 1 < n and buf[end + 1:end + 2] == b"\n":
                    start = end + 2
                else:
                    start = end + 1
                    self._cr_pending = end + 1 == n
            else:
                start = end + 1
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                out.append(event)
        self._buf = buf[start:]
        return out

    def _line(self, line: str) -> Optional[Event]:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> Optional[Event]:
        data, self._data = self._data, []
        event, self._event = self._event, ""
        if not data:
            return None
        return Event("\n".join(data), event or "message", self._id, self._retry)


def iter_events(chunks: Iterable[bytes]) -> Iterator[Event]:
    """Events from an iterable of byte chunks (a streamed response body)."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)


def parse_events(raw: bytes) -> List[Event]:
    """Every complete event in a whole body."""
    return SSEDecoder().feed(raw)
