"""Uploads through the router: the official openai SDK's audio transcription (a multipart
upload with a `model` field) to a simulated vLLM engine, by alias, to a sleeping model
(woken by the request), with API keys; and bad uploads answered with a clear 4xx while the
router keeps serving."""
import re
import socket
import time

import pytest
import requests
from openai import OpenAI

from tests.helpers import SimEngine, free_port, get_json, http, instance_yaml, router_over

KEY = "sk-upload-test"
MODEL = "up/whisper"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    engine = SimEngine("vllm", MODEL, args=["--enable-sleep-mode"])
    other = SimEngine("vllm", "up/other", args=["--enable-sleep-mode"])
    rp = free_port()
    head = (f"router: {{router_port: {rp}, api_keys: [{KEY}], max_upload_mb: 1}}\n"
            "sleep_manager: {min_sleep_duration: 0}\n")
    with router_over(tmp_path_factory.mktemp("uploads"), head, [
            instance_yaml("w", MODEL, engine.port, "vllm",
                          "    served_model_names: [whisper-1]\n"),
            instance_yaml("o", "up/other", other.port, "vllm")], [engine, other]) as router:
        yield {"base": router.base, "engine": engine, "rp": rp}


AUDIO = bytes(range(256)) * 400   # 100 KiB of "audio", every byte value in it


def test_the_openai_sdk_transcribes_an_upload_through_the_router_by_alias(stack):
    client = OpenAI(base_url=stack["base"] + "/v1", api_key=KEY)
    out = client.audio.transcriptions.create(model="whisper-1",
                                             file=("a.wav", AUDIO, "audio/wav"))
    assert out.text.startswith(f"transcribed {len(AUDIO)} bytes ")   # the whole file arrived
    again = client.audio.translations.create(model=MODEL, file=("a.wav", AUDIO, "audio/wav"))
    assert again.text.split()[-1] == out.text.split()[-1]           # byte for byte the same
    _, stats = get_json(stack["base"] + f"/traffic/stats/{MODEL}")
    assert stats["successful_requests"] >= 2


def test_an_upload_wakes_a_sleeping_model(stack):
    base = stack["base"]
    assert http("POST", base + f"/model/sleep/{MODEL}")[0] == 200
    client = OpenAI(base_url=base + "/v1", api_key=KEY)
    out = client.audio.transcriptions.create(model=MODEL, file=("a.wav", b"abc", "audio/wav"))
    assert out.text.startswith("transcribed 3 bytes")
    assert get_json(base + f"/health/{MODEL}")[1]["state"] == "ready"


def _post(base, files=None, data=None, key=KEY, **kw):
    return requests.post(base + "/v1/audio/transcriptions", files=files, data=data,
                         headers={"Authorization": f"Bearer {key}"} if key else {},
                         timeout=30, **kw)


@pytest.mark.parametrize("data,status,code", [
    ({}, 400, "missing_model"),                      # no model field (two models served)
    ({"model": "nope"}, 404, "model_not_found"),
])
def test_bad_uploads_get_a_clear_4xx(stack, data, status, code):
    r = _post(stack["base"], files={"file": ("a.wav", b"x" * 10)}, data=data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_a_model_field_after_the_file_still_routes(stack):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + b"y" * 50000 + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
         f"whisper-1\r\n--{boundary}--\r\n").encode()
    r = requests.post(stack["base"] + "/v1/audio/transcriptions", data=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}",
                               "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200 and r.json()["text"].startswith("transcribed 50000 bytes")


def test_an_oversized_upload_is_refused_before_its_body_and_without_a_key_first(stack):
    big = {"file": ("a.wav", b"z" * (2 * 1024 * 1024))}
    r = _post(stack["base"], files=big, data={"model": MODEL}, key=None)
    assert r.status_code == 401   # the key is checked before anything else
    r = _post(stack["base"], files=big, data={"model": MODEL})
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    assert _post(stack["base"], files={"file": ("a", b"ok")},
                 data={"model": MODEL}).status_code == 200   # the router still serves


