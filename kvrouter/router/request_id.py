"""Request ids (``x-request-id`` when the client sends none): 32 hex digits, a random half
per process and a counter, so no syscall per request (``os.urandom`` per request was one
``getrandom`` each). A forked child draws its own random half."""
from __future__ import annotations

import itertools
import os

_prefix = os.urandom(8).hex()
_count = itertools.count(1)


def _reseed() -> None:
    global _prefix, _count
    _prefix = os.urandom(8).hex()
    _count = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new() -> str:
    return f"{_prefix}{next(_count):016x}"
