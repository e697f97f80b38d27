"""OpenAI error envelopes: our own errors, and engines' errors normalised into the envelope."""
from __future__ import annotations

import json

from kvrouter.errors import ApiError
from kvrouter.http.server import Response

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
          504: "timeout_error"}


def error_response(err: ApiError) -> Response:
    headers = [("Content-Type", "application/json")] + list(err.headers.items())
    return Response(err.status, headers, json.dumps(err.body()).encode())


def envelope(status: int, message: str, type_: str = "", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param, "code": code}}


def normalize_error_body(status: int, body: bytes) -> bytes:
    """Engines answer errors in several shapes; clients get ``{"error": {...}}`` always.

    - vLLM >= 0.10.1 and SGLang /v1/responses: already the envelope (kept as is);
    - vLLM <= 0.10.0 and SGLang: flat ``{"object": "error", "message", ...}``;
    - FastAPI ``{"detail": ...}`` and plain text.
    """
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            out = {"message": err.get("message"), "type": err.get("type"),
                   "param": err.get("param"), "code": err.get("code")}
            return json.dumps({"error": out}).encode()
        if "message" in obj:
            return json.dumps(envelope(status, str(obj["message"]), obj.get("type") or "",
                                       obj.get("param"), obj.get("code"))).encode()
        if "detail" in obj:
            detail = obj["detail"]
            return json.dumps(envelope(status, detail if isinstance(detail, str)
                                       else json.dumps(detail))).encode()
        if isinstance(err, str):
            return json.dumps(envelope(status, err)).encode()
    text = body.decode("utf-8", "replace").strip() or f"engine answered HTTP {status}"
    return json.dumps(envelope(status, text[:2000])).encode()


def stream_error_event(message: str, type_: str = "server_error", code=None) -> bytes:
    """An in-band SSE error: the openai SDK raises APIError on an event with an ``error`` key."""
    return b"data: " + json.dumps({"error": {"message": message, "type": type_, "param": None,
                                             "code": code}}).encode() + b"\n\n"
