"""The controller's state machine against fake engines and a fake process manager.

gevent greenlets, no sockets: engines are objects whose calls the test gates.
"""
import os
import tempfile

import gevent
import gevent.event
import pytest

from kvrouter.config import parse_config_text
from kvrouter.control.controller import Controller
from kvrouter.control.report import gpu_memory, model_status
from kvrouter.control.states import State, TransitionError
from kvrouter.errors import ApiError
from kvrouter.traffic import TrafficMonitor
from tests.fakes import FakeAdapter, FakeProcess


def make(extra_router="", extra_sleep="", instances=None):
    import yaml

    instances = instances or [("a", "m/a", "")]
    router = {"max_queue_per_model": 8, "ready_timeout_seconds": 2}
    router.update(yaml.safe_load("{" + extra_router.lstrip(", ") + "}") or {})
    sleep = {"min_sleep_duration": 0, "wake_timeout_seconds": 5}
    sleep.update(yaml.safe_load("{" + extra_sleep.lstrip(", ") + "}") or {})
    text = f"router: {yaml.safe_dump(router, default_flow_style=True)}"
    text += f"sleep_manager: {yaml.safe_dump(sleep, default_flow_style=True)}"
    text += "instances:\n" + "".join(
        f"  - {{name: {n}, model: {m}, engine: vllm, engine_args: ['--port {9000 + i}']{x}}}\n"
        for i, (n, m, x) in enumerate(instances))
    cfg = parse_config_text(text, base_dir=tempfile.mkdtemp(prefix="kvr-unit-"))
    traffic = TrafficMonitor([i.model for i in cfg.instances])
    proc = FakeProcess()
    ctl = Controller(cfg, adapter_factory=FakeAdapter, process=proc, traffic=traffic)
    for e in ctl.entries.values():
        proc.adapters[e.name] = e.adapter
        ctl._probe_once(e)  # adopt: ready
    return ctl, proc, traffic


def test_adopts_ready_and_sleeping_engines():
    ctl, _, _ = make(instances=[("a", "m/a", ""), ("b", "m/b", "")])
    a, b = ctl.entries["m/a"], ctl.entries["m/b"]
    assert a.state is State.READY and a.info == {"max_model_len": 128}
    # a new router (the entry starts as STARTING) finds engine b asleep
    again = Controller(ctl.cfg, adapter_factory=FakeAdapter, process=FakeProcess(),
                       traffic=ctl.traffic)
    b = again.entries["m/b"]
    b.adapter.asleep = True
    again._probe_once(b)
    assert b.state is State.SLEEPING and b.adapter.wakes == 0 and b.adapter.sleeps == 0


def test_fifty_requests_one_wake():
    ctl, _, _ = make(extra_router=", max_queue_per_model: 64")
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    assert e.state is State.SLEEPING and e.adapter.sleeps == 1
    e.adapter.gate.clear()
    waiters = [gevent.spawn(ctl.ensure_ready, e) for _ in range(50)]
    gevent.sleep(0.01)
    assert e.waiters == 50 and e.state is State.WAKING and e.adapter.wakes == 0
    e.adapter.gate.set()
    gevent.joinall(waiters, timeout=5, raise_error=True)
    assert all(w.successful() for w in waiters)
    assert e.adapter.wakes == 1 and e.adapter.warmups == 1 and e.state is State.READY
    assert e.last_wake_seconds is not None


def test_queue_bound_gives_503_with_retry_after():
    ctl, _, _ = make(extra_router=", max_queue_per_model: 5")
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    e.last_wake_seconds = 2.4
    e.adapter.gate.clear()
    waiters = [gevent.spawn(ctl.ensure_ready, e) for _ in range(5)]
    gevent.sleep(0.01)
    with pytest.raises(ApiError) as err:
        ctl.ensure_ready(e)
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "3"
    e.adapter.gate.set()
    gevent.joinall(waiters, raise_error=True)


