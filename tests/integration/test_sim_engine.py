"""The simulated engine behaves like vLLM and SGLang: APIs, sleep endpoints, quirks, timing."""
import json
import os
import socket
import threading
import time

import openai
import pytest

from tests.helpers import SimEngine, get_json, http, wait_until
from tests.integration import conformance


@pytest.fixture(scope="module", params=["vllm", "sglang"])
def engine(request):
    eng = SimEngine(request.param, model="org/sim-model",
                    args=["--enable-sleep-mode", "--enable-memory-saver", "--itl-ms", "2",
                          "--ttft-ms", "5"])
    yield eng
    eng.stop()


@pytest.mark.parametrize("check", conformance.NO_EMBEDDINGS, ids=lambda f: f.__name__)
def test_conformance(engine, check):
    client = openai.OpenAI(base_url=engine.base + "/v1", api_key="x", max_retries=0)
    check(client, engine.model)


def test_embeddings_follow_the_model_runner():
    """SGLang serves embeddings beside generation; vLLM only for a pooling model (a
    generative one has no /v1/embeddings route), and a pooling model does not generate."""
    sgl = SimEngine("sglang", model="org/emb")
    gen = SimEngine("vllm", model="org/gen")
    pool = SimEngine("vllm", model="org/pool", args=["--runner", "pooling"])
    try:
        for eng in (sgl, pool):
            conformance.check_embeddings(
                openai.OpenAI(base_url=eng.base + "/v1", api_key="x", max_retries=0), eng.model)
        status, _, body = http("POST", gen.base + "/v1/embeddings",
                               {"model": "org/gen", "input": "x"})
        assert status == 404 and json.loads(body) == {"detail": "Not Found"}
        status, _, _ = http("POST", pool.base + "/v1/completions",
                            {"model": "org/pool", "prompt": "x"})
        assert status == 404
    finally:
        for eng in (sgl, gen, pool):
            eng.stop()


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_completion_without_max_tokens_gets_the_engines_default_length(dialect):
    eng = SimEngine(dialect, model="org/len", args=["--min-output-tokens", "100"])
    try:
        status, _, body = http("POST", eng.base + "/v1/completions",
                               {"model": "org/len", "prompt": "hello", "ignore_eos": True})
        got = json.loads(body)
        assert status == 200 and got["usage"]["completion_tokens"] == 16
        assert got["choices"][0]["finish_reason"] == "length"
    finally:
        eng.stop()


def test_error_shapes_per_dialect(engine):
    status, _, body = http("POST", engine.base + "/v1/completions",
                           {"model": "other", "prompt": "x"})
    err = json.loads(body)
    assert status == 404
    if engine.dialect == "vllm":  # vLLM >= 0.10.1: nested envelope
        assert err["error"]["message"].startswith("The model `other` does not exist.")
        assert err["error"]["code"] == 404
    else:  # SGLang: flat legacy object
        assert err["object"] == "error" and err["code"] == 404


def test_sglang_requires_json_content_type():
    eng = SimEngine("sglang", model="m")
    try:
        status, _, body = http("POST", eng.base + "/v1/completions", b'{"prompt":"x"}',
                               headers={"Content-Type": "text/plain"})
        assert status == 400 and json.loads(body)["object"] == "error"
    finally:
        eng.stop()


def test_vllm_sleep_endpoints_need_dev_mode_and_flag():
    plain = SimEngine("vllm", model="m", env={"VLLM_SERVER_DEV_MODE": "0"},
                      args=["--enable-sleep-mode"])
    no_flag = SimEngine("vllm", model="m")
    try:
        assert http("POST", plain.base + "/sleep?level=1")[0] == 404
        assert http("GET", plain.base + "/is_sleeping")[0] == 404
        assert http("POST", no_flag.base + "/sleep?level=1")[0] == 404
    finally:
        plain.stop()
        no_flag.stop()


