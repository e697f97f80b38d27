"""Steering kvcached KV pools: the effects around ``kvplan.divide``.

Every ``sleep_manager.kv_rebalance_seconds``, for each GPU with a budget
(``sleep_manager.gpu_memory_gb``, else NVML's total), the memory left after the resident
models' weights
(and the whole declared footprint of models without kvcached) is divided among the
kvcached pools of the resident single-GPU models on it: demand is the pool's use plus
what the engine's waiting requests need (at the engine's current bytes per running
request). Donors shrink first; receivers grow only into memory the donors' use has left.
A model going to sleep drops its limit to nothing; a waking one gets what is free on its
GPU (at least its floor) before traffic is admitted.

A limit set by hand (``kvctl limit``, ``kvrouter kv limit``, ``POST /model/kv``) holds: a
pool whose limit is not the one kvrouter last wrote was set by someone else, and from then
on the arbiter plans around it (its memory counted as taken, never moved, written again
after an engine restart) until ``kvrouter kv limit MODEL auto``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Optional

import gevent

from kvrouter import kvpool
from kvrouter.control import kvplan
from kvrouter.control.entry import ModelEntry
from kvrouter.control.kvplan import FLOOR_FRACTION
from kvrouter.control.states import RESIDENT

if TYPE_CHECKING:
    from kvrouter.control.controller import Controller

log = logging.getLogger("kvrouter.kv")
GB = 1 << 30
DRAIN_WAIT = 2.0         # how long growing waits for the donors' use to fall


def _path(entry: ModelEntry) -> Optional[str]:
    return entry.inst.kv_pool_path


def _gpus(entry: ModelEntry) -> List[str]:
    return (entry.inst.gpus or "0").split(",")


class KvSteering:
    def __init__(self, ctl: "Controller"):
        self.ctl = ctl
        self.ceilings: Dict[str, int] = {}
        self.wanted_gb: Dict[str, float] = {}   # KV demand past each pool's limit, last seen
        self.written: Dict[str, int] = {}       # the limit kvrouter last wrote (or first saw)
        ctl.events.listeners.append(self._on_state)

    def _on_state(self, ev: dict) -> None:
        """A (re)started engine creates its pool anew: its own limit is the new baseline."""
        if ev["to"] in ("starting", "failed", "stopped"):
            self.written.pop(ev["model"], None)

    def observe(self, entry: ModelEntry, info: kvpool.PoolInfo) -> None:
        """Notice a limit that someone else set (it is not the one kvrouter last wrote), and
        write a hand-set limit again into a pool its engine created anew."""
        written = self.written.get(entry.name)
        if written is None:
            self.written[entry.name] = info.total
            if entry.kv_pinned is not None and info.total != entry.kv_pinned:
                self._set(entry.name, entry.kv_pinned)
        elif info.total != written:
            self.written[entry.name] = info.total
            entry.kv_pinned = info.total
            log.info("%s: KV limit set by hand to %s: kept until `kvrouter kv limit %s auto`",
                     entry.name, kvpool.human(info.total), entry.name)

    def pin(self, entry: ModelEntry, limit: Optional[int]) -> Optional[kvpool.PoolInfo]:
        """A limit set through kvrouter (None: back to the arbiter). Raises
        FileNotFoundError when the engine has no pool yet."""
        entry.kv_pinned = None
        if limit is None:
            log.info("%s: KV limit back to the arbiter", entry.name)
            return None
        info = self._set(entry.name, limit, strict=True)
        entry.kv_pinned = info.total if info is not None else None
        return info

    def loop(self) -> None:
        """Rebalance every kv_rebalance_seconds (the setting is read again each time)."""
        while True:
            every = self.ctl.cfg.sleep_manager.kv_rebalance_seconds
            gevent.sleep(every or 5.0)
            if not every or not self.active():
                continue
            try:
                self.rebalance()
            except Exception:
                log.exception("KV rebalance failed")

    def budgets(self) -> Dict[str, float]:
        """GB per GPU: ``sleep_manager.gpu_memory_gb``, else NVML's totals where present."""
        configured = self.ctl.cfg.sleep_manager.gpu_memory_gb
        if configured:
            return dict(configured)
        return {g: m["total_bytes"] / GB for g, m in self.ctl.nvml.gpus().items()}

    def active(self) -> bool:
        return any(_path(e) for e in self.ctl.entries.values()) and bool(self.budgets())

    def _ceiling(self, entry: ModelEntry, info: kvpool.PoolInfo) -> int:
        if entry.inst.kv_cache_gb:
            return int(entry.inst.kv_cache_gb * GB)
        return self.ceilings.setdefault(entry.name, info.total)  # the pool it started with

    def _steerable(self, entry: ModelEntry) -> bool:
        return _path(entry) is not None and len(_gpus(entry)) == 1

    def _available(self, gpu: str) -> int:
        """Bytes of ``gpu``'s budget the steerable pools on it may share (a pool whose limit
        was set by hand holds its limit, or what it uses when that is more)."""
        total = self.budgets().get(gpu, 0.0) * GB
        for e in self.ctl.entries.values():
            if e.state not in RESIDENT or gpu not in _gpus(e):
                continue
            share = 1 / len(_gpus(e))
            total -= (e.inst.weights_gb or 0) * GB * share
            if not self._steerable(e):
                total -= (e.inst.kv_cache_gb or 0) * GB * share
            elif e.kv_pinned is not None:
                info = kvpool.read_pool(_path(e) or "")
                total -= max(e.kv_pinned, info.used if info else 0)
        return max(0, int(total))

    def _pools(self, gpu: str) -> Dict[str, kvplan.Pool]:
        pools = {}
        for e in self.ctl.entries.values():
            if e.state not in RESIDENT or not self._steerable(e) or _gpus(e)[0] != gpu:
                continue
            info = kvpool.read_pool(_path(e) or "")
            if info is None:
                continue
            self.observe(e, info)
            if e.kv_pinned is not None:
                continue   # held by hand: counted in _available, never moved
            ceiling = self._ceiling(e, info)
            load = e.adapter.load()
            running, waiting = load if load is not None else (0, 0)
            per_request = info.used / running if running else ceiling * FLOOR_FRACTION
            waiting += e.waiters
            pools[e.name] = kvplan.Pool(e.name, info.total, info.used,
                                        int(info.used + waiting * per_request),
                                        int(ceiling * FLOOR_FRACTION), ceiling)
        return pools

    def rebalance(self) -> List[kvplan.Change]:
        """Divide every budgeted GPU's KV memory again; the changes made."""
        made: List[kvplan.Change] = []
        wanted: Dict[str, float] = {}
        for gpu in self.budgets():
            pools = self._pools(gpu)
            for p in pools.values():
                wanted[p.model] = max(0, p.demand - p.limit) / GB
            if pools:
                available = self._available(gpu)
                made += self._apply(kvplan.divide(available, list(pools.values())), pools,
                                    available)
        self.wanted_gb = wanted
        return made

    def _apply(self, plan: List[kvplan.Change], pools: Dict[str, kvplan.Pool],
               available: int) -> List[kvplan.Change]:
        limits = {m: p.limit for m, p in pools.items()}
        used = {m: p.used for m, p in pools.items()}
        made = []
        shrinks = [c for c in plan if c.shrink]
        for c in shrinks:
            self._set(c.model, c.new)
            limits[c.model] = c.new
            made.append(c)
        if shrinks:  # grow only into what the donors' use has left
            deadline = self.ctl.clock() + DRAIN_WAIT
            while True:
                for c in shrinks:
                    info = kvpool.read_pool(_path(self.ctl.entries[c.model]) or "")
                    used[c.model] = info.used if info else 0
                if all(used[c.model] <= c.new for c in shrinks) or \
                        self.ctl.clock() >= deadline:
                    break
                gevent.sleep(0.05)
        for c in plan:
            if c.shrink:
                continue
            others = sum(max(limits[m], used[m]) for m in limits if m != c.model)
            new = min(c.new, available - others)
            if new > limits[c.model]:
                self._set(c.model, new)
                limits[c.model] = new
                made.append(kvplan.Change(c.model, c.old, new))
        return made

    def _set(self, model: str, limit: int, strict: bool = False) -> Optional[kvpool.PoolInfo]:
        """Write a model's pool limit (never below kvpool.MIN_LIMIT a group: kvcached reads
        0 as "no change"); what the pool holds then, or None when it could not be written
        (``strict``: raise instead)."""
        entry = self.ctl.entries.get(model)
        path = _path(entry) if entry else None
        if path is None:
            return None
        try:
            info = kvpool.set_pool_limit(path, max(0, limit))
        except OSError as err:
            if strict:
                raise
            log.warning("%s: cannot set the KV limit: %s", model, err)
            return None
        self.written[model] = info.total
        log.info("%s: KV limit %s", model, kvpool.human(info.total))
        return info

    def policy_kv_gb(self, entry: ModelEntry) -> float:
        """The KV memory the sleep policy counts for a model (eviction, "no room").

        The config's kv_cache_gb, unless the model's kvcached pool can be measured and
        steered: then what it holds can shrink to what it uses, so a resident model counts
        its KV in use (at least its floor), and a model to be woken needs its floor."""
        declared = entry.inst.kv_cache_gb or 0.0
        if not self.active() or not self._steerable(entry):
            return declared
        info = kvpool.read_pool(_path(entry) or "")
        if info is None:
            return declared
        if entry.kv_pinned is not None:
            return max(entry.kv_pinned, info.used) / GB if entry.state in RESIDENT else \
                entry.kv_pinned / GB
        floor = self._ceiling(entry, info) * FLOOR_FRACTION
        if entry.state in RESIDENT:
            return max(info.used, floor) / GB
        return floor / GB

    # --- around sleep and wake ------------------------------------------------------------
    def on_sleep(self, entry: ModelEntry) -> None:
        """An asleep model holds no KV: its limit goes to the others at the next rebalance
        (a limit set by hand stays as it is)."""
        if self.active() and self._steerable(entry) and entry.kv_pinned is None:
            self._set(entry.name, 0)

    def on_wake(self, entry: ModelEntry) -> None:
        """Before traffic is admitted: what is free on the model's GPU, at least its floor."""
        path = _path(entry)
        if not self.active() or not self._steerable(entry) or path is None:
            return
        info = kvpool.read_pool(path)
        if info is None:
            return
        if entry.kv_pinned is not None:
            if info.total != entry.kv_pinned:
                self._set(entry.name, entry.kv_pinned)
            return
        gpu = _gpus(entry)[0]
        taken = 0
        for e in self.ctl.entries.values():
            if e is not entry and e.state in RESIDENT and self._steerable(e) and \
                    _gpus(e)[0] == gpu and e.kv_pinned is None:
                other = kvpool.read_pool(_path(e) or "")
                taken += max(other.total, other.used) if other else 0
        ceiling = self._ceiling(entry, info)
        free = self._available(gpu) - taken
        self._set(entry.name, min(ceiling, max(int(ceiling * FLOOR_FRACTION), free)))