def test_wakeup_on_request_false():
    ctl, _, _ = make(extra_sleep=", wakeup_on_request: false")
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    with pytest.raises(ApiError) as err:
        ctl.ensure_ready(e)
    assert err.value.status == 503 and "wakeup_on_request is false" in err.value.message
    assert e.adapter.wakes == 0


def test_min_sleep_duration_holds_manual_wakes_never_requests():
    ctl, _, _ = make(extra_sleep=", min_sleep_duration: 3600")
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    with pytest.raises(TransitionError, match="min_sleep_duration") as err:
        ctl.wake(e)
    # the refusal says when a manual wake is allowed, and that a request wakes it now
    assert "allowed in" in str(err.value) and "a request to the model wakes it now" \
        in str(err.value)
    assert ctl.ensure_ready(e) >= 0 and e.state is State.READY and e.adapter.wakes == 1


def test_a_manual_sleep_level_is_for_that_sleep_only():
    ctl, _, _ = make(extra_sleep=", auto_sleep_enabled: true, idle_threshold_seconds: 0")
    e = ctl.entries["m/a"]
    ctl.sleep(e, level=2)
    assert e.adapter.levels == [2] and model_status(ctl, e)["sleep_level"] == 2
    assert model_status(ctl, e)["configured_level"] == 1
    ctl.ensure_ready(e)
    assert model_status(ctl, e)["configured_level"] == 1
    ctl.tick()   # the policy's sleep uses the configured level again
    gevent.sleep(0.01)
    assert e.state is State.SLEEPING and e.adapter.levels == [2, 1]
    assert model_status(ctl, e)["sleep_level"] == 1


def test_failed_warm_up_fails_waiters_fast_and_restarts_with_backoff():
    ctl, proc, _ = make()
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    e.adapter.fail_warmup = True
    with pytest.raises(ApiError) as err:
        ctl.ensure_ready(e)
    assert err.value.status == 503 and "warm-up failed" in err.value.message
    gevent.sleep(0)
    assert e.state is State.FAILED and proc.calls == [("restart", "a")]
    # a second failure inside the backoff window does not restart again
    ctl.set_state(e, State.SLEEPING, "test")
    with pytest.raises(ApiError):
        ctl.ensure_ready(e)
    assert proc.calls == [("restart", "a")]


def test_sleep_only_from_ready_and_never_with_requests_in_flight():
    ctl, _, traffic = make()
    e = ctl.entries["m/a"]
    rec = traffic.start("m/a")
    with pytest.raises(TransitionError, match="arrived while draining"):
        ctl.sleep(e, manual=False)
    assert e.state is State.READY and e.adapter.sleeps == 0
    traffic.end(rec, "success")
    ctl.sleep(e)
    with pytest.raises(TransitionError, match="sleeping, not ready"):
        ctl.sleep(e)


def test_engine_busy_cancels_sleep():
    ctl, _, _ = make()
    e = ctl.entries["m/a"]
    e.adapter.busy_n = 3
    with pytest.raises(TransitionError, match="still reports requests"):
        ctl.sleep(e)
    assert e.state is State.READY


def test_auto_sleep_tick_and_deep_sleep_then_request_starts_it():
    ctl, proc, _ = make(extra_sleep=", auto_sleep_enabled: true, idle_threshold_seconds: 0,"
                                    " stop_after_seconds: 0")
    e = ctl.entries["m/a"]
    acts = ctl.tick()
    gevent.sleep(0.01)
    assert [a.kind for a in acts] == ["sleep"] and e.state is State.SLEEPING
    acts = ctl.tick()
    gevent.sleep(0.01)
    assert [a.kind for a in acts] == ["stop"] and e.state is State.STOPPED
    assert proc.calls == [("stop", "a")] and not e.adapter.up
    ctl.ensure_ready(e)
    assert proc.calls == [("stop", "a"), ("start", "a")] and e.state is State.READY


def test_pinned_models_are_not_auto_slept():
    ctl, _, _ = make(extra_sleep=", auto_sleep_enabled: true, idle_threshold_seconds: 0",
                     instances=[("a", "m/a", ", sleep: {pinned: true}")])
    assert ctl.tick() == []


