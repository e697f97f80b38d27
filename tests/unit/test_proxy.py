"""The /v1 proxy without sockets: a mock upstream pool, a fake gate, the real route table,
traffic monitor and error normalisation."""
import json
import tempfile

import pytest

from kvrouter.config import parse_config_text
from kvrouter.control.entry import ModelEntry
from kvrouter.http.client import UpstreamError, UpstreamTimeout
from kvrouter.http.messages import Request, StreamResponse
from kvrouter.router.proxy import Proxy
from kvrouter.router.routes import RouteTable
from kvrouter.traffic import TrafficMonitor
from tests.fakes import FakeAdapter, FakeGate, FakeResponse, MockPool

CONFIG = """
router: {api_keys: [%s]}
instances:
  - {name: a, model: org/a, engine: vllm, served_model_names: [fast],
     engine_args: ['--port 9001 --served-model-name a-up']}
  - {name: b, model: org/b, engine: vllm, engine_args: ['--port 9002']}
"""
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "hi"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


def ok(status=200, body=COMPLETION):
    return FakeResponse(status, json.dumps(body).encode(),
                        headers={"content-type": "application/json"})


def make(handler, keys=""):
    cfg = parse_config_text(CONFIG % keys, base_dir=tempfile.mkdtemp(prefix="kvr-unit-"))
    entries = [ModelEntry(inst, FakeAdapter(inst), 0.0) for inst in cfg.instances]
    pools = {e.name: MockPool(handler) for e in entries}
    traffic = TrafficMonitor([e.name for e in entries])
    gate = FakeGate()
    proxy = Proxy(cfg, gate, traffic, RouteTable(entries), pool_for=lambda e: pools[e.name])
    return proxy, pools, traffic, gate


def request(body, path="/v1/completions", method="POST", headers=None):
    req = Request()
    req.method = method
    req.path = path
    req.url = path.encode()
    req.headers = {k.lower(): v for k, v in (headers or {}).items()}
    req.body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return req


def body_of(resp):
    if isinstance(resp, StreamResponse):
        return b"".join(resp.chunks)
    return resp.body


def test_alias_is_rewritten_to_the_engine_name_and_other_names_pass_unchanged():
    proxy, pools, _, _ = make(lambda *a: ok())
    raw = b'{"model": "org/b",  "prompt": "x"}'
    assert proxy.handle(request(raw)).status == 200
    assert pools["org/b"].requests[0][3] == raw  # byte for byte: not re-encoded
    assert proxy.handle(request({"model": "fast", "prompt": "x"})).status == 200
    sent = json.loads(pools["org/a"].requests[0][3])
    assert sent == {"model": "a-up", "prompt": "x"}


def test_the_pool_is_told_which_answers_come_whole():
    """Only a request that asks for no stream has its answer waited for before the first
    read (the pool's ``whole``); a stream, or a body the router does not read, is read first."""
    proxy, pools, _, _ = make(lambda *a: ok())
    for body in ({"model": "org/b", "prompt": "x"}, {"model": "org/b", "stream": False},
                 {"model": "org/b", "stream": True}):
        assert proxy.handle(request(body)).status == 200
    assert pools["org/b"].whole == [True, True, False]


def test_connection_refused_waits_for_readiness_and_sends_once_more():
    answers = [UpstreamError("connect", "cannot connect: refused"), ok()]
    proxy, pools, traffic, gate = make(lambda *a: answers.pop(0))
    resp = proxy.handle(request({"model": "org/a", "prompt": "x"}))
    assert resp.status == 200 and len(pools["org/a"].requests) == 2
    assert gate.ready_calls == 2 and gate.failures == [("org/a", "cannot connect: refused")]
    assert traffic.models["org/a"].outcomes["success"] == 1


def test_a_request_whose_engine_died_with_it_waits_for_the_restart_and_is_sent_once_more():
    """The engine's connection broke after the request was written, and its port refuses
    now: the process is gone with all it read (a request that came as it was killed), so
    the request waits until the engine is ready again and is sent once more."""
    answers = [UpstreamError("first_byte", "engine connection failed: closed"), ok()]
    proxy, pools, traffic, gate = make(lambda *a: answers.pop(0))
    pools["org/a"].dead = True
    resp = proxy.handle(request({"model": "org/a", "prompt": "x"}))
    assert resp.status == 200 and len(pools["org/a"].requests) == 2
    assert gate.ready_calls == 2
    assert traffic.models["org/a"].outcomes["success"] == 1


