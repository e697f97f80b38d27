"""Anthropic's Messages API through the router with the official `anthropic` SDK: vLLM's
`/v1/messages` on a simulated engine, by alias, streamed and not, with API keys (the SDK
sends `X-Api-Key`), to a sleeping model (woken by the request), token counts in the traffic
figures; and errors in the shape Anthropic's SDK parses, from the router and the engine."""
import json

import anthropic
import pytest
import requests

from tests.helpers import SimEngine, free_port, get_json, http, instance_yaml, router_over

KEY = "sk-messages-test"
MODEL = "msg/llama"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    engine = SimEngine("vllm", MODEL, args=["--enable-sleep-mode"])
    other = SimEngine("vllm", "msg/other")
    head = (f"router: {{router_port: {free_port()}, api_keys: [{KEY}]}}\n"
            "sleep_manager: {min_sleep_duration: 0}\n")
    with router_over(tmp_path_factory.mktemp("messages"), head, [
            instance_yaml("m", MODEL, engine.port, "vllm",
                          "    served_model_names: [claude-local]\n"),
            instance_yaml("o", "msg/other", other.port, "vllm")], [engine, other]) as router:
        yield {"base": router.base}


def _client(stack, key=KEY):
    return anthropic.Anthropic(base_url=stack["base"], api_key=key, max_retries=0)


def test_a_message_by_alias_with_the_anthropic_sdk(stack):
    _, before = get_json(stack["base"] + f"/traffic/stats/{MODEL}")
    msg = _client(stack).messages.create(
        model="claude-local", max_tokens=12, system="Be brief.",
        messages=[{"role": "user", "content": "Say hello"}])
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 12
    _, after = get_json(stack["base"] + f"/traffic/stats/{MODEL}")
    assert after["successful_requests"] == before["successful_requests"] + 1


def test_a_streamed_message_and_its_token_counts(stack):
    client = _client(stack)
    with client.messages.stream(model=MODEL, max_tokens=20,
                                messages=[{"role": "user", "content": "Count to ten"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.content[0].text == text
    assert final.usage.output_tokens > 0
    # the engine's answer, unstreamed, is the same text (the sim is deterministic)
    same = client.messages.create(model=MODEL, max_tokens=20,
                                  messages=[{"role": "user", "content": "Count to ten"}])
    assert same.content[0].text == text
    counted = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten"}])
    assert counted.input_tokens == final.usage.input_tokens


def test_a_message_wakes_a_sleeping_model(stack):
    base = stack["base"]
    assert http("POST", base + f"/model/sleep/{MODEL}")[0] == 200
    assert get_json(base + f"/health/{MODEL}")[1]["state"] == "sleeping"
    msg = _client(stack).messages.create(model=MODEL, max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text
    assert get_json(base + f"/health/{MODEL}")[1]["state"] == "ready"


def test_a_bad_key_is_refused_in_anthropics_shape(stack):
    with pytest.raises(anthropic.AuthenticationError) as err:
        _client(stack, key="wrong").messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": err.value.body["error"]["message"]}}
    assert "API key" in err.value.body["error"]["message"]


def test_an_unknown_model_is_a_not_found_error(stack):
    with pytest.raises(anthropic.NotFoundError) as err:
        _client(stack).messages.create(model="nope", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"] and "claude-local" in body["error"]["message"]


def test_the_engines_validation_error_reaches_the_client_in_anthropics_shape(stack):
    r = requests.post(stack["base"] + "/v1/messages", headers={"x-api-key": KEY},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                      timeout=10)   # no max_tokens: the engine refuses it
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    # and the router still serves the next one
    assert _client(stack).messages.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]).content


def test_the_model_list_says_which_routes_each_engine_kind_serves(stack):
    status, _, raw = http("GET", stack["base"] + "/v1/models",
                          headers={"Authorization": f"Bearer {KEY}"})
    cards = {c["id"]: c for c in json.loads(raw)["data"]}
    assert status == 200
    for route in ("POST /v1/messages", "GET /v1/realtime (WebSocket)",
                  "POST /v1/audio/transcriptions (upload)", "POST /tokenize"):
        assert route in cards["claude-local"]["routes"]
    _, models = get_json(stack["base"] + "/models")
    assert "ANY /upstream/{model}/{path}" in models["models"][MODEL]["routes"]
    _, state = get_json(stack["base"] + "/ui/state")
    assert any("POST /v1/messages" in m["routes"] for m in state["models"])