def test_waking_evicts_least_recently_used_under_budget():
    ctl, _, traffic = make(
        extra_sleep=', gpu_memory_gb: {"0": 30}',
        instances=[(n, f"m/{n}", ", weights_gb: 10") for n in ("a", "b", "c", "d")])
    d = ctl.entries["m/d"]
    ctl.sleep(d)
    for name in ("m/b", "m/a", "m/c"):  # a request each: b is least recently used
        traffic.end(traffic.start(name), "success")
        gevent.sleep(0.001)
    ctl.ensure_ready(d)
    states = {n: e.state.value for n, e in ctl.entries.items()}
    assert states == {"m/a": "ready", "m/b": "sleeping", "m/c": "ready", "m/d": "ready"}


def test_no_room_is_503_with_reason_and_nothing_restarts():
    ctl, proc, _ = make(extra_sleep=', gpu_memory_gb: {"0": 15}',
                        instances=[("a", "m/a", ", weights_gb: 10, sleep: {pinned: true}"),
                                   ("b", "m/b", ", weights_gb: 10")])
    b = ctl.entries["m/b"]
    ctl.sleep(b)
    with pytest.raises(ApiError) as err:
        ctl.ensure_ready(b)
    assert err.value.status == 503 and "no room for m/b" in err.value.message
    # the model stays asleep: restarting its engine would load it onto a full GPU
    assert b.state is State.SLEEPING and b.adapter.wakes == 0
    assert proc.calls == []
    with pytest.raises(TransitionError, match="no room for m/b"):
        ctl.wake(b)
    assert b.state is State.SLEEPING and proc.calls == []


def test_a_wake_that_needs_room_waits_for_a_busy_model_to_go_idle():
    ctl, _, traffic = make(extra_sleep=', gpu_memory_gb: {"0": 15}, room_wait_seconds: 5',
                           instances=[("a", "m/a", ", weights_gb: 10"),
                                      ("b", "m/b", ", weights_gb: 10")])
    b = ctl.entries["m/b"]
    ctl.sleep(b)
    rec = traffic.start("m/a")            # a is busy: it cannot be evicted now
    waiter = gevent.spawn(ctl.ensure_ready, b)
    gevent.sleep(0.3)
    assert not waiter.ready() and b.state is State.SLEEPING   # waiting for room
    traffic.end(rec, "success")           # a goes idle: evicted, b wakes
    waiter.get(timeout=5)
    assert b.state is State.READY and ctl.entries["m/a"].state is State.SLEEPING


def test_a_model_chosen_to_make_room_that_turns_busy_sends_the_wake_to_another():
    """A request for the model chosen to be evicted arrives as it starts draining: its
    sleep is cancelled and the wake evicts another idle model instead of failing (503)."""
    ctl, _, traffic = make(extra_sleep=', gpu_memory_gb: {"0": 25}, room_wait_seconds: 5',
                           instances=[(n, f"m/{n}", ", weights_gb: 10") for n in "abc"])
    a, c = ctl.entries["m/a"], ctl.entries["m/c"]
    ctl.sleep(c)
    for name in ("m/a", "m/b"):        # a request each: a is least recently used
        traffic.end(traffic.start(name), "success")
        gevent.sleep(0.001)
    sleep, tries = ctl.transitions.sleep, []

    def a_request_arrives_as_a_drains(victim, *args, **kw):
        tries.append(victim.name)
        if victim is a:                # a request for m/a waits: its sleep is cancelled
            a.waiters += 1
            gevent.spawn_later(1, setattr, a, "waiters", 0)   # ... until it is served
        return sleep(victim, *args, **kw)
    ctl.transitions.sleep = a_request_arrives_as_a_drains
    ctl.ensure_ready(c)
    states = {n: e.state.value for n, e in ctl.entries.items()}
    assert states == {"m/a": "ready", "m/b": "sleeping", "m/c": "ready"}
    assert tries == ["m/a", "m/b"], tries


