"""The model event log (what /events streams) and the `kvrouter top` screen."""
import gevent

from kvrouter import top
from kvrouter.control.events import EventLog, kind_of


def test_event_kinds_are_named_as_people_say_them():
    assert kind_of("draining", "sleeping") == "sleep"
    assert kind_of("waking", "ready") == "wake"
    assert kind_of("starting", "ready") == "start"
    assert kind_of("failed", "starting") == "restart"
    assert kind_of("ready", "failed") == "failure"
    assert kind_of("sleeping", "stopped") == "stop"


def test_a_listener_gets_the_backlog_then_waits_for_the_next_event():
    log = EventLog(wall=lambda: 100.0, keep=3)
    base = log.last_id
    for i in range(5):
        log.publish("m", "ready", "draining", f"r{i}")
    assert [e["id"] - base for e in log.since(0)] == [3, 4, 5]      # the last `keep`
    waiter = gevent.spawn(log.next, base + 5, 5.0)
    gevent.sleep(0.01)
    assert not waiter.ready()
    log.publish("m", "draining", "sleeping", "done")
    assert [e["kind"] for e in waiter.get(timeout=1)] == ["sleep"]
    assert log.next(base + 6, 0.01) == []


def _state():
    model = {"model": "a/llama", "state": "sleeping", "sleep_level": 1, "since_seconds": 75,
             "in_flight": 0, "waiting": 2, "request_rate": 1.5,
             "ttft": {"p50": 0.031, "p99": 0.2}, "itl": {"p50": 0.012, "p99": 0.02},
             "wakes": 3, "last_wake_seconds": 0.41,
             "history": [{"rate": r, "ttft_p50": None} for r in (0, 1, 2, 4)]}
    return {"time": 0, "policy": "adaptive", "auto_sleep_enabled": True,
            "process_manager": "supervisord", "models": [model],
            "gpus": [{"gpu": "0", "total_gb": 80.0, "total_source": "config", "free_gb": 40.0,
                      "models": [{"model": "a/llama", "weights_gb": 20.0, "kv_used_gb": 10.0,
                                  "kv_limit_gb": 20.0}]}],
            "events": [{"time": 0, "model": "a/llama", "kind": "sleep", "reason": "idle"}]}


def test_top_renders_models_gpus_and_events():
    screen = top.render(_state(), width=160).splitlines()
    assert screen[0].startswith("kvrouter  policy adaptive  auto sleep on  supervisord")
    row = next(line for line in screen if line.startswith("a/llama"))
    for part in ("sleeping L1", "75s", "0/2", "1.50", "31/200 ms", "12 ms", "0.41s", "▁▂▄█"):
        assert part in row, (part, row)
    gpu = next(line for line in screen if line.startswith("GPU 0"))
    # 30 columns: weights 20/80 (8), KV in use 10/80 (4), reserved 10/80 (4), the rest free
    assert "[########====----..............] 80.0 GB (budget), 40.0 GB free" in gpu
    assert screen[-1].endswith("a/llama sleep: idle")


def test_event_ids_grow_across_restarts_and_an_unknown_last_id_gets_the_recent_ones():
    from kvrouter.control.events import EventLog

    clock = [1000.0]
    first = EventLog(wall=lambda: clock[0])
    for _ in range(3):
        first.publish("m", "ready", "sleeping", "x")
    seen = first.last_id
    clock[0] += 5.0                                # the router restarts
    second = EventLog(wall=lambda: clock[0])
    second.publish("m", "sleeping", "waking", "y")
    assert second.last_id > seen                   # a dashboard's id is behind, not ahead
    assert [e["reason"] for e in second.since(second.resume_from(seen))] == ["y"]
    # an id from the future (or garbage) is not trusted: the recent events come
    assert [e["reason"] for e in second.since(second.resume_from(seen * 10))] == ["y"]
    assert second.resume_from(second.last_id) == second.last_id   # nothing new: wait
