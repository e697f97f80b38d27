"""Discrete-event replay of a trace: the router's gate, the engines and a sleep policy,
with no process, socket or clock.

What runs is the real decision code (a ``policies.Policy``: ``decide`` every interval,
``plan_room`` before a wake; ``kvplan.divide`` for kvcached pools) against the engines'
timing and memory model (``timing.py``, the one the simulated engine sleeps by):

- a request for a ready model queues at its engine and is admitted when a slot is free
  and its tokens fit the KV pool; its first token comes after the prefill, the rest one a
  decode step each (the step at its admission's batch size);
- a request for a sleeping or stopped model waits for the one wake it starts (after the
  evictions ``plan_room`` asks for), as the router's gate does; no room: it is refused;
- sleep and wake take the engine's modelled time, plus the router's 1-token warm-up;
- kvcached pools (``elastic``) are divided again every ``kv_rebalance_seconds``;
  ``static`` gives every model an even share of its GPU for the whole run, ``static-sized``
  a share by its expected load (``sizing``, from the trace's first part);
- a policy that queues when full (``ollama``) keeps a request waiting while no room can be
  made, and tries again whenever a request ends.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from kvrouter.config.schema import Config, Instance
from kvrouter.control import kvplan
from kvrouter.control.kvplan import FLOOR_FRACTION
from kvrouter.control.policies import Policy
from kvrouter.control.policy import NoRoom, Snapshot, could_fit, keep_min_ready, room_held
from kvrouter.control.states import ASLEEP, RESIDENT, State
from kvrouter.lab import sizing, views
from kvrouter.lab.replicas import LabGroup, PrefixCache, cached_tokens, groups_of
from kvrouter.timing import GB, WARM_UP_PROMPT_TOKENS, Timing
from kvrouter.traffic import ARRIVALS, GAPS, WakeWindow, late_for_wake


class Req:
    __slots__ = ("t", "model", "prompt", "out", "need", "first", "end", "tpot", "cause", "ok",
                 "queued_at", "engine", "blocks", "block_tokens", "session", "cached")

    def __init__(self, t: float, model: str, prompt: int, out: int, blocks=(),
                 block_tokens: int = 0, session: Optional[str] = None):
        self.t = t
        self.model = model
        self.engine: Optional["Engine"] = None   # the replica that serves it
        self.blocks: Tuple[int, ...] = tuple(blocks)
        self.block_tokens = block_tokens
        self.session = session
        self.cached = 0
        self.prompt = prompt
        self.out = out
        self.need = prompt + out
        self.first: Optional[float] = None
        self.end: Optional[float] = None
        self.tpot: Optional[float] = None
        self.cause = ""      # what delayed it: wake, cold start, queue (KV), queue (slots)
        self.ok = False
        self.queued_at = 0.0

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first is None else self.first - self.t


class Engine:
    """One model's engine, as the router and the engine itself see it."""

    def __init__(self, inst: Instance, timing: Timing, gpus: Tuple[str, ...]):
        self.inst = inst
        self.name = inst.key or inst.model
        self.t = timing
        self.cache = PrefixCache()
        self.served = 0
        self.awake = 0.0               # seconds resident, up to its last state change
        self.gpus = gpus
        self.state = State.READY
        self.since = 0.0
        self.level = inst.sleep_level
        self.in_flight = 0             # the router's count: waiting + queued + running
        self.waiting: List[Req] = []   # for a wake (the router's gate)
        self.queue: Deque[Req] = deque()  # at the engine, not admitted yet
        self.blocked = "queue"            # why the queue last stopped moving
        self.running = 0
        self.tokens = 0
        self.limit = int(timing.kv_cache_gb * GB)   # KV pool bytes
        self.steerable = False
        self.last_end: Optional[float] = None
        self.gaps: Deque[float] = deque(maxlen=GAPS)
        self.arrivals: Deque[float] = deque(maxlen=ARRIVALS)
        self.last_wake_seconds = 0.0
        self.making_room = False       # its wake waits for the models it evicts to sleep
        self.asleep_at = 0.0           # while draining: when its sleep ends
        self.room_since = 0.0          # when its wake began to wait for room
        self.requests = 0              # arrivals, and those that found it idle
        self.idle_arrivals = 0
        self.ttfts: Deque[float] = deque(maxlen=GAPS)   # served TTFTs (no wait)
        self.wakes = 0
        self.starts = 0
        self.sleeps = 0
        self.mem_gb = 0.0
        self.version = 0               # invalidates a scheduled transition end

    @property
    def ceiling(self) -> int:
        return int(self.t.kv_cache_gb * GB)

    def kv_used(self) -> int:
        return self.tokens * self.t.bytes_per_token


