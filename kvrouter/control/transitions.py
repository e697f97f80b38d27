"""Transitions that do I/O: sleep, deep sleep (stop), wake or start, make room, restart.

Each runs under the model's lock and returns a ``Result`` — done, refused (nothing
changed: the model keeps its state) or failed (the engine misbehaved: the model is
marked failed and its engine restarted). Nothing here raises across layers; the
controller turns a result into what its caller needs (an HTTP 409 or 503).

Every engine call runs under a deadline: a wake past ``wake_timeout_seconds`` (plus the
engine's ``startup_timeout_seconds`` for a start) or a sleep past
``sleep_timeout_seconds`` is abandoned, the model marked failed and restarted.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import gevent

from kvrouter.control import policy
from kvrouter.control.coordination import Lease, LeaseLost, holding
from kvrouter.control.entry import ModelEntry
from kvrouter.control.process import ProcessControlError
from kvrouter.control.states import ASLEEP, State
from kvrouter.engines.adapters import EngineError

if TYPE_CHECKING:
    from kvrouter.control.controller import Controller

log = logging.getLogger("kvrouter.controller")


class Outcome(enum.Enum):
    DONE = "done"
    REFUSED = "refused"   # could not happen now; nothing changed
    FAILED = "failed"     # the engine failed or hung; the model is marked failed


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.DONE


def done(message: str = "") -> Result:
    return Result(Outcome.DONE, message)


def refused(message: str) -> Result:
    return Result(Outcome.REFUSED, message)


def failed(message: str) -> Result:
    return Result(Outcome.FAILED, message)


class Deadline(Exception):
    """A control call ran past its deadline."""


def _under_deadline(seconds: float, what: str, fn: Callable[[], None]) -> None:
    """Run ``fn``; raise Deadline when it takes longer than ``seconds``."""
    timer = gevent.Timeout(seconds)
    timer.start()
    try:
        fn()
    except gevent.Timeout as err:
        if err is not timer:
            raise
        raise Deadline(f"{what} did not finish within {seconds:g}s") from None
    finally:
        timer.cancel()


_ENGINE_FAILURES = (EngineError, ProcessControlError, Deadline)


class Transitions:
    DRAIN_TIMEOUT = 60.0   # a manual sleep waits this long for requests in flight
    IDLE_TIMEOUT = 10.0    # ... and for the engine to report none running
    NOT_READY_POLL = 0.1

    def __init__(self, ctl: "Controller"):
        self.ctl = ctl

    def _record(self, entry: ModelEntry, action: str, ok: bool, seconds: float) -> None:
        if self.ctl.metrics is not None:
            self.ctl.metrics.transition(entry.name, action, ok, seconds)

    def _fail(self, entry: ModelEntry, action: str, started: float, message: str) -> Result:
        """The engine failed or hung during a transition: mark it failed and restart it."""
        ctl = self.ctl
        self._record(entry, action, False, ctl.clock() - started)
        ctl.set_state(entry, State.FAILED, f"{action} failed: {message}")
        gevent.spawn(self.restart, entry)  # waiters learn the failure now, not after it
        return failed(message)

    # --- sleep --------------------------------------------------------------------------------
    def sleep(self, entry: ModelEntry, level: Optional[int], manual: bool, reason: str) -> Result:
        """Drain and put a READY model to sleep.

        An automatic sleep gives way to traffic: it does not start while the engine reports
        requests running, and a request that arrives while it drains cancels it."""
        ctl = self.ctl
        level = level or entry.inst.sleep_level   # a manual level is for this sleep only
        refusal = entry.adapter.refuse_level(level)
        if refusal:
            return refused(refusal)
        with entry.lock:
            if entry.state is not State.READY:
                return refused(f"model {entry.name!r} is {entry.state.value}, not ready")
            if entry.inst.sleep.pinned and not manual:
                return refused(f"model {entry.name!r} is pinned")
            if not manual and entry.adapter.busy():
                return refused("the engine reports requests running")
            why_not = ctl.coord.refuse_sleep(entry)
            if why_not:
                return refused(why_not)
            lease = ctl.coord.acquire(entry)
            if lease is None:
                return refused(f"another router is changing model {entry.name!r}")
            with holding(entry, lease):
                try:
                    return self._sleep(entry, lease, level, manual, reason)
                except LeaseLost as err:
                    return refused(str(err))

    def _sleep(self, entry: ModelEntry, lease: Lease, level: int, manual: bool,
               reason: str) -> Result:
        ctl = self.ctl
        ctl.set_state(entry, State.DRAINING, reason)
        started = ctl.clock()
        why_not = self._drain(entry, manual, started) or ctl.coord.drain(
            entry, lease, manual, started + self.DRAIN_TIMEOUT)
        if why_not:
            self._record(entry, "sleep", False, ctl.clock() - started)
            ctl.set_state(entry, State.READY, f"sleep cancelled: {why_not}")
            return refused(why_not)
        lease.check()
        try:
            _under_deadline(ctl.cfg.sleep_manager.sleep_timeout_seconds, "sleep",
                            lambda: entry.adapter.sleep(level))
        except Deadline as err:
            return self._fail(entry, "sleep", started, str(err))
        except EngineError as err:
            # the engine refused: it still holds its memory and serves
            self._record(entry, "sleep", False, ctl.clock() - started)
            ctl.set_state(entry, State.READY, f"sleep cancelled: {err}")
            return refused(str(err))
        except BaseException:
            ctl.set_state(entry, State.READY, "sleep interrupted")
            raise
        ctl.kv.on_sleep(entry)
        entry.level = level
        entry.sleep_manual = manual
        entry.slept_at = ctl.clock()
        entry.last_sleep_seconds = entry.slept_at - started
        entry.sleeps += 1
        self._record(entry, "sleep", True, entry.last_sleep_seconds)
        ctl.set_state(entry, State.SLEEPING, f"{reason}; level {level}, took "
                      f"{entry.last_sleep_seconds:.3f}s")
        if entry.waiters:
            ctl.request_wake(entry, reason="requests arrived while it went to sleep")
        return done()

    def _drain(self, entry: ModelEntry, manual: bool, started: float) -> Optional[str]:
        """Wait until no request runs; why the sleep cannot go on, or None."""
        ctl = self.ctl
        deadline = started + self.DRAIN_TIMEOUT
        while ctl.in_flight(entry) > 0 or (not manual and entry.waiters):
            if not manual:
                return "a request arrived while draining"
            if ctl.clock() > deadline:
                return f"requests still in flight after {self.DRAIN_TIMEOUT:g}s"
            gevent.sleep(0.02)
        if manual and not entry.adapter.wait_idle(self.IDLE_TIMEOUT):
            return "the engine still reports requests running"
        return None

    def stop(self, entry: ModelEntry, reason: str) -> Result:
        """Deep sleep: stop a sleeping engine's process through the process manager."""
        ctl = self.ctl
        with entry.lock:
            if entry.state is not State.SLEEPING:
                return refused(f"model {entry.name!r} is {entry.state.value}")
            lease = ctl.coord.acquire(entry)
            if lease is None:
                return refused(f"another router is changing model {entry.name!r}")
            with holding(entry, lease):
                try:
                    lease.check()
                    ctl.process.stop(entry.inst)
                except (ProcessControlError, LeaseLost) as err:
                    return refused(str(err))
                entry.pool.close_idle()
                self._record(entry, "stop", True, 0.0)
                ctl.set_state(entry, State.STOPPED, reason)
        if entry.waiters:
            ctl.request_wake(entry, reason="requests arrived while it stopped")
        return done()

    # --- wake ---------------------------------------------------------------------------------
    def make_room(self, entry: ModelEntry, wait: float = 0.0) -> Result:
        """Put idle models to sleep until ``entry`` fits its GPUs' budgets (refused: no room).
        While every model that could make room is busy, wait up to ``wait`` seconds (while
        requests wait for the wake) for one to go idle, as Ollama queues such a request. A
        model chosen to make room that turns busy meanwhile (a request arrived while it
        drained: its sleep is cancelled) sends it back to planning, within the same wait.
        Once its room is planned the model's memory is reserved (``making_room``: other
        wakes plan around it), not while it waits for a busy model; a plan that counted on
        the memory of a model already going to sleep waits for that sleep to end
        (``policy.room_held``), and plans again if it was cancelled."""
        ctl = self.ctl
        now = ctl.clock()
        deadline = now + wait
        # a plan counts a draining model's memory as freed: the wake waits for its sleep
        drained_by = now + ctl.cfg.sleep_manager.sleep_timeout_seconds + self.DRAIN_TIMEOUT
        try:
            while True:
                snap = ctl.snapshot()
                try:
                    actions = ctl.sleep_policy.plan_room(snap, entry.name)
                except policy.NoRoom as err:
                    if not policy.could_fit(snap, entry.name):
                        return refused(str(err))
                    why_not: Optional[str] = str(err)
                else:
                    entry.making_room = True   # its room is planned: spoken for from now
                    why_not = self._evict(actions)
                    if why_not is None:
                        if policy.room_held(ctl.snapshot(), entry.name):
                            return done()
                        if ctl.clock() >= drained_by:
                            return refused("a model going to sleep on its GPUs still holds "
                                           "its memory")
                        gevent.sleep(self.NOT_READY_POLL)
                        continue
                # waiting for a busy model to go idle: it holds no room meanwhile (two
                # wakes that each held theirs would wait for each other)
                entry.making_room = False
                if ctl.clock() >= deadline or not entry.waiters:
                    return refused(why_not or "no room")
                gevent.sleep(self.NOT_READY_POLL)
        finally:
            entry.making_room = False

    def _evict(self, actions) -> Optional[str]:
        """Sleep each planned model; why one could not, or None."""
        for action in actions:
            victim = self.ctl.entries[action.model]
            result = self.sleep(victim, action.level, manual=False, reason=action.reason)
            if not result.ok:
                return f"could not make room ({victim.name}: {result.message})"
        return None

    def wake(self, entry: ModelEntry, reason: str) -> Result:
        """Wake a sleeping model or start a stopped one, then warm it up."""
        ctl = self.ctl
        with entry.lock:
            if entry.state not in ASLEEP:
                return done(f"model {entry.name!r} is {entry.state.value}")
            why_not = ctl.coord.refuse_wake(entry)
            if why_not:
                return refused(why_not)
            lease = self._wake_lease(entry)
            if lease is None:
                return done(f"model {entry.name!r} is {entry.state.value} (another router "
                            "woke it)")
            with holding(entry, lease):
                try:
                    return self._wake(entry, lease, reason)
                except LeaseLost as err:
                    # another router carries on with the wake: its outcome arrives as a state
                    log.warning("%s: %s", entry.name, err)
                    return done(str(err))

    def _wake_lease(self, entry: ModelEntry) -> Optional[Lease]:
        """The model's lease for a wake; while another router holds it, wait for that
        router's wake (None once the model is no longer asleep)."""
        ctl = self.ctl
        deadline = ctl.clock() + ctl.cfg.sleep_manager.wake_timeout_seconds + \
            entry.inst.startup_timeout_seconds
        while True:
            lease = ctl.coord.acquire(entry)
            if lease is not None:
                if entry.state in ASLEEP:
                    return lease
                lease.release()   # what the holder did reached this router meanwhile
                return None
            if entry.state not in ASLEEP or ctl.clock() > deadline:
                return None
            entry.changed.wait(timeout=self.NOT_READY_POLL * 2)

    def _wake(self, entry: ModelEntry, lease: Lease, reason: str) -> Result:
        ctl = self.ctl
        started = ctl.clock()
        stopped = entry.state is State.STOPPED
        action = "start" if stopped else "wake"
        room = self.make_room(entry, ctl.cfg.sleep_manager.room_wait_seconds)
        if not room.ok:
            log.warning("%s: not woken: %s", entry.name, room.message)
            return room   # stays asleep; nothing to restart on a GPU that is full
        limit = ctl.cfg.sleep_manager.wake_timeout_seconds
        if stopped:
            limit += entry.inst.startup_timeout_seconds
            ctl.set_state(entry, State.STARTING, f"start ({reason})")
        else:
            ctl.set_state(entry, State.WAKING, reason)
        try:
            _under_deadline(limit, action, lambda: self._bring_up(entry, lease, stopped))
        except _ENGINE_FAILURES as err:
            return self._fail(entry, action, started, str(err) or "failed")
        lease.check()
        entry.last_wake_seconds = ctl.clock() - started
        if ctl.traffic is not None:
            ctl.traffic.woke(entry.name, entry.last_wake_seconds)
        entry.wakes += 1
        entry.slept_at = None
        entry.restart_failures = 0
        self._record(entry, action, True, entry.last_wake_seconds)
        ctl.set_state(entry, State.READY, f"{reason}; took {entry.last_wake_seconds:.3f}s")
        return done()

    def _bring_up(self, entry: ModelEntry, lease: Lease, stopped: bool) -> None:
        """Every engine call is made while the lease is this router's (fencing)."""
        adapter = entry.adapter
        if stopped:
            lease.check()
            self.ctl.process.start(entry.inst)
            adapter.process_started()
            while not adapter.probe():
                gevent.sleep(self.NOT_READY_POLL)
            if adapter.is_sleeping():
                lease.check()
                adapter.wake(entry.level)
        elif adapter.is_sleeping() is False:
            # awake already (another router's wake went through before it died; or someone
            # woke it outside kvrouter): a second wake could break it (SGLang)
            log.info("%s: the engine reports it is awake; not woken again", entry.name)
            adapter.process_started()
        else:
            lease.check()
            adapter.wake(entry.level)
        self.ctl.kv.on_wake(entry)  # KV room before traffic is admitted
        lease.check()
        adapter.warm_up()

    # --- restart ------------------------------------------------------------------------------
    def renew(self, entry: ModelEntry, reason: str) -> Result:
        """The engine's command line changed (``kvrouter render``): drain it (new requests
        wait, those in flight finish, for DRAIN_TIMEOUT at most), then have the process
        manager restart it with the new one; the waiting requests go to the new engine
        once it is ready. A model that is not ready is restarted without waiting."""
        ctl = self.ctl
        if not ctl.process.can_control(entry.inst):
            return refused(f"no process manager controls {entry.inst.name}'s engine")
        with entry.lock:
            lease = ctl.coord.acquire(entry)
            if lease is None:
                return refused(f"another router is changing model {entry.name!r}")
            with holding(entry, lease):
                ready = entry.state is State.READY
                started = ctl.clock()
                if ready:
                    ctl.set_state(entry, State.DRAINING, f"{reason}: draining")
                    why_not = self._drain(entry, True, started) or ctl.coord.drain(
                        entry, lease, True, started + self.DRAIN_TIMEOUT)
                    if why_not:
                        log.warning("%s: %s; restarting anyway", entry.name, why_not)
                try:
                    lease.check()
                    ctl.process.renew(entry.inst)
                except (ProcessControlError, LeaseLost) as err:
                    if ready:
                        ctl.set_state(entry, State.READY, f"restart refused: {err}")
                    return refused(str(err))
                entry.pool.close_idle()
                entry.adapter.process_started()
                self._record(entry, "restart", True, ctl.clock() - started)
                log.info("%s: restarted by %s with its new definition (%s)", entry.name,
                         ctl.process.kind, reason)
                if ready:
                    ctl.set_state(entry, State.STARTING, reason)
                entry.poke.set()
        return done()

    def restart(self, entry: ModelEntry) -> None:
        """Restart a failed engine through the process manager, with backoff (no storms)."""
        ctl = self.ctl
        if not ctl.process.can_control(entry.inst):
            return
        now = ctl.clock()
        if now < entry.next_restart_at:
            log.warning("%s: restart held back for %.0fs (backoff)", entry.name,
                        entry.next_restart_at - now)
            return
        entry.restart_failures += 1
        entry.next_restart_at = now + min(300.0, 5.0 * 2 ** (entry.restart_failures - 1))
        entry.pool.close_idle()
        try:
            ctl.process.restart(entry.inst)
            entry.adapter.process_started()
            log.info("%s: restarted through %s", entry.name, ctl.process.kind)
        except ProcessControlError as err:
            log.error("%s: restart failed: %s", entry.name, err)
