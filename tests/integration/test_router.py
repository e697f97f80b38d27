"""The router in front of two simulated engines, driven by the official openai SDK."""
import json
import socket
import subprocess
import threading
import time

import openai
import pytest

from kvrouter.http.sse import parse_events
from tests.helpers import (
    Router,
    SimEngine,
    free_port,
    get_json,
    http,
    instance_yaml,
    run_concurrently,
    wait_until,
)
from tests.integration import conformance

VLLM_MODEL = "org/llama-sim"
SGL_MODEL = "org/qwen-sim"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    v = SimEngine("vllm", model=VLLM_MODEL, args=["--enable-sleep-mode", "--itl-ms", "2",
                                                  "--ttft-ms", "5", "--max-model-len", "512"])
    s = SimEngine("sglang", model=SGL_MODEL, args=["--enable-memory-saver", "--itl-ms", "2",
                                                   "--ttft-ms", "5"])
    port = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, max_body_mb: 1,"
           " request_timeout_seconds: 3, stream_idle_timeout_seconds: 2}\n"
           "instances:\n%s%s") % (
        port,
        instance_yaml("llama", VLLM_MODEL, v.port, "vllm", "    served_model_names: [llama]\n"),
        instance_yaml("qwen", SGL_MODEL, s.port, "sglang"))
    r = Router(cfg, str(tmp_path_factory.mktemp("router")))
    r.wait_models_ready()
    yield {"router": r, "vllm": v, "sglang": s}
    r.stop()
    v.stop()
    s.stop()


def client(stack, **kw):
    return openai.OpenAI(base_url=stack["router"].base + "/v1", api_key="x", max_retries=0, **kw)


@pytest.mark.parametrize("model", [VLLM_MODEL, SGL_MODEL])
@pytest.mark.parametrize("check", [c for c in conformance.NO_EMBEDDINGS
                                   if c is not conformance.check_models],
                         ids=lambda f: f.__name__)
def test_openai_api_through_router(stack, model, check):
    check(client(stack), model)


def test_embeddings_through_router(stack):
    conformance.check_embeddings(client(stack), SGL_MODEL)
    # a generative vLLM model has no embeddings route: its 404 reaches the client as is
    with pytest.raises(openai.NotFoundError):
        client(stack).embeddings.create(model=VLLM_MODEL, input="x")


def test_models_list_merged_with_aliases(stack):
    ids = [m.id for m in client(stack).models.list().data]
    assert ids == [VLLM_MODEL, "llama", SGL_MODEL]
    one = client(stack).models.retrieve("llama")
    assert one.id == "llama"
    with pytest.raises(openai.NotFoundError):
        client(stack).models.retrieve("nope")


def test_alias_routes_to_engine_under_its_own_name(stack):
    r = client(stack).completions.create(model="llama", prompt="hi", max_tokens=2)
    assert r.model == VLLM_MODEL and r.usage.completion_tokens == 2


def test_error_cases(stack):
    base = stack["router"].base
    c = client(stack)
    with pytest.raises(openai.BadRequestError) as e:  # no model
        c.completions.create(model="", prompt="x")
    assert e.value.body["code"] == "missing_model"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    status, _, body = http("POST", base + "/v1/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = http("POST", base + "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(body)["error"]["message"]
    big = json.dumps({"model": VLLM_MODEL, "prompt": "x" * (2 * 1024 * 1024)}).encode()
    status, _, body = http("POST", base + "/v1/completions", big)
    assert status == 413 and "error" in json.loads(body)


def test_upstream_4xx_passes_through_normalised(stack):
    c = client(stack)
    # vLLM's prompt-too-long 400 (max_model_len 512), envelope kept
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=VLLM_MODEL, prompt="word " * 600, max_tokens=10)
    assert "maximum context length is 512" in e.value.body["message"]
    # SGLang's flat error object becomes the envelope
    status, _, body = http("POST", stack["router"].base + "/v1/completions",
                           {"model": SGL_MODEL, "prompt": "x", "max_tokens": "many"})
    err = json.loads(body)
    assert status == 400 and set(err) == {"error"}
    assert "max_tokens" in err["error"]["message"]


