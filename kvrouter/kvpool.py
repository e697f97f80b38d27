"""kvcached's KV pool segment, read and written with the standard library.

kvcached keeps, per engine (per KV group), a POSIX shared-memory file
``/dev/shm/<KVCACHED_IPC_NAME>`` (group N > 0: ``<name>_g<N>``) of 24 bytes: three native
int64s ``total_size`` (the pool's limit), ``used_size`` and ``prealloc_size``. Readers hold
``flock(LOCK_SH)``, writers ``flock(LOCK_EX)``; the engine polls ``total_size`` and grows or
shrinks its pool, and ``kvctl limit NAME SIZE`` changes a limit by writing it.

Supported: kvcached 0.1.5 and 0.1.6, and its main branch as of commit e8e6406
(``kvcached/cli/utils.py``: ``MemInfoStruct``, ``RwLockedShm``, ``init_kv_cache_limit``;
``kvcached/mem_info_tracker.py``; ``kvcached/utils.py``: ``_sanitize_segment``). All three
write the same 24-byte segment; from 0.1.6 on, an engine with several KV groups (SGLang's
hybrid models) keeps one segment per group, ``<name>_g<N>`` for N > 0. kvrouter reads a
model's pool as the sum of its groups and divides a limit among them in proportion.

Two rules of kvcached's are kept here too:
- the name: kvcached turns every character of ``KVCACHED_IPC_NAME`` that is not a letter,
  a digit, ``_`` or ``-`` into ``-`` and keeps the first 64 (``ipc_name``);
- no limit of 0: kvcached's engine reads ``total // layers // 2 == 0`` as "no change" and
  ``kvctl list`` hides a segment whose limit is not positive, so the smallest limit written
  is ``MIN_LIMIT`` (1 MiB: less than one 2 MiB page per layer, so nothing is kept).

kvcached lives in the engines' virtualenvs, not kvrouter's: this module is its format, not
its code.
"""
from __future__ import annotations

import fcntl
import math
import os
import struct
from dataclasses import dataclass
from typing import List, Optional

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


MIN_LIMIT = 1 << 20
MAX_LIMIT = (1 << 63) - 1


def ipc_name(name: str) -> str:
    """The segment name kvcached makes of ``KVCACHED_IPC_NAME`` (its ``_sanitize_segment``)."""
    return "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in name)[:64]


def segment_path(name: str, group: int = 0, folder: str = SHM_DIR) -> str:
    """Where kvcached keeps group ``group`` of the pool named ``name`` (KVCACHED_IPC_NAME,
    made safe as kvcached does); an absolute path is taken as it is (tests, tools)."""
    if name.startswith("/"):
        return name if group == 0 else f"{name}_g{group}"
    name = ipc_name(name)
    return os.path.join(folder, name if group == 0 else f"{name}_g{group}")


def group_paths(path: str) -> List[str]:
    """The segments of the pool whose first group is at ``path``: ``path`` and each
    ``path_g<N>`` that exists, by N (an engine with one KV group has only ``path``)."""
    folder, base = os.path.split(path)
    groups = []
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    for name in names:
        rest = name[len(base) + 2:] if name.startswith(base + "_g") else ""
        if rest.isdigit() and rest[0] != "0":
            groups.append((int(rest), os.path.join(folder, name)))
    return [path] + [p for _, p in sorted(groups)]


def _added(infos: List[PoolInfo]) -> PoolInfo:
    """A pool's groups as one."""
    return PoolInfo(sum(i.total for i in infos), sum(i.used for i in infos),
                    sum(i.prealloc for i in infos))


def read_pool(path: str) -> Optional[PoolInfo]:
    """A model's whole pool: its groups' figures added up (None without a first segment)."""
    first = read(path)
    if first is None:
        return None
    infos = [first] + [i for i in map(read, group_paths(path)[1:]) if i is not None]
    return _added(infos)


def set_pool_limit(path: str, total: int) -> PoolInfo:
    """Set a model's whole pool to ``total`` bytes, divided among its groups in proportion to
    their limits now (evenly when none has one), never below ``MIN_LIMIT`` a group. Raises
    FileNotFoundError when the pool does not exist."""
    if not 0 <= total <= MAX_LIMIT:
        raise ValueError(f"a KV limit is from 0 to {MAX_LIMIT} bytes, got {total}")
    paths = group_paths(path)
    now = [read(p) for p in paths]
    if now[0] is None:
        raise FileNotFoundError(path)
    weights = [i.total if i is not None else 0 for i in now]
    if sum(weights) <= 0:
        weights = [1] * len(paths)
    infos = [set_limit(p, max(MIN_LIMIT, total * w // sum(weights)))
             for p, w in zip(paths, weights)]
    return _added(infos)


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
    if not 0 <= total <= MAX_LIMIT:
        raise ValueError(f"a KV limit is from 0 to {MAX_LIMIT} bytes, got {total}")
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
    if unit not in units or not 0 <= value < math.inf:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M, 1073741824)")
    if value * units[unit] > MAX_LIMIT:
        raise ValueError(f"too large: {text!r} (at most {MAX_LIMIT} bytes)")
    return int(value * units[unit])


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
