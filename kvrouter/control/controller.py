"""The controller: the one owner of every model's state.

Requests wait through ``ensure_ready`` only. Transitions (sleep, wake, stop,
start) run one at a time per model under its lock; the state shown is the
state observed from the engine (``/is_sleeping``, health), not the command sent.

    STARTING --ready--> READY --idle--> DRAINING --> SLEEPING --request/wake--> WAKING --warm-up--> READY
       ^                  |                             |                         |
       |                  +------ engine died --> FAILED <-------- wake failed ---+
       +-- process manager starts -- STOPPED <-- long asleep (deep sleep)
"""
from __future__ import annotations

import enum
import logging
import os
import time
from typing import Callable, Dict, List, Optional

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from kvrouter.config.schema import Config, Instance
from kvrouter.control import policy
from kvrouter.control.memo import StateFile
from kvrouter.control.process import ProcessControl, ProcessControlError
from kvrouter.engines.adapters import EngineAdapter, EngineError, adapter_for
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


class TransitionError(Exception):
    """A sleep or wake that cannot happen now (HTTP 409) or failed."""


class ModelEntry:
    """Everything the router holds for one instance."""

    def __init__(self, inst: Instance, pool: UpstreamPool, adapter: EngineAdapter, now: float,
                 level: int):
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
        self.poke = Event()            # wakes the health loop early
        self.changed = Event()         # set (and replaced) on every transition
        self.lock = Semaphore(1)       # one transition at a time
        self.level = level             # sleep level in use
        self.sleep_manual = False
        self.slept_at: Optional[float] = None
        self.last_sleep_seconds: Optional[float] = None
        self.last_wake_seconds: Optional[float] = None
        self.wake_task: Optional[gevent.Greenlet] = None
        self.wake_error: Optional[str] = None
        self.sleeps = 0
        self.wakes = 0
        self.restart_failures = 0
        self.next_restart_at = 0.0


