"""The simulated engine's ``/v1/realtime`` WebSocket, in vLLM's realtime transcription
protocol: ``session.created`` on connect; the client sends ``session.update`` (model),
``input_audio_buffer.append`` (base64 audio) and ``input_audio_buffer.commit``; the engine
answers ``transcription.delta`` events and ``transcription.done`` (text and usage); an
``error`` event for what it cannot take. The text names the audio's size and digest, as the
upload routes' does. Sim-only: ``{"type": "session.close"}`` makes the engine close first."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from typing import Any

from kvrouter.http.messages import Request, Response, Upgraded
from kvrouter.http.websocket import CLOSE, PING, PONG, TEXT, accept_key, close_frame, frame, is_upgrade, parse
from kvrouter.sim.generate import SimError


def handle(req: Request, check_model, counters: dict):
    if not is_upgrade(req.headers) or not req.headers.get("sec-websocket-key"):
        return Response(400, [("Content-Type", "application/json")],
                        b'{"detail": "expected a WebSocket handshake"}')
    session = _Session(check_model, counters)
    return Upgraded([("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Accept", accept_key(req.headers["sec-websocket-key"]))],
                    session.run, session.stop)


class _Session:
    def __init__(self, check_model, counters: dict):
        self.check_model = check_model
        self.counters = counters
        self.sock: Any = None
        self.audio = bytearray()

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(close_frame(1001, "engine shutting down"))
            except OSError:
                pass

    def _send(self, event: dict) -> None:
        self.sock.sendall(frame(TEXT, json.dumps(event).encode()))

    def run(self, sock, early: bytes) -> None:
        self.sock = sock
        self.counters["realtime_sessions"] += 1
        self._send({"type": "session.created", "id": f"sess-{uuid.uuid4().hex}",
                    "created": int(time.time())})
        buf = bytearray(early)
        while True:
            got = parse(bytes(buf))
            if got is None:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                continue
            opcode, payload, used = got
            del buf[:used]
            if opcode == CLOSE:
                sock.sendall(close_frame(1000 if len(payload) < 2 else
                                         int.from_bytes(payload[:2], "big")))
                return
            if opcode == PING:
                sock.sendall(frame(PONG, payload))
            elif opcode == TEXT and not self._event(payload):
                sock.sendall(close_frame(1000, "session closed by the engine"))
                return

    def _event(self, payload: bytes) -> bool:
        """Handle one client event; False ends the session."""
        try:
            event = json.loads(payload)
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            self._send({"type": "error", "error": "invalid JSON event", "code": "invalid_json"})
            return True
        if kind == "session.update":
            try:
                self.check_model({"model": event.get("model")} if event.get("model") else {})
            except SimError as err:
                self._send({"type": "error", "error": err.message, "code": "model_not_found"})
        elif kind == "input_audio_buffer.append":
            try:
                self.audio += base64.b64decode(event.get("audio", ""), validate=True)
            except (binascii.Error, ValueError):
                self._send({"type": "error", "error": "audio must be base64",
                            "code": "invalid_audio"})
        elif kind == "input_audio_buffer.commit":
            audio, self.audio = bytes(self.audio), bytearray()
            digest = hashlib.blake2b(audio, digest_size=6).hexdigest()
            text = f"transcribed {len(audio)} bytes {digest}"
            for word in text.split(" "):
                self._send({"type": "transcription.delta", "delta": word + " "})
            tokens = len(text.split(" "))
            self._send({"type": "transcription.done", "text": text, "usage": {
                "prompt_tokens": len(audio) // 640, "completion_tokens": tokens,
                "total_tokens": len(audio) // 640 + tokens}})
        elif kind == "session.close":
            return False
        else:
            self._send({"type": "error", "error": f"unknown event type {kind!r}",
                        "code": "unknown_event"})
        return True
