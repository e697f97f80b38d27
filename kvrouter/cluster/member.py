"""This router as a member of a cluster of routers sharing state through Redis.

- **States.** Every state change this router makes is written to ``P:states`` and published
  with the token of the lease it holds; every other router applies it (fencing: a change
  carrying an older token than one already seen is dropped). Engines stay the authority:
  each router keeps probing them.
- **Leases.** A wake, sleep or deep sleep holds the model's lease (``P:lease:MODEL``, renewed
  while it runs; each taking gets a new token). Requests on other routers wait for the
  holder's outcome: one wake call at the engine. Before each engine call the holder checks
  the lease is still its own.
- **Leader.** One router holds ``P:leader`` and makes the sleep decisions. It puts a model to
  sleep only once every live router has seen it DRAINING (acks in their heartbeats) and has
  no request for it in flight or waiting.
- **Heartbeats.** Every ``heartbeat_seconds`` (at once after a state change) each router
  publishes its in-flight and waiting counts per model, with a TTL; finished requests go to
  the others' traffic monitors, so statistics and idle times are the cluster's.
- **Redis down.** Requests keep flowing on local state; no sleep (no leader, no lease), a
  wake only where the engine can say whether it sleeps; ``/health`` says so; all of it comes
  back with Redis.
"""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import gevent
from gevent.queue import Queue

from kvrouter.cluster import wire
from kvrouter.cluster.lease import RedisLease
from kvrouter.cluster.records import Records
from kvrouter.cluster.store import Store, StoreDown
from kvrouter.config.cluster import redacted
from kvrouter.config.schema import Config
from kvrouter.control.coordination import Coordinator, Lease, holding
from kvrouter.control.entry import ModelEntry
from kvrouter.control.states import IN_TRANSITION, State
from kvrouter.errors import KvrouterError
from kvrouter.traffic import TrafficMonitor

if TYPE_CHECKING:
    from kvrouter.control.controller import Controller

log = logging.getLogger("kvrouter.cluster")
ACK_SECONDS = 2.0        # an automatic sleep waits this long for every router to see DRAINING
RETRY_SECONDS = 0.5      # how often an unreachable Redis is tried again


