"""Sleep, wake and deep sleep of simulated engines under a real supervisord."""
import json
import os
import signal
import threading
import time

import openai
import pytest

from tests.helpers import (
    Router,
    SimEngine,
    free_port,
    get_json,
    http,
    instance_yaml,
    model_states,
    run_concurrently,
    supervised_stack,
    wait_until,
)

LLAMA, QWEN, DEEP = "t/llama", "t/qwen", "t/deep"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    rp, p1, p2, p3 = free_port(), free_port(), free_port(), free_port()
    cfg = (
        "router: {router_host: 127.0.0.1, router_port: %d, max_queue_per_model: 100,"
        " ready_timeout_seconds: 20}\n"
        "sleep_manager: {auto_sleep_enabled: true, idle_threshold_seconds: 2,"
        " check_interval_seconds: 0.3, min_sleep_duration: 0, wake_timeout_seconds: 30}\n"
        "instances:\n%s%s%s") % (
        rp,
        instance_yaml("llama", LLAMA, p1, "vllm", "    weights_gb: 2\n",
                      sim="itl_ms: 5, ttft_ms: 5, startup_seconds: 0.3"),
        instance_yaml("qwen", QWEN, p2, "sglang", "    weights_gb: 1\n",
                      sim="itl_ms: 5, ttft_ms: 5, startup_seconds: 0.3"),
        instance_yaml("deep", DEEP, p3, "vllm",
                      "    sleep: {idle_threshold_seconds: 1, stop_after_seconds: 1}\n",
                      sim="itl_ms: 5, ttft_ms: 5, startup_seconds: 0.5"))
    base = f"http://127.0.0.1:{rp}"
    with supervised_stack(cfg, base) as sup:
        yield {"base": base, "sup": sup, "ports": {LLAMA: p1, QWEN: p2, DEEP: p3}}


def _stats(stack, model):
    return get_json(f"http://127.0.0.1:{stack['ports'][model]}/sim/stats")[1]


def _client(stack):
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key="x", max_retries=0, timeout=60)


def _ensure_asleep(stack, model):
    if model_states(stack["base"])[model] != "sleeping":
        wait_until(lambda: model_states(stack["base"])[model] == "sleeping", 15,
                   what=f"{model} asleep")


def test_auto_sleep_after_idle(stack):
    _client(stack).completions.create(model=LLAMA, prompt="x", max_tokens=1)
    assert model_states(stack["base"])[LLAMA] == "ready"
    t0 = time.monotonic()
    _ensure_asleep(stack, LLAMA)
    assert time.monotonic() - t0 >= 1.5  # not before the idle threshold (2 s)
    _, st = get_json(stack["base"] + "/sleep/status")
    assert st["models"][LLAMA]["sleep_kind"] == "automatic"
    assert _stats(stack, LLAMA)["sleeping"] is True  # observed on the engine


