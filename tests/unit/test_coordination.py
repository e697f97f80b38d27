"""The controller with other routers: leases (single flight across routers, fencing),
the drain barrier, the leader, and Redis away. The cluster member runs against an
in-memory store with Redis's semantics (the real one is in tests/integration/test_cluster.py).
"""
import gevent
import pytest

from kvrouter.cluster import orphans
from kvrouter.cluster.member import Cluster
from kvrouter.cluster.store import StoreDown
from kvrouter.config import parse_config_text
from kvrouter.control.coordination import Coordinator, Lease, LeaseLost
from kvrouter.control.states import State, TransitionError
from tests.unit.test_controller import make


class MemoryStore:
    """Store's interface on dicts (one process: every 'router' shares it)."""

    def __init__(self):
        self.kv, self.states_, self.fence, self.published = {}, {}, 0, []
        self.beats = {}
        self.down = False

    def _check(self):
        if self.down:
            raise StoreDown("ConnectionError: refused")

    def key(self, *parts):
        return ":".join(("kvrouter",) + parts)

    def acquire(self, name, holder, seconds):
        self._check()
        key = self.key("lease", name)
        if key in self.kv:
            return 0
        self.fence += 1
        self.kv[key] = f"{holder}|{self.fence}"
        return self.fence

    def renew(self, key, value, seconds):
        self._check()
        return self.kv.get(key) == value

    def release(self, key, value):
        self._check()
        if self.kv.get(key) == value:
            del self.kv[key]
            return True
        return False

    def get(self, key):
        self._check()
        return self.kv.get(key)

    def exists(self, key):
        self._check()
        return key in self.kv

    def take(self, key, value, seconds):
        self._check()
        if key in self.kv:
            return False
        self.kv[key] = value
        return True

    def fence_floor(self, floor):
        self.fence = max(self.fence, floor)

    def put_state(self, model, fence, doc):
        self._check()
        cur = self.states_.get(model)
        if cur and isinstance(cur.get("fence"), int) and cur["fence"] > fence:
            return False
        self.states_[model] = doc
        self.published.append(doc)
        return True

    def states(self):
        self._check()
        return dict(self.states_)

    def beat(self, router_id, doc, ttl):
        self._check()
        self.beats[router_id] = doc

    def router(self, router_id):
        self._check()
        return self.beats.get(router_id)

    def routers(self):
        return list(self.beats.values())

    def publish_text(self, kind, router_id, text):
        self._check()

    def remember_response(self, rid, model):
        self.kv[self.key("resp", rid)] = model

    def response_model(self, rid):
        self._check()
        return self.kv.get(self.key("resp", rid))

    def forget(self, router_id):
        pass

    def ping(self):
        self._check()
        return True


def beat(m, router_id, row, acks, **more):
    """Router ``router_id``'s heartbeat about model m/a, as ``m`` receives it."""
    m._on_beat(dict({"id": router_id, "models": {"m/a": row}, "acks": acks,
                     "time": m.wall()}, **more))


def member(ctl, store, name):
    import dataclasses

    cfg = dataclasses.replace(ctl.cfg, node=name, cluster=dataclasses.replace(
        ctl.cfg.cluster, redis_url="redis://127.0.0.1:1/0"))
    m = Cluster(cfg, ctl, ctl.traffic, store=store)
    ctl.coord = m
    return m


class LosingLease(Lease):
    """A lease that is taken over by another router after ``keep`` checks."""

    token = 7

    def __init__(self, keep):
        self.keep = keep
        self.released = False

    def check(self):
        if self.keep <= 0:
            raise LeaseLost("router other holds it now")
        self.keep -= 1

    def release(self):
        self.released = True


class OneLease(Coordinator):
    def __init__(self, lease):
        self.lease = lease

    def acquire(self, entry):
        return self.lease


def test_a_router_that_loses_its_lease_mid_wake_stops_touching_the_engine():
    """Fencing: the lease is lost while the engine wakes; this router neither warms it up
    nor declares it ready, and its waiting requests wait for the new holder's outcome
    (not a 503)."""
    ctl, _, _ = make()
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    lease = LosingLease(keep=1)   # the check before /wake_up passes, the next one fails
    ctl.coord = OneLease(lease)
    e.adapter.gate.clear()
    waiter = gevent.spawn(ctl.ensure_ready, e)
    gevent.sleep(0.01)
    assert e.state is State.WAKING
    e.adapter.gate.set()
    gevent.sleep(0.05)
    assert e.adapter.wakes == 1 and e.adapter.warmups == 0
    assert e.state is State.WAKING and not waiter.ready()
    assert lease.released
    # the router that took over reports the outcome
    ctl.apply_remote(e, State.READY, "woken", 1, "other")
    assert waiter.get(timeout=2) >= 0


