"""The controller: the one owner of every model's state.

It holds the entries, gates requests (``ensure_ready`` is the only way a request
waits for a model), runs the health and policy loops, and starts transitions
(``transitions.py``), which run one at a time per model under its lock. The state
shown is the state observed from the engine (``/is_sleeping``, health), not the
command sent. The allowed states and moves are in ``states.py``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional

import gevent
from gevent.event import Event

from kvrouter.config.schema import Config
from kvrouter.control import policies, policy, states
from kvrouter.control.coordination import Coordinator
from kvrouter.control.entry import ModelEntry
from kvrouter.control.events import EventLog
from kvrouter.control.kvsteer import KvSteering
from kvrouter.control.memo import StateFile
from kvrouter.control.nvml import Nvml
from kvrouter.control.process import ProcessControl
from kvrouter.control.states import ASLEEP, IN_TRANSITION, SETTLED, State, TransitionError
from kvrouter.control.transitions import Result, Transitions
from kvrouter.engines.adapters import EngineAdapter, adapter_for
from kvrouter.errors import ServiceUnavailable

log = logging.getLogger("kvrouter.controller")


class Controller:
    NOT_READY_POLL = 0.1
    READY_POLL = 2.0
    WAKE_GRACE = 1.0

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic,
                 adapter_factory: Callable[..., EngineAdapter] = adapter_for,
                 process: Optional[ProcessControl] = None, traffic=None, metrics=None):
        self.cfg = cfg
        self.clock = clock
        self.process = process or ProcessControl()
        self.traffic = traffic
        self.metrics = metrics
        self.adapter_factory = adapter_factory
        self.entries: Dict[str, ModelEntry] = {
            inst.key: ModelEntry(inst, adapter_factory(inst), clock()) for inst in cfg.instances}
        self.health_loops: Dict[str, gevent.Greenlet] = {}
        self.transitions = Transitions(self)
        self.events = EventLog()
        self.kv = KvSteering(self)
        self.nvml = Nvml()
        self.loops: List[gevent.Greenlet] = []
        self.memo = StateFile(cfg.router.state_file or (
            os.path.join(cfg.base_dir, ".kvrouter-state.json") if cfg.base_dir else None))
        # Read before any probe: an engine this router put to sleep before a restart may not
        # be able to say so (SGLang), and a generating health check would crash it.
        self.remembered: Dict[str, dict] = {}
        for entry in self.entries.values():
            memo = self.memo.get(entry.name)
            if isinstance(memo, dict) and memo.get("state") in ("sleeping", "stopped"):
                self.remembered[entry.name] = memo
                entry.adapter.mark_released()
                if memo.get("level") in entry.adapter.sleep_levels:
                    entry.level = memo["level"]
        self._asked_process_at: Dict[str, float] = {}
        self._policy: Optional[policies.Policy] = None
        self.policy_poke = Event()   # set by a reload
        self.coord = Coordinator()   # the other routers (kvrouter.cluster), or none

    # --- state ------------------------------------------------------------------------------
    def set_state(self, entry: ModelEntry, state: State, reason: str,
                  origin: Optional[str] = None) -> None:
        """The only place a model's state changes (checked against ``states.ALLOWED``, except
        a change another router made, ``origin``: it is what that router observed)."""
        if entry.state is state:
            entry.reason = reason
            return
        if origin is None:
            states.check(entry.state, state)
        log.info("%s: %s -> %s (%s)%s", entry.name, entry.state.value, state.value, reason,
                 f" [router {origin}]" if origin else "")
        self.events.publish(entry.name, entry.state.value, state.value, reason, origin)
        entry.state = state
        entry.since = self.clock()
        entry.reason = reason
        if state is State.READY:
            entry.ready.set()
        else:
            entry.ready.clear()
        changed, entry.changed = entry.changed, Event()
        changed.set()
        if state in SETTLED:
            # a model not adopted yet keeps what was remembered of it
            self.memo.save({e.name: self.remembered.get(e.name) if e.state is State.STARTING
                            and e.name in self.remembered else
                            {"state": e.state.value, "level": e.level}
                            for e in self.entries.values()})

    # --- requests ---------------------------------------------------------------------------
    def ensure_ready(self, entry: ModelEntry) -> float:
        """Return once the model can take a request (seconds waited), or raise 503.

        The first request for a sleeping or stopped model starts its wake; every later
        one waits on the same wake (single flight). Waiting is bounded in count
        (``router.max_queue_per_model``) and time.
        """
        if entry.state is State.READY:
            return 0.0
        router, sm = self.cfg.router, self.cfg.sleep_manager
        if entry.state in states.WAKEABLE:
            # a little past the wake's own deadline, so a hung wake reports its own failure
            timeout = sm.wake_timeout_seconds + sm.room_wait_seconds + self.WAKE_GRACE + (
                entry.inst.startup_timeout_seconds if entry.state is State.STOPPED else 0)
        else:
            timeout = router.ready_timeout_seconds
        if entry.waiters >= router.max_queue_per_model:
            raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} and "
                                    f"{entry.waiters} requests already wait for it")
        entry.waiters += 1
        started = self.clock()
        deadline = started + timeout
        watched: Optional[gevent.Greenlet] = None  # the wake this request waits on
        try:
            while entry.state is not State.READY:
                if watched is not None and watched.ready():
                    result: Optional[Result] = watched.value
                    if result is not None and not result.ok:
                        raise self._unavailable(entry, f"model {entry.name!r} could not wake: "
                                                f"{result.message}")
                    watched = None
                if entry.state in ASLEEP and watched is None:
                    if not sm.wakeup_on_request:
                        raise self._unavailable(
                            entry, f"model {entry.name!r} is {entry.state.value} and "
                            "wakeup_on_request is false; wake it with POST /model/wake/{model}")
                    watched = self.request_wake(entry, reason="request")
                elif entry.wake_task is not None and not entry.wake_task.ready():
                    watched = entry.wake_task
                left = deadline - self.clock()
                if left <= 0:
                    raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} "
                                            f"({entry.reason}); not ready within {timeout:g}s")
                # only objects that are not ready yet: a finished one would return at once
                gevent.wait([entry.ready, entry.changed] + ([watched] if watched else []),
                            timeout=left, count=1)
        finally:
            entry.waiters -= 1
        return self.clock() - started

    def _unavailable(self, entry: ModelEntry, message: str) -> ServiceUnavailable:
        if entry.state in (State.SLEEPING, State.WAKING, State.DRAINING) and \
                entry.last_wake_seconds:
            retry = max(1, int(entry.last_wake_seconds + 0.999))
        elif entry.state in (State.STARTING, State.STOPPED, State.FAILED):
            retry = 10
        else:
            retry = 2
        return ServiceUnavailable(message, code="model_not_ready",
                                  headers={"Retry-After": str(retry)})

    def apply_remote(self, entry: ModelEntry, state: State, reason: str, level: Optional[int],
                     origin: str) -> None:
        """Another router changed the model's state (it holds the model's lease): take it,
        with what it means for the engine's memory."""
        if state is entry.state:
            return
        if level in entry.adapter.sleep_levels:
            entry.level = level
        if state in ASLEEP and entry.state not in ASLEEP:
            entry.slept_at = self.clock()
        if state is State.SLEEPING:
            entry.adapter.mark_released()
        elif state is State.READY:
            entry.adapter.process_started()
            entry.slept_at = None
        elif state is State.STOPPED:
            entry.pool.close_idle()
        self.set_state(entry, state, reason, origin=origin)

    def upstream_failed(self, entry: ModelEntry, reason: str) -> None:
        """A request could not reach the engine: it is not ready until a probe says so."""
        if entry.state is State.READY:
            self.set_state(entry, State.FAILED, reason)
        entry.poke.set()

    # --- replicas (the proxy's view) ---------------------------------------------------------
    def is_ready(self, entry: ModelEntry) -> bool:
        return entry.state is State.READY

    def load(self, entry: ModelEntry) -> int:
        """Requests in flight on the engine: this router's (its workers') and its peers'."""
        return self.traffic.in_flight(entry.name) if self.traffic is not None else 0

    def scale(self, group, chooser=None) -> None:
        """Elastic replicas, on each request for a model with several: wake one more when
        fewer than ``min_ready`` are ready or the ready ones are loaded past
        ``routing.wake_at_in_flight`` each (the request itself goes to a ready one)."""
        if not self.cfg.sleep_manager.wakeup_on_request:
            return
        entries = group.entries
        i = policy.wake_for_load([e.state for e in entries], [self.load(e) for e in entries],
                                 group.min_ready, self.cfg.routing.wake_at_in_flight)
        if i is not None:
            ready = sum(1 for e in entries if e.state is State.READY)
            why = "min_ready" if ready < group.min_ready else "load"
            self.request_wake(entries[i], reason=f"{why}: {ready} of {len(entries)} replicas "
                              f"of {group.model} ready")

    def breaker_moved(self, group, entry: ModelEntry, old, new, reason: str) -> None:
        """A replica's breaker moved (the proxy ejected it or let it back): on /events."""
        self.events.publish(entry.name, f"breaker {old.value}", f"breaker {new.value}",
                            reason, state=False)

    def in_flight(self, entry: ModelEntry) -> int:
        """Requests being served by the engine (those waiting in ensure_ready excluded)."""
        if self.traffic is None:
            return 0
        return max(0, self.traffic.in_flight(entry.name) - entry.waiters)

    # --- transitions (the admin API and the policy) -------------------------------------------
    def sleep(self, entry: ModelEntry, level: Optional[int] = None, manual: bool = True,
              reason: str = "manual") -> State:
        """Drain and put a READY model to sleep. Raises TransitionError when it cannot."""
        result = self.transitions.sleep(entry, level, manual, reason)
        if not result.ok:
            raise TransitionError(result.message)
        return entry.state

    def renew(self, entry: ModelEntry, reason: str = "new command line") -> State:
        """Drain the model, then restart its engine with the process manager's new
        definition. Raises TransitionError when it cannot."""
        result = self.transitions.renew(entry, reason)
        if not result.ok:
            raise TransitionError(result.message)
        return entry.state

    def request_wake(self, entry: ModelEntry, reason: str) -> gevent.Greenlet:
        """Start the wake unless one runs (single flight). The greenlet's value is a Result."""
        task = entry.wake_task
        if task is None or task.ready():
            task = entry.wake_task = gevent.spawn(self.transitions.wake, entry, reason)
        return task

    def wake(self, entry: ModelEntry, manual: bool = True) -> State:
        """Manual or policy wake: honours min_sleep_duration (requests never do)."""
        if entry.state not in ASLEEP:
            raise TransitionError(f"model {entry.name!r} is {entry.state.value}, not sleeping")
        asleep_for = self.clock() - (entry.slept_at or 0)
        min_sleep = self.cfg.sleep_manager.min_sleep_duration
        if entry.slept_at is not None and asleep_for < min_sleep:
            raise TransitionError(
                f"model {entry.name!r} has slept {asleep_for:.1f}s, less than "
                f"sleep_manager.min_sleep_duration ({min_sleep:g}s): a manual wake is allowed "
                f"in {min_sleep - asleep_for:.1f}s; a request to the model wakes it now")
        result = self.request_wake(entry, reason="manual wake" if manual else "policy").get()
        if not result.ok:
            raise TransitionError(result.message)
        return entry.state

    # --- observation ----------------------------------------------------------------------------
    def _adopt(self, entry: ModelEntry, why: str) -> None:
        """The engine answers: is it asleep? (after a router restart, or an engine restart)."""
        adapter = entry.adapter
        adapter.refresh_version()
        if not entry.info:
            entry.info = adapter.model_info()
        asleep = adapter.is_sleeping()
        if asleep is None and entry.state is State.STARTING and entry.name in self.remembered:
            asleep = True  # the engine cannot say (SGLang): what this router did before
        if asleep:
            entry.level = adapter.observed_level() or entry.level
            self.set_state(entry, State.SLEEPING, f"{why}: engine reports it is asleep")
            if entry.waiters:
                self.request_wake(entry, reason="requests waiting")
        else:
            self.set_state(entry, State.READY, why)

    def _probe_once(self, entry: ModelEntry) -> None:
        state = entry.state
        if state in IN_TRANSITION or entry.lock.locked():
            return  # a transition owns the model now
        if state is State.READY and entry.adapter.is_sleeping():
            # put to sleep (or released) by someone else: requests must wait for a wake
            entry.level = entry.adapter.observed_level() or entry.level
            entry.sleep_manual, entry.slept_at = True, self.clock()
            self.set_state(entry, State.SLEEPING, "the engine reports it was put to sleep "
                           "outside kvrouter")
            return
        released = True if state is State.SLEEPING else False if state is State.READY else None
        ok = entry.adapter.probe(memory_released=released)
        if ok and state in (State.STARTING, State.FAILED):
            self._adopt(entry, "health check passed")
        elif ok and state is State.STOPPED:
            self._adopt(entry, "engine started outside kvrouter")
        elif not ok and state in (State.READY, State.SLEEPING):
            self.set_state(entry, State.FAILED, "health check failed")
        elif ok and not entry.info:
            # taken from another router (cluster): this router has not asked the engine yet
            entry.adapter.refresh_version()
            entry.info = entry.adapter.model_info()
        elif not ok and state is State.STARTING and self._engine_stopped(entry):
            # e.g. deep sleep before a router restart: a request starts it again
            self.set_state(entry, State.STOPPED, f"the engine is not running "
                           f"({self.process.kind} reports it stopped)")

    def _engine_stopped(self, entry: ModelEntry) -> bool:
        """The process manager says the engine is not running (asked at most once a second)."""
        now = self.clock()
        if now - self._asked_process_at.get(entry.name, -1e9) < 1.0:
            return False
        self._asked_process_at[entry.name] = now
        return self.process.is_running(entry.inst) is False

    def health_loop(self, entry: ModelEntry) -> None:
        while True:
            try:
                self._probe_once(entry)
            except Exception:
                log.exception("%s: health probe error", entry.name)
            interval = self.READY_POLL if entry.state in SETTLED else self.NOT_READY_POLL
            entry.poke.clear()
            entry.poke.wait(timeout=interval)

    # --- policy -----------------------------------------------------------------------------------
    @property
    def sleep_policy(self) -> policies.Policy:
        """The policy in force (``sleep_manager.policy``; a reload may change it)."""
        name = self.cfg.sleep_manager.policy
        if self._policy is None or self._policy.label != name:
            self._policy = policies.get(name)
        return self._policy

    def snapshot(self) -> policy.Snapshot:
        sm = self.cfg.sleep_manager
        now = self.clock()
        views = []
        for e in self.entries.values():
            t = self.traffic.models[e.name] if self.traffic is not None else None
            idle = self.traffic.idle_seconds(e.name) if self.traffic is not None else 0.0
            elsewhere = self.coord.peers_idle_seconds(e.name)
            if elsewhere is not None:   # idle only when idle on every router
                idle = min(idle, elsewhere)
            if e.state is State.READY and e.inst.replica_of > 1:
                # a replica is not idle for longer than it has been awake (one just woken
                # for load has not had its first request yet)
                idle = min(idle, now - e.since)
            inst = e.inst
            last = (t.last_end_mono if t is not None and t.last_end_mono is not None
                    else (t.created_mono if t is not None else 0.0))
            views.append(policy.ModelView(
                name=e.name, state=e.state,
                in_flight=self.traffic.in_flight(e.name) if self.traffic is not None else 0,
                waiting=e.waiters + self.coord.peers_waiting(e.name), idle_seconds=idle,
                state_seconds=now - e.since,
                pinned=inst.sleep.pinned, idle_threshold=inst.idle_threshold_seconds,
                stop_after=inst.stop_after_seconds, level=inst.sleep_level,
                gpus=tuple((inst.gpus or "0").split(",")),
                weights_gb=inst.weights_gb or 0.0, kv_cache_gb=self.kv.policy_kv_gb(e),
                last_used=last, gaps=tuple(t.gaps) if t is not None else (),
                wake_seconds=e.last_wake_seconds or e.inst.timing.wake_seconds(e.level),
                arrival_gaps=self.traffic.arrival_gaps(e.name) if self.traffic is not None else (),
                kv_wanted_gb=self.kv.wanted_gb.get(e.name, 0.0),
                group=e.model if inst.replica_of > 1 else "",
                reserved=e.making_room,
                min_ready=inst.min_ready if inst.min_ready is not None else
                self.cfg.routing.min_ready,
                requests=t.arrived if t is not None else 0,
                idle_arrivals=t.idle_arrivals if t is not None else 0,
                ttft_slo=inst.ttft_slo_seconds,
                ttfts=self.traffic.served_ttfts(e.name) if self.traffic is not None else ()))
        recent, waited, late = self.traffic.wakes.totals(now) if self.traffic is not None \
            else (0, 0, 0)
        return policy.Snapshot(tuple(views), sm.auto_sleep_enabled, dict(sm.gpu_memory_gb),
                               recent, waited, late)

    def tick(self) -> List[policy.Action]:
        """Apply the policy once (the policy loop calls this every check interval)."""
        snap = self.snapshot()
        actions = [a for a in policy.keep_min_ready(snap, self.sleep_policy.decide(snap))
                   if self.coord.decides(a.model)]   # in a cluster: the models it decides
        for action in actions:
            entry = self.entries[action.model]
            if action.kind == "stop" and not self.process.can_control(entry.inst):
                continue
            gevent.spawn(self._apply, entry, action)
        return actions

    def _apply(self, entry: ModelEntry, action: policy.Action) -> None:
        if action.kind == "sleep":
            result = self.transitions.sleep(entry, action.level, manual=False,
                                            reason=f"auto: {action.reason}")
        else:
            result = self.transitions.stop(entry, f"deep sleep: {action.reason}")
        if not result.ok:
            log.info("%s: %s skipped: %s", entry.name, action.kind, result.message)

    def _policy_loop(self) -> None:
        while True:
            # a reload pokes it: a new check interval applies now, not after the old one
            self.policy_poke.wait(
                timeout=self.sleep_policy.interval(self.cfg.sleep_manager.check_interval_seconds))
            if self.policy_poke.is_set():
                self.policy_poke.clear()
                continue
            if not self.coord.decides():
                continue   # another router (the leader) makes the sleep decisions
            try:
                self.tick()
            except Exception:
                log.exception("policy tick failed")

    def start(self) -> None:
        for entry in self.entries.values():
            self.health_loops[entry.name] = gevent.spawn(self.health_loop, entry)
        self.loops.append(gevent.spawn(self._policy_loop))
        self.loops.append(gevent.spawn(self.kv.loop))

    def stop_loops(self) -> None:
        gevent.killall(self.loops + list(self.health_loops.values()), block=False)
        self.loops, self.health_loops = [], {}
