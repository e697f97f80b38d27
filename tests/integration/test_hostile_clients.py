"""Clients that try to exhaust the router: slow headers, bytes pipelined without limit,
unauthenticated large bodies, deeply nested JSON, running out of descriptors. Each one is
contained and every other request keeps being served."""
import json
import socket
import time

import pytest

from tests.helpers import Router, SimEngine, free_port, http, instance_yaml

MODEL = "org/hostile-sim"
KEY = "sk-test"


@pytest.fixture(scope="module")
def engine():
    eng = SimEngine("vllm", model=MODEL, args=["--itl-ms", "20", "--ttft-ms", "5",
                                               "--min-output-tokens", "200",
                                               "--max-output-tokens", "200"])
    yield eng
    eng.stop()


def router_config(engine, port, extra=""):
    return ("router: {router_host: 127.0.0.1, router_port: %d, max_body_mb: 1,"
            " header_timeout_seconds: 1, api_keys: [%s]%s}\ninstances:\n%s") % (
        port, KEY, extra, instance_yaml("m", MODEL, engine.port))


@pytest.fixture(scope="module")
def router(engine, tmp_path_factory):
    r = Router(router_config(engine, free_port()), str(tmp_path_factory.mktemp("hostile")))
    r.wait_models_ready()
    yield r
    r.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def healthy(router, timeout=2.0):
    status, _, _ = http("GET", router.base + "/health", timeout=timeout)
    return status == 200


