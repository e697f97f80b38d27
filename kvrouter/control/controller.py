"""The controller: one owner of every model's state; ``ensure_ready`` is how a request waits.

This module holds readiness (STARTING -> READY, READY -> FAILED -> READY) from
polling the engines. A request for a model that is not ready waits, bounded by
the queue length and ``router.ready_timeout_seconds``, then gets 503 with
Retry-After.
"""
from __future__ import annotations

import enum
import logging
import time
from typing import Callable, Dict, Optional

import gevent
from gevent.event import Event

from kvrouter.config.schema import Config, Instance
from kvrouter.engines.adapters import EngineAdapter, adapter_for
from kvrouter.errors import ApiError
from kvrouter.router.upstream import UpstreamPool

log = logging.getLogger("kvrouter.controller")


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPED = "stopped"
    FAILED = "failed"


class ModelEntry:
    """Everything the router holds for one instance."""

    def __init__(self, inst: Instance, pool: UpstreamPool, adapter: EngineAdapter, now: float):
        self.inst = inst
        self.name = inst.model
        self.pool = pool
        self.adapter = adapter
        self.state = State.STARTING
        self.since = now
        self.reason = "router started"
        self.ready = Event()
        self.waiters = 0
        self.info: dict = {}
        self.ever_ready = False
        self.poke = Event()  # wakes the health loop early (e.g. after a connection failure)


class Controller:
    NOT_READY_POLL = 0.1
    READY_POLL = 2.0

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic,
                 adapter_factory: Callable = adapter_for):
        self.cfg = cfg
        self.clock = clock
        self.entries: Dict[str, ModelEntry] = {}
        for inst in cfg.instances:
            adapter = adapter_factory(inst)
            self.entries[inst.model] = ModelEntry(inst, adapter.pool, adapter, clock())
        self._loops = []

    # --- state ------------------------------------------------------------------------------
    def set_state(self, entry: ModelEntry, state: State, reason: str) -> None:
        if entry.state is state:
            return
        log.info("%s: %s -> %s (%s)", entry.name, entry.state.value, state.value, reason)
        entry.state = state
        entry.since = self.clock()
        entry.reason = reason
        if state is State.READY:
            entry.ever_ready = True
            entry.ready.set()
        else:
            entry.ready.clear()

    # --- requests ---------------------------------------------------------------------------
    def ensure_ready(self, entry: ModelEntry) -> float:
        """Return once the model can take a request (seconds waited), or raise ApiError 503."""
        if entry.state is State.READY:
            return 0.0
        router = self.cfg.router
        if entry.waiters >= router.max_queue_per_model:
            raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} and "
                                    f"{entry.waiters} requests already wait for it")
        entry.waiters += 1
        started = self.clock()
        try:
            if not entry.ready.wait(timeout=router.ready_timeout_seconds):
                raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} "
                                        f"({entry.reason}); not ready within "
                                        f"{router.ready_timeout_seconds:g}s")
        finally:
            entry.waiters -= 1
        return self.clock() - started

    def _unavailable(self, entry: ModelEntry, message: str) -> ApiError:
        retry = 5 if entry.state in (State.STARTING, State.FAILED) else 2
        return ApiError(503, message, "service_unavailable", "model_not_ready",
                        headers={"Retry-After": str(retry)})

    def upstream_failed(self, entry: ModelEntry, reason: str) -> None:
        """A request could not reach the engine: it is not ready until a probe says so."""
        if entry.state is State.READY:
            self.set_state(entry, State.FAILED, reason)
        entry.poke.set()

    # --- health loops -------------------------------------------------------------------------
    def _probe_once(self, entry: ModelEntry) -> None:
        ok = entry.adapter.probe(memory_released=False)
        if ok and entry.state in (State.STARTING, State.FAILED):
            if not entry.info:
                entry.info = entry.adapter.model_info()
            self.set_state(entry, State.READY, "health check passed")
        elif not ok and entry.state is State.READY:
            self.set_state(entry, State.FAILED, "health check failed")

    def _loop(self, entry: ModelEntry) -> None:
        while True:
            try:
                self._probe_once(entry)
            except Exception:  # noqa: BLE001 - keep probing whatever happens
                log.exception("%s: health probe error", entry.name)
            interval = self.READY_POLL if entry.state is State.READY else self.NOT_READY_POLL
            entry.poke.clear()
            entry.poke.wait(timeout=interval)

    def start(self) -> None:
        for entry in self.entries.values():
            self._loops.append(gevent.spawn(self._loop, entry))

    def stop(self) -> None:
        gevent.killall(self._loops, block=False)
        self._loops = []

    def get(self, name: str) -> Optional[ModelEntry]:
        return self.entries.get(name)
