"""The route key of a request, for the routing policies that need one (``session``,
``cache_aware``): its session (a header, else the body's ``user``) and the hashes of its
prompt's leading blocks.

A block is ``block_tokens`` x 4 bytes of the prompt's text (about that many tokens); each
hash covers the block and every block before it, so equal hashes mean equal prefixes, as
in an engine's prefix cache. Only the first ``MAX_BLOCKS`` blocks are hashed: a prompt's
cost to route stays bounded however long it is.
"""
from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Tuple

from kvrouter.control.routing import RouteKey

MAX_BLOCKS = 256
BYTES_PER_TOKEN = 4
EMPTY = RouteKey()


def prompt_text(body: Any) -> str:
    """The text an engine would prefill: chat messages (role and content, in order), a
    completion's prompt, or the Responses API's input."""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: List[str] = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):   # parts: keep the text ones
                content = "".join(p.get("text", "") for p in content
                                  if isinstance(p, dict) and isinstance(p.get("text"), str))
            parts.append(f"<{m.get('role')}>{content if isinstance(content, str) else ''}")
        return "".join(parts)
    for field in ("prompt", "input", "text"):
        value = body.get(field)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
    return ""


def block_hashes(text: bytes, block_bytes: int, limit: int = MAX_BLOCKS) -> Tuple[int, ...]:
    out = []
    h = hashlib.blake2b(digest_size=8)
    for start in range(0, min(len(text), block_bytes * limit) - block_bytes + 1,
                       block_bytes):   # whole blocks only, as a prefix cache keeps them
        h.update(text[start:start + block_bytes])
        out.append(int.from_bytes(h.copy().digest(), "big"))
    return tuple(out)


def route_key(body: Any, headers, session_header: str, block_tokens: int,
              blocks: bool = True) -> RouteKey:
    session: Optional[str] = headers.get(session_header) if session_header else None
    if not session and isinstance(body, dict) and isinstance(body.get("user"), str):
        session = body["user"]
    hashes: Tuple[int, ...] = ()
    if blocks:
        text = prompt_text(body).encode("utf-8", "surrogatepass")
        hashes = block_hashes(text, block_tokens * BYTES_PER_TOKEN)
    return RouteKey(session or None, hashes)