def test_vllm_sleep_level_is_a_query_parameter_and_request_hangs_until_wake():
    eng = SimEngine("vllm", model="m", args=["--enable-sleep-mode", "--weights-gb", "1"])
    try:
        # a JSON body is ignored: level comes from the query (default 1)
        assert http("POST", eng.base + "/sleep", {"level": 2})[0] == 200
        assert get_json(eng.base + "/is_sleeping")[1] == {"is_sleeping": True}
        metrics = http("GET", eng.base + "/metrics")[2].decode()
        assert 'sleep_state="weights_offloaded"} 1' in metrics
        result = {}

        def call():
            result["r"] = http("POST", eng.base + "/v1/completions",
                               {"prompt": "hi", "max_tokens": 2}, timeout=20)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "a request to a sleeping vLLM engine must hang"
        assert http("POST", eng.base + "/wake_up")[0] == 200
        t.join(10)
        assert result["r"][0] == 200
        assert eng.stats()["wake_calls"] == 1
        # /health does not report sleep
        assert http("GET", eng.base + "/health")[0] == 200
    finally:
        eng.stop()


def test_vllm_old_version_crashes_on_request_while_sleeping():
    eng = SimEngine("vllm", model="m", args=["--enable-sleep-mode", "--crash-on-sleeping-request"])
    try:
        http("POST", eng.base + "/sleep?level=1")
        with pytest.raises(OSError):
            http("POST", eng.base + "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                 timeout=5)
        wait_until(lambda: not eng.proc.alive(), 5, what="engine process dies")
        assert "illegal memory access" in eng.proc.output()
    finally:
        eng.stop()


def test_vllm_sleep_with_running_requests_aborts_them():
    eng = SimEngine("vllm", model="m", args=["--enable-sleep-mode", "--itl-ms", "20"])
    try:
        out = {}

        def call():
            out["r"] = http("POST", eng.base + "/v1/completions",
                            {"prompt": "hi", "max_tokens": 200, "ignore_eos": True}, timeout=20)

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: eng.stats()["running"] == 1, 5, what="request running")
        assert http("POST", eng.base + "/sleep?level=1")[0] == 200
        t.join(10)
        body = json.loads(out["r"][2])
        assert body["choices"][0]["finish_reason"] == "abort"
        assert body["usage"]["completion_tokens"] < 200
    finally:
        eng.stop()


def test_vllm_level2_plain_wake_gives_gibberish_reload_fixes_it():
    eng = SimEngine("vllm", model="m", args=["--enable-sleep-mode"])
    try:
        body = {"prompt": "hello", "max_tokens": 5, "ignore_eos": True}
        good = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        http("POST", eng.base + "/sleep?level=2")
        http("POST", eng.base + "/wake_up")
        bad = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        assert bad["choices"][0]["text"] != good["choices"][0]["text"]
        # the recipe: wake weights, reload, wake kv cache, reset prefix cache
        http("POST", eng.base + "/sleep?level=2")
        assert http("POST", eng.base + "/wake_up?tags=weights")[0] == 200
        assert http("POST", eng.base + "/collective_rpc", {"method": "reload_weights"})[0] == 200
        assert get_json(eng.base + "/is_sleeping")[1]["is_sleeping"] is True
        assert http("POST", eng.base + "/wake_up?tags=kv_cache")[0] == 200
        assert http("POST", eng.base + "/reset_prefix_cache")[0] == 200
        fixed = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        assert fixed["choices"][0]["text"] == good["choices"][0]["text"]
    finally:
        eng.stop()


def test_sglang_release_with_requests_running_kills_the_server():
    eng = SimEngine("sglang", model="m", args=["--enable-memory-saver", "--itl-ms", "20"])
    try:
        def doomed():
            with pytest.raises(OSError):  # the engine dies under it
                http("POST", eng.base + "/v1/completions",
                     {"prompt": "x", "max_tokens": 500, "ignore_eos": True})

        threading.Thread(target=doomed, daemon=True).start()
        wait_until(lambda: eng.stats()["running"] == 1, 5, what="request running")
        try:
            http("POST", eng.base + "/release_memory_occupation", {"tags": ["kv_cache"]},
                 timeout=3)
        except OSError:
            pass
        wait_until(lambda: not eng.proc.alive(), 5, what="engine dies")
        assert "AssertionError" in eng.proc.output()
    finally:
        eng.stop()


