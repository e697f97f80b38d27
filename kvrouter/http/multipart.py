"""``multipart/form-data`` bodies (uploads): one text field found and replaced.

The router routes an upload (Whisper's ``/v1/audio/transcriptions``) by its ``model``
field and rewrites an alias there; the simulated engine reads the same field. Finding a
field is a few ``bytes.find`` over the part boundaries, never a parse of a file part;
replacing it leaves every other byte of the body as it came.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple, Union

from kvrouter.errors import BadRequest

_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.I)
_NAME_RE = re.compile(rb'content-disposition:[^\r\n]*?[; ]name="([^"]*)"', re.I)


def is_multipart(headers) -> bool:
    return (headers.get("content-type") or "").lower().startswith("multipart/form-data")


def boundary(content_type: str) -> bytes:
    found = _BOUNDARY_RE.search(content_type or "")
    if not found:
        raise BadRequest("multipart/form-data without a boundary in its Content-Type",
                         code="invalid_multipart")
    return (found.group(1) or found.group(2)).encode("latin-1")


def find(body: bytes, content_type: str, name: str) -> Optional[slice]:
    """Where part ``name``'s content stands in ``body`` (None: no such part). A body that
    is not the multipart it says is a 400."""
    wanted = name.encode()
    delim = b"--" + boundary(content_type)
    pos = body.find(delim)
    if pos < 0:
        raise BadRequest("multipart body does not contain its boundary", code="invalid_multipart")
    while True:
        start = pos + len(delim)
        if body[start:start + 2] == b"--":
            return None                # the closing delimiter
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            raise BadRequest("multipart part without the blank line after its headers",
                             code="invalid_multipart")
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise BadRequest("multipart body ends before its closing boundary (a half-sent "
                             "upload?)", code="invalid_multipart")
        found = _NAME_RE.search(body, start, head_end)
        if found is not None and found.group(1) == wanted:
            return slice(head_end + 4, nxt)
        pos = nxt + 2


class FieldScanner:
    """Finds text field ``name`` in a body that arrives in pieces: ``scan(prefix)`` on the
    bytes so far (each call with more) answers the field's (value, span) once its part is
    complete, (None, None) once the body's closing delimiter shows it is absent, else
    ``MORE``. Each byte is searched about once, however the body is cut."""

    def __init__(self, content_type: str, name: str):
        self.delim = b"--" + boundary(content_type)
        self.wanted = name.encode()
        self.pos = -1     # where the current part's delimiter starts (-1: not seen yet)
        self.seen = 0     # searched up to here for what comes next

    def scan(self, buf: Union[bytes, bytearray]):
        delim = self.delim
        while True:
            if self.pos < 0:
                pos = buf.find(delim, self.seen)
                if pos < 0:
                    self.seen = max(0, len(buf) - len(delim))
                    return MORE
                self.pos = self.seen = pos
            start = self.pos + len(delim)
            if len(buf) < start + 2:
                return MORE
            if buf[start:start + 2] == b"--":
                return None, None
            head_end = buf.find(b"\r\n\r\n", start)
            if head_end < 0:
                return MORE
            nxt = buf.find(b"\r\n" + delim, max(head_end + 4, self.seen))
            if nxt < 0:
                self.seen = max(head_end + 4, len(buf) - len(delim) - 2)
                return MORE
            found = _NAME_RE.search(buf, start, head_end)
            if found is not None and found.group(1) == self.wanted:
                span = slice(head_end + 4, nxt)
                try:
                    return buf[span].decode("utf-8").strip(), span
                except UnicodeDecodeError:
                    raise BadRequest(f"the {self.name} field is not UTF-8 text",
                                     param=self.name) from None
            self.pos = self.seen = nxt + 2

    @property
    def name(self) -> str:
        return self.wanted.decode()


MORE = ("more", None)   # FieldScanner.scan: the field's part has not all arrived yet


def field(body: bytes, content_type: str,
          name: str) -> Tuple[Optional[str], Optional[slice]]:
    """Text field ``name``'s value and where it stands (None, None: no such field)."""
    span = find(body, content_type, name)
    if span is None:
        return None, None
    try:
        return body[span].decode("utf-8").strip(), span
    except UnicodeDecodeError:
        raise BadRequest(f"the {name} field is not UTF-8 text", param=name) from None


def replace(body: bytes, span: slice, value: str) -> bytes:
    """``body`` with a field's value (found by ``field``) replaced."""
    return body[:span.start] + value.encode("utf-8") + body[span.stop:]
