"""The simulated engine's state: sleep and memory, request slots, counters, kvcached segment."""
from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import time
from typing import Optional, Set

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from kvrouter.sim.options import SimConfig

log = logging.getLogger("kvrouter.sim")
GB = 1024 ** 3
SGLANG_TAGS = ("weights", "kv_cache", "cuda_graph")


def crash(reason: str) -> None:
    """What a real engine does on these bugs: the process dies."""
    log.error("engine crashed: %s", reason)
    logging.shutdown()
    os._exit(70)


class KvcachedSegment:
    """A kvcached-style /dev/shm segment: 3 little-endian int64s [total, used, prealloc]."""

    def __init__(self, name: str, total_bytes: int, folder: str = "/dev/shm"):
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
        self.path = os.path.join(folder, safe)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self._fd = fd
        os.ftruncate(fd, 24)
        self.write(total_bytes, 0, 0)

    def write(self, total: int, used: int, prealloc: int) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            os.pwrite(self._fd, struct.pack("<qqq", total, used, prealloc), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        try:
            os.close(self._fd)
            os.unlink(self.path)
        except OSError:
            pass


class EngineState:
    def __init__(self, cfg: SimConfig, clock=time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.started_at = time.time()
        self.ready_at = clock() + (cfg.startup_seconds if cfg.dialect == "sglang" else 0.0)
        self.dead = False
        # vLLM sleep
        self.sleep_level = 0
        self.asleep_tags: Set[str] = set()
        self.weights_valid = True   # False after level 2 until reload_weights / from disk
        # SGLang memory saver
        self.released: Set[str] = set()
        self.paused = False
        self.awake = Event()
        self.awake.set()
        self.slots = Semaphore(cfg.max_concurrency)
        self.running = 0
        self.waiting = 0
        self.tokens_in_flight = 0
        self.abort_epoch = 0
        self.counters = {"requests": 0, "success": 0, "aborted": 0, "prompt_tokens": 0,
                         "generation_tokens": 0, "sleep_calls": 0, "wake_calls": 0,
                         "release_calls": 0, "resume_calls": 0}
        self.last_sleep_seconds = 0.0
        self.last_wake_seconds = 0.0
        self.segment: Optional[KvcachedSegment] = None

    # --- memory ---------------------------------------------------------------------------
    @property
    def weights_resident(self) -> bool:
        if self.cfg.dialect == "vllm":
            return "weights" not in self.asleep_tags
        return "weights" not in self.released

    @property
    def kv_resident(self) -> bool:
        if self.cfg.dialect == "vllm":
            return "kv_cache" not in self.asleep_tags
        return "kv_cache" not in self.released

    def kv_used_bytes(self) -> int:
        per_token = int(self.cfg.kv_cache_gb * GB / max(1, self.cfg.max_model_len * 8))
        return min(int(self.cfg.kv_cache_gb * GB), self.tokens_in_flight * per_token)

    def gpu_memory_bytes(self) -> int:
        used = 0
        if self.weights_resident:
            used += int(self.cfg.weights_gb * GB)
        if self.kv_resident:
            used += int(self.cfg.kv_cache_gb * GB)
        return used

    def update_segment(self) -> None:
        if self.segment is not None:
            total = int(self.cfg.kv_cache_gb * GB)
            self.segment.write(total, self.kv_used_bytes(), 0)

    def kv_usage(self) -> float:
        total = self.cfg.kv_cache_gb * GB
        return round(self.kv_used_bytes() / total, 6) if total else 0.0

    # --- readiness and sleep ----------------------------------------------------------------
    def is_starting(self) -> bool:
        return self.clock() < self.ready_at

    def is_sleeping(self) -> bool:
        return bool(self.asleep_tags) or bool(self.released)

    def sleep_state_label(self) -> str:
        if not self.asleep_tags:
            return "awake"
        return "discard_all" if self.sleep_level == 2 else "weights_offloaded"

    def transfer_seconds(self, gb: float, bandwidth: float, base: float = 0.05) -> float:
        return gb / bandwidth + base if bandwidth > 0 else base

    def vllm_sleep(self, level: int) -> None:
        self.counters["sleep_calls"] += 1
        if self.asleep_tags:
            log.info("engine is already sleeping")
            return
        started = self.clock()
        if self.running:
            # vLLM >= 0.17 mode=abort: running requests finish with finish_reason "abort"
            self.abort_epoch += 1
        self.awake.clear()
        gevent.sleep(self.transfer_seconds(self.cfg.weights_gb, self.cfg.wake_bandwidth_gbps))
        self.sleep_level = level
        self.asleep_tags = {"weights", "kv_cache"}
        if level == 2:
            self.weights_valid = False
        self.last_sleep_seconds = self.clock() - started
        log.info("sleep level %d done in %.3fs", level, self.last_sleep_seconds)
        self.update_segment()

    def vllm_wake(self, tags) -> None:
        self.counters["wake_calls"] += 1
        tags = set(tags) if tags else {"weights", "kv_cache"}
        if not self.asleep_tags:
            return  # no-op when awake
        if not tags <= self.asleep_tags:
            # vLLM #31618: if any requested tag is awake, nothing wakes
            log.warning("wake_up tags %s not all sleeping (%s): nothing done", sorted(tags),
                        sorted(self.asleep_tags))
            return
        started = self.clock()
        if "weights" in tags:
            gevent.sleep(self.transfer_seconds(self.cfg.weights_gb, self.cfg.wake_bandwidth_gbps))
        self.asleep_tags -= tags
        if not self.asleep_tags:
            self.sleep_level = 0
            self.awake.set()
        self.last_wake_seconds = self.clock() - started
        log.info("wake_up %s done in %.3fs", sorted(tags), self.last_wake_seconds)
        self.update_segment()

    def reload_weights(self) -> None:
        gevent.sleep(self.transfer_seconds(self.cfg.weights_gb, self.cfg.disk_bandwidth_gbps))
        self.weights_valid = True

    def sglang_release(self, tags) -> None:
        self.counters["release_calls"] += 1
        tags = set(tags) if tags else set(SGLANG_TAGS)
        if self.running or self.waiting:
            crash("release_memory_occupation with requests running: AssertionError "
                  "self._is_no_request()")
        started = self.clock()
        self.awake.clear()
        gevent.sleep(self.transfer_seconds(self.cfg.weights_gb, self.cfg.wake_bandwidth_gbps)
                     if "weights" in tags else 0.01)
        if "weights" in tags and not self.cfg.weights_cpu_backup:
            self.weights_valid = False
        self.released |= tags
        self.last_sleep_seconds = self.clock() - started
        self.update_segment()

    def sglang_resume(self, tags) -> None:
        self.counters["resume_calls"] += 1
        tags = set(tags) if tags else set(SGLANG_TAGS)
        for tag in tags:
            if tag not in self.released:
                crash(f"resume_memory_occupation of tag {tag!r} that was not released: "
                      "KeyError in offload_tags.remove")
        started = self.clock()
        if "weights" in tags:
            gevent.sleep(self.transfer_seconds(self.cfg.weights_gb, self.cfg.wake_bandwidth_gbps))
        self.released -= tags
        if not self.released:
            self.awake.set()
        self.last_wake_seconds = self.clock() - started
        self.update_segment()