def test_sglang_resume_of_unreleased_tag_kills_the_server():
    eng = SimEngine("sglang", model="m", args=["--enable-memory-saver"])
    try:
        assert http("POST", eng.base + "/release_memory_occupation", {"tags": ["kv_cache"]})[0] \
            == 200
        try:
            http("POST", eng.base + "/resume_memory_occupation", {"tags": ["weights"]}, timeout=3)
        except OSError:
            pass
        wait_until(lambda: not eng.proc.alive(), 5, what="engine dies")
        assert "KeyError" in eng.proc.output()
    finally:
        eng.stop()


def test_sglang_weights_lost_without_cpu_backup_until_reload():
    eng = SimEngine("sglang", model="m", args=["--enable-memory-saver"])
    try:
        body = {"prompt": "hello", "max_tokens": 5, "ignore_eos": True}
        good = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        http("POST", eng.base + "/release_memory_occupation", {})
        # generation on released memory: garbage
        during = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        assert during["choices"][0]["text"] != good["choices"][0]["text"]
        http("POST", eng.base + "/resume_memory_occupation", {})
        after = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        assert after["choices"][0]["text"] != good["choices"][0]["text"]
        assert http("POST", eng.base + "/update_weights_from_disk", {"model_path": "m"})[0] == 200
        fixed = json.loads(http("POST", eng.base + "/v1/completions", body)[2])
        assert fixed["choices"][0]["text"] == good["choices"][0]["text"]
        # released/resumed counts are visible to tests
        assert eng.stats()["release_calls"] == 1 and eng.stats()["resume_calls"] == 1
    finally:
        eng.stop()


def test_sglang_generating_health_check_on_released_engine_crashes_it():
    eng = SimEngine("sglang", model="m", args=["--enable-memory-saver",
                                                 "--enable-weights-cpu-backup"])
    try:
        http("POST", eng.base + "/release_memory_occupation", {})
        assert http("GET", eng.base + "/model_info")[0] == 200  # the safe probe
        try:
            http("GET", eng.base + "/health", timeout=3)
        except OSError:
            pass
        wait_until(lambda: not eng.proc.alive(), 5, what="engine dies")
    finally:
        eng.stop()


def test_sglang_health_is_503_while_starting():
    eng = SimEngine("sglang", model="m", args=["--startup-seconds", "1.5"], wait=False)
    try:
        wait_until(lambda: http("GET", eng.base + "/model_info", timeout=1)[0] == 200, 10,
                   what="port bound")
        assert http("GET", eng.base + "/health")[0] == 503
        wait_until(lambda: http("GET", eng.base + "/health", timeout=1)[0] == 200, 10,
                   what="ready")
    finally:
        eng.stop()


def test_vllm_binds_port_only_after_loading():
    eng = SimEngine("vllm", model="m", wait=False)
    eng.proc.stop()
    eng = SimEngine("vllm", model="m", args=["--startup-seconds", "1.0"], wait=False)
    try:
        time.sleep(0.4)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", eng.port), timeout=0.5).close()
        eng.wait_ready(10)
    finally:
        eng.stop()


