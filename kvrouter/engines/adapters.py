"""Engine adapters: how kvrouter asks each engine kind whether it is up (and, later, asleep).

Probes never generate: vLLM's /health is cheap; SGLang's /health runs a
1-token generation by default, which is dangerous on a released engine, so it
is only used while the engine holds its memory; otherwise /model_info.
"""
from __future__ import annotations

import json
from typing import Optional

from kvrouter.config.schema import Instance
from kvrouter.router.upstream import UpstreamError, UpstreamPool

PROBE_TIMEOUT = 2.0


class EngineAdapter:
    dialect = "base"

    def __init__(self, inst: Instance, pool: UpstreamPool):
        self.inst = inst
        self.pool = pool

    def _get(self, path: str, timeout: float = PROBE_TIMEOUT):
        resp = self.pool.request("GET", path, {}, b"", connect_timeout=timeout,
                                 first_byte_timeout=timeout, idle_timeout=timeout)
        return resp.status, resp.read()

    def probe(self, memory_released: bool = False) -> bool:
        """True when the engine answers as ready. Never wakes it, never generates."""
        raise NotImplementedError

    def model_info(self) -> dict:
        """What /v1/models says of this engine (max_model_len), {} when unreachable."""
        try:
            status, body = self._get("/v1/models")
            if status != 200:
                return {}
            data = json.loads(body).get("data") or []
            return data[0] if data else {}
        except (UpstreamError, ValueError, AttributeError):
            return {}


class VllmAdapter(EngineAdapter):
    dialect = "vllm"

    def probe(self, memory_released: bool = False) -> bool:
        try:
            status, _ = self._get("/health")
        except UpstreamError:
            return False
        return status == 200


class SglangAdapter(EngineAdapter):
    dialect = "sglang"

    def probe(self, memory_released: bool = False) -> bool:
        path = "/model_info" if memory_released else "/health"
        try:
            status, _ = self._get(path)
        except UpstreamError:
            return False
        return status == 200


def adapter_for(inst: Instance, pool: Optional[UpstreamPool] = None) -> EngineAdapter:
    pool = pool or UpstreamPool(_host(inst), inst.port)
    return (VllmAdapter if inst.dialect == "vllm" else SglangAdapter)(inst, pool)


def _host(inst: Instance) -> str:
    host = inst.host
    return "127.0.0.1" if host in ("0.0.0.0", "", "::", "localhost") else host
