"""How a streamed response is written: the same bytes, in fewer sends when the engine's
answer came whole (the head with a first piece that is at hand, the end of the chunked body
with the last piece)."""
import pytest

from kvrouter.http.connection import Connection
from kvrouter.http.limits import ServerLimits
from kvrouter.http.messages import Request, StreamResponse


class Sock:
    def __init__(self):
        self.sends = []

    def send(self, data, *args):
        self.sends.append(bytes(data))
        return len(data)

    def settimeout(self, seconds):
        pass


def write(pieces, first_ready, ended, version="1.1", method="GET"):
    sock = Sock()
    conn = Connection(sock, ("127.0.0.1", 1), None, ServerLimits(max_connections=16))
    req = Request()
    req.method, req.version = method, version
    left = [len(pieces)]

    def produce():
        for p in pieces:
            left[0] -= 1
            yield p

    resp = StreamResponse(200, [("Content-Type", "text/event-stream")], produce(),
                          first_ready, (lambda: left[0] == 0) if ended else None)
    conn._write_stream(req, resp, True)
    return sock.sends


EVENTS = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]


@pytest.mark.parametrize("first_ready,ended,sends", [
    (False, False, 5),   # head, three pieces, the end
    (True, False, 4),    # head with the first piece
    (False, True, 4),    # the end with the last piece
    (True, True, 3),
])
def test_a_stream_is_the_same_bytes_in_fewer_sends_when_the_hints_allow(first_ready, ended,
                                                                          sends):
    out = write(EVENTS, first_ready, ended)
    assert len(out) == sends
    head, _, body = b"".join(out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in head
    assert body == b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n"


def test_an_answer_that_came_whole_is_one_send():
    whole = b"".join(EVENTS)
    out = write([whole], True, True)
    assert len(out) == 1 and out[0].endswith(b"\r\n%b\r\n0\r\n\r\n" % whole)


def test_no_piece_at_all_still_sends_the_head_and_the_end():
    out = write([], True, True)
    assert b"".join(out).endswith(b"\r\n\r\n0\r\n\r\n") and len(out) == 1


def test_http10_and_head_requests():
    out = write(EVENTS, True, True, version="1.0")   # no chunks: the body ends by closing
    assert b"".join(out).endswith(b"\r\n\r\n" + b"".join(EVENTS))
    assert b"Connection: close" in out[0]
    out = write(EVENTS, True, True, method="HEAD")
    assert len(out) == 1 and out[0].endswith(b"\r\n\r\n")