def test_client_disconnect_aborts_generation_and_frees_slot():
    eng = SimEngine("vllm", model="m", args=["--itl-ms", "20", "--max-concurrency", "1"])
    try:
        s = socket.create_connection(("127.0.0.1", eng.port))
        body = json.dumps({"prompt": "x", "max_tokens": 1000, "stream": True,
                           "ignore_eos": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.recv(1000)
        wait_until(lambda: eng.stats()["running"] == 1, 5, what="running")
        s.close()
        wait_until(lambda: eng.stats()["aborted"] == 1, 2, what="abort seen")
        assert eng.stats()["running"] == 0
        # the single slot is free again
        assert http("POST", eng.base + "/v1/completions", {"prompt": "x", "max_tokens": 2},
                    timeout=5)[0] == 200
    finally:
        eng.stop()


def test_timing_matches_configuration():
    eng = SimEngine("vllm", model="m", args=["--ttft-ms", "80", "--itl-ms", "25",
                                              "--prefill-ms-per-token", "0"])
    try:
        client = openai.OpenAI(base_url=eng.base + "/v1", api_key="x", max_retries=0)
        start = time.perf_counter()
        stamps = []
        for chunk in client.completions.create(model="m", prompt="hi", max_tokens=20,
                                               stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
        ttft = stamps[0] - start
        itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        assert len(stamps) == 20
        assert 0.070 <= ttft <= 0.160, ttft
        assert 0.022 <= itl <= 0.032, itl
    finally:
        eng.stop()


def test_kvcached_segment(tmp_path):
    name = f"kvr_test_{os.getpid()}"
    eng = SimEngine("vllm", model="m", args=["--kv-cache-gb", "1"],
                    env={"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": name})
    path = f"/dev/shm/{name}"
    try:
        import struct

        with open(path, "rb") as fh:
            total, used, prealloc = struct.unpack("<qqq", fh.read(24))
        assert total == 1024 ** 3 and used == 0 and prealloc == 0
    finally:
        eng.stop()
    assert not os.path.exists(path)  # unlinked on clean exit


def test_a_bad_request_never_leaves_the_engine_busy(engine):
    """A lone surrogate cannot be tokenized: 400, as the engines answer, and the engine's
    bookkeeping is released (a stuck running counter would keep the model from sleeping)."""
    raw = b'{"model": "org/sim-model", "prompt": "\\ud800 hi", "max_tokens": 3}'
    status, _, body = http("POST", engine.base + "/v1/completions", raw)
    assert status == 400 and b"surrogate" in body
    deep = b'{"model": "org/sim-model", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert http("POST", engine.base + "/v1/completions", deep)[0] == 400
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    ok = b'{"model": "org/sim-model", "prompt": "\\ud83d\\ude00 hi", "max_tokens": 3}'
    assert http("POST", engine.base + "/v1/completions", ok)[0] == 200  # a valid pair is fine


def test_a_repeated_prefix_skips_its_prefill_and_is_reported_as_vllm_does():
    """A conversation's next turn shares its leading blocks: prefill is shorter by them, and
    with --enable-prompt-tokens-details the usage says how many tokens came from the cache
    (SDK-readable); a sleep frees the KV cache, and with it every cached prefix."""
    eng = SimEngine("vllm", model="org/prefix", env={"VLLM_SERVER_DEV_MODE": "1"},
                    args=["--enable-sleep-mode", "--enable-prompt-tokens-details",
                          "--ttft-ms", "5", "--prefill-ms-per-token", "0.5"])
    try:
        client = openai.OpenAI(base_url=eng.base + "/v1", api_key="x", max_retries=0)
        history = " ".join(f"w{i}" for i in range(400))

        def ask(prompt):
            start = time.monotonic()
            r = client.completions.create(model="org/prefix", prompt=prompt, max_tokens=1)
            return time.monotonic() - start, r.usage.prompt_tokens_details.cached_tokens

        cold, cached0 = ask(history)
        warm, cached1 = ask(history + " and the next question")
        assert cached0 == 0 and cached1 == 400 and warm < cold - 0.1, (cold, warm)
        assert http("POST", eng.base + "/sleep?level=1")[0] == 200
        assert http("POST", eng.base + "/wake_up")[0] == 200
        assert ask(history)[1] == 0          # the cache went with the KV memory
        plain = SimEngine("vllm", model="org/plain")   # without the flag: no details
        try:
            r = http("POST", plain.base + "/v1/completions",
                     {"model": "org/plain", "prompt": history, "max_tokens": 1})
            assert json.loads(r[2])["usage"]["prompt_tokens_details"] is None
        finally:
            plain.stop()
    finally:
        eng.stop()