def test_request_id_propagated_or_generated(stack):
    raw = client(stack).completions.with_raw_response.create(
        model=VLLM_MODEL, prompt="x", max_tokens=1, extra_headers={"X-Request-Id": "abc-123"})
    assert raw.headers["x-request-id"] == "abc-123"
    status, headers, _ = http("POST", stack["router"].base + "/v1/completions",
                              {"model": VLLM_MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200 and len(headers["X-Request-Id"]) == 32


def test_stream_headers(stack):
    raw = client(stack).completions.with_raw_response.create(
        model=SGL_MODEL, prompt="x", max_tokens=2, stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["cache-control"] == "no-cache"
    assert raw.headers["x-accel-buffering"] == "no"
    events = parse_events(raw.http_response.read())
    assert events[-1].data == "[DONE]" and len(events) >= 3


def test_client_disconnect_closes_upstream(stack):
    eng = stack["vllm"]
    before = eng.stats()["aborted"]
    s = socket.create_connection(("127.0.0.1", stack["router"].port))
    body = json.dumps({"model": VLLM_MODEL, "prompt": "x", "max_tokens": 450, "stream": True,
                       "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in s.recv(4096)
    wait_until(lambda: eng.stats()["running"] >= 1, 5, what="engine running")
    s.close()
    closed = time.monotonic()
    wait_until(lambda: eng.stats()["aborted"] == before + 1, 2, interval=0.01,
               what="engine saw the abort")
    assert time.monotonic() - closed < 2.0
    _, stats = get_json(stack["router"].base + "/traffic/stats/" + VLLM_MODEL)
    assert stats["failures"]["disconnect"] >= 1


def test_disconnect_while_waiting_for_first_byte(stack):
    eng = stack["sglang"]
    before = eng.stats()["aborted"]
    s = socket.create_connection(("127.0.0.1", stack["router"].port))
    body = json.dumps({"model": SGL_MODEL, "prompt": "x", "max_tokens": 3000,
                       "ignore_eos": True}).encode()  # not streamed: nothing is written back
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: eng.stats()["running"] >= 1, 5, what="engine running")
    s.close()
    wait_until(lambda: eng.stats()["aborted"] == before + 1, 2, interval=0.01,
               what="engine saw the abort")


def test_concurrent_streams_across_models(stack):
    """200 concurrent streams, both engines, each gets its full, right content."""
    c = client(stack, timeout=60)
    expected = {}
    for model in (VLLM_MODEL, SGL_MODEL):
        r = c.completions.create(model=model, prompt="p7", max_tokens=8,
                                 extra_body={"ignore_eos": True})
        expected[model] = r.choices[0].text
    def one(i):
        model = VLLM_MODEL if i % 2 else SGL_MODEL
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model=model, prompt="p7", max_tokens=8, stream=True,
            extra_body={"ignore_eos": True}) if ch.choices)
        return text == expected[model]

    results, errors = run_concurrently(one, 200)
    assert errors == []
    assert len(results) == 200 and all(results)


def test_health_endpoints(stack):
    base = stack["router"].base
    status, body = get_json(base + "/health")
    assert status == 200 and body["status"] == "healthy" and body["states"] == {"ready": 2}
    status, body = get_json(base + "/health/org%2Fqwen-sim")
    assert status == 200 and body["state"] == "ready" and body["engine"] == "sim"
    status, body = get_json(base + "/health/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    _, body = get_json(base + "/health/all")
    assert [m["model"] for m in body["models"]] == [VLLM_MODEL, SGL_MODEL]
    _, body = get_json(base + "/models")
    assert body["models"][VLLM_MODEL]["endpoint"] == stack["vllm"].base
    assert body["models"][VLLM_MODEL]["aliases"] == ["llama"]
    _, info = get_json(base + "/get_server_info")
    assert info["config_file"].endswith("kvrouter.yaml") and info["uptime_seconds"] > 0
    # probes never generate
    gen = stack["vllm"].stats()["requests"]
    for _ in range(3):
        get_json(base + "/health/all")
    assert stack["vllm"].stats()["requests"] == gen


def test_engine_unreachable_and_slow_start(tmp_path):
    """A model whose engine is down: requests wait (bounded) for readiness, then 503."""
    port = free_port()
    down = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, ready_timeout_seconds: 1.5}\n"
           "instances:\n%s") % (port, instance_yaml("late", "late/model", down, "vllm"))
    r = Router(cfg, str(tmp_path))
    try:
        c = openai.OpenAI(base_url=r.base + "/v1", api_key="x", max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="late/model", prompt="x", max_tokens=1)
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"]
        assert 1.4 <= time.monotonic() - t0 < 5
        # the engine comes up while a request waits: the request succeeds
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("r", c.completions.create(
            model="late/model", prompt="x", max_tokens=2)))
        th.start()
        time.sleep(0.3)
        eng = SimEngine("vllm", model="late/model", port=down, wait=False)
        try:
            th.join(10)
            assert out["r"].usage.completion_tokens == 2
        finally:
            eng.stop()
        # engine gone again: 503 naming the model, once readiness notices
        wait_until(lambda: get_json(r.base + "/health/late%2Fmodel")[0] == 503, 5,
                   what="router notices the engine is gone")
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="late/model", prompt="x", max_tokens=1)
        assert e.value.status_code == 503 and "late/model" in e.value.message
    finally:
        r.stop()