def test_a_request_the_engine_may_have_read_is_never_sent_twice():
    proxy, pools, traffic, gate = make(
        lambda *a: UpstreamError("first_byte", "engine connection failed: reset"))
    resp = proxy.handle(request({"model": "org/a", "prompt": "x"}))
    err = json.loads(resp.body)["error"]
    assert resp.status == 503 and err["code"] == "model_unreachable"
    assert len(pools["org/a"].requests) == 1
    assert traffic.models["org/a"].outcomes["upstream_error"] == 1


def test_timeout_is_504_in_the_envelope():
    proxy, _, traffic, _ = make(lambda *a: UpstreamTimeout("first_byte", "no response in 1s"))
    resp = proxy.handle(request({"model": "org/a", "prompt": "x"}))
    assert resp.status == 504
    assert json.loads(resp.body)["error"]["type"] == "timeout_error"
    assert traffic.models["org/a"].outcomes["timeout"] == 1


@pytest.mark.parametrize("engine_body, message", [
    (b'{"object": "error", "message": "bad n", "type": "BadRequestError", "param": "n",'
     b' "code": 400}', "bad n"),                                         # vLLM <= 0.10.0, SGLang
    (b'{"error": {"message": "bad n", "type": "BadRequestError", "param": "n", "code": 400}}',
     "bad n"),                                                           # vLLM >= 0.10.1
    (b'{"detail": "bad n"}', "bad n"),                                   # FastAPI
    (b"bad n", "bad n"),                                                 # plain text
])
def test_engine_errors_keep_their_status_and_become_the_envelope(engine_body, message):
    proxy, _, traffic, _ = make(lambda *a: FakeResponse(400, engine_body))
    resp = proxy.handle(request({"model": "org/a", "prompt": "x"}))
    assert resp.status == 400
    err = json.loads(resp.body)["error"]
    assert err["message"] == message and set(err) == {"message", "type", "param", "code"}
    assert traffic.models["org/a"].outcomes["client_error"] == 1


def test_usage_is_counted_from_plain_and_streamed_responses():
    events = [b'data: {"choices": [{"text": "h"}]}\n\n', b'data: {"choices": [{"text": "i"}]}\n\n',
              b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
              b"data: [DONE]\n\n"]
    streamed = {"yes": False}

    def handler(method, path, headers, body):
        if json.loads(body).get("stream"):
            streamed["yes"] = True
            return FakeResponse(200, chunks=events, headers={"content-type": "text/event-stream"})
        return ok()

    proxy, _, traffic, _ = make(handler)
    proxy.handle(request({"model": "org/a", "prompt": "x"}))
    resp = proxy.handle(request({"model": "org/a", "prompt": "x", "stream": True}))
    assert isinstance(resp, StreamResponse) and body_of(resp) == b"".join(events)
    m = traffic.models["org/a"]
    assert streamed["yes"] and m.prompt_tokens == 5 + 3 and m.completion_tokens == 7 + 2
    assert m.streams == 1 and m.outcomes["success"] == 2


def test_a_stream_that_breaks_ends_with_an_in_band_error():
    proxy, _, traffic, gate = make(lambda *a: FakeResponse(
        200, chunks=[b'data: {"choices": []}\n\n'],
        fail_after=UpstreamError("body", "engine closed the connection mid-response")))
    resp = proxy.handle(request({"model": "org/a", "prompt": "x", "stream": True}))
    out = body_of(resp).split(b"\n\n")
    assert json.loads(out[1][len(b"data: "):])["error"]["code"] == "upstream_error"
    assert traffic.models["org/a"].outcomes["upstream_error"] == 1 and gate.failures