def test_a_wake_while_another_model_goes_to_sleep_waits_for_it_and_evicts_no_one():
    """Room for two of three 10 GB models: ``a`` is going to sleep (idle) when a request
    wakes ``c``. The wake counts on a's memory and waits for its sleep to end; before, it
    put ``b`` to sleep too."""
    ctl, _, _ = make(extra_sleep=', gpu_memory_gb: {"0": 25}',
                     instances=[(n, f"m/{n}", ", weights_gb: 10") for n in "abc"])
    a, b, c = (ctl.entries[f"m/{n}"] for n in "abc")
    ctl.sleep(c)
    slept = gevent.event.Event()
    plain_sleep = a.adapter.sleep

    def slow_sleep(level):
        slept.wait()
        plain_sleep(level)
    a.adapter.sleep = slow_sleep
    going = gevent.spawn(ctl.sleep, a)
    gevent.sleep(0.05)
    assert a.state is State.DRAINING
    waking = gevent.spawn(ctl.ensure_ready, c)
    gevent.sleep(0.3)
    assert c.state is State.SLEEPING and c.adapter.wakes == 0   # waits: a holds its memory
    assert b.state is State.READY
    slept.set()
    waking.get(timeout=5)
    going.get(timeout=5)
    states = {n: e.state.value for n, e in ctl.entries.items()}
    assert states == {"m/a": "sleeping", "m/b": "ready", "m/c": "ready"}


def test_wake_that_hangs_is_abandoned_marked_failed_and_restarted():
    ctl, proc, _ = make(extra_sleep=", wake_timeout_seconds: 0.3")
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    e.adapter.hang = True  # the engine never answers /wake_up
    started = gevent.get_hub().loop.now()
    with pytest.raises(ApiError) as err:
        ctl.ensure_ready(e)
    assert err.value.status == 503 and "did not finish within 0.3s" in err.value.message
    assert gevent.get_hub().loop.now() - started < 1.0
    assert e.state is State.FAILED and "wake failed" in e.reason
    gevent.sleep(0)
    assert proc.calls == [("restart", "a")]


def test_sleep_that_hangs_is_abandoned_marked_failed_and_restarted():
    ctl, proc, _ = make(extra_sleep=", sleep_timeout_seconds: 0.2")
    e = ctl.entries["m/a"]
    e.adapter.hang = True
    with pytest.raises(TransitionError, match="did not finish within 0.2s"):
        ctl.sleep(e)
    gevent.sleep(0)
    assert e.state is State.FAILED and proc.calls == [("restart", "a")]


def test_transitions_outside_the_table_are_refused():
    from kvrouter.control.states import IllegalTransition

    ctl, _, _ = make()
    e = ctl.entries["m/a"]
    with pytest.raises(IllegalTransition, match="ready -> waking"):
        ctl.set_state(e, State.WAKING, "test")
    assert e.state is State.READY


def test_automatic_sleep_gives_way_to_a_busy_engine_at_once():
    ctl, _, _ = make(extra_sleep=", auto_sleep_enabled: true, idle_threshold_seconds: 0")
    e = ctl.entries["m/a"]
    e.adapter.busy_n = 2  # work the router does not see (another client)
    with pytest.raises(TransitionError, match="reports requests running"):
        ctl.sleep(e, manual=False)
    assert e.state is State.READY and e.adapter.sleeps == 0


def test_health_failure_marks_failed_and_recovery_adopts():
    ctl, _, _ = make()
    e = ctl.entries["m/a"]
    e.adapter.up = False
    ctl._probe_once(e)
    assert e.state is State.FAILED
    e.adapter.up = True
    ctl._probe_once(e)
    assert e.state is State.READY


