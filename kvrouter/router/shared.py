"""What the owner of model state shares with its worker processes (``router.workers``):
one memory-mapped file. The owner writes each model's state; each worker writes only its
own slot of in-flight counts, so nothing is locked, and reading a ready model's state on
the request path is one byte of memory.

Layout: ``[names: NAME_BYTES x MAX_MODELS][state: 1 byte x MAX_MODELS][in flight: int32 x
MAX_MODELS x MAX_WORKERS]``. The owner numbers the models and writes their names; a number,
once given, never changes (a reload adds models at the end), so workers started before and
after a reload agree. A worker reads the names when it starts; a model it does not know is
not ready to it, and goes to the owner.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Dict, Sequence

from kvrouter.control.states import State

MAX_MODELS = 256
MAX_WORKERS = 256
CODES = {s: i + 1 for i, s in enumerate(State)}   # 0: unknown
STATES = {i: s for s, i in CODES.items()}
READY = CODES[State.READY]
_COUNT = struct.Struct("=i")
NAME_BYTES = 256
STATES_AT = NAME_BYTES * MAX_MODELS
COUNTS_AT = STATES_AT + MAX_MODELS
SIZE = COUNTS_AT + MAX_MODELS * MAX_WORKERS * _COUNT.size


class SharedState:
    def __init__(self, path: str, create: bool = False):
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, SIZE)
            self.mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.slots = MAX_WORKERS   # worker slots in use (the owner narrows it)
        self.index: Dict[str, int] = {}
        for i in range(MAX_MODELS):
            raw = self.mm[i * NAME_BYTES:(i + 1) * NAME_BYTES].rstrip(b"\0")
            if not raw:
                break
            self.index[raw.decode()] = i

    # --- the owner ----------------------------------------------------------------------------
    def register(self, models: Sequence[str]) -> None:
        """Number the models not numbered yet (the ones a reload added)."""
        for m in models:
            if m in self.index:
                continue
            i = len(self.index)
            raw = m.encode()
            if i >= MAX_MODELS or len(raw) >= NAME_BYTES:
                continue   # such a model is served through the owner only
            self.mm[i * NAME_BYTES:i * NAME_BYTES + len(raw)] = raw
            self.index[m] = i

    def set_state(self, model: str, state: State) -> None:
        i = self.index.get(model)
        if i is not None:
            self.mm[STATES_AT + i] = CODES[state]

    def in_flight(self, model: str) -> int:
        """Requests the workers are serving for ``model`` now."""
        i = self.index.get(model)
        if i is None:
            return 0
        mm, unpack, total = self.mm, _COUNT.unpack_from, 0
        for slot in range(self.slots):
            total += unpack(mm, self._off(slot, i))[0]
        return total

    def reset_slot(self, slot: int) -> None:
        """A worker died: its requests died with its connections."""
        for i in range(MAX_MODELS):
            _COUNT.pack_into(self.mm, self._off(slot, i), 0)

    # --- a worker -----------------------------------------------------------------------------
    def ready(self, model: str) -> bool:
        i = self.index.get(model)
        return i is not None and self.mm[STATES_AT + i] == READY

    def state(self, model: str) -> State:
        i = self.index.get(model)
        return STATES.get(self.mm[STATES_AT + i], State.STARTING) if i is not None \
            else State.STARTING

    def add(self, slot: int, model: str, delta: int) -> None:
        i = self.index.get(model)
        if i is not None:
            off = self._off(slot, i)
            _COUNT.pack_into(self.mm, off, _COUNT.unpack_from(self.mm, off)[0] + delta)

    @staticmethod
    def _off(slot: int, i: int) -> int:
        return COUNTS_AT + (slot * MAX_MODELS + i) * _COUNT.size

    def close(self, unlink: bool = False) -> None:
        self.mm.close()
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass
