"""The simulated engine's speech-to-text routes, as vLLM serves them for Whisper-class
models: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``, a
``multipart/form-data`` upload with ``file`` and ``model`` fields (and ``response_format``:
``json``, the default, or ``text``). The answer is deterministic: it names the upload's
size and a digest of its bytes, so a test can tell that the whole file arrived. The body is
read as it arrives (``upload_bytes`` in /sim/stats counts it), so a test can tell that the
router passes an upload on before the client has sent all of it."""
from __future__ import annotations

import hashlib
import json

from kvrouter.errors import ApiError
from kvrouter.http import multipart
from kvrouter.http.messages import Request, Response
from kvrouter.sim.generate import SimError

UPLOADS = ("/v1/audio/transcriptions", "/v1/audio/translations")


def streamed(req: Request) -> bool:
    return req.method == "POST" and req.path in UPLOADS and multipart.is_multipart(req.headers)


def _read(req: Request, counters: dict) -> bytes:
    if req.stream is None:
        return req.body
    parts = []
    for piece in req.stream:
        counters["upload_bytes"] += len(piece)
        parts.append(piece)
    return b"".join(parts)


def transcribe(req: Request, check_model, counters: dict, translate: bool = False) -> Response:
    req.body = _read(req, counters)
    if not multipart.is_multipart(req.headers):
        raise SimError(400, "expected multipart/form-data with a file and a model field")
    ctype = req.headers.get("content-type") or ""
    try:
        model, _ = multipart.field(req.body, ctype, "model")
        span = multipart.find(req.body, ctype, "file")
        fmt, _ = multipart.field(req.body, ctype, "response_format")
    except ApiError as err:   # the same words, in the engine's shape
        raise SimError(400, err.message) from None
    check_model({"model": model} if model else {})
    if span is None:
        raise SimError(400, "the upload has no file field", param="file")
    audio = req.body[span]
    digest = hashlib.blake2b(audio, digest_size=6).hexdigest()
    text = f"{'translated' if translate else 'transcribed'} {len(audio)} bytes {digest}"
    if (fmt or "json") == "text":
        return Response(200, [("Content-Type", "text/plain; charset=utf-8")], text.encode())
    return Response(200, [("Content-Type", "application/json")],
                    json.dumps({"text": text}).encode())
