"""Public traces turned into kvrouter traces (``kvrouter bench import-trace``).

- **mooncake**: kvcache-ai/Mooncake's FAST'25 traces (``conversation_trace.jsonl``,
  ``synthetic_trace.jsonl``; Apache-2.0): JSON lines ``{"timestamp": ms, "input_length": n,
  "output_length": n, "hash_ids": [...]}``, one id per 512-token block of the prompt, equal
  ids for equal blocks (shared prefixes). Each request keeps its ids as ``blocks``, so a
  replay sends equal text for equal ids and a prefix cache has what the real one had.

A single-model trace becomes a multi-model one by a documented rule, with a seed:
``conversation`` (the default) gives each conversation (a request's first block after the
prefix every request shares) to one model, chosen by a seeded hash, so its turns stay
together; ``stripe`` deals requests to the models in turn (AlpaServe's round-robin
assignment), which splits conversations.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator, List, Sequence

from kvrouter.errors import KvrouterError

RULES = ("conversation", "stripe")


def _pick(key: str, models: Sequence[str], seed: int) -> str:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return models[int.from_bytes(digest, "big") % len(models)]


def mooncake(path: str, models: Sequence[str], rule: str = "conversation", seed: int = 0,
             block_tokens: int = 512) -> Iterator[dict]:
    """The trace's requests as kvrouter rows, in file order (a line at a time)."""
    if not models:
        raise KvrouterError("import-trace: name the models (--model, or --models-from CONFIG)")
    if rule not in RULES:
        raise KvrouterError(f"import-trace: --assign {rule!r}: choose from {', '.join(RULES)}")
    try:
        fh = open(path, encoding="utf-8")
    except OSError as err:
        raise KvrouterError(f"{path}: cannot read: {err.strerror}") from None
    with fh:
        n = 0
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                ts, prompt, output = doc["timestamp"], doc["input_length"], doc["output_length"]
                ids: List[int] = doc.get("hash_ids") or []
                if not all(isinstance(v, int) and not isinstance(v, bool)
                           for v in (ts, prompt, output, *ids)):
                    raise ValueError("timestamp, input_length, output_length and hash_ids "
                                     "are whole numbers")
                if ts < 0 or prompt < 1 or output < 0 or any(i < 0 for i in ids):
                    raise ValueError("negative time, length or id, or an empty prompt")
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise KvrouterError(f"{path}:{line_no}: not a Mooncake trace line ({err}); "
                                    'expected {"timestamp": ms, "input_length": n, '
                                    '"output_length": n, "hash_ids": [...]}') from None
            if rule == "stripe":
                model = models[n % len(models)]
            else:
                model = _pick(str(ids[1] if len(ids) > 1 else ids[0] if ids else n), models,
                              seed)
            n += 1
            yield {"time": ts / 1000.0, "model": model, "prompt_tokens": prompt,
                   "output_tokens": max(1, output), "blocks": ids, "block_tokens": block_tokens}
