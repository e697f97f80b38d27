"""``multipart/form-data`` bodies (uploads): one text field found and replaced.

The router routes an upload (Whisper's ``/v1/audio/transcriptions``) by its ``model``
field and rewrites an alias there; the simulated engine reads the same field. Finding a
field is a few ``bytes.find`` over the part boundaries, never a parse of a file part;
replacing it leaves every other byte of the body as it came.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

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
