"""What the policy sees of the lab's world: the same ``Snapshot`` the live controller
builds from its engines and traffic (``control/controller.py``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvrouter.control.kvplan import FLOOR_FRACTION
from kvrouter.control.policy import ModelView, Snapshot
from kvrouter.control.states import RESIDENT, State
from kvrouter.timing import GB
from kvrouter.traffic import arrival_gaps

if TYPE_CHECKING:
    from kvrouter.lab.world import World


def snapshot(world: "World") -> Snapshot:
    now = world.now
    views = []
    for e in world.engines.values():
        inst = e.inst
        wanted = 0.0
        if e.steerable:
            floor = e.ceiling * FLOOR_FRACTION
            kv = (max(e.kv_used(), floor) if e.state in RESIDENT else floor) / GB
            if e.queue:
                demand = e.kv_used() + sum(r.need for r in e.queue) * e.t.bytes_per_token
                wanted = max(0, demand - e.limit) / GB
        else:
            kv = world.declared_kv(e) / GB
        engine_load = e.in_flight - len(e.waiting)
        idle = 0.0 if e.in_flight else now - (e.last_end or 0.0)
        replica = inst.replica_of > 1
        if replica and e.state is State.READY:   # as the controller: not idle for
            idle = min(idle, now - e.since)       # longer than it has been awake
        views.append(ModelView(
            name=e.name, state=e.state, in_flight=engine_load, waiting=len(e.waiting),
            idle_seconds=idle,
            state_seconds=now - e.since, pinned=inst.sleep.pinned,
            idle_threshold=inst.idle_threshold_seconds, stop_after=inst.stop_after_seconds,
            level=e.level, gpus=e.gpus, weights_gb=e.t.weights_gb, kv_cache_gb=kv,
            last_used=e.last_end or 0.0, gaps=tuple(e.gaps),
            wake_seconds=e.last_wake_seconds or e.t.wake_seconds(e.level),
            arrival_gaps=arrival_gaps(e.arrivals), kv_wanted_gb=wanted,
            group=inst.model if replica else "",
            min_ready=inst.min_ready if inst.min_ready is not None else
            world.cfg.routing.min_ready, requests=e.requests,
            idle_arrivals=e.idle_arrivals, ttft_slo=inst.ttft_slo_seconds,
            ttfts=tuple(e.ttfts), reserved=e.making_room))
    recent, waited, late = world.wake_window.totals(now)
    return Snapshot(tuple(views), world.sm.auto_sleep_enabled, world.budget, recent, waited,
                    late)