def test_a_half_sent_upload_is_a_400_and_nothing_else_suffers(stack):
    base = stack["base"]
    body = b"--zz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n" + MODEL.encode() + \
        b"\r\n--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc"
    r = requests.post(base + "/v1/audio/transcriptions", data=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}",
                               "Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"]
    # a client that sends half its declared body and goes away: the others are served
    s = socket.create_connection(("127.0.0.1", stack["rp"]))
    s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + KEY.encode() + b"\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
              b"Content-Length: 100000\r\n\r\n" + body[:100])
    s.close()
    client = OpenAI(base_url=base + "/v1", api_key=KEY)
    assert client.audio.transcriptions.create(model=MODEL, file=("a", b"q")).text


def _upload_head(model, length, boundary=b"zz"):
    """Request head and the body's first bytes: the model field, then a file part opened."""
    part = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            + model.encode() + b"\r\n--" + boundary +
            b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n")
    head = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nContent-Type: multipart/form-data; boundary=" + boundary +
            b"\r\n" + (b"Content-Length: %d\r\n" % length if length else
                       b"Transfer-Encoding: chunked\r\n") + b"\r\n")
    return head, part


def _read_status(sock, timeout=10):
    """The response's status and bytes (read to the end of a Content-Length body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"(?i)content-length: *(\d+)", data).group(1)):
        got = sock.recv(65536)
        if not got:
            break
        data += got
    return int(data.split(b" ", 2)[1]), data


def test_an_upload_reaches_the_engine_before_the_client_has_sent_it_all(stack):
    """Streamed both ways: the engine has the first 200 KB while the client still holds the
    rest; nothing waits for the whole body."""
    engine = stack["engine"]
    before = get_json(engine.base + "/sim/stats")[1]["upload_bytes"]
    first, rest = b"a" * 200_000, b"b" * 300_000
    tail = b"\r\n--zz--\r\n"
    head, part = _upload_head(MODEL, 0)
    body_start = part + first
    s = socket.create_connection(("127.0.0.1", stack["rp"]))
    s.sendall(head + b"%x\r\n%b\r\n" % (len(body_start), body_start))
    deadline = time.monotonic() + 10
    while get_json(engine.base + "/sim/stats")[1]["upload_bytes"] - before < 200_000:
        assert time.monotonic() < deadline, "the engine never got the first part"
        time.sleep(0.05)
    end = rest + tail
    s.sendall(b"%x\r\n%b\r\n0\r\n\r\n" % (len(end), end))
    status, data = _read_status(s)
    s.close()
    assert status == 200 and b"transcribed 500000 bytes" in data


def test_an_upload_for_an_unknown_model_is_refused_before_its_file_is_sent(stack):
    head, part = _upload_head("no-such-model", 900_000)
    s = socket.create_connection(("127.0.0.1", stack["rp"]))
    s.sendall(head + part + b"x" * 1000)   # 900 KB announced, 1 KB of it sent
    status, data = _read_status(s)
    s.close()
    assert status == 404 and b"model_not_found" in data


def test_a_chunked_upload_past_the_limit_is_a_413(stack):
    head, part = _upload_head(MODEL, 0)
    s = socket.create_connection(("127.0.0.1", stack["rp"]))
    s.sendall(head + b"%x\r\n%b\r\n" % (len(part), part))
    piece = b"c" * 65536
    status = None
    try:
        for _ in range(40):   # 2.5 MB against a 1 MB limit
            s.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
    except OSError:
        pass
    status, data = _read_status(s)
    s.close()
    assert status == 413 and b"upload_too_large" in data
    client = OpenAI(base_url=stack["base"] + "/v1", api_key=KEY)
    assert client.audio.transcriptions.create(model=MODEL, file=("a", b"q")).text


def test_the_passthrough_needs_the_key_and_streams_an_upload_on(stack):
    base = stack["base"]
    assert http("GET", base + f"/upstream/{MODEL}/v1/models")[0] == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, raw = http("GET", base + f"/upstream/{MODEL}/v1/models", headers=auth)
    assert status == 200 and MODEL in raw.decode()
    # an upload through the passthrough: sent on as it arrives, the engine's answer back
    r = requests.post(base + f"/upstream/{MODEL}/v1/audio/transcriptions", headers=auth,
                      files={"file": ("a.wav", AUDIO)}, data={"model": MODEL}, timeout=30)
    assert r.status_code == 200 and r.json()["text"].startswith(f"transcribed {len(AUDIO)}")
