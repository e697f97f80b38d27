"""Known traffic through the router gives exact statistics on both path spellings and /metrics."""
import time

import openai
import pytest

from tests.helpers import Router, SimEngine, free_port, get_json, http, instance_yaml

A, B = "org/a", "org/b"


@pytest.fixture(scope="module")
def driven(tmp_path_factory):
    ea = SimEngine("vllm", model=A, args=["--itl-ms", "1", "--ttft-ms", "2"])
    eb = SimEngine("sglang", model=B, args=["--itl-ms", "1", "--ttft-ms", "2"])
    port = free_port()
    cfg = "router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s%s" % (
        port, instance_yaml("a", A, ea.port, "vllm"), instance_yaml("b", B, eb.port, "sglang"))
    r = Router(cfg, str(tmp_path_factory.mktemp("traffic")))
    r.wait_models_ready()
    c = openai.OpenAI(base_url=r.base + "/v1", api_key="x", max_retries=0)
    for _ in range(10):
        c.completions.create(model=A, prompt="one two three", max_tokens=4,
                             extra_body={"ignore_eos": True})
    for _ in range(3):
        status, _, _ = http("POST", r.base + "/v1/completions",
                            {"model": B, "prompt": "x", "sim_fail_status": 500})
        assert status == 500
    for _ in range(2):
        assert http("POST", r.base + "/v1/completions", {"model": "nope", "prompt": "x"})[0] == 404
    for _ in range(4):
        list(c.chat.completions.create(model=B, max_tokens=5, stream=True,
                                       stream_options={"include_usage": True},
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"ignore_eos": True}))
    yield r
    r.stop()
    ea.stop()
    eb.stop()


@pytest.mark.parametrize("prefix", ["/model/traffic", "/traffic"])
def test_exact_counts(driven, prefix):
    status, body = get_json(driven.base + prefix + "/stats?window=60")
    assert status == 200 and body["unrouted_requests"] == 2
    a, b = body["models"][A], body["models"][B]
    assert (a["total_requests"], a["successful_requests"], a["failed_requests"]) == (10, 10, 0)
    assert a["completion_tokens"] == 40 and a["prompt_tokens"] == 30
    assert (b["total_requests"], b["successful_requests"], b["failed_requests"]) == (7, 4, 3)
    assert b["failures"]["upstream_error"] == 3
    assert b["streams"] == 4 and b["completion_tokens"] == 20
    assert b["time_to_first_token"]["p50"] is not None
    assert b["inter_token_latency"]["p50"] is not None
    assert a["window_requests"] == 10 and a["request_rate"] == pytest.approx(10 / 60, abs=1e-5)
    status, one = get_json(driven.base + prefix + "/stats/org%2Fa?window=120")
    assert one["total_requests"] == 10 and one["window_seconds"] == 120
    assert one["request_rate"] == pytest.approx(10 / 120, abs=1e-5)
    for key in ("total_requests", "successful_requests", "failed_requests", "request_rate",
                "avg_response_time", "last_activity_time", "idle_time_seconds", "is_idle"):
        assert key in one


@pytest.mark.parametrize("idle_path,active_path", [("/model/traffic/idle", "/model/traffic/active"),
                                                   ("/models/idle", "/models/active")])
def test_idle_and_active(driven, idle_path, active_path):
    time.sleep(0.3)
    _, idle = get_json(driven.base + idle_path + "?threshold=0.2")
    assert set(idle["models"]) == {A, B}
    _, idle = get_json(driven.base + idle_path + "?threshold=3600")
    assert idle["models"] == {}
    _, active = get_json(driven.base + active_path + "?threshold=3600&window=60")
    assert set(active["models"]) == {A, B}
    assert active["models"][A]["total_requests"] == 10


@pytest.mark.parametrize("query", ["window=abc", "window=-5", "window=7200", "threshold=x",
                                   "window=nan"])
def test_bad_parameters_are_400(driven, query):
    status, body = get_json(driven.base + "/traffic/stats?" + query)
    assert status == 400 and body["error"]["message"]


def test_unknown_model_is_404(driven):
    status, body = get_json(driven.base + "/model/traffic/stats/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_metrics_match(driven):
    status, headers, body = http("GET", driven.base + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples[f'kvrouter_requests_total{{model="{A}",outcome="success"}}'] == 10
    assert samples[f'kvrouter_requests_total{{model="{B}",outcome="upstream_error"}}'] == 3
    assert samples[f'kvrouter_requests_total{{model="{B}",outcome="success"}}'] == 4
    assert samples["kvrouter_unrouted_requests_total"] == 2
    assert samples[f'kvrouter_tokens_total{{kind="completion",model="{A}"}}'] == 40
    assert samples[f'kvrouter_tokens_total{{kind="completion",model="{B}"}}'] == 20
    assert samples[f'kvrouter_request_duration_seconds_count{{model="{A}"}}'] == 10
    assert samples[f'kvrouter_time_to_first_token_seconds_count{{model="{B}"}}'] == 4
    assert samples[f'kvrouter_model_state{{model="{A}",state="ready"}}'] == 1
    assert samples[f'kvrouter_requests_in_flight{{model="{A}"}}'] == 0
