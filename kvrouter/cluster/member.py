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

import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import gevent
from gevent.queue import Queue

from kvrouter.cluster import orphans, report, wire
from kvrouter.cluster.identity import Identity
from kvrouter.cluster.lease import RedisLease
from kvrouter.cluster.peers import Peer, Peers, config_digest
from kvrouter.cluster.records import Records
from kvrouter.cluster.store import Store, StoreDown
from kvrouter.config.cluster import redacted
from kvrouter.config.schema import Config
from kvrouter.control.coordination import Coordinator, Lease
from kvrouter.control.entry import ModelEntry
from kvrouter.control.states import State
from kvrouter.errors import KvrouterError
from kvrouter.traffic import TrafficMonitor

if TYPE_CHECKING:
    from kvrouter.control.controller import Controller

log = logging.getLogger("kvrouter.cluster")
ACK_SECONDS = 2.0        # an automatic sleep waits this long for every router to see DRAINING
RETRY_SECONDS = 0.5      # how often an unreachable Redis is tried again


def _without_times(doc: dict) -> dict:
    """A heartbeat less what changes every time (its clock, the ages): unchanged or not."""
    return {k: ({m: row[:2] for m, row in v.items()} if k == "models" else v)
            for k, v in doc.items() if k != "time"}


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
        self.config_digest = config_digest(cfg)
        self.peers = Peers(clock, wall, self.ttl, self.config_digest, cfg.source)
        self.up = True
        self.down_since: Optional[float] = None
        self.down_reason = ""
        self.is_leader = False
        self.leader_id: Optional[str] = None
        self.outbox: Queue = Queue()
        self.records = Records(clock)
        self.identity = Identity(self.router_id)  # two routers with one id: one stays out
        self.loop_restarts = 0
        self._malformed = wire.Complaints(clock)  # one warning a minute per kind
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
        if not self.up or self.identity.conflict:
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
        return self.peers.waiting(model)

    def peers_in_flight(self, model: str) -> int:
        return self.peers.in_flight(model)

    def peers_idle_seconds(self, model: str) -> Optional[float]:
        return self.peers.idle_seconds(model)

    def alive(self) -> List[Peer]:
        return self.peers.alive()

    def status(self) -> Dict[str, object]:
        return report.status(self)

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
                "instance": self.identity.instance, "config": self.config_digest,
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
            if self.identity.observe(doc):
                self.is_leader = False
            return
        self.peers.heard(doc, self.ctl.entries)

    def _on_records(self, doc: dict) -> None:
        self.records.replay(doc, self.traffic)

    # --- one router per id ----------------------------------------------------------------------
    def _held_by_another(self) -> bool:
        """Whether a live heartbeat under this router's id is another process's (two routers
        given one host name): then this one stays out (no heartbeat, no decisions)."""
        try:
            beat = self.store.router(self.router_id)
        except StoreDown as err:
            self._down(err)
            return False
        if self.identity.observe(beat):
            self.is_leader = False
            return True
        return False

    def check_unique(self) -> None:
        """At start: refuse to join when a live router already holds this id."""
        try:
            beat = self.store.router(self.router_id)
        except StoreDown:
            return   # Redis away: nothing to compare with; the heartbeat loop checks again
        if self.identity.other(beat):
            raise KvrouterError(self.identity.message(beat))

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

    def _orphan_loop(self) -> None:
        orphans.watch(self)

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
        if self.up and not self.identity.conflict:
            try:
                if self.is_leader:
                    self.store.release(self.store.key("leader"), self.router_id)
                self.store.forget(self.router_id)
            except StoreDown:
                pass
        self.is_leader = False