def test_status_shows_observed_state_and_memory():
    ctl, _, _ = make(instances=[("a", "m/a", ", weights_gb: 4, kv_cache_gb: 2, gpus: 1")])
    e = ctl.entries["m/a"]
    ctl.sleep(e, level=2)
    st = model_status(ctl, e)
    assert st["state"] == "sleeping" and st["sleep_level"] == 2 and st["sleep_kind"] == "manual"
    assert st["memory"] == {"gpus": ["1"], "weights_gb": 4.0, "kv_cache_gb": 2.0, "source": "declared",
                            "resident_gb": 0.0}
    ctl.wake(e)
    assert model_status(ctl, e)["memory"]["resident_gb"] == 6.0
    assert gpu_memory(ctl) == {"1": {"budget_gb": None, "used_gb": 6.0, "source": "declared"}}


def test_remembered_sleep_is_known_before_the_first_probe_and_survives_adoption():
    ctl, _, _ = make(instances=[("a", "m/a", ""), ("b", "m/b", "")])
    ctl.sleep(ctl.entries["m/b"])
    again = Controller(ctl.cfg, adapter_factory=FakeAdapter, process=FakeProcess(),
                       traffic=ctl.traffic)
    a, b = again.entries["m/a"], again.entries["m/b"]
    assert getattr(b.adapter, "released", False) is True and b.adapter.probes == []
    b.adapter.is_sleeping = lambda: None     # an engine that cannot tell (SGLang)
    again._probe_once(a)                     # a settles first: b's memory must stay as it was
    assert a.state is State.READY and again.memo.get("m/b")["state"] == "sleeping"
    again._probe_once(b)
    assert b.adapter.probes == [None]        # "may be released": never a generating check
    assert b.state is State.SLEEPING


def test_a_stopped_engine_is_adopted_as_stopped_and_a_request_starts_it():
    ctl, proc, _ = make()
    e = ctl.entries["m/a"]
    again_proc = FakeProcess()
    again = Controller(ctl.cfg, adapter_factory=FakeAdapter, process=again_proc,
                       traffic=ctl.traffic)
    e = again.entries["m/a"]
    again_proc.adapters[e.name] = e.adapter
    e.adapter.up = False                     # deep sleep before the router restarted
    again_proc.running["a"] = None           # the process manager cannot say: keep waiting
    again._probe_once(e)
    assert e.state is State.STARTING
    again_proc.running["a"] = False
    again._asked_process_at.clear()
    again._probe_once(e)
    assert e.state is State.STOPPED and "not running" in e.reason
    assert again.ensure_ready(e) >= 0 and e.state is State.READY
    assert again_proc.calls == [("start", "a")]


def test_router_restart_remembers_sleep_for_engines_that_cannot_tell():
    ctl, _, _ = make()
    e = ctl.entries["m/a"]
    ctl.sleep(e)
    # a new router process over the same state file; the engine cannot say it sleeps
    again = Controller(ctl.cfg, adapter_factory=FakeAdapter, process=FakeProcess(),
                       traffic=ctl.traffic)
    e2 = again.entries["m/a"]
    e2.adapter.is_sleeping = lambda: None
    again._probe_once(e2)
    assert e2.state is State.SLEEPING and e2.adapter.released is True


def test_reconfigure_keeps_unchanged_models_and_their_state():
    from kvrouter.control.reload import reconfigure

    ctl, _, _ = make(instances=[("a", "m/a", ""), ("b", "m/b", "")])
    a = ctl.entries["m/a"]
    ctl.sleep(a)
    text = ("sleep_manager: {idle_threshold_seconds: 42}\ninstances:\n"
            "  - {name: a, model: m/a, engine: vllm, engine_args: ['--port 9000']}\n"
            "  - {name: c, model: m/c, engine: vllm, engine_args: ['--port 9005']}\n")
    cfg = parse_config_text(text, base_dir=ctl.cfg.base_dir)
    report = reconfigure(ctl, cfg)
    assert report == {"added": ["m/c"], "removed": ["m/b"], "changed": ["m/a"], "kept": []}
    assert ctl.entries["m/a"] is a and a.state is State.SLEEPING  # state kept
    assert a.inst.idle_threshold_seconds == 42 and ctl.cfg is cfg
    assert set(ctl.entries) == {"m/a", "m/c"}
    assert ctl.entries["m/c"].state is State.STARTING


