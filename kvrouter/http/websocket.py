"""WebSocket (RFC 6455) as far as the router and the simulated engine need it: the
handshake's accept key, frames built and read, and ``FrameCursor``, which follows frame
boundaries in a relayed byte stream (so the router can end a session with a close frame of
its own without cutting into one of the peers')."""
from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Optional, Tuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
GOING_AWAY = 1001


def is_upgrade(headers) -> bool:
    return (headers.get("upgrade") or "").lower() == "websocket" and \
        "upgrade" in (headers.get("connection") or "").lower()


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.strip().encode() + GUID).digest()).decode()


def frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One final frame; ``mask``: as a client sends (RFC 6455 5.3)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(payload, key)


def close_frame(code: int = GOING_AWAY, reason: str = "", mask: bool = False) -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason.encode()[:120], mask)


def _unmask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def parse(buf: bytes) -> Optional[Tuple[int, bytes, int]]:
    """The first whole frame in ``buf``: (opcode, unmasked payload, bytes it took), or None
    while it has not all arrived."""
    if len(buf) < 2:
        return None
    opcode, n, masked = buf[0] & 0x0F, buf[1] & 0x7F, buf[1] & 0x80
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    key = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        key, pos = buf[pos:pos + 4], pos + 4
    if len(buf) < pos + n:
        return None
    payload = buf[pos:pos + n]
    return opcode, (_unmask(payload, key) if masked else payload), pos + n


class FrameCursor:
    """Where the frames of one direction of a relayed stream begin and end, fed the bytes
    as they pass (headers parsed, payloads skipped). ``at_boundary``: no frame is half
    sent, so a frame of the router's own may go next; ``closed``: a close frame passed."""

    def __init__(self):
        self.skip = 0          # payload bytes of the current frame still to pass
        self.head = b""        # a frame header cut by a read
        self.closed = False

    @property
    def at_boundary(self) -> bool:
        return self.skip == 0 and not self.head

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self.skip:
                step = min(self.skip, n - pos)
                self.skip -= step
                pos += step
                continue
            head = self.head + data[pos:pos + 14]
            need = _header_size(head)
            if need is None or len(head) < need:
                self.head = head   # the rest of the header comes with the next read
                return
            taken = need - len(self.head)
            self.head = b""
            if head[0] & 0x0F == CLOSE:
                self.closed = True
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", head[2:4])[0]
            elif length == 127:
                length = struct.unpack("!Q", head[2:10])[0]
            self.skip = length
            pos += taken


def _header_size(head: bytes) -> Optional[int]:
    if len(head) < 2:
        return None
    n = head[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if head[1] & 0x80 else 0)