def config_digest(cfg: Config) -> str:
    """The config file's digest, which heartbeats carry so that routers notice they differ."""
    try:
        with open(cfg.source, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError:
        return ""


def _without_times(doc: dict) -> dict:
    """A heartbeat less what changes every time (its clock, the ages): unchanged or not."""
    return {k: ({m: row[:2] for m, row in v.items()} if k == "models" else v)
            for k, v in doc.items() if k != "time"}


@dataclass
class Peer:
    """Another router, as its last heartbeat told."""

    router_id: str
    seen: float
    # model -> (in flight, waiting, when its last request ended there on this router's
    # clock, or None: never); the sender says how long ago, never at what wall time
    models: Dict[str, tuple] = field(default_factory=dict)
    acks: Dict[str, int] = field(default_factory=dict)           # model -> lease token seen
    config: str = ""                                             # its config's digest


class Cluster(Coordinator):
    def __init__(self, cfg: Config, ctl: "Controller", traffic: TrafficMonitor,
                 store: Optional[Store] = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        cl = cfg.cluster
        assert cl.redis_url
        self.cfg = cfg
        self.ctl = ctl
        self.traffic = traffic
        self.clock, self.wall = clock, wall
        self.store = store or Store(cl.redis_url, cl.key_prefix)
        self.redis_name = redacted(cl.redis_url)   # for logs and /health
        self.router_id = cfg.node or f"{socket.gethostname()}:{cfg.router.router_port}"
        self.url = f"http://{cfg.router.router_host}:{cfg.router.router_port}"
        self.ttl = max(1.0, 5 * cl.heartbeat_seconds)
        self.peers: Dict[str, Peer] = {}
        self.up = True
        self.down_since: Optional[float] = None
        self.down_reason = ""
        self.is_leader = False
        self.leader_id: Optional[str] = None
        self.outbox: Queue = Queue()
        self.records = Records(clock)
        self.instance = uuid.uuid4().hex          # this process: two with one id are refused
        self.config_digest = config_digest(cfg)
        self.conflict: Optional[str] = None       # another live router with this id
        self.loop_restarts = 0
        self._bad: Dict[str, float] = {}          # what was malformed -> last logged
        self._clock_warned: Dict[str, float] = {}
        self._config_warned: Dict[str, str] = {}
        self.on_end = self.records.add   # the traffic monitor's hook: a request finished here
        self._beat_due = True
        self._last_beat = 0.0
        self._loops: List[gevent.Greenlet] = []
        ctl.events.listeners.append(self._on_event)
        traffic.peers = self.peers_in_flight

    # --- Coordinator --------------------------------------------------------------------------
    def acquire(self, entry: ModelEntry) -> Optional[Lease]:
        if not self.up:
            return Lease()   # Redis down: alone (refuse_wake and refuse_sleep said when)
        seconds = self.cfg.cluster.wake_lease_seconds
        try:
            token = self.store.acquire(entry.name, self.router_id, seconds)
            if token and token <= entry.fence_seen:
                # Redis lost its counter (a restart without persistence): move it past every
                # token seen, so that this change is not taken for an old one
                self.store.release(self.store.key("lease", entry.name),
                                   f"{self.router_id}|{token}")
                self.store.fence_floor(self._max_fence())
                token = self.store.acquire(entry.name, self.router_id, seconds)
            if not token:
                return None
            self._freshen(entry)
        except StoreDown as err:
            self._down(err)
            return Lease()
        entry.fence_seen = max(entry.fence_seen, token)
        return RedisLease(self.store, self.router_id, entry.name, token, seconds)

    def _max_fence(self) -> int:
        return max([e.fence_seen for e in list(self.ctl.entries.values())] + [0])

    def _freshen(self, entry: ModelEntry) -> None:
        """Take a state change this router missed (e.g. while Redis was away)."""
        doc = self._stored_states().get(entry.name)
        if doc and doc["router"] != self.router_id and doc["fence"] > entry.fence_seen:
            self._apply(entry, doc)

    def _stored_states(self) -> Dict[str, dict]:
        """The states hash, each record checked; a malformed one is logged, left out, and
        written again from what this router knows (the engine is the authority: its next
        probe corrects anything else)."""
        good = {}
        for model, raw in self.store.states().items():
            try:
                doc = wire.state_doc(raw)
                if doc["model"] != model:
                    raise wire.BadMessage(f"model: {doc['model']!r} under key {model!r}")
                good[model] = doc
            except wire.BadMessage as err:
                self._malformed(f"state record of {model}", err)
                entry = self.ctl.entries.get(model)
                if entry is not None and entry.state in (State.READY, State.SLEEPING,
                                                         State.STOPPED):
                    self._publish_own(entry)
        return good

    def _publish_own(self, entry: ModelEntry) -> None:
        self.outbox.put(("state", entry.name, entry.fence_seen, {
            "model": entry.name, "state": entry.state.value, "reason": entry.reason,
            "level": entry.level, "router": self.router_id, "fence": entry.fence_seen,
            "time": self.wall()}))

    def _malformed(self, what: str, err: Exception) -> None:
        """One warning per kind of malformed input a minute (a flood stays one line)."""
        now = self.clock()
        if now - self._bad.get(what, -1e9) >= 60.0:
            self._bad[what] = now
            log.warning("ignored a malformed %s from Redis: %s", what, err)

    def refuse_wake(self, entry: ModelEntry) -> Optional[str]:
        if self.up or len(self.cfg.cluster.router_hosts) <= 1:
            return None
        if entry.state is State.SLEEPING and entry.adapter.is_sleeping() is None:
            return (f"Redis is unreachable ({self.down_reason}) and the engine of "
                    f"{entry.name!r} cannot say whether it sleeps: waking it could wake it twice "
                    "from two routers")
        return None

    def refuse_sleep(self, entry: ModelEntry) -> Optional[str]:
        if not self.up:
            return (f"Redis is unreachable ({self.down_reason}): a sleep could hit another "
                    "router's requests; sleeps resume when it is back")
        return None

    def drain(self, entry: ModelEntry, lease: Lease, manual: bool,
              deadline: float) -> Optional[str]:
        model = entry.name
        self._beat_due = True
        started = self.clock()
        while True:
            if not self.up:
                return f"Redis is unreachable ({self.down_reason})"
            pending, busy, waiting = [], [], []
            for p in self.alive():
                if model not in p.models:
                    continue   # that router does not serve the model (another config)
                if p.acks.get(model, 0) < lease.token:
                    pending.append(p.router_id)
                in_flight, queued = (p.models.get(model) or [0, 0])[:2]
                if queued:
                    waiting.append(p.router_id)
                if in_flight:
                    busy.append(p.router_id)
            if waiting and not manual:
                return f"a request arrived on router {waiting[0]} while draining"
            if busy and not manual:
                return f"requests in flight on router {busy[0]}"
            if not pending and not busy and not waiting:
                return None
            now = self.clock()
            if now > deadline or (not manual and now - started > ACK_SECONDS):
                if pending:
                    return (f"router(s) {', '.join(pending)} did not confirm they stopped "
                            f"sending requests to {model!r}")
                return f"requests still in flight on router(s) {', '.join(busy + waiting)}"
            gevent.sleep(min(0.02, self.cfg.cluster.heartbeat_seconds / 2))

    def decides(self, model: Optional[str] = None) -> bool:
        """The leader decides for the models it serves; a model the leader's config lacks
        is decided by the first (by id) live router that serves it."""
        if not self.up or self.conflict:
            return False
        if model is None:
            return self.is_leader or any(self.decides(m) for m in list(self.ctl.entries))
        if model not in self.ctl.entries:
            return False
        if self.is_leader:
            return True
        leader = self.peers.get(self.leader_id or "")
        if leader is None or leader not in self.alive() or model in leader.models:
            return False
        serving = [p.router_id for p in self.alive() if model in p.models]
        return all(self.router_id < other for other in serving)

    def peers_waiting(self, model: str) -> int:
        return sum((p.models.get(model) or [0, 0])[1] for p in self.alive())

    def peers_in_flight(self, model: str) -> int:
        return sum((p.models.get(model) or [0, 0])[0] for p in self.alive())

    def peers_idle_seconds(self, model: str) -> Optional[float]:
        ends = [m[2] for m in (p.models.get(model) for p in self.alive())
                if m and m[2] is not None]
        return max(0.0, self.clock() - max(ends)) if ends else None

    def alive(self) -> List[Peer]:
        now = self.clock()
        return [p for p in self.peers.values() if now - p.seen <= self.ttl]

    def status(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "router_id": self.router_id, "redis": "ok" if self.up else "unreachable",
            "leader": self.leader_id, "this_router_leads": self.decides(),
            "routers": sorted([self.router_id] + [p.router_id for p in self.alive()]),
            "auto_sleep": "on" if self.up else "paused (Redis unreachable)"}
        differ = sorted(p.router_id for p in self.alive() if p.config and
                        p.config != self.config_digest)
        if differ:
            out["config_differs"] = differ
        dead = [g for g in self._loops if g.dead]
        if self.conflict:
            out["degraded"] = self.conflict
        elif dead:
            out["degraded"] = ("a cluster loop stopped and is being restarted (see the log); "
                               "shared state may lag meanwhile")
        if self.loop_restarts:
            out["loop_restarts"] = self.loop_restarts
        if not self.up:
            out["degraded"] = (f"Redis at {self.redis_name} unreachable for "
                               f"{self.clock() - (self.down_since or self.clock()):.0f}s "
                               f"({self.down_reason}): serving on this router's own state; no "
                               "automatic sleep until it is back")
        return out

    # --- the responses map --------------------------------------------------------------------
    def remember_response(self, response_id: str, model: str) -> None:
        self.outbox.put(("response", response_id, model))

    def response_model(self, response_id: str) -> Optional[str]:
        if not self.up:
            return None
        try:
            return self.store.response_model(response_id)
        except StoreDown as err:
            self._down(err)
            return None

    # --- outgoing -----------------------------------------------------------------------------
    def _on_event(self, ev: dict) -> None:
        """A state change on this router: to Redis and the others (in order, off the caller's
        greenlet: no Redis round trip inside a transition or a request)."""
        if ev.get("router", self.router_id) != self.router_id:
            return   # applied from another router
        entry = self.ctl.entries.get(ev["model"])
        if entry is None:
            return
        fence = entry.lease.token if entry.lease is not None and entry.lease.token else \
            entry.fence_seen
        self.outbox.put(("state", ev["model"], fence, {
            "model": ev["model"], "state": ev["to"], "reason": ev["reason"],
            "level": entry.level, "router": self.router_id, "fence": fence,
            "time": ev["time"]}))

    def _send_loop(self) -> None:
        while True:
            item = self.outbox.get()
            while True:
                try:
                    self._send(item)
                    break
                except StoreDown as err:
                    self._down(err)
                    if item[0] != "state":
                        break   # a lost response id or record is not worth waiting for
                    gevent.sleep(RETRY_SECONDS)

    def _send(self, item) -> None:
        if item[0] == "state":
            _, model, fence, doc = item
            if not self.store.put_state(model, fence, doc):
                log.debug("%s: state %s not published: a router with a newer lease "
                          "changed it since", model, doc["state"])
        elif item[0] == "response":
            self.store.remember_response(item[1], item[2])

    def _beat_doc(self) -> dict:
        models = {}
        for e in list(self.ctl.entries.values()):
            if e.name not in self.traffic.models:
                continue   # a reload is adding it
            in_flight = max(0, self.traffic.local_in_flight(e.name) - e.waiters)
            models[e.name] = [in_flight, e.waiters, self.records.age(e.name)]
        return {"id": self.router_id, "url": self.url, "leader": self.is_leader,
                "instance": self.instance, "config": self.config_digest,
                "time": self.wall(), "models": models,
                "acks": {e.name: e.fence_seen for e in list(self.ctl.entries.values())}}

    def _beat_loop(self) -> None:
        """Heartbeats (at once when something changed), records, leader lease, Redis back."""
        cl = self.cfg.cluster
        last_doc: Optional[tuple] = None
        next_leader = 0.0
        while True:
            gevent.sleep(min(cl.heartbeat_seconds, 0.05) if self._beat_due else
                         cl.heartbeat_seconds)
            try:
                if not self.up:
                    self._recover()
                    continue
                now = self.clock()
                doc = self._beat_doc()
                shape = (_without_times(doc), dict(self.records.ended))
                same = last_doc is not None and shape == last_doc
                if not same or self._beat_due or now - self._last_beat > self.ttl / 3:
                    self._beat_due = False
                    if self._held_by_another():
                        continue
                    self.store.beat(self.router_id, doc, self.ttl)
                    self._last_beat, last_doc = now, shape
                batch = self.records.take(self.router_id)
                if batch is not None:
                    self.store.publish_text("records", self.router_id, batch)
                if now >= next_leader:
                    self._lead()
                    next_leader = now + min(cl.leader_lease_seconds / 3, cl.heartbeat_seconds)
            except StoreDown as err:
                self._down(err)
            except Exception:
                log.exception("cluster heartbeat failed")

    def _lead(self) -> None:
        cl = self.cfg.cluster
        key = self.store.key("leader")
        if self.is_leader:
            if not self.store.renew(key, self.router_id, cl.leader_lease_seconds):
                self.is_leader = False
                log.warning("router %s is no longer the leader (its lease expired)",
                            self.router_id)
        elif self.store.take(key, self.router_id, cl.leader_lease_seconds):
            self.is_leader = True
            log.info("router %s is the leader: it makes the sleep decisions", self.router_id)
        self.leader_id = self.router_id if self.is_leader else self.store.get(key)

    # --- incoming -----------------------------------------------------------------------------
    def _subscribe_loop(self) -> None:
        handlers = {"states": self._on_state, "beats": self._on_beat,
                    "records": self._on_records}
        while True:
            sub = None
            try:
                sub = self.store.subscribe()
                self._catch_up()
                while True:
                    msg = sub.next(timeout=1.0)
                    if msg is None or msg[1] == self.router_id or msg[0] not in handlers:
                        continue   # this router's own messages are not even parsed
                    try:
                        handlers[msg[0]](json.loads(msg[2]))
                    except Exception as err:  # noqa: BLE001 - untrusted input: skip, never stop
                        self._malformed(f"{msg[0]} message from router {msg[1]!r}", err)
            except StoreDown as err:
                self._down(err)
            finally:
                if sub is not None:
                    sub.close()
            gevent.sleep(RETRY_SECONDS)

    def _catch_up(self) -> None:
        """After (re)subscribing: the states and routers as Redis has them now."""
        for model, doc in self._stored_states().items():
            entry = self.ctl.entries.get(model)
            if entry is not None and doc["router"] != self.router_id and \
                    doc["fence"] >= entry.fence_seen:
                self._apply(entry, doc)
        for raw in self.store.routers():
            try:
                if isinstance(raw, dict) and raw.get("id") != self.router_id:
                    self._on_beat(raw)
            except wire.BadMessage as err:
                self._malformed("heartbeat record", err)

    def _on_state(self, raw: dict) -> None:
        doc = wire.state_doc(raw)
        if doc["router"] == self.router_id:
            return
        entry = self.ctl.entries.get(doc["model"])
        if entry is not None:
            self._apply(entry, doc)

    def _apply(self, entry: ModelEntry, doc: dict) -> None:
        """A checked state record (wire.state_doc) from another router."""
        fence = doc["fence"]
        if fence < entry.fence_seen:
            return   # older than a change already seen (fencing)
        entry.fence_seen = fence
        lease = entry.lease
        if isinstance(lease, RedisLease) and fence > lease.token and lease.lost is None:
            lease.lost = f"router {doc['router']} changed the model with token {fence}"
        if lease is None or fence > lease.token:
            self.ctl.apply_remote(entry, State(doc["state"]), doc["reason"], doc["level"],
                                  doc["router"])
        self._beat_due = True   # the ack: this router has seen it

    def _on_beat(self, raw: dict) -> None:
        doc = wire.beat_doc(raw)
        rid = doc["id"]
        if rid == self.router_id:
            if doc["instance"] != self.instance:
                self._claim_conflict(doc)
            return
        now = self.clock()
        models = {m: (n, w, None if age < 0 else now - age)
                  for m, (n, w, age) in doc["models"].items()}
        self.peers[rid] = Peer(rid, now, models, doc["acks"], doc["config"])
        skew = doc["time"] - self.wall()
        if abs(skew) > 1.0 and now - self._clock_warned.get(rid, -1e9) >= 600:
            self._clock_warned[rid] = now
            log.warning("router %s's clock is %+.1fs from this one's: kvrouter exchanges "
                        "ages, not times, so nothing is shifted; set the clocks right (NTP)",
                        rid, skew)
        if doc["config"] and doc["config"] != self.config_digest and \
                self._config_warned.get(rid) != doc["config"]:
            self._config_warned[rid] = doc["config"]
            mine, theirs = set(self.ctl.entries), set(doc["models"])
            log.warning("router %s runs another config than this one (%s); each model is "
                        "decided among the routers that serve it%s", rid, self.cfg.source,
                        f" (only here: {', '.join(sorted(mine - theirs))}; only there: "
                        f"{', '.join(sorted(theirs - mine))})" if mine != theirs else "")

    def _on_records(self, doc: dict) -> None:
        self.records.replay(doc, self.traffic)

    # --- one router per id ----------------------------------------------------------------------
    def _held_by_another(self) -> bool:
        """Whether a live heartbeat under this router's id is another process's (two routers
        given one host name): then this one stays out (no heartbeat, no decisions)."""
        try:
            raw = self.store.router(self.router_id)
        except StoreDown as err:
            self._down(err)
            return False
        if not isinstance(raw, dict) or raw.get("instance") in (None, self.instance):
            if self.conflict and raw is None:
                self.conflict = None
            return False
        self._claim_conflict(raw)
        return True

    def _claim_conflict(self, raw: dict) -> None:
        message = (f"another live router uses the id {self.router_id!r} ({raw.get('url')}): "
                   "give each router its own cluster host (--cluster-host NAME, a host of "
                   "cluster.hosts)")
        if self.conflict != message:
            log.error("%s", message)
        self.conflict = message
        self.is_leader = False

    def check_unique(self) -> None:
        """At start: refuse to join when a live router already holds this id."""
        try:
            raw = self.store.router(self.router_id)
        except StoreDown:
            return   # Redis away: nothing to compare with; the heartbeat loop checks again
        if isinstance(raw, dict) and raw.get("instance") and raw.get("instance") != self.instance:
            raise KvrouterError(f"another live router uses the id {self.router_id!r} "
                                f"({raw.get('url')}): give each router its own cluster host "
                                "(--cluster-host NAME, a host of cluster.hosts)")

    # --- Redis away and back ------------------------------------------------------------------
    def _down(self, err: BaseException) -> None:
        if self.up:
            self.up = False
            self.down_since = self.clock()
            log.warning("Redis at %s unreachable (%s): serving on this router's own state, "
                        "no automatic sleep until it is back", self.redis_name, err)
        self.down_reason = str(err) or type(err).__name__
        if self.is_leader:
            self.is_leader = False
            log.warning("router %s steps down as leader (Redis unreachable)", self.router_id)

    def _recover(self) -> None:
        try:
            self.store.ping()
            # Redis may have lost its data: tokens must keep growing past what was seen
            self.store.fence_floor(self._max_fence())
            known = self.store.states()
        except StoreDown as err:
            self.down_reason = str(err)
            gevent.sleep(RETRY_SECONDS)
            return
        log.info("Redis at %s reachable again after %.1fs: shared state resumes",
                 self.redis_name, self.clock() - (self.down_since or self.clock()))
        self.up, self.down_since, self._beat_due = True, None, True
        for e in list(self.ctl.entries.values()):   # what this router knows, where missing
            if e.name not in known and e.state in (State.READY, State.SLEEPING, State.STOPPED):
                self._publish_own(e)

    # --- transitions left behind --------------------------------------------------------------
    def _orphan_loop(self) -> None:
        """A model left WAKING or DRAINING by a router that died (its lease expired, or Redis
        lost it): ask the engine and settle it."""
        while True:
            gevent.sleep(self.cfg.cluster.wake_lease_seconds / 2)
            if not self.up:
                continue
            for entry in list(self.ctl.entries.values()):
                if entry.state not in IN_TRANSITION or entry.lock.locked():
                    continue
                try:
                    held = self.store.exists(self.store.key("lease", entry.name))
                except StoreDown as err:
                    self._down(err)
                    break
                if not held:
                    gevent.spawn(self._settle, entry)

    def _settle(self, entry: ModelEntry) -> None:
        with entry.lock:
            if entry.state not in IN_TRANSITION:
                return
            lease = self.acquire(entry)
            if lease is None:
                return
            with holding(entry, lease):
                asleep = entry.adapter.is_sleeping()
                if asleep is None:
                    asleep = entry.state is State.WAKING
                state = State.SLEEPING if asleep else State.READY
                reason = ("the router that was changing it is gone; the engine reports it "
                          f"is {'asleep' if asleep else 'awake'}")
                if asleep:
                    entry.adapter.mark_released()
                self.ctl.set_state(entry, state, reason, origin=self.router_id)
        if entry.state is State.SLEEPING and entry.waiters:
            self.ctl.request_wake(entry, reason="requests waiting")

    # --- life -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._loops = [gevent.spawn(self._supervised, f) for f in (
            self._send_loop, self._beat_loop, self._subscribe_loop, self._orphan_loop)]
        log.info("cluster member %s (Redis %s, prefix %s)", self.router_id,
                 self.redis_name, self.cfg.cluster.key_prefix)

    def _supervised(self, loop: Callable[[], None]) -> None:
        """Run a loop for good: one that ends by an error is logged and started again (the
        routers must never stop hearing each other while /health says all is well)."""
        while True:
            try:
                loop()
            except gevent.GreenletExit:
                raise
            except Exception:
                self.loop_restarts += 1
                log.exception("cluster %s stopped; starting it again", loop.__name__)
            gevent.sleep(RETRY_SECONDS)

    def stop(self) -> None:
        """Leave: give the leader's lease up and drop the heartbeat, so others take over now."""
        gevent.killall(self._loops, block=False)
        if self.up and not self.conflict:
            try:
                if self.is_leader:
                    self.store.release(self.store.key("leader"), self.router_id)
                self.store.forget(self.router_id)
            except StoreDown:
                pass
        self.is_leader = False
