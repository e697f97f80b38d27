"""SGLang's native ``POST /generate`` on the simulated engine: ``{"text": ..., "sampling_params":
{"max_new_tokens", ...}, "stream": bool}`` (or ``input_ids``). No ``model`` field: through the
router it is reached by ``/upstream/{model}/generate``. The answer is ``{"text", "meta_info":
{"id", "finish_reason": {"type", "length"?}, "prompt_tokens", "completion_tokens",
"cached_tokens"}}``; streamed, each SSE event carries the text so far (SGLang's default,
without ``--incremental-streaming-output``), then ``data: [DONE]``."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

from kvrouter.http.messages import Response, StreamResponse
from kvrouter.sim import text as T
from kvrouter.sim.generate import Generator, SimError

JSON = [("Content-Type", "application/json")]
SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]


def generate(gen: Generator, body: Any):
    if not isinstance(body, dict):
        raise SimError(400, "the request body must be a JSON object")
    prompt = body.get("text")
    if prompt is None and isinstance(body.get("input_ids"), list):
        prompt = T.detokenize(body["input_ids"])
    if not isinstance(prompt, str):
        raise SimError(400, "Either text or input_ids should be provided (one prompt: the "
                       "simulated engine takes no batch).", param="text")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise SimError(400, "sampling_params must be an object", param="sampling_params")
    request = {"prompt": prompt, "max_tokens": params.get("max_new_tokens", 128),
               "ignore_eos": bool(params.get("ignore_eos", False))}
    parsed = gen.parse(request, chat=False)
    rid = uuid.uuid4().hex
    start = time.monotonic()
    if body.get("stream"):
        return StreamResponse(200, SSE, _stream(gen, parsed, rid, start))
    out = gen.complete(parsed)
    choice = out["choices"][0]
    return Response(200, JSON, json.dumps({"text": choice["text"], "meta_info": _meta(
        rid, parsed, out["usage"]["completion_tokens"], choice["finish_reason"],
        start)}).encode())


def _meta(rid: str, parsed: dict, completion: int, reason, start: float) -> dict:
    finish = None if reason is None else (
        {"type": "length", "length": completion} if reason == "length" else
        {"type": "stop", "matched": None})
    return {"id": rid, "finish_reason": finish, "prompt_tokens": parsed["prompt_tokens"],
            "completion_tokens": completion, "cached_tokens": parsed.get("cached_tokens", 0),
            "e2e_latency": round(time.monotonic() - start, 6)}


def _stream(gen: Generator, parsed: dict, rid: str, start: float) -> Iterator[bytes]:
    run = gen.run(parsed)
    text, produced = "", 0
    try:
        for step in run:
            for _, piece, reason in step:
                if piece:
                    produced += 1
                text += piece
                yield b"data: " + json.dumps({"text": text, "meta_info": _meta(
                    rid, parsed, produced, reason, start)}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        run.close()
