"""The seed's response shapes: a monitoring client written for the seed's router
(kvcached's controller/frontend.py) reads the same keys, types and meanings from kvrouter.

What the seed's own client (its tests/test_traffic_monitor.py) reads is asserted here the
way it reads it: models with activity from ``traffic_stats``, ``idle_models`` after a
pause, ``active_models``, ``model_stats`` with ``model_name``, ``total_requests`` and
``request_rate``."""
import json
import re
import time

import pytest

from tests.helpers import Router, SimEngine, free_port, get_json, http, instance_yaml, wait_until

A, B, UNUSED = "seed/a", "seed/b", "seed/unused"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    engines = {m: SimEngine("vllm", model=m, args=["--enable-sleep-mode", "--itl-ms", "1",
                                                  "--ttft-ms", "1"]) for m in (A, B, UNUSED)}
    port = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d}\n"
           "sleep_manager: {min_sleep_duration: 0, idle_threshold_seconds: 300}\n"
           "instances:\n%s") % (port, "".join(
               instance_yaml(m.split("/")[1], m, e.port) for m, e in engines.items()))
    r = Router(cfg, str(tmp_path_factory.mktemp("seed")))
    r.wait_models_ready()
    started = time.time()
    for model, n in ((A, 3), (B, 2)):
        for _ in range(n):
            assert http("POST", r.base + "/v1/completions",
                        {"model": model, "prompt": "hi", "max_tokens": 3})[0] == 200
    http("POST", r.base + "/v1/completions", {"model": B, "prompt": "x", "max_tokens": -1})
    yield {"router": r, "base": r.base, "started": started}
    r.stop()
    for e in engines.values():
        e.stop()


SEED_MODEL_KEYS = {"total_requests": int, "successful_requests": int, "failed_requests": int,
                   "request_rate": float, "avg_response_time": float,
                   "last_activity_time": float, "idle_time_seconds": float, "is_idle": bool}