def completion(router, timeout=10.0):
    return http("POST", router.base + "/v1/completions",
                {"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=AUTH,
                timeout=timeout)


def closed_within(sock, seconds, trickle=None):
    """Seconds until the peer closes ``sock`` (sending ``trickle`` bytes one at a time
    meanwhile), or None if it is still open after ``seconds``."""
    start = time.monotonic()
    sock.settimeout(0.25)
    while time.monotonic() - start < seconds:
        if trickle:
            try:
                sock.send(trickle[:1])
                trickle = trickle[1:]
            except OSError:
                return time.monotonic() - start
        try:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_slow_headers_are_cut_at_the_header_deadline(router):
    s = socket.create_connection(("127.0.0.1", router.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    # one byte every 0.25 s would reset a per-read timeout forever
    took = closed_within(s, 6.0, trickle=b"X-Slow: " + b"a" * 100)
    s.close()
    assert took is not None and took < 3.0, took
    assert healthy(router)


def test_bytes_sent_while_a_request_is_served_are_bounded(router):
    before = router.rss_mb()
    socks = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", router.port))
        body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 200,
                           "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        socks.append(s)
    junk = b"G" * 65536
    for s in socks:
        s.settimeout(5)
        try:
            for _ in range(20 * 16):       # up to 20 MB each while the stream runs
                s.sendall(junk)
        except OSError:
            pass                           # the router closed the connection
    # every connection ends (closed at the limit, or answered 400 and drained): none is
    # kept open with what it sent held in memory
    assert all(closed_within(s, 6.0) is not None for s in socks)
    for s in socks:
        s.close()
    assert healthy(router)
    assert router.rss_mb() - before < 40, (before, router.rss_mb())


def test_unauthenticated_bodies_are_refused_on_the_headers(router):
    s = socket.create_connection(("127.0.0.1", router.port), timeout=3)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000\r\n\r\n")  # and no body: the answer must not wait
    head = s.recv(65536)
    s.close()
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"invalid_api_key" in head and b"Connection: close" in head


def test_models_list_needs_the_api_key(router):
    assert http("GET", router.base + "/v1/models")[0] == 401
    assert http("GET", router.base + f"/v1/models/{MODEL}")[0] == 401
    status, _, body = http("GET", router.base + "/v1/models", headers=AUTH)
    assert status == 200 and json.loads(body)["data"][0]["id"] == MODEL


def test_deeply_nested_json_is_a_client_error(router):
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * 100000 + b"]" * 100000 \
        + b"}"
    status, _, raw = http("POST", router.base + "/v1/completions", body,
                          headers=dict(AUTH, **{"Content-Type": "application/json"}))
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "invalid_json"
    assert "Traceback" not in router.proc.output()


def test_descriptor_exhaustion_under_a_lowered_limit(engine, tmp_path):
    """64 descriptors and no connection cap: accept() runs out; the router says so in one
    line now and then, closes idle connections, and still serves a real request."""
    r = Router(router_config(engine, free_port(), ", max_connections: 1000"), str(tmp_path),
               open_files=64)
    hogs = []
    try:
        r.wait_models_ready()
        for _ in range(120):
            try:
                hogs.append(socket.create_connection(("127.0.0.1", r.port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)  # connections that never sent a request are closed after 0.5 s idle
        status, _, body = completion(r, timeout=15)
        assert status == 200, body
        out = r.proc.output()
        assert "open files limit 64" in out and "Traceback" not in out, out[-3000:]
        assert r.proc.alive()
    finally:
        for s in hogs:
            s.close()
        r.stop()


def test_connection_cap_from_the_descriptor_limit_keeps_room_for_real_requests(engine, tmp_path):
    r = Router(router_config(engine, free_port()), str(tmp_path), open_files=96)
    hogs = []
    try:
        r.wait_models_ready()
        assert "up to 16 client connections" in r.proc.output()
        hogs = [socket.create_connection(("127.0.0.1", r.port), timeout=2) for _ in range(60)]
        for _ in range(3):
            status, _, _ = completion(r, timeout=10)
            assert status == 200
        assert "Traceback" not in r.proc.output()
    finally:
        for s in hogs:
            s.close()
        r.stop()


def test_out_of_descriptors_is_503_for_the_request_never_a_failed_engine(engine, tmp_path):
    """60 streams under a 64-descriptor limit: each one is served or refused at once with
    a clear 503; none hangs, and the (healthy) engine is never marked failed."""
    from tests.helpers import get_json, run_concurrently

    r = Router(router_config(engine, free_port(), ", max_connections: 1000"), str(tmp_path),
               open_files=64)
    try:
        r.wait_models_ready()

        def one(i):
            status, _, body = http("POST", r.base + "/v1/completions",
                                   {"model": MODEL, "prompt": f"p{i}", "max_tokens": 20,
                                    "stream": True}, headers=AUTH, timeout=30)
            if status == 503:
                assert json.loads(body)["error"]["code"] in ("router_overloaded",
                                                             "server_busy"), body
            return status

        statuses, errors = run_concurrently(one, 60, timeout=60)
        assert errors == [] and len(statuses) == 60
        assert set(statuses) <= {200, 503} and statuses.count(200) > 0
        _, health = get_json(r.base + "/health/all")
        assert [m["state"] for m in health["models"]] == ["ready"]
        assert "marked failed" not in r.proc.output() and "-> failed" not in r.proc.output()
    finally:
        r.stop()


def test_one_address_cannot_hold_every_connection(engine, tmp_path):
    """Trickling header bytes from one address holds at most its share: the next connection
    from it is answered 503 at once (one warning a minute), other addresses are served, and a
    listed proxy is not capped."""
    port = free_port()
    r = Router(router_config(engine, port, ", max_connections_per_client: 4, "
                             "trusted_proxies: [127.0.0.3]")
               .replace("router_host: 127.0.0.1", "router_host: 0.0.0.0")
               .replace("header_timeout_seconds: 1", "header_timeout_seconds: 20"),
               str(tmp_path))
    held = []
    try:
        r.wait_models_ready()
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")   # never ends its headers
            held.append(s)
        time.sleep(0.3)
        for _ in range(3):
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            answer = extra.recv(4096)
            extra.close()
            assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        other = socket.create_connection(("127.0.0.2", port), source_address=("127.0.0.2", 0))
        other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert other.recv(4096).startswith(b"HTTP/1.1 200")
        other.close()
        proxy = []
        for _ in range(6):   # a trusted proxy's address may hold more
            s = socket.create_connection(("127.0.0.3", port), source_address=("127.0.0.3", 0))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            proxy.append(s)
        proxy[-1].sendall(b"\r\n")
        assert proxy[-1].recv(4096).startswith(b"HTTP/1.1 200")
        held.extend(proxy)
        text = r.proc.output()
        assert text.count("refusing more from it") == 1, text[-2000:]
    finally:
        for s in held:
            s.close()
        r.stop()