def test_response_ids_route_back_to_the_engine_that_made_them():
    def handler(method, path, headers, body):
        if path == "/v1/responses":
            return ok(body={"id": "resp_abc", "object": "response"})
        return ok(body={"id": "resp_abc", "status": "completed"})

    proxy, pools, _, _ = make(handler)
    assert proxy.handle(request({"model": "org/b", "input": "x"}, "/v1/responses")).status == 200
    got = proxy.handle_response_id(request(b"", "/v1/responses/resp_abc", "GET"))
    assert got.status == 200 and len(pools["org/b"].requests) == 2
    assert pools["org/a"].requests == []
    missing = proxy.handle_response_id(request(b"", "/v1/responses/resp_nope", "GET"))
    assert missing.status == 404
    assert json.loads(missing.body)["error"]["code"] == "response_not_found"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1]", 400, "invalid_body"),
    (b'{"prompt": "x"}', 400, "missing_model"),
    (b'{"model": 3}', 400, "invalid_model"),
    (b'{"model": "nope"}', 404, "model_not_found"),
])
def test_bad_requests_are_answered_by_the_router(body, status, code):
    proxy, pools, traffic, _ = make(lambda *a: ok())
    resp = proxy.handle(request(body))
    assert resp.status == status and json.loads(resp.body)["error"]["code"] == code
    assert traffic.unrouted == 1 and all(p.requests == [] for p in pools.values())


def test_api_keys_are_checked_before_anything_else():
    proxy, pools, _, _ = make(lambda *a: ok(), keys="k1, k2")
    assert proxy.handle(request({"model": "org/a"})).status == 401
    assert proxy.handle(request({"model": "org/a"},
                                headers={"Authorization": "Bearer nope"})).status == 401
    assert proxy.handle(request({"model": "org/a"},
                                headers={"Authorization": "Bearer k2"})).status == 200
    assert len(pools["org/a"].requests) == 1


def test_anthropic_messages_count_tokens_and_break_off_in_anthropics_shape():
    events = [b'event: message_start\ndata: {"type": "message_start", "message": {"usage": '
              b'{"input_tokens": 9, "output_tokens": 0}}}\n\n',
              b'event: message_delta\ndata: {"type": "message_delta", "usage": '
              b'{"output_tokens": 4}}\n\n']
    proxy, _, traffic, _ = make(lambda *a: FakeResponse(
        200, chunks=events, headers={"content-type": "text/event-stream"},
        fail_after=UpstreamError("body", "engine closed the connection mid-response")))
    resp = proxy.handle(request({"model": "org/a", "max_tokens": 4, "stream": True,
                                 "messages": []}, path="/v1/messages"))
    out = body_of(resp).split(b"\n\n")
    assert out[2].startswith(b"event: error\ndata: ")
    err = json.loads(out[2].split(b"data: ", 1)[1])
    assert err["type"] == "error" and err["error"]["type"] == "api_error"
    m = traffic.models["org/a"]
    assert (m.prompt_tokens, m.completion_tokens) == (9, 4)   # input from the first event


@pytest.mark.parametrize("engine_body,status,kind", [
    (b'{"type": "error", "error": {"type": "BadRequestError", "message": "bad"}}', 400,
     "invalid_request_error"),
    (b'{"error": {"message": "bad", "type": "x"}}', 503, "overloaded_error"),
    (b"plain bad", 500, "api_error"),
])
def test_anthropic_errors_from_the_engine_keep_status_and_message(engine_body, status, kind):
    proxy, _, _, _ = make(lambda *a: FakeResponse(status, engine_body))
    resp = proxy.handle(request({"model": "org/a", "max_tokens": 1}, path="/v1/messages"))
    assert resp.status == status
    body = json.loads(resp.body)
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    assert "bad" in body["error"]["message"]


def test_anthropic_clients_key_and_router_errors():
    proxy, _, _, _ = make(lambda *a: ok(), keys="k1")
    req = request({"model": "org/a", "max_tokens": 1}, path="/v1/messages",
                  headers={"x-api-key": "k1"})
    assert proxy.handle(req).status == 200
    bad = proxy.handle(request({"model": "org/a"}, path="/v1/messages",
                               headers={"x-api-key": "k2"}))
    assert bad.status == 401 and json.loads(bad.body)["error"]["type"] == "authentication_error"
    assert json.loads(bad.body)["type"] == "error"