def _typed(obj, keys):
    for key, tp in keys.items():
        assert key in obj, key
        value = obj[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            if tp is float else isinstance(value, tp)
        assert ok, (key, value)


def test_health(stack):
    status, body = get_json(stack["base"] + "/health")
    assert status == 200 and body["status"] == "healthy"
    _, one = get_json(stack["base"] + "/health/seed%2Fa")
    assert one["model"] == A and list(one["health"].values()) == [True]
    assert all(url.startswith("http://127.0.0.1:") for url in one["health"])
    _, every = get_json(stack["base"] + "/health/all")
    assert every["model"] == "all" and set(every["health"]) == {A, B, UNUSED}
    assert all(list(h.values()) == [True] for h in every["health"].values())


def test_traffic_stats_lists_models_with_activity(stack):
    status, body = get_json(stack["base"] + "/traffic/stats?window=30")
    assert status == 200 and body["window_seconds"] == 30
    stats = body["traffic_stats"]
    assert set(stats) == {A, B}  # the seed's monitor knows only models that had a request
    for s in stats.values():
        _typed(s, SEED_MODEL_KEYS)
    assert stats[A]["total_requests"] == 3 and stats[A]["successful_requests"] == 3
    assert (stats[B]["total_requests"], stats[B]["failed_requests"]) == (3, 1)
    assert stats[A]["request_rate"] == pytest.approx(3 / 30, abs=1e-6)
    # seed meanings: mean over successful requests since start; start of the last request
    assert 0 < stats[A]["avg_response_time"] < 5
    assert stack["started"] - 1 < stats[A]["last_activity_time"] <= time.time()
    assert set(body["models"]) == {A, B, UNUSED}  # kvrouter's own view keeps every model


def test_model_stats(stack):
    status, body = get_json(stack["base"] + "/traffic/stats/seed%2Fa?window=30")
    assert status == 200 and body["window_seconds"] == 30
    ms = body["model_stats"]
    assert ms["model_name"] == A
    _typed(ms, SEED_MODEL_KEYS)
    assert ms["total_requests"] == 3 and body["total_requests"] == 3
    _, unused = get_json(stack["base"] + "/traffic/stats/seed%2Funused")
    assert unused["model_stats"]["total_requests"] == 0
    assert unused["model_stats"]["last_activity_time"] == 0.0
    assert unused["model_stats"]["avg_response_time"] == 0.0


def test_idle_and_active_models(stack):
    time.sleep(0.6)
    _, idle = get_json(stack["base"] + "/models/idle?threshold=0.5")
    assert sorted(idle["idle_models"]) == [A, B] and idle["idle_models_count"] == 2
    assert idle["idle_threshold_seconds"] == 0.5
    for d in idle["idle_model_details"].values():
        _typed(d, {"idle_time_seconds": float, "total_requests": int,
                   "last_activity_time": float})
    assert UNUSED in idle["models"]  # kvrouter's view: idle since the router started
    _, active = get_json(stack["base"] + "/models/active?threshold=3600&window=60")
    assert sorted(active["active_models"]) == [A, B] and active["active_models_count"] == 2
    assert active["window_seconds"] == 60 and active["idle_threshold_seconds"] == 3600
    for d in active["active_model_details"].values():
        _typed(d, {"request_rate": float, "total_requests": int, "avg_response_time": float,
                   "last_activity_time": float})


def test_sleep_status_candidates_and_actions(stack):
    base = stack["base"]
    status, _, body = http("POST", base + "/action/sleep/seed%2Fb")
    got = json.loads(body)
    assert status == 200 and got["model_name"] == B and got["success"] is True
    assert isinstance(got["message"], str)
    _, st = get_json(base + "/sleep/status")
    assert set(st["sleeping_models"]) == {B}
    sb = st["sleeping_models"][B]
    assert sb["manual_sleep"] is True and 0 <= sb["sleep_duration"] < 60
    assert abs(sb["sleep_start_time"] - time.time()) < 60
    assert isinstance(st["sleep_candidates"], list)
    for key, tp in (("auto_sleep_enabled", bool), ("wakeup_on_request", bool),
                    ("idle_threshold_seconds", float)):
        assert isinstance(st[key], tp) or (tp is float and isinstance(st[key], int))
    _, cand = get_json(base + "/sleep/candidates")
    for key in ("sleep_candidates", "candidate_details", "idle_threshold_seconds",
                "auto_sleep_enabled"):
        assert key in cand
    # again: success, nothing done (idempotent)
    again = json.loads(http("POST", base + "/action/sleep/seed%2Fb")[2])
    assert again["success"] is True and "nothing was done" in again["message"]
    status, _, body = http("POST", base + "/action/wakeup/seed%2Fb")
    woke = json.loads(body)
    assert status == 200 and woke["success"] is True and woke["model_name"] == B
    assert get_json(base + "/sleep/status")[1]["sleeping_models"] == {}


def test_access_log_line_per_request_and_one_line_refusals(stack):
    r = stack["router"]
    status, headers, _ = http("POST", r.base + "/v1/completions",
                              {"model": A, "prompt": "hi", "max_tokens": 2, "stream": True})
    assert status == 200
    rid = headers["X-Request-Id"]
    http("POST", r.base + "/action/wakeup/seed%2Fnope")
    # access lines are buffered like nginx's and flushed twice a second
    wait_until(lambda: f"rid={rid}" in r.proc.output(), 5, what="the access line")
    out = r.proc.output()
    line = [x for x in out.splitlines() if f"rid={rid}" in x]
    assert len(line) == 1, out[-2000:]
    assert re.search(r"kvrouter\.access: POST /v1/completions model=seed/a status=200 "
                     r"bytes=\d+ duration=\d+\.\d+s ttft=\d+\.\d+s rid=\w+ outcome=success",
                     line[0]), line
    assert "POST /action/wakeup/seed/nope: 404" in out and "Traceback" not in out
