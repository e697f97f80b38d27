"""What other routers write to Redis, read as untrusted input: every message and record is
checked for its shape, types and ranges before anything acts on it. A check that fails
raises ``BadMessage`` saying which field; the caller logs it and skips the message (or
repairs the record from what this router knows).

Times between routers are ages (seconds before the sender's message), never wall-clock
times: a router whose clock is off cannot make a model look busy or idle to the others.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

from kvrouter.control.states import State

MAX_AGE = 1e8            # seconds (three years): "never" is -1, anything past this is a lie
MAX_COUNT = 10 ** 9
MAX_NAME = 512
STATES = frozenset(s.value for s in State)


log = logging.getLogger("kvrouter.cluster")


class BadMessage(ValueError):
    """A message or record from Redis that does not have the expected shape."""


class Complaints:
    """One warning a minute per kind of malformed input: a flood stays one line."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.last: Dict[str, float] = {}   # what was malformed -> when last logged

    def __call__(self, what: str, err: Exception) -> None:
        now = self.clock()
        if now - self.last.get(what, -1e9) >= 60.0:
            self.last[what] = now
            log.warning("ignored a malformed %s from Redis: %s", what, err)


def _text(doc: dict, key: str, optional: bool = False, limit: int = MAX_NAME) -> Optional[str]:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadMessage(f"{key}: expected a string of 1 to {limit} characters, got "
                         f"{str(value)[:80]!r}")
    return value


def number(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not lo <= value <= hi:
        raise BadMessage(f"{what}: expected a number from {lo:g} to {hi:g}, got "
                         f"{str(value)[:80]!r}")
    return float(value)


def whole(value: Any, what: str, lo: int = 0, hi: int = 2 ** 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadMessage(f"{what}: expected a whole number from {lo} to {hi}, got "
                         f"{str(value)[:80]!r}")
    return value


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadMessage(f"{what}: expected an object, got {type(value).__name__}")
    return value


def state_doc(doc: Any) -> dict:
    """A state change (published, or kept in the states hash)."""
    doc = _mapping(doc, "state")
    state = _text(doc, "state")
    if state not in STATES:
        raise BadMessage(f"state: {state!r} is not a state")
    level = doc.get("level")
    if level not in (None, 1, 2) or isinstance(level, bool):
        raise BadMessage(f"level: expected 1, 2 or null, got {str(level)[:20]!r}")
    reason = doc.get("reason", "")
    return {"model": _text(doc, "model"), "state": state, "level": level,
            "reason": reason[:1000] if isinstance(reason, str) else "",
            "router": _text(doc, "router"), "fence": whole(doc.get("fence"), "fence")}


def beat_doc(doc: Any) -> dict:
    """A heartbeat: per model [in flight, waiting, seconds since its last request ended
    there (-1: never)], the lease tokens seen, the sender's config digest and clock."""
    doc = _mapping(doc, "heartbeat")
    models: Dict[str, Tuple[int, int, float]] = {}
    for model, row in _mapping(doc.get("models", {}), "models").items():
        if not isinstance(row, list) or len(row) != 3:
            raise BadMessage(f"models[{model[:80]!r}]: expected [in flight, waiting, age]")
        models[model] = (whole(row[0], "in flight", 0, MAX_COUNT),
                         whole(row[1], "waiting", 0, MAX_COUNT),
                         number(row[2], "age", -1, MAX_AGE))
    acks = {m: whole(t, f"acks[{m[:80]!r}]")
            for m, t in _mapping(doc.get("acks", {}), "acks").items()}
    return {"id": _text(doc, "id"), "instance": _text(doc, "instance", optional=True) or "",
            "config": _text(doc, "config", optional=True) or "",
            "time": number(doc.get("time"), "time", 0, 1e11), "models": models, "acks": acks}


def records_doc(doc: Any) -> Tuple[float, List[tuple]]:
    """A batch of finished requests: the sender's clock at sending, and each request as
    (model, start, end, outcome, wait, first byte after start, stream, prompt tokens,
    completion tokens, inter-token latency), its times on the sender's clock."""
    doc = _mapping(doc, "records")
    now = number(doc.get("now"), "now", 0, 1e11)
    rows = doc.get("records")
    if not isinstance(rows, list):
        raise BadMessage("records: expected a list")
    out = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 10:
            raise BadMessage("a record: expected a list of 10 fields")
        model, start, end, outcome, wait, first, stream, prompt, completion, itl = row
        if not isinstance(model, str) or not isinstance(outcome, str) or \
                not isinstance(stream, bool):
            raise BadMessage("a record: model and outcome are strings, stream a boolean")
        start = number(start, "start", now - MAX_AGE, now)
        end = number(end, "end", start, now)
        out.append((model, start, end, outcome[:40], number(wait, "wait", 0, MAX_AGE),
                    None if first is None else number(first, "first byte", 0, MAX_AGE),
                    stream, whole(prompt, "prompt tokens", 0, 10 ** 9),
                    whole(completion, "completion tokens", 0, 10 ** 9),
                    None if itl is None else number(itl, "itl", 0, MAX_AGE)))
    return now, out
