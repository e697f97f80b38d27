"""What the controller holds for one model: its state and the facts its transitions keep."""
from __future__ import annotations

from typing import Optional

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from kvrouter.config.schema import Instance
from kvrouter.control.coordination import Lease
from kvrouter.control.states import State
from kvrouter.engines.adapters import EngineAdapter
from kvrouter.http.client import UpstreamPool


class ModelEntry:
    """One instance: state (changed only through ``Controller.set_state``), engine adapter,
    pool of connections to the engine, and the bookkeeping of its sleeps and wakes."""

    def __init__(self, inst: Instance, adapter: EngineAdapter, now: float):
        self.inst = inst
        self.name = inst.model
        self.adapter = adapter
        self.pool: UpstreamPool = adapter.pool
        self.state = State.STARTING
        self.since = now
        self.reason = "router started"
        self.ready = Event()
        self.waiters = 0
        self.info: dict = {}           # the engine's /v1/models card (max_model_len)
        self.poke = Event()            # wakes the health loop early
        self.changed = Event()         # set (and replaced) on every transition
        self.lock = Semaphore(1)       # one transition at a time
        self.level = inst.sleep_level  # sleep level in use (the engine may report another)
        self.sleep_manual = False
        self.slept_at: Optional[float] = None
        self.last_sleep_seconds: Optional[float] = None
        self.last_wake_seconds: Optional[float] = None
        self.wake_task: Optional[gevent.Greenlet] = None  # its value: a transitions.Result
        self.sleeps = 0
        self.wakes = 0
        self.restart_failures = 0
        self.next_restart_at = 0.0
        self.kv_pinned: Optional[int] = None  # a KV pool limit set by hand: the arbiter keeps it
        self.lease: Optional[Lease] = None   # held by this router's transition now
        self.fence_seen = 0                  # the highest lease token seen (cluster)
