"""Uploads (``multipart/form-data``) on the /v1 path: routed by their ``model`` form field,
an alias rewritten there. A streamed upload (``req.stream``) is read only until that field
is found; the rest goes to the engine as it arrives, bounded by ``router.max_upload_mb``."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

from kvrouter.control.entry import ModelGroup
from kvrouter.errors import BadRequest, PayloadTooLarge
from kvrouter.http import multipart
from kvrouter.http.body import StreamBody
from kvrouter.http.messages import Request
from kvrouter.router.routes import RouteTable


def too_large(size, limit: int) -> PayloadTooLarge:
    """The 413 for an upload of ``size`` bytes (a number, or words such as "over N")."""
    return PayloadTooLarge(f"upload of {size} bytes is over the limit of {limit} bytes "
                           "(router.max_upload_mb)", code="upload_too_large")


def parse_upload(req: Request, routes: RouteTable, limit: int):
    """(group, payload, None): the model's group and the body to send its engine."""
    if req.stream is not None:
        return _parse_streamed(req, routes, limit)
    if len(req.body) > limit:   # sent chunked: no Content-Length to refuse it on
        raise too_large(len(req.body), limit)
    model, span = multipart.field(req.body, req.headers.get("content-type") or "", "model")
    group = _group(routes, model)
    if span is not None and model != group.upstream_model:
        return group, multipart.replace(req.body, span, group.upstream_model), None
    return group, req.body, None


def _group(routes: RouteTable, model: Optional[str]) -> ModelGroup:
    return routes.resolve(model, "the upload has no model field")


def _parse_streamed(req: Request, routes: RouteTable, limit: int):
    reader = req.stream
    assert reader is not None
    scanner = multipart.FieldScanner(req.headers.get("content-type") or "", "model")
    pieces = iter(reader)
    buf = bytearray()
    found = multipart.MORE
    while found is multipart.MORE:   # held until the field is found (a model field after
        piece = next(pieces, None)   # the file costs the file, within the limit)
        if piece is None:
            raise BadRequest("multipart body ends before its closing boundary (a half-sent "
                             "upload?)", code="invalid_multipart")
        if len(buf) + len(piece) > limit:
            raise too_large(f"over {limit}", limit)
        reader.hold(len(piece))
        buf += piece
        found = scanner.scan(buf)
    model, span = found
    group = _group(routes, model)
    length = reader.length
    if span is not None and model != group.upstream_model:
        value = group.upstream_model.encode()
        buf[span] = value
        if length is not None:
            length += len(value) - (span.stop - span.start)
    return group, StreamBody(bytes(buf), _bounded(pieces, limit - len(buf), limit),
                             length), None


def _bounded(pieces: Iterable[bytes], left: int, limit: int) -> Iterator[bytes]:
    """The rest of a streamed upload, refused (413) past the limit (a chunked one has no
    Content-Length the headers' check could refuse it on)."""
    for piece in pieces:
        left -= len(piece)
        if left < 0:
            raise too_large(f"over {limit}", limit)
        yield piece
