"""Deterministic fake tokenizer, text generation and embeddings for the simulated engine."""
from __future__ import annotations

import base64
import hashlib
import random
import re
import struct
from typing import Dict, List

VOCAB = (
    "the of and to in is that it for on with as was by at be this from or an are which but "
    "not have one all they we can more there their if has been will would model memory token "
    "engine sleep wake request batch cache kernel layer weight prompt answer stream router "
    "latency throughput serve queue fast slow small large gpu cpu data time first next"
).split()
GIBBERISH = ["\u00bf", "##", "\u2593", "\ufffd", "qz", "\u00e6\u00f0", "<0x0A>", "xX", "!!", "\u0416"]
_WORD_RE = re.compile(r"\w+|[^\w\s]")
VOCAB_SIZE = 32000


_LEARNED: Dict[int, str] = {}   # id -> the word it was made from, so ids detokenize back
_LEARN_AT_MOST = 1 << 16


def tokenize(text: str) -> List[int]:
    """Words and punctuation marks are tokens; ids are stable hashes (remembered, so that
    ``detokenize`` gives the words back)."""
    ids = []
    for w in _WORD_RE.findall(text):
        i = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") \
            % VOCAB_SIZE
        if len(_LEARNED) < _LEARN_AT_MOST:
            _LEARNED.setdefault(i, w)
        ids.append(i)
    return ids


def tokens(text: str) -> List[str]:
    """The tokens' texts (words and punctuation marks)."""
    return _WORD_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(_WORD_RE.findall(text))


def token_text(token_id: int) -> str:
    return " " + VOCAB[token_id % len(VOCAB)]


def detokenize(ids: List[int]) -> str:
    """Words for ids: those ``tokenize`` made give their word back (a round trip), others a
    word of the vocabulary."""
    return "".join(" " + _LEARNED[i] if i in _LEARNED else token_text(i) for i in ids).lstrip()


def seed_for(seed: int, prompt: str, index: int) -> int:
    h = hashlib.blake2b(f"{seed}|{index}|{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def natural_length(seed: int, prompt: str, lo: int, hi: int) -> int:
    """Where the simulated model would stop (EOS) for this prompt."""
    return random.Random(seed_for(seed, prompt, -1)).randint(lo, max(lo, hi))


class TokenStream:
    """The tokens of one choice: words of the vocabulary, or gibberish when weights are bad."""

    def __init__(self, seed: int, prompt: str, index: int, gibberish: bool = False):
        self._rng = random.Random(seed_for(seed, prompt, index))
        self.gibberish = gibberish

    def next_text(self) -> str:
        if self.gibberish:
            return self._rng.choice(GIBBERISH)
        return " " + self._rng.choice(VOCAB)


def embedding(text: str, dim: int) -> List[float]:
    rng = random.Random(seed_for(0, text, -7))
    vec = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [v / norm for v in vec]


def encode_base64(vec: List[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