class Controller:
    NOT_READY_POLL = 0.1
    READY_POLL = 2.0
    DRAIN_TIMEOUT = 60.0

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic,
                 adapter_factory: Callable = adapter_for,
                 process: Optional[ProcessControl] = None, traffic=None, metrics=None):
        self.cfg = cfg
        self.clock = clock
        self.process = process or ProcessControl()
        self.traffic = traffic
        self.metrics = metrics
        self.entries: Dict[str, ModelEntry] = {}
        sm = cfg.sleep_manager
        for inst in cfg.instances:
            adapter = adapter_factory(inst)
            level = inst.sleep.level or sm.level
            self.entries[inst.model] = ModelEntry(inst, adapter.pool, adapter, clock(), level)
        self._loops: List[gevent.Greenlet] = []
        self.memo = StateFile(cfg.router.state_file or (
            os.path.join(cfg.base_dir, ".kvrouter-state.json") if cfg.base_dir else None))

    # --- state ------------------------------------------------------------------------------
    def set_state(self, entry: ModelEntry, state: State, reason: str) -> None:
        if entry.state is state:
            entry.reason = reason
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
        changed, entry.changed = entry.changed, Event()
        changed.set()
        if state in (State.READY, State.SLEEPING, State.STOPPED):
            self._persist()

    def _persist(self) -> None:
        self.memo.save({e.name: {"state": e.state.value, "level": e.level}
                        for e in self.entries.values()})

    def _record(self, entry: ModelEntry, action: str, ok: bool, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.transition(entry.name, action, ok, seconds)

    # --- requests ---------------------------------------------------------------------------
    def ensure_ready(self, entry: ModelEntry) -> float:
        """Return once the model can take a request (seconds waited), or raise ApiError 503.

        The first request for a sleeping or stopped model starts its wake; every later
        one waits on the same event (single flight). Waiting is bounded in count
        (``router.max_queue_per_model``) and time.
        """
        if entry.state is State.READY:
            return 0.0
        router, sm = self.cfg.router, self.cfg.sleep_manager
        if entry.state in (State.SLEEPING, State.STOPPED, State.DRAINING, State.WAKING):
            if not sm.wakeup_on_request and entry.state in (State.SLEEPING, State.STOPPED):
                raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} and "
                                        "wakeup_on_request is false; wake it with POST "
                                        "/model/wake/{model}")
            timeout = sm.wake_timeout_seconds + (entry.inst.startup_timeout_seconds
                                                 if entry.state is State.STOPPED else 0)
        else:
            timeout = router.ready_timeout_seconds
        if entry.waiters >= router.max_queue_per_model:
            raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} and "
                                    f"{entry.waiters} requests already wait for it")
        entry.waiters += 1
        started = self.clock()
        try:
            if entry.state in (State.SLEEPING, State.STOPPED):
                self.request_wake(entry, reason="request")
            deadline = started + timeout
            watched = None  # the wake this request waits on
            while entry.state is not State.READY:
                task = entry.wake_task
                running = task is not None and not task.ready()
                if running:
                    watched = task
                elif watched is not None and entry.wake_error:
                    raise self._unavailable(entry, f"model {entry.name!r} failed to wake: "
                                            f"{entry.wake_error}")
                left = deadline - self.clock()
                if left <= 0:
                    raise self._unavailable(entry, f"model {entry.name!r} is {entry.state.value} "
                                            f"({entry.reason}); not ready within {timeout:g}s")
                # only objects that are not ready yet: a finished one would return at once
                gevent.wait([entry.ready, entry.changed] + ([task] if running else []),
                            timeout=left, count=1)
                if entry.state in (State.SLEEPING, State.STOPPED) and (
                        entry.wake_task is None or entry.wake_task.ready()):
                    self.request_wake(entry, reason="request")  # a sleep finished meanwhile
        finally:
            entry.waiters -= 1
        return self.clock() - started

    def _unavailable(self, entry: ModelEntry, message: str) -> ApiError:
        if entry.state in (State.SLEEPING, State.WAKING, State.DRAINING) and \
                entry.last_wake_seconds:
            retry = max(1, int(entry.last_wake_seconds + 0.999))
        elif entry.state in (State.STARTING, State.STOPPED, State.FAILED):
            retry = 10
        else:
            retry = 2
        return ApiError(503, message, "service_unavailable", "model_not_ready",
                        headers={"Retry-After": str(retry)})

    def upstream_failed(self, entry: ModelEntry, reason: str) -> None:
        """A request could not reach the engine: it is not ready until a probe says so."""
        if entry.state is State.READY:
            self.set_state(entry, State.FAILED, reason)
        entry.poke.set()

    # --- sleep --------------------------------------------------------------------------------
    def in_flight(self, entry: ModelEntry) -> int:
        """Requests being served by the engine (those waiting in ensure_ready excluded)."""
        if self.traffic is None:
            return 0
        return max(0, self.traffic.models[entry.name].in_flight - entry.waiters)

    def sleep(self, entry: ModelEntry, level: Optional[int] = None, manual: bool = True,
              reason: str = "manual") -> State:
        """Drain and put a READY model to sleep. Raises TransitionError when it cannot."""
        level = level or entry.level
        if level == 2 and entry.adapter.dialect == "vllm" and entry.adapter.version and \
                not entry.adapter.supports_level2():
            raise TransitionError(f"vLLM {'.'.join(map(str, entry.adapter.version))} cannot "
                                  "reload weights over HTTP (needs >= 0.10.2): use level 1")
        with entry.lock:
            if entry.state is not State.READY:
                raise TransitionError(f"model {entry.name!r} is {entry.state.value}, not ready")
            if entry.inst.sleep.pinned and not manual:
                raise TransitionError(f"model {entry.name!r} is pinned")
            self.set_state(entry, State.DRAINING, reason)
            started = self.clock()
            try:
                deadline = started + self.DRAIN_TIMEOUT
                while self.in_flight(entry) > 0:
                    if not manual:
                        raise TransitionError("a request arrived while draining")
                    if self.clock() > deadline:
                        raise TransitionError("requests still in flight after "
                                              f"{self.DRAIN_TIMEOUT:g}s")
                    gevent.sleep(0.02)
                if not manual and entry.waiters:
                    raise TransitionError("a request arrived while draining")
                if not entry.adapter.wait_idle(10.0):
                    raise TransitionError("the engine still reports requests running")
                entry.adapter.sleep(level)
            except (TransitionError, EngineError) as err:
                self.set_state(entry, State.READY, f"sleep cancelled: {err}")
                self._record(entry, "sleep", False, self.clock() - started)
                raise TransitionError(str(err)) from None
            except BaseException:
                self.set_state(entry, State.READY, "sleep interrupted")
                raise
            entry.level = level
            entry.sleep_manual = manual
            entry.slept_at = self.clock()
            entry.last_sleep_seconds = entry.slept_at - started
            entry.sleeps += 1
            self._record(entry, "sleep", True, entry.last_sleep_seconds)
            self.set_state(entry, State.SLEEPING, f"{reason}; level {level}, took "
                           f"{entry.last_sleep_seconds:.3f}s")
        if entry.waiters:
            self.request_wake(entry, reason="requests arrived while it went to sleep")
        return entry.state

    def stop(self, entry: ModelEntry, reason: str) -> State:
        """Deep sleep: stop the engine process through the process manager."""
        with entry.lock:
            if entry.state is not State.SLEEPING:
                raise TransitionError(f"model {entry.name!r} is {entry.state.value}")
            try:
                self.process.stop(entry.inst)
            except ProcessControlError as err:
                raise TransitionError(str(err)) from None
            entry.pool.close_idle()
            self._record(entry, "stop", True, 0.0)
            self.set_state(entry, State.STOPPED, reason)
        if entry.waiters:
            self.request_wake(entry, reason="requests arrived while it stopped")
        return entry.state

    # --- wake ---------------------------------------------------------------------------------
    def request_wake(self, entry: ModelEntry, reason: str) -> gevent.Greenlet:
        """Start the wake unless one runs (single flight)."""
        task = entry.wake_task
        if task is None or task.ready():
            entry.wake_error = None
            task = entry.wake_task = gevent.spawn(self._wake, entry, reason)
        return task

    def wake(self, entry: ModelEntry, manual: bool = True) -> State:
        """Manual or policy wake: honours min_sleep_duration (requests never do)."""
        if entry.state not in (State.SLEEPING, State.STOPPED):
            raise TransitionError(f"model {entry.name!r} is {entry.state.value}, not sleeping")
        asleep_for = self.clock() - (entry.slept_at or 0)
        min_sleep = self.cfg.sleep_manager.min_sleep_duration
        if entry.slept_at is not None and asleep_for < min_sleep:
            raise TransitionError(f"model {entry.name!r} has slept {asleep_for:.1f}s, less than "
                                  f"min_sleep_duration {min_sleep:g}s")
        task = self.request_wake(entry, reason="manual wake" if manual else "policy")
        task.join()
        if entry.wake_error:
            raise TransitionError(entry.wake_error)
        return entry.state

    def _make_room(self, entry: ModelEntry) -> None:
        try:
            actions = policy.plan_room(self.snapshot(), entry.name)
        except policy.NoRoom as err:
            raise EngineError(str(err)) from None
        for action in actions:
            victim = self.entries[action.model]
            try:
                self.sleep(victim, action.level, manual=False, reason=action.reason)
            except TransitionError as err:
                raise EngineError(f"could not make room ({victim.name}: {err})") from None

    def _wake(self, entry: ModelEntry, reason: str) -> None:
        with entry.lock:
            if entry.state not in (State.SLEEPING, State.STOPPED):
                return
            started = self.clock()
            stopped = entry.state is State.STOPPED
            try:
                self._make_room(entry)
                if stopped:
                    self.set_state(entry, State.STARTING, f"start ({reason})")
                    try:
                        self.process.start(entry.inst)
                    except ProcessControlError as err:
                        raise EngineError(str(err)) from None
                    self._wait_up(entry, entry.inst.startup_timeout_seconds)
                    asleep = entry.adapter.is_sleeping()
                    if asleep:
                        entry.adapter.wake(entry.level)
                else:
                    self.set_state(entry, State.WAKING, reason)
                    entry.adapter.wake(entry.level)
                entry.adapter.warm_up()
            except (EngineError, gevent.Timeout) as err:
                entry.wake_error = str(err) or "timed out"
                self._record(entry, "start" if stopped else "wake", False,
                             self.clock() - started)
                self.set_state(entry, State.FAILED, f"wake failed: {entry.wake_error}")
                self._restart(entry)
                return
            entry.last_wake_seconds = self.clock() - started
            entry.wakes += 1
            entry.slept_at = None
            entry.restart_failures = 0
            self._record(entry, "start" if stopped else "wake", True, entry.last_wake_seconds)
            self.set_state(entry, State.READY, f"{reason}; took {entry.last_wake_seconds:.3f}s")

    def _wait_up(self, entry: ModelEntry, timeout: float) -> None:
        deadline = self.clock() + timeout
        while not entry.adapter.probe():
            if self.clock() > deadline:
                raise EngineError(f"not up within {timeout:g}s of its start")
            gevent.sleep(self.NOT_READY_POLL)

    def _restart(self, entry: ModelEntry) -> None:
        """Restart a failed engine through the process manager, with backoff (no storms)."""
        if not self.process.available:
            return
        now = self.clock()
        if now < entry.next_restart_at:
            log.warning("%s: restart held back for %.0fs (backoff)", entry.name,
                        entry.next_restart_at - now)
            return
        entry.restart_failures += 1
        entry.next_restart_at = now + min(300.0, 5.0 * 2 ** (entry.restart_failures - 1))
        try:
            self.process.restart(entry.inst)
            log.info("%s: restarted through %s", entry.name, self.process.kind)
        except ProcessControlError as err:
            log.error("%s: restart failed: %s", entry.name, err)

    # --- observation ----------------------------------------------------------------------------
    def _adopt(self, entry: ModelEntry, why: str) -> None:
        """The engine answers: is it asleep? (after a router restart, or an engine restart)."""
        if entry.adapter.dialect == "vllm":
            entry.adapter.fetch_version()
        if not entry.info:
            entry.info = entry.adapter.model_info()
        asleep = entry.adapter.is_sleeping()
        if asleep is None and entry.state is State.STARTING:
            # the engine cannot say (SGLang): trust what this router did before a restart
            memo = self.memo.get(entry.name)
            if memo and memo.get("state") in ("sleeping", "stopped"):
                asleep = True
                entry.adapter.mark_released()
        if asleep:
            if entry.adapter.dialect == "vllm":
                entry.level = entry.adapter.sleep_level() or entry.level
            self.set_state(entry, State.SLEEPING, f"{why}: engine reports it is asleep")
            if entry.waiters:
                self.request_wake(entry, reason="requests waiting")
        else:
            self.set_state(entry, State.READY, why)

    def _probe_once(self, entry: ModelEntry) -> None:
        state = entry.state
        if state in (State.DRAINING, State.WAKING) or entry.lock.locked():
            return  # a transition owns the model now
        released = state is State.SLEEPING
        ok = entry.adapter.probe(memory_released=released)
        if ok and state in (State.STARTING, State.FAILED):
            self._adopt(entry, "health check passed")
        elif ok and state is State.STOPPED:
            self._adopt(entry, "engine started outside kvrouter")
        elif not ok and state in (State.READY, State.SLEEPING):
            self.set_state(entry, State.FAILED, "health check failed")

    def _loop(self, entry: ModelEntry) -> None:
        while True:
            try:
                self._probe_once(entry)
            except Exception:  # noqa: BLE001 - keep probing whatever happens
                log.exception("%s: health probe error", entry.name)
            interval = self.READY_POLL if entry.state in (State.READY, State.SLEEPING,
                                                         State.STOPPED) else self.NOT_READY_POLL
            entry.poke.clear()
            entry.poke.wait(timeout=interval)

    # --- policy -----------------------------------------------------------------------------------
    def snapshot(self) -> policy.Snapshot:
        sm = self.cfg.sleep_manager
        now = self.clock()
        views = []
        for e in self.entries.values():
            t = self.traffic.models[e.name] if self.traffic is not None else None
            idle = self.traffic.idle_seconds(e.name) if self.traffic is not None else 0.0
            inst = e.inst
            last = (t.last_end_mono if t is not None and t.last_end_mono is not None
                    else (t.created_mono if t is not None else 0.0))
            views.append(policy.ModelView(
                name=e.name, state=e.state.value, in_flight=t.in_flight if t else 0,
                waiting=e.waiters, idle_seconds=idle, state_seconds=now - e.since,
                pinned=inst.sleep.pinned,
                idle_threshold=(inst.sleep.idle_threshold_seconds
                                if inst.sleep.idle_threshold_seconds is not None
                                else sm.idle_threshold_seconds),
                stop_after=(inst.sleep.stop_after_seconds
                            if inst.sleep.stop_after_seconds is not None
                            else sm.stop_after_seconds),
                level=e.level, gpus=tuple((inst.gpus or "0").split(",")),
                weights_gb=inst.weights_gb or 0.0, kv_cache_gb=inst.kv_cache_gb or 0.0,
                last_used=last))
        return policy.Snapshot(tuple(views), sm.auto_sleep_enabled, dict(sm.gpu_memory_gb))

    def tick(self) -> List[policy.Action]:
        """Apply the policy once (the policy loop calls this every check interval)."""
        actions = policy.decide(self.snapshot())
        for action in actions:
            entry = self.entries[action.model]
            if action.kind == "stop" and not self.process.available:
                continue
            gevent.spawn(self._apply, entry, action)
        return actions

    def _apply(self, entry: ModelEntry, action: policy.Action) -> None:
        try:
            if action.kind == "sleep":
                self.sleep(entry, action.level, manual=False, reason=f"auto: {action.reason}")
            elif action.kind == "stop":
                self.stop(entry, f"deep sleep: {action.reason}")
        except TransitionError as err:
            log.info("%s: %s skipped: %s", entry.name, action.kind, err)

    def _policy_loop(self) -> None:
        while True:
            gevent.sleep(self.cfg.sleep_manager.check_interval_seconds)
            try:
                self.tick()
            except Exception:  # noqa: BLE001
                log.exception("policy tick failed")

    def start(self) -> None:
        for entry in self.entries.values():
            self._loops.append(gevent.spawn(self._loop, entry))
        self._loops.append(gevent.spawn(self._policy_loop))

    def stop_loops(self) -> None:
        gevent.killall(self._loops, block=False)
        self._loops = []

    def get(self, name: str) -> Optional[ModelEntry]:
        return self.entries.get(name)
