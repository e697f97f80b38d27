"""The simulated vLLM's scoring routes, served by a pooling model (``--runner pooling``), in
vLLM's shapes: ``/rerank`` (also ``/v1/rerank``, ``/v2/rerank``: Jina's and Cohere's API) and
``/score`` (also ``/v1/score``). Relevance is the share of words two texts have in common
(Jaccard over lower-cased words): deterministic, and a document that shares the query's
words ranks above one that does not, so a test can tell the ranking came back whole."""
from __future__ import annotations

import time
import uuid
from typing import Any, List

from kvrouter.sim import text as T
from kvrouter.sim.generate import Generator, SimError


def relevance(a: str, b: str) -> float:
    wa, wb = set(a.lower().split()), set(b.lower().split())
    return round(len(wa & wb) / len(wa | wb), 6) if wa | wb else 0.0


def _texts(value: Any, field: str) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise SimError(400, f"{field} must be a string or a non-empty list of strings", param=field)


def rerank(gen: Generator, body: Any) -> dict:
    if not isinstance(body, dict):
        raise SimError(400, "the request body must be a JSON object")
    model = gen.check_model(body)
    query = body.get("query")
    if not isinstance(query, str):
        raise SimError(400, "query must be a string", param="query")
    docs = _texts(body.get("documents"), "documents")
    top_n = body.get("top_n") or len(docs)
    if not isinstance(top_n, int) or top_n < 1:
        raise SimError(400, "top_n must be a positive integer", param="top_n")
    ranked = sorted(((relevance(query, d), i, d) for i, d in enumerate(docs)),
                    key=lambda r: (-r[0], r[1]))[:top_n]
    tokens = sum(T.count_tokens(query) + T.count_tokens(d) for d in docs)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model,
            "usage": {"total_tokens": tokens},
            "results": [{"index": i, "document": {"text": d}, "relevance_score": s}
                        for s, i, d in ranked]}


def score(gen: Generator, body: Any) -> dict:
    if not isinstance(body, dict):
        raise SimError(400, "the request body must be a JSON object")
    model = gen.check_model(body)
    first = _texts(body.get("text_1"), "text_1")
    second = _texts(body.get("text_2"), "text_2")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise SimError(400, "text_1 and text_2 must have the same length (or text_1 one "
                       "text)", param="text_2")
    tokens = sum(T.count_tokens(a) + T.count_tokens(b) for a, b in zip(first, second))
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list",
            "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": relevance(a, b)}
                     for i, (a, b) in enumerate(zip(first, second))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None}}