def test_midstream_engine_death_gives_in_band_error(tmp_path):
    eng = SimEngine("vllm", model="m", args=["--itl-ms", "20"])
    port = free_port()
    cfg = "router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s" % (
        port, instance_yaml("m", "m", eng.port, "vllm"))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        c = openai.OpenAI(base_url=r.base + "/v1", api_key="x", max_retries=0)
        got = 0
        with pytest.raises(openai.APIError) as e:
            for chunk in c.completions.create(model="m", prompt="x", max_tokens=500, stream=True,
                                              extra_body={"ignore_eos": True}):
                got += 1
                if got == 3:
                    http("POST", eng.base + "/sim/fail?exit=1")
        assert got >= 3 and "m" in str(e.value)
        _, stats = get_json(r.base + "/traffic/stats/m")
        assert stats["failures"]["upstream_error"] == 1
    finally:
        r.stop()
        eng.stop()


def test_upstream_timeout_is_504(tmp_path):
    eng = SimEngine("vllm", model="m", args=["--ttft-ms", "3000"])
    port = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, request_timeout_seconds: 0.5}\n"
           "instances:\n%s") % (port, instance_yaml("m", "m", eng.port, "vllm"))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        status, _, body = http("POST", r.base + "/v1/completions",
                               {"model": "m", "prompt": "x", "max_tokens": 1})
        assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    finally:
        r.stop()
        eng.stop()


def test_a_stream_the_engine_stops_sending_ends_with_an_error_event(tmp_path):
    """``stream_idle_timeout_seconds`` between two pieces of an engine's stream: the client
    gets what came, then an error event, and the engine's connection is closed."""
    eng = SimEngine("vllm", model="m", args=["--ttft-ms", "10", "--itl-ms", "3000"])
    port = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, stream_idle_timeout_seconds: 0.5}"
           "\ninstances:\n%s") % (port, instance_yaml("m", "m", eng.port, "vllm"))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        start = time.monotonic()
        status, _, body = http("POST", r.base + "/v1/completions",
                               {"model": "m", "prompt": "x", "max_tokens": 5, "stream": True},
                               timeout=10)
        took = time.monotonic() - start
        events = [json.loads(line[6:]) for line in body.decode().split("\n\n")
                  if line.startswith("data: {")]
        assert status == 200 and took < 2.5
        assert events[0]["choices"]                      # the first token came through
        assert events[-1]["error"]["code"] == "upstream_timeout"
        _, stats = get_json(r.base + "/traffic/stats/m")
        assert stats["failures"]["timeout"] == 1
    finally:
        r.stop()
        eng.stop()


