"""What the controller holds for one engine (its state and the facts its transitions keep),
and for one model: its replicas, as the proxy routes among them."""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from kvrouter.config.schema import Instance, RoutingConfig
from kvrouter.control import routing
from kvrouter.control.coordination import Lease
from kvrouter.control.ejection import Ejection, EjectionConfig
from kvrouter.control.states import State
from kvrouter.engines.adapters import EngineAdapter
from kvrouter.http.client import UpstreamPool


class ModelEntry:
    """One instance: state (changed only through ``Controller.set_state``), engine adapter,
    pool of connections to the engine, and the bookkeeping of its sleeps and wakes."""

    def __init__(self, inst: Instance, adapter: EngineAdapter, now: float):
        self.inst = inst
        self.name = inst.key or inst.model   # the model, or this replica's instance name
        self.model = inst.model
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
        self.making_room = False   # its room is planned, it is not WAKING yet: memory spoken for
        self.sleeps = 0
        self.wakes = 0
        self.restart_failures = 0
        self.next_restart_at = 0.0
        self.kv_pinned: Optional[int] = None  # a KV pool limit set by hand: the arbiter keeps it
        self.lease: Optional[Lease] = None   # held by this router's transition now
        self.fence_seen = 0                  # the highest lease token seen (cluster)


class ModelGroup:
    """One model as clients see it: its replicas in a fixed order (a routing policy's
    ``replica`` is a position here), the policy that spreads requests over them, and each
    replica's breaker. A model with one engine is a group of one: one code path."""

    def __init__(self, entries: Sequence[ModelEntry], cfg: RoutingConfig,
                 rng: Optional[random.Random] = None):
        self.settings = cfg
        self.take(entries)
        first = self.entries[0].inst
        self.model = first.model
        self.policy_name = first.routing_policy or cfg.policy
        self.policy = routing.from_settings(self.policy_name, cfg)
        self.rng = rng or random.Random()
        self.ejection_cfg = EjectionConfig(failure_threshold=cfg.eject_after_failures,
                                           base_seconds=cfg.eject_seconds,
                                           cap_seconds=max(60.0, cfg.eject_seconds))
        self.ejections: Dict[str, Ejection] = {e.name: Ejection() for e in self.entries}

    @property
    def keys(self) -> List[str]:
        return [e.name for e in self.entries]

    def same_shape(self, entries: Sequence[ModelEntry], cfg: RoutingConfig) -> bool:
        """A reload left the replicas and routing settings as they were (keep what the
        policy learned)."""
        first = entries[0].inst
        return [e.name for e in entries] == self.keys and cfg == self.settings and \
            (first.routing_policy or cfg.policy) == self.policy_name

    def take(self, entries: Sequence[ModelEntry]) -> None:
        """These engines (a reload's, with their instances' settings) from now on."""
        self.entries: List[ModelEntry] = list(entries)
        first = self.entries[0].inst
        self.route_names = first.route_names
        self.upstream_model = first.upstream_model
        self.min_ready = first.min_ready if first.min_ready is not None else \
            self.settings.min_ready
