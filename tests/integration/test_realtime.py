"""WebSockets through the router: vLLM's `/v1/realtime` (realtime transcription) on a
simulated engine, with the `websocket-client` library: relayed both ways, by alias, with API
keys, a sleeping model woken by the handshake, the session in flight while open (the model
is not idle), ended cleanly by the client, by the engine and by the router's shutdown; bad
handshakes answered with a clear 4xx while the router keeps serving."""
import base64
import json
import struct
import time

import pytest
import websocket

from tests.helpers import Router, SimEngine, free_port, get_json, http, instance_yaml, wait_until

KEY = "sk-realtime-test"
MODEL = "rt/voxtral"


def _config(rp, engine, other, extra="", auto=False):
    return (f"router: {{router_port: {rp}, api_keys: [{KEY}]}}\n"
            "sleep_manager: {min_sleep_duration: 0, check_interval_seconds: 0.2, "
            f"auto_sleep_enabled: {str(auto).lower()}}}\ninstances:\n"
            + instance_yaml("rt", MODEL, engine.port, "vllm",
                            "    served_model_names: [voxtral]\n" + extra)
            + instance_yaml("o", "rt/other", other.port, "vllm"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    engine = SimEngine("vllm", MODEL, args=["--enable-sleep-mode"])
    other = SimEngine("vllm", "rt/other", args=["--enable-sleep-mode"])
    rp = free_port()
    router = Router(_config(rp, engine, other), str(tmp_path_factory.mktemp("realtime")))
    try:
        router.wait_models_ready()
        yield {"base": router.base, "rp": rp, "engine": engine}
    finally:
        router.stop()
        engine.stop()
        other.stop()


def _connect(rp, model="voxtral", key=KEY):
    return websocket.create_connection(
        f"ws://127.0.0.1:{rp}/v1/realtime" + (f"?model={model}" if model else ""),
        header=[f"Authorization: Bearer {key}"], timeout=10)


def _transcribe(ws, audio):
    ws.send(json.dumps({"type": "input_audio_buffer.append",
                        "audio": base64.b64encode(audio).decode()}))
    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    deltas = []
    while True:
        event = json.loads(ws.recv())
        if event["type"] == "transcription.delta":
            deltas.append(event["delta"])
        elif event["type"] == "transcription.done":
            return "".join(deltas).strip(), event["text"]
        else:
            raise AssertionError(event)


def _in_flight(base):
    return get_json(base + f"/traffic/stats/{MODEL}")[1]["requests_in_flight"]


def test_a_realtime_session_through_the_router_by_alias(stack):
    ws = _connect(stack["rp"])
    assert json.loads(ws.recv())["type"] == "session.created"
    ws.send(json.dumps({"type": "session.update", "model": MODEL}))
    streamed, text = _transcribe(ws, b"\x01\x02" * 5000)
    assert text.startswith("transcribed 10000 bytes") and streamed == text
    again, _ = _transcribe(ws, b"\x03" * 70000)   # a frame over 64 KiB, and a second turn
    assert again.startswith("transcribed 70000 bytes")
    assert _in_flight(stack["base"]) == 1          # the open session counts
    ws.ping(b"hi")                                 # control frames pass too
    ws.close()
    wait_until(lambda: _in_flight(stack["base"]) == 0, 5, what="session ended")
    assert get_json(stack["engine"].base + "/sim/stats")[1]["realtime_sessions"] >= 1


def test_a_session_wakes_a_sleeping_model(stack):
    base = stack["base"]
    assert http("POST", base + f"/model/sleep/{MODEL}")[0] == 200
    assert get_json(base + f"/health/{MODEL}")[1]["state"] == "sleeping"
    ws = _connect(stack["rp"], model=MODEL)
    assert json.loads(ws.recv())["type"] == "session.created"
    assert get_json(base + f"/health/{MODEL}")[1]["state"] == "ready"
    ws.close()


def test_the_engine_closing_ends_the_session_cleanly(stack):
    ws = _connect(stack["rp"])
    json.loads(ws.recv())
    ws.send(json.dumps({"type": "session.close"}))   # the sim engine closes first
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", data[:2])[0] == 1000
    wait_until(lambda: _in_flight(stack["base"]) == 0, 5, what="session ended")


@pytest.mark.parametrize("model,key,status", [
    ("nope", KEY, 404), ("voxtral", "wrong", 401), (None, KEY, 400)])
def test_bad_handshakes_get_a_clear_4xx(stack, model, key, status):
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        _connect(stack["rp"], model=model, key=key)
    assert err.value.status_code == status
    body = json.loads(err.value.resp_body)
    assert body["error"]["message"]
    if model is None:   # two models served: the router says which
        assert "rt/other" in body["error"]["message"]
    code, _, _ = http("GET", stack["base"] + "/v1/realtime?model=voxtral",
                      headers={"Authorization": f"Bearer {KEY}"})
    assert code == 400   # not a WebSocket handshake
    ws = _connect(stack["rp"])     # and the router still serves sessions
    assert json.loads(ws.recv())["type"] == "session.created"
    ws.close()


def test_an_open_session_keeps_its_model_awake_and_shutdown_says_going_away(tmp_path):
    engine = SimEngine("vllm", MODEL, args=["--enable-sleep-mode"])
    other = SimEngine("vllm", "rt/other", args=["--enable-sleep-mode"])
    rp = free_port()
    router = Router(_config(rp, engine, other, "    sleep: {idle_threshold_seconds: 0.5}\n",
                            auto=True),
                    str(tmp_path))
    try:
        router.wait_models_ready()
        ws = _connect(rp)
        json.loads(ws.recv())
        time.sleep(2.0)   # four idle thresholds with the session open and silent
        assert get_json(router.base + f"/health/{MODEL}")[1]["state"] == "ready"
        ws.close()        # closed: now it is idle, and sleeps
        wait_until(lambda: get_json(router.base + f"/health/{MODEL}")[1]["state"] ==
                   "sleeping", 10, what="the idle model asleep")
        ws = _connect(rp)   # woken by the next session
        json.loads(ws.recv())
        router.stop()     # SIGTERM: the client is told, not cut off
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert struct.unpack("!H", data[:2])[0] == 1001
    finally:
        router.stop()
        engine.stop()
        other.stop()
