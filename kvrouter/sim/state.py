"""The simulated engine's state: sleep and memory, request slots, counters, kvcached segment."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Set

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from kvrouter import kvpool
from kvrouter.sim.options import SimConfig
from kvrouter.sim.prefix_cache import PrefixCache

log = logging.getLogger("kvrouter.sim")
GB = 1024 ** 3
SGLANG_TAGS = ("weights", "kv_cache", "cuda_graph")


def crash(reason: str) -> None:
    """What a real engine does on these bugs: the process dies."""
    log.error("engine crashed: %s", reason)
    logging.shutdown()
    os._exit(70)


class KvcachedSegment:
    """The engine's kvcached pool (``kvrouter.kvpool``): one segment per KV group (group N > 0
    at ``<name>_g<N>``, as kvcached 0.1.6 does for SGLang's hybrid models), created at start
    with kv_cache_gb divided among them as their limits; the engine writes its usage (spread
    over the groups) and reads back the limits, which kvrouter or ``kvctl`` may change
    while it runs. ``limit`` is the whole pool's."""

    RESERVE = 5 * 2 * 1024 ** 2  # kvcached's default: 5 reserved 2 MiB pages, ahead of use

    def __init__(self, name: str, total_bytes: int, folder: str = kvpool.SHM_DIR,
                 groups: int = 1):
        self.paths = [kvpool.segment_path(name, g, folder=folder) for g in range(groups)]
        self.path = self.paths[0]
        self.limit = sum(kvpool.create(p, total_bytes // groups).total for p in self.paths)

    def report(self, used: int) -> int:
        """Write ``used`` (and what is preallocated); return the current limit."""
        n = len(self.paths)
        prealloc = max(0, min(self.RESERVE, self.limit - used))
        self.limit = sum(kvpool.report_usage(p, used // n, prealloc // n).total
                         for p in self.paths)
        return self.limit

    def refresh(self) -> int:
        infos = [kvpool.read(p) for p in self.paths]
        if all(i is not None for i in infos):
            self.limit = sum(i.total for i in infos if i is not None)
        return self.limit

    def close(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass


class EngineState:
    def __init__(self, cfg: SimConfig, clock=time.monotonic):
        self.cfg = cfg
        self.timing = cfg.timing
        self.clock = clock
        self.started_at = time.time()
        self.ready_at = clock() + (cfg.startup_seconds if cfg.dialect == "sglang" else 0.0)
        self.dead = False
        self.refuse_status = 0   # /sim/fail?status=N: generations answer N, health passes
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
                         "release_calls": 0, "resume_calls": 0, "upload_bytes": 0,
                         "realtime_sessions": 0}
        self.last_sleep_seconds = 0.0
        self.last_wake_seconds = 0.0
        self.segment: Optional[KvcachedSegment] = None
        self.prefix = PrefixCache(cfg.block_size, 0) if not cfg.no_prefix_caching else None

    def prefix_capacity_blocks(self) -> int:
        """Blocks the prefix cache may keep: the KV pool less what running requests hold."""
        free = max(0, self.kv_capacity_tokens() - self.tokens_in_flight)
        return free // self.cfg.block_size

    def forget_prefixes(self) -> None:
        """The KV cache was freed (a sleep, released memory): nothing stays cached."""
        if self.prefix is not None:
            self.prefix.clear()

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

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token holds: kv_cache_gb fits 8 sequences of max_model_len."""
        return self.timing.bytes_per_token

    def kv_limit_bytes(self) -> int:
        """The KV pool's size: the kvcached segment's limit when there is one."""
        if self.segment is not None:
            return self.segment.limit
        return int(self.cfg.kv_cache_gb * GB)

    def kv_capacity_tokens(self) -> int:
        return self.timing.capacity_tokens(self.kv_limit_bytes())

    def kv_used_bytes(self) -> int:
        return min(self.kv_limit_bytes(), self.tokens_in_flight * self.kv_bytes_per_token) \
            if self.segment is None else self.tokens_in_flight * self.kv_bytes_per_token

    def gpu_memory_bytes(self) -> int:
        used = 0
        if self.weights_resident:
            used += int(self.cfg.weights_gb * GB)
        if self.kv_resident:
            # with kvcached the pool maps pages as they are used (plus a small reserve)
            used += (self.kv_used_bytes() + KvcachedSegment.RESERVE if self.segment is not None
                     else int(self.cfg.kv_cache_gb * GB))
        return used

    def update_segment(self) -> None:
        if self.segment is not None:
            self.segment.report(self.kv_used_bytes())

    def kv_usage(self) -> float:
        total = self.kv_limit_bytes()
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
        gevent.sleep(self.timing.sleep_seconds(level))
        self.sleep_level = level
        self.asleep_tags = {"weights", "kv_cache"}
        self.forget_prefixes()
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
            gevent.sleep(self.timing.offload_seconds())
        self.asleep_tags -= tags
        if not self.asleep_tags:
            self.sleep_level = 0
            self.awake.set()
        self.last_wake_seconds = self.clock() - started
        log.info("wake_up %s done in %.3fs", sorted(tags), self.last_wake_seconds)
        self.update_segment()

    def reload_weights(self) -> None:
        gevent.sleep(self.timing.reload_seconds())
        self.weights_valid = True

    def sglang_release(self, tags) -> None:
        self.counters["release_calls"] += 1
        tags = set(tags) if tags else set(SGLANG_TAGS)
        if self.running or self.waiting:
            crash("release_memory_occupation with requests running: AssertionError "
                  "self._is_no_request()")
        started = self.clock()
        self.awake.clear()
        gevent.sleep(self.timing.offload_seconds() if "weights" in tags else 0.01)
        if "weights" in tags and not self.cfg.weights_cpu_backup:
            self.weights_valid = False
        self.released |= tags
        if "kv_cache" in tags:
            self.forget_prefixes()
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
            gevent.sleep(self.timing.offload_seconds())
        self.released -= tags
        if not self.released:
            self.awake.set()
        self.last_wake_seconds = self.clock() - started
        self.update_segment()