def test_sleep_done_outside_the_router_is_noticed_and_a_request_wakes_it():
    ctl, _, _ = make()
    e = ctl.entries["m/a"]
    e.adapter.asleep = True                   # someone called /sleep on the engine directly
    ctl._probe_once(e)
    assert e.state is State.SLEEPING and "outside kvrouter" in e.reason
    assert ctl.ensure_ready(e) >= 0 and e.state is State.READY and e.adapter.wakes == 1


def test_measured_kv_decides_eviction_where_kvcached_pools_exist():
    """Declared: a (5 + 10 GB) and b (5 + 10 GB) do not fit 20 GB, so waking b would evict
    a. Measured: a uses 2 GB of its pool (it can shrink to that) and b needs its floor
    (10/8 GB) to wake: both fit, nothing is evicted."""
    import uuid

    from kvrouter import kvpool

    tag = uuid.uuid4().hex[:8]
    ipc = {n: f"kvr_unit_{n}_{tag}" for n in ("a", "b")}
    extra = {n: f", weights_gb: 5, kv_cache_gb: 10, gpus: 0, kvcached_env: "
                f"[ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipc[n]}]" for n in ipc}
    paths = {n: kvpool.segment_path(i) for n, i in ipc.items()}
    try:
        for n, p in paths.items():
            kvpool.create(p, 10 << 30)
        kvpool.report_usage(paths["a"], 2 << 30)
        ctl, _, traffic = make(extra_sleep=', gpu_memory_gb: {"0": 20}',
                               instances=[("a", "m/a", extra["a"]), ("b", "m/b", extra["b"])])
        b = ctl.entries["m/b"]
        ctl.sleep(b)
        views = {v.name: v for v in ctl.snapshot().models}
        assert views["m/a"].kv_cache_gb == 2.0 and views["m/b"].kv_cache_gb == 1.25
        ctl.ensure_ready(b)
        assert ctl.entries["m/a"].state is State.READY and b.state is State.READY
        assert kvpool.read(paths["b"]).total >= (10 << 30) // 8  # room given before traffic
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)


def test_a_hand_set_kv_limit_holds_until_auto_and_a_sleeping_pool_is_never_zero():
    import uuid

    from kvrouter import kvpool

    tag = uuid.uuid4().hex[:8]
    ipc = {n: f"kvr_unit_pin_{n}_{tag}" for n in ("a", "b")}
    extra = {n: f", weights_gb: 4, kv_cache_gb: 16, gpus: 0, kvcached_env: "
                f"[ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipc[n]}]" for n in ipc}
    paths = {n: kvpool.segment_path(i) for n, i in ipc.items()}
    try:
        for p in paths.values():
            kvpool.create(p, 8 << 30)
        ctl, _, _ = make(extra_sleep=', gpu_memory_gb: {"0": 24}',
                         instances=[("a", "m/a", extra["a"]), ("b", "m/b", extra["b"])])
        a, b = ctl.entries["m/a"], ctl.entries["m/b"]
        kvpool.report_usage(paths["b"], 6 << 30)     # b is busy: the arbiter feeds it
        ctl.kv.rebalance()
        assert kvpool.read(paths["a"]).total < 8 << 30
        kvpool.set_limit(paths["a"], 5 << 30)        # `kvctl limit` by hand
        for _ in range(3):
            ctl.kv.rebalance()
        assert kvpool.read(paths["a"]).total == 5 << 30
        assert model_status(ctl, a)["kv_pool"]["set_by_hand"] is True
        assert kvpool.read(paths["b"]).total <= (24 - 8 - 5) << 30   # planned around it
        ctl.kv.pin(a, None)                          # `kvrouter kv limit m/a auto`
        ctl.kv.rebalance()
        assert kvpool.read(paths["a"]).total != 5 << 30
        assert model_status(ctl, a)["kv_pool"]["set_by_hand"] is False
        ctl.sleep(b)
        total = kvpool.read(paths["b"]).total
        assert 0 < total == kvpool.MIN_LIMIT          # never what kvcached reads as unset
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)