def test_fifty_concurrent_requests_one_wake(stack):
    _ensure_asleep(stack, LLAMA)
    before = _stats(stack, LLAMA)["wake_calls"]
    c = _client(stack)

    def one(i):
        r = c.completions.create(model=LLAMA, prompt=f"p{i}", max_tokens=3,
                                 extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason, r.usage.completion_tokens

    results, errors = run_concurrently(one, 50)
    assert errors == []
    assert results == [("length", 3)] * 50
    assert _stats(stack, LLAMA)["wake_calls"] == before + 1


def test_sglang_cycles_never_trigger_its_quirks(stack):
    pid = _stats(stack, QWEN)["pid"]
    c = _client(stack)
    for _ in range(2):
        _ensure_asleep(stack, QWEN)
        r = c.completions.create(model=QWEN, prompt="hello", max_tokens=4,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
    s = _stats(stack, QWEN)
    assert s["pid"] == pid  # never killed by a release under load or a bad resume
    assert s["release_calls"] == s["resume_calls"] >= 2
    assert s["weights_valid"] is True  # weights reloaded from disk after each resume
    good = json.loads(http("POST", f"http://127.0.0.1:{stack['ports'][QWEN]}/v1/completions",
                           {"prompt": "hello", "max_tokens": 4, "ignore_eos": True})[2])
    assert good["choices"][0]["text"] == r.choices[0].text  # no garbage after wake


def test_no_sleep_while_a_request_is_in_flight_and_request_during_drain(stack):
    c = _client(stack)
    c.completions.create(model=LLAMA, prompt="x", max_tokens=1)  # awake
    port = stack["ports"][LLAMA]
    before = _stats(stack, LLAMA)["sleep_calls"]
    long = threading.Thread(target=lambda: c.completions.create(
        model=LLAMA, prompt="x", max_tokens=700, extra_body={"ignore_eos": True}))
    long.start()  # 700 tokens x 5 ms = 3.5 s, longer than the idle threshold
    time.sleep(3.0)
    assert model_states(stack["base"])[LLAMA] == "ready"
    assert _stats(stack, LLAMA)["sleep_calls"] == before
    long.join(20)
    # a manual sleep with a request in flight drains; a request arriving meanwhile waits
    # and is served after the sleep, by a wake
    long = threading.Thread(target=lambda: c.completions.create(
        model=LLAMA, prompt="x", max_tokens=200, extra_body={"ignore_eos": True}))
    long.start()
    wait_until(lambda: get_json(f"http://127.0.0.1:{port}/sim/stats")[1]["running"] == 1, 5,
               what="long request running")
    sleeper = threading.Thread(target=http, args=("POST", stack["base"] + "/model/sleep/t%2Fllama"),
                               kwargs={"timeout": 60})
    sleeper.start()
    wait_until(lambda: model_states(stack["base"])[LLAMA] == "draining", 5, what="draining")
    r = c.completions.create(model=LLAMA, prompt="during drain", max_tokens=2)
    assert r.usage.completion_tokens == 2
    long.join(20)
    sleeper.join(20)
    assert _stats(stack, LLAMA)["aborted"] == 0  # nothing was cut off by the sleep


def test_deep_sleep_stops_the_process_and_a_request_starts_it(stack):
    sup = stack["sup"]
    wait_until(lambda: model_states(stack["base"])[DEEP] == "stopped", 20, what="deep sleep")
    assert sup.process_info("engine-deep")["statename"] == "STOPPED"
    r = _client(stack).completions.create(model=DEEP, prompt="x", max_tokens=2)
    assert r.usage.completion_tokens == 2
    # started again (RUNNING once supervisord's startsecs have passed)
    assert sup.process_info("engine-deep")["statename"] in ("STARTING", "RUNNING")
    _, st = get_json(stack["base"] + "/sleep/status")
    assert st["models"][DEEP]["state"] == "ready"


def test_engine_killed_mid_stream_in_band_error_restart_and_serve(stack):
    sup = stack["sup"]
    c = _client(stack)
    c.completions.create(model=LLAMA, prompt="x", max_tokens=1)
    pid = sup.process_info("engine-llama")["pid"]
    got = 0
    with pytest.raises(openai.APIError):
        for _ in c.completions.create(model=LLAMA, prompt="x", max_tokens=500, stream=True,
                                      extra_body={"ignore_eos": True}):
            got += 1
            if got == 5:
                os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: sup.process_info("engine-llama")["pid"] not in (0, pid), 20,
               what="supervisord restarted the engine")
    r = c.completions.create(model=LLAMA, prompt="x", max_tokens=2)  # waits for readiness
    assert r.usage.completion_tokens == 2


def test_router_restart_adopts_sleeping_engines(stack):
    sup = stack["sup"]
    c = _client(stack)
    c.completions.create(model=LLAMA, prompt="x", max_tokens=1)
    status, _, body = http("POST", stack["base"] + "/action/sleep/t%2Fllama")
    assert status == 200 and json.loads(body)["status"]["state"] == "sleeping"
    before = _stats(stack, LLAMA)
    sup.stop("kvrouter")
    sup.start("kvrouter")
    wait_until(lambda: model_states(stack["base"]).get(LLAMA) == "sleeping", 20,
               what="router adopted the sleeping engine")
    after = _stats(stack, LLAMA)
    assert (after["sleep_calls"], after["wake_calls"]) == (before["sleep_calls"],
                                                           before["wake_calls"])


def test_admin_errors(stack):
    assert http("POST", stack["base"] + "/model/sleep/nope")[0] == 404
    _ensure_asleep(stack, QWEN)
    # idempotent, like `systemctl start` on a running unit: success, nothing done
    status, _, body = http("POST", stack["base"] + "/model/sleep/t%2Fqwen")
    got = json.loads(body)
    assert status == 200 and got["success"] is True and got["changed"] is False
    assert "nothing was done" in got["message"] and got["status"]["state"] == "sleeping"
    status, _, body = http("POST", stack["base"] + "/model/wake/t%2Fqwen")
    got = json.loads(body)
    assert status == 200 and got["status"]["state"] == "ready" and got["changed"] is True
    assert got["model_name"] == QWEN and got["success"] is True
    status, _, body = http("POST", stack["base"] + "/action/wakeup/t%2Fqwen")
    assert status == 200 and json.loads(body)["changed"] is False
    _, cand = get_json(stack["base"] + "/sleep/candidates")
    assert isinstance(cand["candidates"], list)


def test_queue_overflow_and_admin_token(tmp_path):
    eng = SimEngine("vllm", model="slow", args=["--enable-sleep-mode", "--weights-gb", "50"])
    port = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, max_queue_per_model: 3,"
           " admin_token: s3cret}\nsleep_manager: {min_sleep_duration: 0}\n"
           "instances:\n%s") % (port, instance_yaml("slow", "slow", eng.port, "vllm"))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        assert http("POST", r.base + "/model/sleep/slow")[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert http("POST", r.base + "/model/sleep/slow", headers=auth, timeout=30)[0] == 200
        # the wake takes ~2 s (50 GB at 25 GB/s): 3 requests wait, the 4th is refused
        c = openai.OpenAI(base_url=r.base + "/v1", api_key="x", max_retries=0)
        threads = [threading.Thread(target=c.completions.create,
                                    kwargs=dict(model="slow", prompt="x", max_tokens=1))
                   for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: get_json(r.base + "/health/all")[1]["models"][0]
                   ["waiting_requests"] == 3, 5, what="3 waiting")
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="slow", prompt="x", max_tokens=1)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        for t in threads:
            t.join(20)
        assert eng.stats()["wake_calls"] == 1
    finally:
        r.stop()
        eng.stop()

