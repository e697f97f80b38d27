"""What each engine kind serves to clients through the router (shown in /v1/models, /models
and the dashboard). vLLM registers a route only for the tasks of its model (a pooling model
has no chat, a generative one no /pooling): the list is the kind's, not the model's."""
from __future__ import annotations

from typing import Dict, List

_OPENAI = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings",
           "POST /v1/responses"]
_PASSTHROUGH = "ANY /upstream/{model}/{path}"

ROUTES: Dict[str, List[str]] = {
    "vllm": _OPENAI + [
        "POST /v1/messages", "POST /v1/messages/count_tokens",
        "POST /v1/audio/transcriptions (upload)", "POST /v1/audio/translations (upload)",
        "GET /v1/realtime (WebSocket)",
        "POST /tokenize", "POST /detokenize", "POST /pooling", "POST /classify", "POST /score",
        "POST /v1/score", "POST /rerank", "POST /v1/rerank", "POST /v2/rerank",
        "POST /invocations", _PASSTHROUGH],
    "sglang": _OPENAI + [
        "POST /v1/rerank", "POST /v1/score", "POST /v1/tokenize", "POST /v1/detokenize",
        "POST /generate_from_file (upload)", _PASSTHROUGH + " (e.g. /generate)"],
}


def client_routes(dialect: str) -> List[str]:
    return list(ROUTES.get(dialect, _OPENAI + [_PASSTHROUGH]))
