"""Token counts scraped from an engine's answer as the router relays it (``proxy._usage``)."""
import json

from kvrouter.router.proxy import _usage


def test_openai_body_counts_come_from_its_usage():
    body = json.dumps({"id": "cmpl-1", "choices": [{"text": "prompt_tokens are words"}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 7,
                                 "total_tokens": 19,
                                 "prompt_tokens_details": {"cached_tokens": 3}}}).encode()
    assert _usage(body) == (12, 7)


def test_responses_api_names():
    body = b'{"id":"resp_1","usage":{"input_tokens":5,"output_tokens":9,' \
           b'"output_tokens_details":{"reasoning_tokens":2}}}'
    assert _usage(body) == (5, 9)


def test_the_last_usage_of_a_burst_of_stream_events_counts():
    events = b"".join(b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":%d}}'
                      b"\n\n" % i for i in range(1, 6))
    assert _usage(events) == (4, 5)


def test_an_anthropic_stream_in_one_chunk_counts_input_from_its_first_event():
    chunk = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
             b'{"input_tokens":21,"output_tokens":1}}}\n\n'
             b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
             b'event: message_delta\ndata: {"type":"message_delta","usage":'
             b'{"output_tokens":15}}\n\n')
    assert _usage(chunk) == (21, 15)


def test_no_usage_counts_nothing():
    assert _usage(b'{"choices":[{"text":"hi"}]}') == (0, 0)