def test_requests_wait_for_the_wake_of_the_router_holding_the_lease():
    """Another router holds the model's lease: nothing is sent to the engine from here,
    and every request here is released by that router's outcome."""
    ctl, _, _ = make(extra_router=", max_queue_per_model: 64")
    e = ctl.entries["m/a"]
    ctl.sleep(e)

    class HeldElsewhere(Coordinator):
        def acquire(self, entry):
            return None

    ctl.coord = HeldElsewhere()
    waiters = [gevent.spawn(ctl.ensure_ready, e) for _ in range(20)]
    gevent.sleep(0.3)
    assert e.adapter.wakes == 0 and not any(w.ready() for w in waiters)
    ctl.apply_remote(e, State.WAKING, "wake (request)", 1, "other")
    ctl.apply_remote(e, State.READY, "woken", 1, "other")
    gevent.joinall(waiters, timeout=2, raise_error=True)
    assert all(w.successful() for w in waiters) and e.adapter.wakes == 0


def test_only_the_leader_ticks_and_a_refused_sleep_says_why():
    ctl, _, _ = make(extra_sleep=", auto_sleep_enabled: true, idle_threshold_seconds: 0, "
                     "check_interval_seconds: 0.05")
    e = ctl.entries["m/a"]

    class Follower(Coordinator):
        def decides(self):
            return False

        def refuse_sleep(self, entry):
            return "Redis is unreachable"

    ctl.coord = Follower()
    ctl.start()
    try:
        gevent.sleep(0.3)
        assert e.state is State.READY and e.adapter.sleeps == 0
        with pytest.raises(TransitionError, match="Redis is unreachable"):
            ctl.sleep(e)
        ctl.coord = Coordinator()   # alone again: it leads
        gevent.sleep(0.3)
        assert e.state is State.SLEEPING
    finally:
        ctl.stop_loops()


def test_leases_are_single_flight_with_growing_tokens_and_stale_states_are_dropped():
    store = MemoryStore()
    ctl_a, _, _ = make()
    ctl_b, _, _ = make()
    a, b = member(ctl_a, store, "a"), member(ctl_b, store, "b")
    ea, eb = ctl_a.entries["m/a"], ctl_b.entries["m/a"]
    lease = a.acquire(ea)
    assert lease.token == 1 and b.acquire(eb) is None
    lease.release()
    second = b.acquire(eb)
    assert second.token == 2
    with pytest.raises(LeaseLost, match="router b holds it now"):
        lease.check()     # a released (or lost) lease never acts again
    # router b's change (token 2) is applied by a; a late message of token 1 is not
    a._on_state({"model": "m/a", "state": "sleeping", "router": "b", "fence": 2, "level": 1})
    assert ea.state is State.SLEEPING
    a._on_state({"model": "m/a", "state": "ready", "router": "c", "fence": 1, "level": 1})
    assert ea.state is State.SLEEPING
    second.release()


def test_state_changes_are_published_with_the_lease_token():
    store = MemoryStore()
    ctl, _, _ = make()
    m = member(ctl, store, "a")
    sender = gevent.spawn(m._send_loop)
    try:
        ctl.sleep(ctl.entries["m/a"])
        gevent.sleep(0.05)
        states = [(d["state"], d["fence"], d["router"]) for d in store.published]
        assert states == [("draining", 1, "a"), ("sleeping", 1, "a")]
        assert store.kv == {}   # the lease was given back
    finally:
        sender.kill()


def test_drain_waits_for_every_router_to_see_draining_and_cancels_for_their_requests():
    store = MemoryStore()
    ctl, _, _ = make()
    m = member(ctl, store, "a")
    e = ctl.entries["m/a"]
    lease = m.acquire(e)
    clock = ctl.clock
    # b has not seen the new token yet; c has, and has nothing for the model
    beat(m, "b", [0, 0, -1], {"m/a": 0})
    beat(m, "c", [0, 0, -1], {"m/a": lease.token})
    waiter = gevent.spawn(m.drain, e, lease, False, clock() + 5)
    gevent.sleep(0.1)
    assert not waiter.ready()
    beat(m, "b", [0, 0, -1], {"m/a": lease.token})
    assert waiter.get(timeout=1) is None
    # a request waiting on b cancels an automatic sleep
    beat(m, "b", [0, 1, -1], {"m/a": lease.token})
    assert "a request arrived on router b" in m.drain(e, lease, False, clock() + 5)
    # requests in flight on c: a manual sleep waits for them
    beat(m, "b", [0, 0, -1], {"m/a": lease.token})
    beat(m, "c", [2, 0, -1], {"m/a": lease.token})
    manual = gevent.spawn(m.drain, e, lease, True, clock() + 5)
    gevent.sleep(0.1)
    assert not manual.ready()
    beat(m, "c", [0, 0, -1], {"m/a": lease.token})
    assert manual.get(timeout=1) is None
    assert m.peers_in_flight("m/a") == 0
    lease.release()


