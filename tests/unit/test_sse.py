"""The SSE decoder follows the WHATWG rules, whatever the chunking."""
import pytest

from kvrouter.http.sse import SSEDecoder, parse_events

STREAM = (b": keep-alive comment\r\n"
          b"data: {\"a\": 1}\r\n\r\n"
          b"data:no-space\n\n"
          b"event: update\ndata: line one\ndata:  two spaces\nid: 7\nretry: 1500\n\n"
          b"data: cr only\r\r"
          b"event: no data\n\n"
          b"data: [DONE]\n\n")


def expected():
    return [("message", '{"a": 1}', None), ("message", "no-space", None),
            ("update", "line one\n two spaces", "7"), ("message", "cr only", "7"),
            ("message", "[DONE]", "7")]


def test_whole_stream():
    events = parse_events(STREAM)
    assert [(e.event, e.data, e.id) for e in events] == expected()
    assert events[2].retry == 1500


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_any_chunking_gives_the_same_events(size):
    dec = SSEDecoder()
    events = []
    for i in range(0, len(STREAM), size):
        events += dec.feed(STREAM[i:i + size])
    assert [(e.event, e.data, e.id) for e in events] == expected()


def test_an_incomplete_event_waits_for_its_blank_line():
    dec = SSEDecoder()
    assert dec.feed(b"data: x\n") == []
    assert [e.data for e in dec.feed(b"\n")] == ["x"]
