"""kvrouter's HTTP/1.1 server side: keep-alive, chunked both ways, limits, 100-continue,
pipelining, slow and half-closed clients, client gone."""
import json
import socket
import time

import pytest

from tests.helpers import PY, Proc, free_port, get_json, http, wait_until


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = Proc([PY, "tests/integration/http_echo_server.py", str(port)])
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http("GET", base + "/x", timeout=1)[0] == 200, 10, what="echo server")
    yield port, base
    proc.stop()


def conn(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def read_response(s):
    """Read one response (Content-Length or chunked); return (head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        while len(rest) < n:
            rest += s.recv(65536)
        return head, rest[:n], rest[n:]
    if headers.get(b"transfer-encoding") == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            if not data:
                break
            rest += data
        body, pos = b"", 0
        while True:
            end = rest.index(b"\r\n", pos)
            size = int(rest[pos:end], 16)
            if size == 0:
                break
            body += rest[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
        return head, body, b""
    while True:
        data = s.recv(65536)
        if not data:
            return head, rest, b""
        rest += data


def test_keep_alive_reuses_the_connection(server):
    port, _ = server
    s = conn(port)
    for i in range(3):
        s.sendall(b"GET /a%2Fb?i=" + str(i).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 200")
        echo = json.loads(body)
        assert echo["path"] == "/a/b" and echo["query"] == f"i={i}"
    s.close()


def test_pipelined_requests_answered_in_order(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    _, b1, rest = read_response(s)
    assert json.loads(b1)["path"] == "/one"
    if rest:
        assert b"/two" in rest
    else:
        _, b2, _ = read_response(s)
        assert json.loads(b2)["path"] == "/two"
    s.close()


def test_chunked_request_body(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    _, body, _ = read_response(s)
    assert json.loads(body)["body"] == "hello world"


def test_expect_100_continue(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(b"data")
    _, body, _ = read_response(s)
    assert json.loads(body)["body"] == "data"


def test_expect_100_continue_refused_when_too_large(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n"
              b"Expect: 100-continue\r\n\r\n")
    head, body, _ = read_response(s)
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert json.loads(body)["error"]["message"].startswith("request body over")


def test_body_and_header_limits(server):
    _, base = server
    assert http("POST", base + "/e", b"x" * 20000)[0] == 413
    assert http("GET", base + "/e", headers={"X-Big": "y" * 8000})[0] == 431


def test_malformed_request_is_400(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"BLAH / HTTP/1.1\r\n\r\n")
    head, _, _ = read_response(s)
    assert head.startswith(b"HTTP/1.1 400")


def test_streamed_response_is_chunked_and_arrives_incrementally(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"GET /stream?n=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    first = s.recv(65536)
    assert b"Transfer-Encoding: chunked" in first
    assert b"data: 4" not in first  # the first event came before the last was produced
    rest = first
    while not rest.endswith(b"0\r\n\r\n"):
        rest += s.recv(65536)
    assert rest.count(b"data: ") == 5


def test_http10_stream_ends_by_close(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"GET /stream?n=3 HTTP/1.0\r\n\r\n")
    head, body, _ = read_response(s)
    assert b"chunked" not in head and body.count(b"data: ") == 3


def test_client_gone_mid_stream_closes_the_producer(server):
    port, base = server
    before = get_json(base + "/state")[1]["stream_closed"]
    s = conn(port)
    s.sendall(b"GET /stream?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(100)
    s.close()
    wait_until(lambda: get_json(base + "/state")[1]["stream_closed"] == before + 1, 2,
               what="generator closed")


def test_client_gone_while_handler_waits(server):
    port, base = server
    before = get_json(base + "/state")[1]["handler_gone"]
    s = conn(port)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    s.shutdown(socket.SHUT_WR)  # half-closed counts as gone, as with nginx
    t0 = time.monotonic()
    wait_until(lambda: get_json(base + "/state")[1]["handler_gone"] == before + 1, 2,
               interval=0.01, what="handler interrupted")
    assert time.monotonic() - t0 < 1.0
    s.close()


def test_only_a_request_served_a_while_has_its_client_watched(monkeypatch):
    """A request answered within WATCH_AFTER costs no watcher greenlet (nor its read of
    the socket); one that runs longer gets one, the first time and every time after (the
    connection's timer, once it fired, must still wait the whole period)."""
    import gevent
    import gevent.socket

    from kvrouter.http.connection import WATCH_AFTER, Connection
    from kvrouter.http.messages import Response
    from kvrouter.http.server import HTTPServer

    watched = []
    real_watch = Connection._watch
    monkeypatch.setattr(Connection, "_watch",
                        lambda self, target: (watched.append(self.served),
                                              real_watch(self, target)))

    def handle(req):
        # (each waits, as on an engine: the hub runs while it does)
        gevent.sleep(WATCH_AFTER * 3 if req.path == "/slow" else 0.001)
        return Response(200, [("Content-Type", "text/plain")], b"ok")

    server = HTTPServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        s = gevent.socket.create_connection(server.address, timeout=5)
        paths = ["/slow", "/fast", "/fast", "/fast", "/slow", "/fast", "/fast"]
        for path in paths:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, body, _ = read_response(s)
            assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
            gevent.sleep(0.005)
        s.close()
    finally:
        server.stop()
    assert watched == [1, 5]   # the two slow requests, by their number on the connection


def test_a_client_that_never_reads_its_answer_is_cut_at_the_write_timeout():
    """A response bigger than the socket buffers to a client that reads nothing: the
    server gives up after ``write_timeout`` and closes, and serves the next client."""
    import gevent
    import gevent.socket

    from kvrouter.http.limits import ServerLimits
    from kvrouter.http.messages import Response
    from kvrouter.http.server import HTTPServer

    big = b"x" * (64 * 1024 * 1024)
    server = HTTPServer(("127.0.0.1", 0), lambda req: Response(
        200, [("Content-Type", "text/plain")], big if req.path == "/big" else b"ok"),
        limits=ServerLimits(write_timeout=0.3))
    server.start()
    try:
        stuck = gevent.socket.create_connection(server.address)
        stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        gevent.sleep(1.5)               # reads nothing meanwhile
        other = gevent.socket.create_connection(server.address, timeout=5)
        other.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body, _ = read_response(other)
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        other.close()
        got, stuck_timeout = 0, gevent.Timeout(10)
        with stuck_timeout:
            while True:
                data = stuck.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        assert got < len(big)           # closed short: the rest was never sent
        stuck.close()
    finally:
        server.stop()


def test_idle_and_slow_header_clients_are_dropped(server):
    port, base = server
    idle = conn(port)
    slow = conn(port)
    slow.sendall(b"GET /x HTTP/1.1\r\nHost")  # never finishes its headers
    time.sleep(1.5)
    assert idle.recv(10) == b""
    assert slow.recv(10) == b""
    assert http("GET", base + "/x")[0] == 200  # the server keeps serving


def test_handler_error_is_500_and_server_survives(server):
    _, base = server
    status, _, body = http("GET", base + "/boom")
    assert status == 500 and json.loads(body)["error"]["type"] == "internal_server_error"
    assert http("GET", base + "/x")[0] == 200


def test_tcp_nodelay_small_responses_are_fast(server):
    port, _ = server
    s = conn(port)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    read_response(s)
    t0 = time.perf_counter()
    for _ in range(20):
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(s)
    # without TCP_NODELAY each small response would wait ~40 ms (delayed ACK + Nagle)
    assert (time.perf_counter() - t0) / 20 < 0.030


def test_request_bodies_in_progress_are_bounded_together(server):
    """Each body is under the per-request limit, but together they may not hold more than
    max_pending_body_bytes (25,000 here): the next one is refused at once, not buffered."""
    port, base = server
    socks = []
    try:
        for _ in range(2):  # 2 x 9,000 bytes announced and partly sent: 18,000 reserved
            s = conn(port)
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n" + b"a" * 10)
            socks.append(s)
        time.sleep(0.2)
        s = conn(port)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n")
        head, body, _ = read_response(s)
        s.close()
        assert head.startswith(b"HTTP/1.1 503") and b"server_busy" in body
        for s in socks:  # the first two finish normally and release their share
            s.sendall(b"a" * 8990)
            head, _, _ = read_response(s)
            assert head.startswith(b"HTTP/1.1 200")
        status, _, _ = http("POST", base + "/echo", b"b" * 9000)
        assert status == 200
    finally:
        for s in socks:
            s.close()