def test_api_keys(tmp_path):
    eng = SimEngine("sglang", model="m")
    port = free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, api_keys: [sk-a, sk-b]}\n"
           "instances:\n%s") % (port, instance_yaml("m", "m", eng.port, "sglang"))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        bad = openai.OpenAI(base_url=r.base + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="m", prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=r.base + "/v1", api_key="sk-b", max_retries=0)
        assert good.completions.create(model="m", prompt="x", max_tokens=1).choices
        assert "sk-wrong" not in r.proc.output() and "sk-b" not in r.proc.output()
    finally:
        r.stop()
        eng.stop()


def test_responses_are_stateful_per_engine(stack):
    c = client(stack)
    made = {}
    for model in (VLLM_MODEL, SGL_MODEL):
        r = c.responses.create(model=model, input="hello", max_output_tokens=4)
        assert r.id.startswith("resp_") and r.output_text
        made[model] = r
    for model, r in made.items():  # each id goes back to the engine that made it
        again = c.responses.retrieve(r.id)
        assert again.id == r.id and again.output_text == r.output_text
    events = list(c.responses.create(model=SGL_MODEL, input="hi", max_output_tokens=3,
                                     stream=True))
    created = [e for e in events if e.type == "response.created"][0]
    assert c.responses.retrieve(created.response.id).status == "completed"
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve("resp_unknown")
    assert e.value.body["code"] == "response_not_found"


def test_the_engines_own_json_routes_are_routed_by_model(stack):
    """vLLM's /tokenize and /detokenize go through the router like /v1 (alias rewritten, a
    sleeping model woken, the request counted); a request without a model names the choices
    when the router serves several."""
    base = stack["router"].base
    v = stack["vllm"]
    assert http("POST", base + "/model/sleep/llama")[0] == 200
    before = get_json(base + f"/traffic/stats/{VLLM_MODEL.replace('/', '%2F')}")[1][
        "model_stats"]["total_requests"]
    status, _, raw = http("POST", base + "/tokenize",
                          {"model": "llama", "prompt": "Hello, router world"}, timeout=30)
    body = json.loads(raw)
    assert status == 200 and body["count"] == 4 and body["token_strs"] is None, body
    assert v.stats()["wake_calls"] >= 1                       # the request woke it
    status, _, raw = http("POST", base + "/detokenize",
                          {"model": "llama", "tokens": body["tokens"]})
    assert status == 200 and json.loads(raw)["prompt"] == "Hello , router world"
    after = get_json(base + f"/traffic/stats/{VLLM_MODEL.replace('/', '%2F')}")[1][
        "model_stats"]["total_requests"]
    assert after == before + 2
    status, _, raw = http("POST", base + "/tokenize", {"prompt": "x"})
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == "missing_model" and "llama" in err["message"] \
        and SGL_MODEL in err["message"]


def test_with_one_model_a_request_may_leave_the_model_out(tmp_path):
    eng = SimEngine("vllm", model="solo/model")
    r = Router("router: {router_host: 127.0.0.1, router_port: %d, api_keys: [k1]}\n"
               "instances:\n%s" % (free_port(), instance_yaml("solo", "solo/model", eng.port)),
               str(tmp_path))
    try:
        r.wait_models_ready()
        assert http("POST", r.base + "/tokenize", {"prompt": "a b"})[0] == 401   # keys too
        auth = {"Authorization": "Bearer k1"}
        status, _, raw = http("POST", r.base + "/tokenize", {"prompt": "a b"}, headers=auth)
        assert status == 200 and json.loads(raw)["count"] == 2
        status, _, raw = http("POST", r.base + "/v1/completions",
                              {"prompt": "hi", "max_tokens": 2}, headers=auth)
        assert status == 200 and json.loads(raw)["model"] == "solo/model"
    finally:
        r.stop()
        eng.stop()


