"""Restarts and stuck engines under a real supervisord: the router restarts over a sleeping
SGLang engine and over a stopped (deep-slept) engine; an engine stops answering mid-wake."""
import os
import signal

import pytest

from tests.helpers import (
    free_port,
    get_json,
    http,
    instance_yaml,
    model_states,
    supervised_stack,
    wait_until,
)

SGL, DEEP, HANG = "r/sgl", "r/deep", "r/hang"
FAST = "itl_ms: 5, ttft_ms: 5, startup_seconds: 0.3"


@pytest.fixture(scope="module")
def stack():
    rp, p1, p2, p3 = free_port(), free_port(), free_port(), free_port()
    cfg = (
        "router: {router_host: 127.0.0.1, router_port: %d, ready_timeout_seconds: 20}\n"
        "sleep_manager: {check_interval_seconds: 0.3, min_sleep_duration: 0,"
        " wake_timeout_seconds: 2}\n"
        "instances:\n%s%s%s") % (
        rp,
        instance_yaml("sgl", SGL, p1, "sglang", sim=FAST),
        instance_yaml("deep", DEEP, p2, "vllm", "    sleep: {stop_after_seconds: 0.5}\n",
                      sim=FAST),
        instance_yaml("hang", HANG, p3, "vllm", sim=FAST))
    base = f"http://127.0.0.1:{rp}"
    with supervised_stack(cfg, base) as sup:
        yield {"base": base, "sup": sup, "ports": {SGL: p1, DEEP: p2, HANG: p3}}


def _complete(stack, model, timeout=30):
    return http("POST", stack["base"] + "/v1/completions",
                {"model": model, "prompt": "x", "max_tokens": 2}, timeout=timeout)


def _restart_router(stack):
    stack["sup"].stop("kvrouter")
    stack["sup"].start("kvrouter")
    wait_until(lambda: get_json(stack["base"] + "/health", timeout=1)[0] == 200, 15,
               what="router back")


def test_router_restart_keeps_a_sleeping_sglang_engine_alive(stack):
    sup, name = stack["sup"], "engine-sgl"
    assert http("POST", stack["base"] + "/model/sleep/r%2Fsgl")[0] == 200
    pid = sup.process_info(name)["pid"]
    _restart_router(stack)
    # adopted as asleep without a generating health check (which kills a released SGLang)
    wait_until(lambda: model_states(stack["base"]).get(SGL) == "sleeping", 10, what="adopted")
    assert sup.process_info(name)["pid"] == pid
    assert sup.process_info(name)["statename"] in ("STARTING", "RUNNING")  # not exited
    stats = get_json(f"http://127.0.0.1:{stack['ports'][SGL]}/sim/stats")[1]
    assert stats["released"]
    status, _, body = _complete(stack, SGL)
    assert status == 200, body
    assert sup.process_info(name)["pid"] == pid


def test_router_restart_over_a_stopped_engine_and_a_request_starts_it(stack):
    sup, name = stack["sup"], "engine-deep"
    assert http("POST", stack["base"] + "/model/sleep/r%2Fdeep")[0] == 200
    wait_until(lambda: model_states(stack["base"]).get(DEEP) == "stopped", 10, what="deep sleep")
    assert sup.process_info(name)["statename"] == "STOPPED"
    _restart_router(stack)
    wait_until(lambda: model_states(stack["base"]).get(DEEP) == "stopped", 10,
               what="adopted as stopped, not left starting")
    status, _, body = _complete(stack, DEEP)
    assert status == 200, body
    assert sup.process_info(name)["statename"] in ("STARTING", "RUNNING")


def test_wake_against_an_engine_that_stops_answering(stack):
    sup, name = stack["sup"], "engine-hang"
    assert http("POST", stack["base"] + "/model/sleep/r%2Fhang")[0] == 200
    pid = sup.process_info(name)["pid"]
    os.killpg(pid, signal.SIGSTOP)  # the engine stops answering: /wake_up never returns
    try:
        status, _, body = _complete(stack, HANG, timeout=15)
        assert status == 503 and b"did not finish within 2s" in body, body
        _, st = get_json(stack["base"] + "/model/sleep/status")
        assert st["models"][HANG]["state"] == "failed"
        assert "wake failed" in st["models"][HANG]["reason"]
    finally:
        os.killpg(pid, signal.SIGCONT)  # lets supervisord's SIGTERM end it
    wait_until(lambda: sup.process_info(name)["pid"] not in (0, pid), 30,
               what="the router had supervisord restart the engine")
    status, _, body = _complete(stack, HANG)
    assert status == 200, body
    wait_until(lambda: model_states(stack["base"]).get(HANG) == "ready", 10, what="ready again")
