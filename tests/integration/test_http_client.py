"""The upstream client against a real socket server that closes keep-alive connections."""
import socket
import threading
import time

import pytest

from kvrouter.http.client import UpstreamError, UpstreamPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Server:
    """A loopback server: each connection served by ``_serve`` in a thread of its own."""

    def __init__(self):
        self.connections = 0
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _serve(self, conn):
        raise NotImplementedError

    def _accept(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self):
        self.srv.close()


class ClosingServer(_Server):
    """Answers the first request on each connection; what it does with the second is
    ``second``: "close" (read it, close without answering) or "close-idle" (close the
    connection right after the first answer). Counts every request it reads."""

    def __init__(self, second):
        self.second = second
        self.requests = 0
        self.lock = threading.Lock()
        super().__init__()

    def _read_request(self, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(body) < length:
            body += conn.recv(65536)
        with self.lock:
            self.requests += 1
        return True

    def _serve(self, conn):
        with conn:
            if not self._read_request(conn):
                return
            conn.sendall(OK)
            if self.second == "close-idle":
                return
            if self._read_request(conn):
                return  # read it, then close without an answer


@pytest.fixture
def server(request):
    srv = ClosingServer(request.param)
    yield srv
    srv.close()


@pytest.mark.parametrize("server", ["close"], indirect=True)
def test_a_post_the_engine_read_is_not_sent_again(server):
    pool = UpstreamPool("127.0.0.1", server.port)
    assert pool.request("POST", "/v1/completions", {}, b"{}").read() == b"ok"
    with pytest.raises(UpstreamError):
        pool.request("POST", "/v1/completions", {}, b"{}", first_byte_timeout=5)
    assert server.requests == 2  # read once, never resent on a new connection


@pytest.mark.parametrize("server", ["close-idle"], indirect=True)
def test_a_connection_the_engine_closed_while_idle_is_not_reused(server):
    pool = UpstreamPool("127.0.0.1", server.port)
    assert pool.request("POST", "/x", {}, b"{}").read() == b"ok"
    time.sleep(0.6)  # the server has closed the pooled connection by now (and CHECK_AFTER)
    assert pool.request("POST", "/x", {}, b"{}").read() == b"ok"
    assert server.requests == 2


class CountingServer(_Server):
    """Keep-alive: answers each request on a connection with its number there (``n=1``,
    ``n=2``...), the answer to ``extra_after`` followed by bytes nobody asked for."""

    def __init__(self, extra_after=None):
        self.extra_after = extra_after
        super().__init__()

    def _serve(self, conn):
        with conn:
            n, data = 0, b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                _, _, data = data.partition(b"\r\n\r\n")
                n += 1
                body = b"n=%d" % n
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                if n == self.extra_after:
                    answer += b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
                conn.sendall(answer)


def test_each_keep_alive_answer_is_parsed_afresh_on_a_reused_connection():
    srv = CountingServer()
    pool = UpstreamPool("127.0.0.1", srv.port)
    got = [pool.request("POST", "/x", {}, b"{}").read() for _ in range(4)]
    assert got == [b"n=1", b"n=2", b"n=3", b"n=4"]
    assert srv.connections == 1
    srv.close()


def test_a_connection_that_sent_bytes_nobody_asked_for_is_not_reused():
    srv = CountingServer(extra_after=1)
    pool = UpstreamPool("127.0.0.1", srv.port)
    first = pool.request("POST", "/x", {}, b"{}")
    time.sleep(0.2)   # the unasked answer arrives with the first (one read)
    assert first.read() == b"n=1"
    assert pool.request("POST", "/x", {}, b"{}").read() == b"n=1"   # a new connection's first
    assert srv.connections == 2
    srv.close()
