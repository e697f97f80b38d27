"""Errors on the /v1 path: ApiError as a response, engines' errors normalised into the envelope."""
from __future__ import annotations

import json

from kvrouter.errors import ApiError, anthropic_type, api_error, envelope, error_type
from kvrouter.http.messages import Response

ANTHROPIC_PATH = "/v1/messages"   # and /v1/messages/count_tokens: Anthropic's clients


def anthropic_path(path: str) -> bool:
    return path.startswith(ANTHROPIC_PATH)


def error_response(err: ApiError) -> Response:
    headers = [("Content-Type", "application/json")] + list(err.headers.items())
    return Response(err.status, headers, err.to_json())


def _engine_envelope(status: int, message: str, type_=None, param=None, code=None) -> bytes:
    return json.dumps(envelope(message, type_ or error_type(status), param, code)).encode()


def normalize_error_body(status: int, body: bytes) -> bytes:
    """Engines answer errors in several shapes; clients get ``{"error": {...}}`` always.

    - vLLM >= 0.10.1 and SGLang /v1/responses: already the envelope (kept as is);
    - vLLM <= 0.10.0 and SGLang: flat ``{"object": "error", "message", ...}``;
    - FastAPI ``{"detail": ...}`` and plain text.
    """
    try:
        obj = json.loads(body) if body else None
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return json.dumps(envelope(str(err.get("message")), err.get("type") or error_type(status),
                                       err.get("param"), err.get("code"))).encode()
        if "message" in obj:
            return _engine_envelope(status, str(obj["message"]), obj.get("type"),
                                    obj.get("param"), obj.get("code"))
        if "detail" in obj:
            detail = obj["detail"]
            return _engine_envelope(status, detail if isinstance(detail, str)
                                    else json.dumps(detail))
        if isinstance(err, str):
            return _engine_envelope(status, err)
    text = body.decode("utf-8", "replace").strip() or f"engine answered HTTP {status}"
    return _engine_envelope(status, text[:2000])


def stream_error_event(message: str, type_: str = "server_error", code=None) -> bytes:
    """An in-band SSE error: the openai SDK raises APIError on an event with an ``error`` key."""
    return b"data: " + json.dumps(envelope(message, type_, None, code)).encode() + b"\n\n"


def to_anthropic(resp: Response) -> Response:
    """An error answered on /v1/messages (the router's own, or an engine's already put in
    the OpenAI envelope) in the shape Anthropic's SDK parses."""
    try:
        message = str(json.loads(resp.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = resp.body.decode("utf-8", "replace")[:2000]
    body = api_error(resp.status, message).for_anthropic().to_json()
    return Response(resp.status, resp.headers, body)


def anthropic_stream_error(message: str, status: int = 502) -> bytes:
    """An in-band error on an Anthropic event stream (its SDK raises on ``event: error``)."""
    body = {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