def test_idle_only_when_idle_on_every_router():
    """The leader's view: a request that ended a moment ago on another router makes the
    model busy, however long it has been idle here."""
    store = MemoryStore()
    ctl, _, traffic = make()
    m = member(ctl, store, "a")
    t0 = traffic.clock()
    traffic.clock = lambda: t0 + 1000.0   # long idle here
    assert ctl.snapshot().models[0].idle_seconds > 900
    beat(m, "b", [0, 0, 2.0], {})
    view = ctl.snapshot().models[0]
    assert 1.5 < view.idle_seconds < 3.0
    beat(m, "b", [1, 2, -1], {})
    view = ctl.snapshot().models[0]
    assert view.in_flight == 1 and view.waiting == 2


def test_redis_down_serves_alone_and_says_so():
    store = MemoryStore()
    ctl, _, _ = make()
    m = member(ctl, store, "a")
    m.is_leader = True
    store.down = True
    e = ctl.entries["m/a"]
    lease = m.acquire(e)          # a local lease: requests are still served
    assert lease is not None and lease.token == 0
    assert not m.up and not m.decides()
    assert "Redis is unreachable" in m.refuse_sleep(e)
    status = m.status()
    assert status["redis"] == "unreachable" and "no automatic sleep" in status["degraded"]
    with pytest.raises(TransitionError, match="Redis is unreachable"):
        ctl.sleep(e)
    store.down = False
    m._recover()
    assert m.up and m.refuse_sleep(e) is None and "degraded" not in m.status()


def test_a_model_left_waking_by_a_dead_router_is_settled_from_the_engine():
    store = MemoryStore()
    ctl, _, _ = make()
    m = member(ctl, store, "a")
    e = ctl.entries["m/a"]
    e.adapter.asleep = False     # the dead router's wake went through
    m._on_state({"model": "m/a", "state": "waking", "router": "b", "fence": 3, "level": 1})
    assert e.state is State.WAKING
    orphans.settle(m, e)         # its lease is gone (no key in the store)
    assert e.state is State.READY and e.adapter.wakes == 0
    kind, model, fence, doc = m.outbox.get_nowait()   # published with a newer token
    assert (kind, model, doc["state"], doc["router"]) == ("state", "m/a", "ready", "a")
    assert fence == 4


def test_cluster_config_needs_redis_for_several_routers():
    text = ("cluster:\n  hosts:\n    - {name: a, address: 10.0.0.2, router: true}\n"
            "    - {name: b, address: 10.0.0.3, router: true}\n"
            "instances:\n  - {name: x, model: x, engine: vllm, host: a, "
            "engine_args: ['--port 9000']}\n")
    with pytest.raises(Exception, match=r"cluster.redis_url: 2 hosts run a router"):
        parse_config_text(text)


def test_finished_requests_reach_the_other_routers_statistics_not_their_metrics():
    store = MemoryStore()
    ctl_a, _, traffic_a = make()
    ctl_b, _, traffic_b = make()
    a, b = member(ctl_a, store, "a"), member(ctl_b, store, "b")
    traffic_a.on_end = a.on_end
    ended = []
    traffic_b.on_end = lambda *args: ended.append(args)   # b's metrics hook
    rec = traffic_a.start("m/a")
    rec.stream = True
    rec.first_byte = rec.start + 0.05
    traffic_a.end(rec, "success", prompt_tokens=7, completion_tokens=3, itl=0.01)
    import json

    b._on_records(json.loads(a.records.take("a")))
    assert a.records.take("a") is None
    stats = traffic_b.stats("m/a")
    assert stats["total_requests"] == 1 and stats["successful_requests"] == 1
    assert stats["prompt_tokens"] == 7 and stats["completion_tokens"] == 3
    assert abs(stats["time_to_first_token"]["p50"] - 0.05) < 0.01
    assert ended == []        # not counted in b's own Prometheus metrics
    assert traffic_b.in_flight("m/a") == 0


