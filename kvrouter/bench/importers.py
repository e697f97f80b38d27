"""Public traces turned into kvrouter traces (``kvrouter bench import-trace``).

- **mooncake**: kvcache-ai/Mooncake's FAST'25 traces (``conversation_trace.jsonl``,
  ``synthetic_trace.jsonl``; Apache-2.0): JSON lines ``{"timestamp": ms, "input_length": n,
  "output_length": n, "hash_ids": [...]}``, one id per 512-token block of the prompt, equal
  ids for equal blocks (shared prefixes). Each request keeps its ids as ``blocks``, so a
  replay sends equal text for equal ids and a prefix cache has what the real one had.

- **access-log**: kvrouter's own access lines (the router's log file under supervisord, or
  ``journalctl --user-unit kvrouter -o short-iso-precise`` under systemd): each routed POST
  becomes a request at its start (the line's time less its duration), for its model, with
  the tokens the engine reported (``tokens=P/C``; a line without them, a stream that asked
  for no usage, gets the defaults). "What would policy X have done with last week's
  traffic?" is then `kvrouter simulate CONFIG --trace` on it.

A single-model trace becomes a multi-model one by a documented rule, with a seed:
``conversation`` (the default) gives each conversation (a request's first block after the
prefix every request shares) to one model, chosen by a seeded hash, so its turns stay
together; ``stripe`` deals requests to the models in turn (AlpaServe's round-robin
assignment), which splits conversations.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime
from typing import Iterator, List, Optional, Sequence, Tuple

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


_ACCESS = re.compile(
    r"kvrouter\.access: POST (?P<path>\S+) model=(?P<model>\S+) status=(?P<status>\d+) "
    r"bytes=\d+ duration=(?P<duration>[\d.]+)s.*?(?: tokens=(?P<p>\d+)/(?P<c>\d+))?$")
_FILE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_JOURNAL_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?[+-]\d\d:?\d\d) ")


def _line_time(line: str) -> Optional[float]:
    m = _FILE_TIME.match(line)
    if m:   # the router's own format, local time with milliseconds
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + \
            int(m.group(2)) / 1000.0
    m = _JOURNAL_TIME.match(line)
    if m:   # journalctl -o short-iso-precise
        stamp = m.group(1)
        if stamp[-3] != ":":
            stamp = stamp[:-2] + ":" + stamp[-2:]
        return datetime.fromisoformat(stamp).timestamp()
    return None


def access_log(path: str, prompt_tokens: int = 256, output_tokens: int = 128,
               statuses: Tuple[int, ...] = (200,)) -> Tuple[List[dict], int]:
    """(rows sorted by time from the first request, how many lacked token counts)."""
    found: List[Tuple[float, str, Optional[int], Optional[int]]] = []
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except OSError as err:
        raise KvrouterError(f"{path}: cannot read: {err.strerror}") from None
    with fh:
        for line in fh:
            m = _ACCESS.search(line.rstrip("\n"))
            if m is None or m.group("model") == "-" or int(m.group("status")) not in statuses:
                continue
            end = _line_time(line)
            if end is None:
                continue
            p, c = m.group("p"), m.group("c")
            found.append((end - float(m.group("duration")), m.group("model"),
                          int(p) if p else None, int(c) if c else None))
    if not found:
        raise KvrouterError(f"{path}: no kvrouter access lines with a time (the router's log "
                            "file, or journalctl --user-unit kvrouter -o short-iso-precise)")
    found.sort()
    first = found[0][0]
    missing = sum(1 for _, _, p, c in found if not p or not c)
    rows = [{"time": round(t - first, 3), "model": model,
             "prompt_tokens": p or prompt_tokens, "output_tokens": c or output_tokens}
            for t, model, p, c in found]
    return rows, missing
