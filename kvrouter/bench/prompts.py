"""Prompts for the load generator: synthetic of a given length, or a ShareGPT-format file."""
from __future__ import annotations

import functools
import json
import random
from typing import List, Optional, Sequence, Tuple

from kvrouter.errors import KvrouterError
from kvrouter.sim.text import VOCAB


def synthetic(n: int, tokens: int, seed: int) -> List[Tuple[str, Optional[int]]]:
    """``n`` prompts of ``tokens`` words each (one word is one token for the simulated engine)."""
    rng = random.Random(seed)
    return [(" ".join(rng.choice(VOCAB) for _ in range(max(1, tokens))), None) for _ in range(n)]


@functools.lru_cache(maxsize=8192)
def _block_words(block: int, block_tokens: int) -> Tuple[str, ...]:
    rng = random.Random(f"block-{block}")
    return tuple(rng.choice(VOCAB) for _ in range(block_tokens))


def from_blocks(blocks: Sequence[int], tokens: int, block_tokens: int) -> str:
    """A prompt of ``tokens`` tokens whose i-th block of ``block_tokens`` is the text of
    block id ``blocks[i]``: two prompts with the same leading block ids share exactly that
    leading text (what a prefix cache can reuse), as traces with block hashes describe
    (Mooncake's ``hash_ids``); different ids give different text. Past the listed blocks
    the text goes on with ids of its own."""
    words: List[str] = []
    i = 0
    while len(words) < max(1, tokens):
        block = blocks[i] if i < len(blocks) else -1 - i - (blocks[-1] if blocks else 0)
        words.extend(_block_words(block, block_tokens))
        i += 1
    return " ".join(words[:max(1, tokens)])


def sharegpt(path: str, n: int, seed: int) -> List[Tuple[str, Optional[int]]]:
    """First human turn of each conversation; output length from the answer's word count."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as err:
        raise KvrouterError(f"{path}: cannot read dataset: {err.strerror}") from None
    except ValueError as err:
        raise KvrouterError(f"{path}: not JSON: {err}") from None
    if not isinstance(data, list):
        raise KvrouterError(f"{path}: expected a list of conversations (ShareGPT format)")
    out = []
    for i, conv in enumerate(data):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or len(turns) < 1:
            continue
        first = turns[0].get("value") if isinstance(turns[0], dict) else None
        if not isinstance(first, str) or not first.strip():
            continue
        answer = turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None
        out_len = max(1, len(answer.split())) if isinstance(answer, str) else None
        out.append((first, out_len))
    if not out:
        raise KvrouterError(f"{path}: no usable conversations (need conversations[0].value)")
    rng = random.Random(seed)
    rng.shuffle(out)
    return [out[i % len(out)] for i in range(n)]
