"""Pure wire-format helpers the router relies on when it does not hold a whole body: the
WebSocket frame cursor (where frames begin and end in a relayed stream) and the multipart
field scanner (a form field found in a body that arrives in pieces)."""
import pytest

from kvrouter.http import multipart, websocket


def _frames():
    return [websocket.frame(websocket.TEXT, b"hello"),
            websocket.frame(websocket.BINARY, b"x" * 300, mask=True),       # 16-bit length
            websocket.frame(websocket.BINARY, b"y" * 70000),                # 64-bit length
            websocket.frame(websocket.PING, b"", mask=True),
            websocket.close_frame(1001, "bye")]


def test_the_frame_cursor_finds_every_boundary_however_the_stream_is_cut():
    frames = _frames()
    stream = b"".join(frames)
    ends = set()
    pos = 0
    for f in frames:
        pos += len(f)
        ends.add(pos)
    for cut in (1, 2, 3, 7, 13, 1000, 65536):
        cursor = websocket.FrameCursor()
        seen = 0
        for i in range(0, len(stream), cut):
            piece = stream[i:i + cut]
            cursor.feed(piece)
            seen += len(piece)
            assert cursor.at_boundary == (seen in ends), (cut, seen)
        assert cursor.closed


def test_frames_round_trip_through_parse_masked_or_not():
    for mask in (False, True):
        data = websocket.frame(websocket.TEXT, b"abc" * 50000, mask=mask) + b"rest"
        opcode, payload, used = websocket.parse(data)
        assert (opcode, payload, data[used:]) == (websocket.TEXT, b"abc" * 50000, b"rest")
        assert websocket.parse(data[:used - 1]) is None   # not all there yet


def test_the_accept_key_is_rfc_6455s_example():
    assert websocket.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


BODY = (b"--bb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
        + b"--b" * 2000 + b"\r\n--bb\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
        b" whisper-1 \r\n--bb--\r\n")


@pytest.mark.parametrize("cut", [1, 5, 64, 4096, len(BODY)])
def test_the_field_scanner_agrees_with_the_whole_body_parse_at_any_cut(cut):
    ctype = "multipart/form-data; boundary=bb"
    scanner = multipart.FieldScanner(ctype, "model")
    found = multipart.MORE
    got = 0
    while found is multipart.MORE:
        got += cut
        found = scanner.scan(BODY[:got])
    assert found == multipart.field(BODY, ctype, "model") == ("whisper-1", found[1])
    absent = multipart.FieldScanner(ctype, "language")
    assert absent.scan(BODY) == (None, None)