def test_the_configured_policy_decides_and_a_reload_switches_it():
    import dataclasses

    ctl, _, traffic = make(extra_sleep=", auto_sleep_enabled: true, idle_threshold_seconds: 0,"
                                       " policy: static")
    assert ctl.sleep_policy.name == "static" and ctl.tick() == []
    # the controller's snapshot carries what the adaptive policy learns from
    for _ in range(3):
        traffic.end(traffic.start("m/a"), "success")
    view = ctl.snapshot().models[0]
    assert len(view.gaps) == 2 and len(view.arrival_gaps) == 2 and view.wake_seconds > 0
    assert ctl.snapshot().recent_requests == 3
    # and what the slo policy weighs them by (live, it once saw no request and kept the
    # configured threshold: only the lab's snapshot counted them)
    assert (view.requests, view.idle_arrivals) == (3, 2)
    sm = dataclasses.replace(ctl.cfg.sleep_manager, policy="seed")
    ctl.cfg = dataclasses.replace(ctl.cfg, sleep_manager=sm)
    assert ctl.sleep_policy.name == "seed" and ctl.tick() == []   # 300 s idle: not yet
    sm = dataclasses.replace(sm, policy="lru")
    ctl.cfg = dataclasses.replace(ctl.cfg, sleep_manager=sm)
    assert [a.kind for a in ctl.tick()] == ["sleep"]


def test_gpu_bars_show_measured_pools_and_declared_figures_labelled():
    """The dashboard's per-GPU bar: a kvcached pool as measured, a plain engine as declared,
    a sleeping model holding nothing, and what is left of the budget free."""
    import uuid

    from kvrouter import kvpool
    from kvrouter.control.report import gpu_bars

    ipc = f"kvr_unit_bar_{uuid.uuid4().hex[:8]}"
    path = kvpool.segment_path(ipc)
    try:
        kvpool.create(path, 8 << 30)
        kvpool.report_usage(path, 3 << 30)
        ctl, _, _ = make(extra_sleep=', gpu_memory_gb: {"0": 40}', instances=[
            ("a", "m/a", f", weights_gb: 6, kv_cache_gb: 8, gpus: 0, kvcached_env: "
                         f"[ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipc}]"),
            ("b", "m/b", ", weights_gb: 4, kv_cache_gb: 10, gpus: 0"),
            ("c", "m/c", ", weights_gb: 9, kv_cache_gb: 1, gpus: 0")])
        ctl.sleep(ctl.entries["m/c"])
        (bar,) = gpu_bars(ctl)
        assert bar["gpu"] == "0" and bar["total_gb"] == 40 and bar["total_source"] == "config"
        by = {m["model"]: m for m in bar["models"]}
        assert by["m/a"] == {"model": "m/a", "state": "ready", "weights_gb": 6.0,
                             "kv_used_gb": 3.0, "kv_limit_gb": 8.0, "source": "kvcached"}
        assert by["m/b"]["kv_used_gb"] is None and by["m/b"]["source"] == "config"
        assert by["m/c"]["weights_gb"] == 0.0 and by["m/c"]["kv_limit_gb"] == 0.0
        assert bar["free_gb"] == 40 - (6 + 8) - (4 + 10)
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_the_snapshot_carries_the_ttft_slo_and_the_ttfts_served():
    ctl, _, traffic = make(extra_sleep=", ttft_slo_ms: 800")
    rec = traffic.start("m/a")
    rec.stream = True
    rec.first_byte = rec.start + 0.05
    traffic.end(rec, "success", now=rec.start + 0.2)
    view = ctl.snapshot().models[0]
    assert view.ttft_slo == 0.8 and view.ttfts == (pytest.approx(0.05),)