class World:
    def __init__(self, cfg: Config, policy: Policy, rows: Sequence[dict],
                 history: Optional[Sequence[dict]] = None,
                 timings: Optional[Dict[str, Timing]] = None):
        """``history``: the requests a ``static-sized`` partition is sized from (default:
        the first part of ``rows``); ``timings``: a timing profile per engine (by key or
        model) instead of the config's."""
        self.cfg = cfg
        self.sm = cfg.sleep_manager
        self.policy = policy
        self.now = 0.0
        self.heap: List[tuple] = []
        self.seq = 0
        self.budget: Dict[str, float] = dict(self.sm.gpu_memory_gb)
        self.engines: Dict[str, Engine] = {}
        for inst in cfg.instances:
            timing = (timings or {}).get(inst.key or inst.model) or \
                (timings or {}).get(inst.model) or inst.timing
            e = Engine(inst, timing, tuple((inst.gpus or "0").split(",")))
            self.engines[e.name] = e
        self.groups = groups_of(list(self.engines.values()), cfg)
        self.routes: Dict[str, LabGroup] = {}
        for g in self.groups:
            for alias in g.engines[0].inst.route_names or (g.model,):
                self.routes[alias] = g
        self.requests = [Req(r["time"], r["model"], r["prompt_tokens"], r["output_tokens"],
                             r.get("blocks") or (), int(r.get("block_tokens") or 0),
                             r.get("session")) for r in rows]
        self.duration = max((r.t for r in self.requests), default=0.0)
        self.unrouted = [r for r in self.requests if r.model not in self.routes]
        self.wake_window = WakeWindow()
        self.mem_total = 0.0
        self.mem_seconds = 0.0
        self.last_t = 0.0
        self.full: List[Engine] = []    # waiting for room (a policy that queues when full)
        self._place(sizing.history(rows) if history is None else history)

    # --- setup --------------------------------------------------------------------------------
    def _place(self, history: Sequence[dict]) -> None:
        """All engines start awake, as many as fit their GPUs' budgets (the rest asleep);
        ``static`` splits each GPU evenly (``static-sized``: by expected load); kvcached
        pools share what the weights leave."""
        elastic = self.policy.elastic_kv
        if not elastic and self.budget:
            sizing.partition(list(self.engines.values()), self.budget,
                             self.policy.sizing, history)
        for e in self.engines.values():
            e.steerable = (elastic and e.inst.kvcached_enabled and len(e.gpus) == 1
                           and bool(self.budget))
            if e.steerable:
                e.limit = int(e.ceiling * FLOOR_FRACTION)
            e.state = State.SLEEPING
        cap = self.policy.max_loaded(self.snapshot())
        loaded = 0
        for e in self.engines.values():   # in config order, while they fit
            if (not self.budget or self._fits(e)) and (cap is None or loaded < cap):
                e.state = State.READY
                loaded += 1
            elif self.policy.unloads:
                e.state = State.STOPPED
            self._mem(e)
        if any(e.steerable for e in self.engines.values()):
            self._rebalance()

    def _footprint_gb(self, e: Engine) -> float:
        return e.t.weights_gb + (e.ceiling * FLOOR_FRACTION if e.steerable else
                                 self.declared_kv(e)) / GB

    def declared_kv(self, e: Engine) -> float:
        """The KV bytes the policy counts for an engine without a steerable pool: as the
        live controller, the config's kv_cache_gb (none declared: 0); static: its share."""
        if not self.policy.elastic_kv:
            return e.limit
        return (e.inst.kv_cache_gb or 0.0) * GB

    def _fits(self, e: Engine) -> bool:
        for g in e.gpus:
            if g not in self.budget:
                continue
            used = sum(self._footprint_gb(o) / len(o.gpus) for o in self.engines.values()
                       if o is not e and o.state in RESIDENT and g in o.gpus)
            if used + self._footprint_gb(e) / len(e.gpus) > self.budget[g] + 1e-9:
                return False
        return True

    # --- events -------------------------------------------------------------------------------
    def at(self, t: float, kind: str, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, args))

    def run(self) -> "World":
        for r in self.requests:
            if r.model in self.routes:
                self.at(r.t, "arrive", r)
        interval = self.policy.interval(self.sm.check_interval_seconds)
        self.at(interval, "tick", interval)
        every = self.sm.kv_rebalance_seconds
        if every and any(e.steerable for e in self.engines.values()):
            self.at(every, "rebalance", every)
        heap = self.heap
        pop = heapq.heappop
        while heap:
            t, _, kind, args = pop(heap)
            if t > self.now:
                self._advance(t)
            getattr(self, "_on_" + kind)(*args)
        self._advance(max(self.now, self.duration))
        return self

    def _advance(self, t: float) -> None:
        end = min(t, self.duration)
        if end > self.last_t:
            self.mem_seconds += self.mem_total * (end - self.last_t)
            self.last_t = end
        self.now = t

    def _mem(self, e: Engine) -> None:
        """GPU memory the engine holds: weights while resident, and its KV (with kvcached,
        the pages in use; without, the whole pool, allocated at start)."""
        new = 0.0
        if e.state in RESIDENT:
            new = e.t.weights_gb + (e.kv_used() if e.steerable else e.limit) / GB
        self.mem_total += new - e.mem_gb
        e.mem_gb = new

    def _on_arrive(self, r: Req) -> None:
        g = self.routes[r.model]
        e = g.choose(r.session, r.blocks) or g.waiting_on()
        r.engine = e
        self._arrive(e, r)
        more = g.to_wake()   # elastic replicas: one more awake for load
        if more is not None and not more.waiting:
            self._wake(more)

    def _arrive(self, e: "Engine", r: Req) -> None:
        e.requests += 1
        if not e.in_flight and e.last_end is not None:
            e.gaps.append(self.now - e.last_end)
            e.idle_arrivals += 1
        e.arrivals.append(self.now)
        e.in_flight += 1
        if e.state is State.READY:
            self._submit(e, r)
            return
        r.cause = "cold start" if e.state in (State.STOPPED, State.STARTING) else "wake"
        e.waiting.append(r)
        if e.state in ASLEEP and not e.making_room:
            self._wake(e)

    def _submit(self, e: Engine, r: Req) -> None:
        r.queued_at = self.now
        e.queue.append(r)
        self._admit(e)

    def _admit(self, e: Engine) -> None:
        t = e.t
        capacity = t.capacity_tokens(e.limit)
        changed = False
        while e.queue:
            r = e.queue[0]
            if e.running >= t.max_concurrency:
                e.blocked = "queue (slots)"
                break
            if e.running and e.tokens + r.need > capacity:
                e.blocked = "queue (KV full)"
                break
            e.queue.popleft()
            if r.queued_at < self.now and not r.cause:
                r.cause = e.blocked
            e.running += 1
            e.tokens += r.need
            changed = True
            e.served += 1
            if r.blocks and r.block_tokens:   # the engine's prefix cache
                r.cached = cached_tokens(e.cache, r.blocks, r.block_tokens, r.prompt)
                e.cache.keep(r.blocks, t.capacity_tokens(e.limit) // r.block_tokens)
            r.first = self.now + t.prefill_seconds(r.prompt - r.cached)
            if r.out > 1:
                r.tpot = t.step_seconds(e.running)
                r.end = r.first + (r.out - 1) * r.tpot
            else:
                r.end = r.first
            self.at(r.end, "done", r)
        if changed and e.steerable:
            self._mem(e)

    def _on_done(self, r: Req) -> None:
        e = r.engine
        assert e is not None
        r.ok = True
        ttft = (r.first or self.now) - r.t
        waited = r.cause in ("wake", "cold start")
        self.wake_window.add(self.now, waited, waited and late_for_wake(
            e.inst.ttft_slo_seconds, e.last_wake_seconds, ttft, 0.0))
        if not waited:
            e.ttfts.append(ttft)
        e.running -= 1
        e.tokens -= r.need
        e.in_flight -= 1
        if not e.in_flight:
            e.last_end = self.now
        if e.steerable:
            self._mem(e)
        self._admit(e)
        if self.full and not e.in_flight:   # an idle model: room for one waiting?
            self._retry_full()

    def _retry_full(self) -> None:
        waiting, self.full = self.full, []
        for w in waiting:
            if w.waiting and w.state in ASLEEP and not w.making_room:
                self._wake(w)

    # --- transitions --------------------------------------------------------------------------
    def awake_seconds(self, e: Engine) -> float:
        """Seconds the engine held its GPU memory (resident) within the trace's span."""
        extra = max(0.0, min(self.now, self.duration) - e.since) \
            if e.state in RESIDENT else 0.0
        return e.awake + extra

    def _set(self, e: Engine, state: State) -> None:
        if e.state in RESIDENT:
            e.awake += max(0.0, min(self.now, self.duration) - min(e.since, self.duration))
        e.state = state
        e.since = self.now
        e.version += 1
        self._mem(e)

    def _wake(self, e: Engine) -> None:
        """The single wake the first waiting request starts: evictions, then the wake.
        No room while the models that could make it are busy: it waits for one to go idle,
        ``room_wait_seconds`` at most (Ollama: for as long as it takes), as the live gate."""
        snap = self.snapshot()
        try:
            actions = self.policy.plan_room(snap, e.name)
        except NoRoom:
            wait = math.inf if self.policy.queue_when_full else self.sm.room_wait_seconds
            if wait > 0 and could_fit(snap, e.name):
                if e not in self.full:
                    self.full.append(e)
                    e.room_since = self.now
                    if wait < math.inf:
                        self.at(self.now + wait, "room_wait_over", e, self.now)
                return
            self._refuse(e)
            return
        delay = 0.0
        for a in actions:   # the live controller sleeps the victims one after the other
            victim = self.engines[a.model]
            delay += victim.t.sleep_seconds(a.level)
            self._sleep(victim, a.level, done_at=self.now + delay)
        if not room_held(snap, e.name, {a.model for a in actions}):
            # the plan counted on the memory of models already going to sleep: as live,
            # the wake waits for their sleeps to end
            delay = max([delay] + [o.asleep_at - self.now for o in self.engines.values()
                                   if o.state is State.DRAINING and set(o.gpus) & set(e.gpus)])
        if delay:   # as live: the model stays asleep (its memory reserved) meanwhile
            e.making_room = True
            self.at(self.now + delay, "room_made", e, delay)
        else:
            self._on_room_made(e, 0.0)

    def _refuse(self, e: Engine) -> None:
        for r in e.waiting:
            r.cause = "refused: no room"
            self.wake_window.add(self.now, True)
            e.in_flight -= 1
        e.waiting = []

    def _on_room_wait_over(self, e: Engine, since: float) -> None:
        if e in self.full and e.room_since == since:
            self.full.remove(e)
            self._refuse(e)

    def _on_room_made(self, e: Engine, delay: float) -> None:
        e.making_room = False
        stopped = e.state is State.STOPPED
        cost = (e.t.start_seconds() if stopped else e.t.wake_seconds(e.level)) + \
            e.t.prefill_seconds(WARM_UP_PROMPT_TOKENS)
        self._set(e, State.STARTING if stopped else State.WAKING)
        if e.steerable:   # before traffic: what is free on its GPU, at least its floor
            e.limit = self._free_kv(e)
            self._mem(e)
        self.at(self.now + cost, "woken", e, e.version, delay + cost, stopped)

    def _on_woken(self, e: Engine, version: int, seconds: float, started: bool) -> None:
        if e.version != version:
            return
        e.last_wake_seconds = seconds
        if started:
            e.starts += 1
        else:
            e.wakes += 1
        self._set(e, State.READY)
        waiting, e.waiting = e.waiting, []
        for r in waiting:
            self._submit(e, r)

    def _sleep(self, e: Engine, level: int, done_at: Optional[float] = None) -> None:
        self._set(e, State.DRAINING)
        e.level = level
        e.asleep_at = done_at if done_at is not None else self.now + e.t.sleep_seconds(level)
        self.at(e.asleep_at, "slept", e, e.version)

    def _on_slept(self, e: Engine, version: int) -> None:
        if e.version != version:
            return
        e.sleeps += 1
        if e.steerable:
            e.limit = 0
        e.cache.clear()   # the KV cache is freed with the sleep
        self._set(e, State.SLEEPING)
        if e.waiting:
            self._wake(e)
        elif self.full:
            self._retry_full()

    def _on_tick(self, interval: float) -> None:
        snap = self.snapshot()
        for a in keep_min_ready(snap, self.policy.decide(snap)):
            e = self.engines[a.model]
            if a.kind == "sleep" and e.state is State.READY and not e.in_flight:
                self._sleep(e, a.level)
            elif a.kind == "stop" and e.state is State.SLEEPING and not e.waiting:
                self._set(e, State.STOPPED)
        if self.now < self.duration:
            self.at(self.now + interval, "tick", interval)

    # --- kvcached pools -----------------------------------------------------------------------
    def _available(self, gpu: str) -> int:
        total = self.budget.get(gpu, 0.0) * GB
        for e in self.engines.values():
            if e.state in RESIDENT and gpu in e.gpus:
                total -= e.t.weights_gb * GB / len(e.gpus)
                if not e.steerable:
                    total -= e.limit / len(e.gpus)
        return max(0, int(total))

    def _free_kv(self, e: Engine) -> int:
        gpu = e.gpus[0]
        taken = sum(max(o.limit, o.kv_used()) for o in self.engines.values()
                    if o is not e and o.steerable and o.state in RESIDENT and o.gpus[0] == gpu)
        floor = int(e.ceiling * FLOOR_FRACTION)
        return min(e.ceiling, max(floor, self._available(gpu) - taken))

    def _rebalance(self) -> None:
        by_gpu: Dict[str, List[Engine]] = {}
        for e in self.engines.values():
            if e.steerable and e.state in (State.READY, State.WAKING):
                by_gpu.setdefault(e.gpus[0], []).append(e)
        for gpu, engines in by_gpu.items():
            available = self._available(gpu)
            pools = {e.name: kvplan.Pool(
                e.name, e.limit, e.kv_used(),
                e.kv_used() + sum(r.need for r in e.queue) * e.t.bytes_per_token +
                len(e.waiting) * int(e.ceiling * FLOOR_FRACTION),
                int(e.ceiling * FLOOR_FRACTION), e.ceiling) for e in engines}
            plan = kvplan.divide(available, list(pools.values()))
            for c in plan:
                if c.shrink:
                    self.engines[c.model].limit = c.new
            for c in plan:
                if c.shrink:
                    continue
                e = self.engines[c.model]
                others = sum(max(o.limit, o.kv_used()) for o in engines if o is not e)
                e.limit = max(e.limit, min(c.new, available - others))
                self._admit(e)

    def _on_rebalance(self, every: float) -> None:
        self._rebalance()
        if self.now < self.duration:
            self.at(self.now + every, "rebalance", every)

    # --- what the policy sees -----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return views.snapshot(self)
