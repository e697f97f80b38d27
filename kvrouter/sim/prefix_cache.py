"""The simulated engine's prefix cache, as vLLM's automatic prefix caching and SGLang's
radix cache behave: a prompt is cut into blocks of ``--block-size`` tokens (16), each block
known by the hash of everything before it and itself; the blocks a request computed stay
cached (within the KV pool, least recently used out first), and the next request whose
leading blocks are cached skips that part of prefill. vLLM counts only whole blocks and
always computes the last token (a fully cached prompt reports ``len - 1`` rounded down to a
block), and reports the figure as ``usage.prompt_tokens_details.cached_tokens`` when it was
started with ``--enable-prompt-tokens-details`` (SGLang: ``--enable-cache-report``).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import List

from kvrouter.sim import text as T


def block_hashes(prompt: str, block: int) -> List[bytes]:
    """The chained hash of each whole block of ``prompt``'s tokens."""
    words = T.tokens(prompt)
    out: List[bytes] = []
    parent = b""
    for start in range(0, len(words) - block + 1, block):
        parent = hashlib.blake2b(parent + "\0".join(words[start:start + block]).encode(),
                                 digest_size=12).digest()
        out.append(parent)
    return out


class PrefixCache:
    def __init__(self, block: int, capacity_blocks: int):
        self.block = block
        self.capacity = capacity_blocks
        self.blocks: "OrderedDict[bytes, None]" = OrderedDict()
        self.hits = 0       # tokens served from the cache, all requests together
        self.queries = 0    # prompt tokens looked up

    def lookup(self, prompt: str) -> int:
        """Tokens of ``prompt`` already cached (whole leading blocks, never its last token);
        the blocks it hits become the most recently used."""
        hashes = block_hashes(prompt, self.block)
        hit = 0
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            hit += 1
        tokens = len(T.tokens(prompt))
        block = self.block
        cached = min(hit * block, ((tokens - 1) // block) * block) if tokens else 0
        self.hits += cached
        self.queries += tokens
        return max(0, cached)

    def insert(self, prompt: str, capacity_blocks: int) -> None:
        """``prompt``'s blocks are computed: keep them, within ``capacity_blocks``."""
        self.capacity = capacity_blocks
        for h in block_hashes(prompt, self.block):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > max(0, self.capacity):
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        """The KV cache was freed (sleep, memory released)."""
        self.blocks.clear()