def test_malformed_messages_are_skipped_and_the_subscription_never_dies(caplog):
    """A JSON array where an object belongs, wrong types, NaN, huge numbers: each message is
    logged (once a minute per kind) and skipped; the good ones after it still apply."""
    import json

    store = MemoryStore()
    ctl, _, _ = make()
    m = member(ctl, store, "a")
    e = ctl.entries["m/a"]

    class Sub:
        def __init__(self, msgs):
            self.msgs = list(msgs)

        def next(self, timeout):
            if not self.msgs:
                raise StoreDown("done")   # ends this subscription; the loop would resubscribe
            return self.msgs.pop(0)

        def close(self):
            pass

    good = {"model": "m/a", "state": "sleeping", "reason": "x", "level": 1, "router": "b",
            "fence": 5, "time": 1.0}
    bad = ["[1, 2, 3]", "{}", json.dumps(dict(good, fence="7")), json.dumps(dict(good, fence=-1)),
           json.dumps(dict(good, state="napping")), json.dumps(dict(good, level=True)),
           "not json", json.dumps(dict(good, model=["m/a"]))]
    msgs = [("states", "b", t) for t in bad] + [
        ("beats", "b", '{"id": "b", "models": [], "acks": {}, "time": 1}'),
        ("beats", "b", '{"id": "b", "models": {"m/a": [0, 0, NaN]}, "acks": {}, "time": 1}'),
        ("records", "b", '{"router": "b", "now": 5, "records": [["m/a", 1e300, 1, "x", 0, '
                         'null, false, 1, 1, null]]}'),
        ("states", "b", json.dumps(good))]
    store.subscribe = lambda: Sub(msgs)
    m._catch_up = lambda: None
    loop = gevent.spawn(m._subscribe_loop)
    gevent.sleep(0.2)
    loop.kill()
    assert e.state is State.SLEEPING and e.fence_seen == 5     # the good one after the bad
    assert m.peers == {} and ctl.traffic.stats("m/a")["total_requests"] == 0
    warned = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert any("states message from router 'b'" in w for w in warned)
    assert len([w for w in warned if "states message" in w]) == 1   # once a minute


def test_a_malformed_state_record_is_ignored_repaired_and_wakes_still_work():
    store = MemoryStore()
    ctl, _, _ = make()
    m = member(ctl, store, "a")
    e = ctl.entries["m/a"]
    store.states_["m/a"] = {"model": "m/a", "state": "ready", "router": "b", "fence": "x7"}
    ctl.sleep(e)                 # takes a lease: reads the hash (no traceback)
    assert e.state is State.SLEEPING
    assert ctl.ensure_ready(e) >= 0 and e.state is State.READY
    # ... and the record was written again from what this router knew
    gevent.spawn(m._send_loop)
    gevent.sleep(0.05)
    assert isinstance(store.states_["m/a"]["fence"], int)


def test_a_second_router_with_the_same_id_is_refused():
    from kvrouter.errors import KvrouterError

    store = MemoryStore()
    ctl_1, _, _ = make()
    ctl_2, _, _ = make()
    one, two = member(ctl_1, store, "gpu-a"), member(ctl_2, store, "gpu-a")
    store.beat("gpu-a", one._beat_doc(), 1.0)
    with pytest.raises(KvrouterError, match="another live router uses the id 'gpu-a'"):
        two.check_unique()
    # one that started while Redis was away stays out once it sees the other
    assert two._held_by_another() and "another live router" in two.status()["degraded"]
    assert not two.decides() and not two.decides("m/a")


def test_a_model_only_one_router_serves_is_decided_there_and_drained_without_the_others():
    store = MemoryStore()
    ctl, _, _ = make(instances=[("a", "m/a", ""), ("x", "m/x", "")])
    b = member(ctl, store, "b")            # not the leader; serves m/x, which a lacks
    b.leader_id = "a"
    b._on_beat({"id": "a", "models": {"m/a": [0, 0, -1]}, "acks": {}, "time": b.wall(),
                "config": "other"})
    assert b.decides("m/x") and not b.decides("m/a") and b.decides()
    assert b.status()["config_differs"] == ["a"]
    lease = b.acquire(ctl.entries["m/x"])
    assert b.drain(ctl.entries["m/x"], lease, False, ctl.clock() + 1) is None   # a never acks m/x
    lease.release()


def test_a_peer_clock_an_hour_ahead_moves_no_idle_time(caplog):
    store = MemoryStore()
    ctl, _, traffic = make()
    m = member(ctl, store, "a")
    beat(m, "b", [0, 0, 30.0], {}, time=m.wall() + 3600)   # its last request: 30 s ago
    assert 29 < m.peers_idle_seconds("m/a") < 31
    assert any("clock is +3600" in r.getMessage() for r in caplog.records)
    # finished requests are placed by their age too
    import json
    import time as _time

    sender_now = _time.monotonic() + 3600.0
    doc = {"router": "b", "now": sender_now, "records": [
        ["m/a", sender_now - 3.0, sender_now - 2.0, "success", 0.0, None, False, 1, 1, None]]}
    m._on_records(json.loads(json.dumps(doc)))
    assert 1.5 < traffic.idle_seconds("m/a") < 2.5
