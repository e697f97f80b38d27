"""kvcached's KV pool segment, read and written with the standard library.

kvcached keeps, per engine (per KV group), a POSIX shared-memory file
``/dev/shm/<KVCACHED_IPC_NAME>`` (group N > 0: ``<name>_g<N>``) of 24 bytes: three native
int64s ``total_size`` (the pool's limit), ``used_size`` and ``prealloc_size``. Readers hold
``flock(LOCK_SH)``, writers ``flock(LOCK_EX)``; the engine polls ``total_size`` and grows or
shrinks its pool, and ``kvctl limit NAME SIZE`` changes a limit by writing it.

Checked against kvcached at commit e8e6406 (``kvcached/cli/utils.py``: ``MemInfoStruct``,
``RwLockedShm``, ``init_kv_cache_limit``; ``kvcached/mem_info_tracker.py``). kvcached lives
in the engines' virtualenvs, not kvrouter's: this module is its format, not its code.
"""
from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Optional

SHM_DIR = "/dev/shm"
FORMAT = "=qqq"                     # native byte order, as numpy's int64 view in kvcached
SIZE = struct.calcsize(FORMAT)      # 24


@dataclass(frozen=True)
class PoolInfo:
    total: int      # the limit (bytes)
    used: int       # bytes of KV cache in use
    prealloc: int   # bytes mapped ahead of use

    @property
    def free(self) -> int:
        return max(0, self.total - self.used - self.prealloc)


def segment_path(ipc_name: str, group: int = 0, folder: str = SHM_DIR) -> str:
    """Where kvcached keeps the pool of ``ipc_name`` (an absolute name is a path)."""
    name = ipc_name if group == 0 else f"{ipc_name}_g{group}"
    return name if name.startswith("/") else os.path.join(folder, name)


def read(path: str) -> Optional[PoolInfo]:
    """The pool's figures, or None when there is no (complete) segment."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = os.pread(fd, SIZE, 0)
    finally:
        os.close(fd)  # closing releases the lock
    if len(data) < SIZE:
        return None
    return PoolInfo(*struct.unpack(FORMAT, data))


def _update(path: str, fn, create: bool) -> PoolInfo:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = os.pread(fd, SIZE, 0)
        old = PoolInfo(*struct.unpack(FORMAT, data)) if len(data) == SIZE else PoolInfo(0, 0, 0)
        new = fn(old)
        os.pwrite(fd, struct.pack(FORMAT, new.total, new.used, new.prealloc), 0)
        return new
    finally:
        os.close(fd)


def set_limit(path: str, total: int) -> PoolInfo:
    """Write the pool's limit (what ``kvctl limit`` does); used and prealloc are the
    engine's and stay as they are. Raises FileNotFoundError when the pool does not exist."""
    if total < 0:
        raise ValueError(f"a KV limit cannot be negative, got {total}")
    return _update(path, lambda old: PoolInfo(total, old.used, old.prealloc), create=False)


def create(path: str, total: int) -> PoolInfo:
    """The engine's side at start: a pool of ``total`` bytes, nothing used (kvcached's
    ``init_kv_cache_limit``)."""
    return _update(path, lambda old: PoolInfo(total, 0, 0), create=True)


def report_usage(path: str, used: int, prealloc: int = 0) -> PoolInfo:
    """The engine's side while it runs: its usage, under the limit someone else may set.
    Returns the figures with the current limit."""
    return _update(path, lambda old: PoolInfo(old.total, used, prealloc), create=True)


def parse_size(text: str) -> int:
    """``"12G"``, ``"512MiB"``, ``"1.5GB"``, ``"1048576"`` -> bytes (powers of 1024, as kvctl)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
             "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
             "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    s = text.strip().lower()
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M, 1073741824)") from None
    if unit not in units or value < 0 or value != value:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M, 1073741824)")
    return int(value * units[unit])


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