def test_upstream_passthrough_reaches_anything_an_engine_serves(stack):
    """/upstream/MODEL/PATH: any method, query kept, the engine's own answer (not the OpenAI
    envelope), a sleeping model woken, counted; lifecycle endpoints refused."""
    base = stack["router"].base
    model = SGL_MODEL.replace("/", "%2F")
    # SGLang's own GET routes, through the model's name with its slash as is or encoded
    for name in (SGL_MODEL, model):
        status, _, raw = http("GET", base + f"/upstream/{name}/get_model_info")
        assert status == 200 and "model_path" in json.loads(raw), raw[:200]
    status, headers, raw = http("GET", base + f"/upstream/{SGL_MODEL}/metrics?x=1")
    assert status == 200 and b"sglang:" in raw
    # the engine's own error shape is kept (FastAPI's 404), not rewritten
    status, _, raw = http("GET", base + f"/upstream/{SGL_MODEL}/no/such/route")
    assert status == 404 and json.loads(raw) == {"detail": "Not Found"}
    # a sleeping model is woken by a passthrough request, which is counted
    assert http("POST", base + "/model/sleep/llama")[0] == 200
    before = get_json(base + "/traffic/stats/llama")[1]["model_stats"]["total_requests"]
    status, _, raw = http("POST", base + "/upstream/llama/tokenize", {"prompt": "a b c"},
                          timeout=30)
    assert status == 200 and json.loads(raw)["count"] == 3
    after = get_json(base + "/traffic/stats/llama")[1]["model_stats"]["total_requests"]
    assert after == before + 1
    # what the router manages is refused there, with the way to do it
    for path in ("sleep?level=1", "wake_up", "release_memory_occupation"):
        status, _, raw = http("POST", base + f"/upstream/llama/{path}")
        err = json.loads(raw)["error"]
        assert status == 403 and err["code"] == "lifecycle_endpoint" and \
            "/model/sleep/" in err["message"], (path, raw)
    status, _, raw = http("GET", base + "/upstream/nope/health")
    assert status == 404 and "llama" in json.loads(raw)["error"]["message"]


def test_sglang_native_generate_through_the_passthrough_with_curl(stack):
    """SGLang's /generate has no model field: /upstream/MODEL/generate reaches it, plain and
    streamed (curl -N: each event as it comes), counted under the model."""
    base = stack["router"].base
    before = get_json(base + f"/traffic/stats/{SGL_MODEL.replace('/', '%2F')}")[1][
        "model_stats"]["total_requests"]
    body = json.dumps({"text": "The capital of France is",
                       "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
    out = subprocess.run(["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
                          "-d", body, base + f"/upstream/{SGL_MODEL}/generate"],
                         capture_output=True, text=True, timeout=30)
    answer = json.loads(out.stdout)
    assert answer["meta_info"]["completion_tokens"] == 5 and answer["text"]
    assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    streamed = subprocess.run(
        ["curl", "-sS", "-N", "-X", "POST", "-H", "Content-Type: application/json", "-d",
         json.dumps(dict(json.loads(body), stream=True)),
         base + f"/upstream/{SGL_MODEL}/generate"], capture_output=True, timeout=30)
    events = [e.data for e in parse_events(streamed.stdout)]
    assert events[-1] == "[DONE]" and len(events) == 6
    assert json.loads(events[-2])["text"] == answer["text"]   # cumulative, as SGLang's
    after = get_json(base + f"/traffic/stats/{SGL_MODEL.replace('/', '%2F')}")[1][
        "model_stats"]["total_requests"]
    assert after == before + 2
