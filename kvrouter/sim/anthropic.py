"""The simulated engine's Anthropic Messages API, as vLLM serves it: ``POST /v1/messages``
(a message, or its event stream: message_start, content_block_start,
content_block_delta..., content_block_stop, message_delta, message_stop) and
``POST /v1/messages/count_tokens``. Errors in vLLM's shapes for these routes: what its
handler refuses (an unknown model) as ``{"type": "error", "error": {"type": <vLLM's error
class>, "message": ...}}``; a body that fails validation (no ``max_tokens``) in the OpenAI
envelope, as vLLM's request validation answers on every route (checked against vLLM 0.32 by
tests/engine). The router gives clients Anthropic's shape either way."""
from __future__ import annotations

import json
import uuid
from typing import Any, Iterator, List

from kvrouter.http.messages import Response, StreamResponse
from kvrouter.sim.generate import Generator, SimError

JSON = [("Content-Type", "application/json")]
SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
_STOP = {"stop": "end_turn", "length": "max_tokens", "abort": "end_turn"}


class Invalid(SimError):
    """The body fails the request model's validation (answered in the OpenAI envelope)."""


def error(err: SimError) -> Response:
    body = {"type": "error", "error": {"type": err.type, "message": err.message}}
    return Response(err.status, JSON, json.dumps(body).encode())


def _text(content: Any, where: str) -> str:
    """A message's (or the system prompt's) content: a string, or text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: List[str] = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or "type" not in block:
                raise Invalid(400, f"{where}[{i}]: a content block must be an object with a "
                               "type", param=where)
            if block["type"] == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    raise Invalid(400, f"{where}: content must be a string or a list of blocks", param=where)


def _chat(body: Any) -> dict:
    """The request as the chat completion the engine runs."""
    if not isinstance(body, dict):
        raise Invalid(400, "the request body must be a JSON object")
    if not isinstance(body.get("max_tokens"), int) or isinstance(body["max_tokens"], bool):
        raise Invalid(400, "max_tokens: Field required (an integer)", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid(400, "messages: a non-empty list is required", param="messages")
    chat = []
    if body.get("system"):
        chat.append({"role": "system", "content": _text(body["system"], "system")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise Invalid(400, f"messages[{i}]: role must be user or assistant",
                           param="messages")
        chat.append({"role": m["role"], "content": _text(m.get("content"),
                                                         f"messages[{i}].content")})
    out = {"model": body.get("model"), "messages": chat, "max_tokens": body["max_tokens"]}
    if body.get("stream") is not None:
        out["stream"] = body["stream"]
    return out


def count_tokens(gen: Generator, body: Any) -> Response:
    chat = _chat(dict(body, max_tokens=1) if isinstance(body, dict) else body)
    chat.pop("stream", None)
    parsed = gen.parse(chat, chat=True)
    return Response(200, JSON, json.dumps({
        "input_tokens": parsed["prompt_tokens"],
        "context_management": {"original_input_tokens": parsed["prompt_tokens"]}}).encode())


def messages(gen: Generator, body: Any):
    parsed = gen.parse(_chat(body), chat=True)
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    if parsed["stream"]:
        return StreamResponse(200, SSE, _events(gen, parsed, mid))
    out = gen.complete(parsed)
    choice = out["choices"][0]
    msg = {"id": mid, "type": "message", "role": "assistant", "model": parsed["model"],
           "content": [{"type": "text", "text": choice["message"]["content"]}],
           "stop_reason": _STOP.get(choice["finish_reason"], "end_turn"),
           "usage": {"input_tokens": out["usage"]["prompt_tokens"],
                     "output_tokens": out["usage"]["completion_tokens"]}}
    return Response(200, JSON, json.dumps(msg).encode())


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _events(gen: Generator, parsed: dict, mid: str) -> Iterator[bytes]:
    run = gen.run(parsed)
    produced, reason = 0, "stop"
    try:
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": parsed["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": parsed["prompt_tokens"], "output_tokens": 0}}})
        yield _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})
        for step in run:
            for _, piece, finish in step:
                if piece:
                    produced += 1
                    yield _event("content_block_delta", {
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": piece}})
                if finish:
                    reason = finish
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP.get(reason, "end_turn"), "stop_sequence": None},
            "usage": {"input_tokens": parsed["prompt_tokens"], "output_tokens": produced}})
        yield _event("message_stop", {"type": "message_stop"})
    finally:
        run.close()
