"""Routers side by side for ``make bench``: the same backends behind kvrouter (one process
and N workers), the aiohttp proxy yardstick and the Rust vllm-router, loaded the same way in
one run.

Backends (each its own process):
  fast    kvrouter's fixed-JSON backend; its streams write each of 100 events apart
          ("spaced": every event a write, as an engine decoding one request sends them);
  burst   the same, its streams' 64 events in one write (as an engine under load, or a
          cached answer, delivers them);
  nginx   nginx answering every POST with the fixed JSON (when installed): the cheapest
          backend there is, so what a router costs shows most;
  slow    50 events 100 ms apart, for the 1,000 concurrent streams.
kvrouter serves all four as models (``bench/model``, ``bench/burst``, ``bench/nginx``,
``bench/slow``); the aiohttp proxy and vllm-router route anything to one upstream, so one
of each runs per backend it is compared on."""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List

from kvrouter.bench.backends import FIXED, MODELS
from kvrouter.bench.harness import (
    BODY,
    BURST_BODY,
    NGINX_BODY,
    PY,
    Child,
    free_port,
    peer_router,
    sse_streams,
    start_nginx,
    start_router,
    wait_port,
)


class Bench:
    """The processes of one side-by-side run; ``stop()`` ends them all."""

    def __init__(self, workers: int, aiohttp: bool = True):
        self.children: List[Child] = []
        self.ports: Dict[str, int] = {}
        self.notes: List[str] = []
        self.workers = workers
        for name, argv in (("fast", ["--events", "100"]),
                           ("burst", ["--events", "64", "--burst"]),
                           ("slow", ["--events", "50", "--interval-ms", "100"])):
            port = self.ports[name] = free_port()
            self._start(name, [PY, "-m", "kvrouter.bench.backends", "fast", "--port",
                               str(port), *argv])
        nginx_port = free_port()
        nginx = start_nginx(nginx_port, FIXED, MODELS)
        if nginx is not None:
            self.children.append(nginx)
            self.ports["nginx"] = nginx_port
        else:
            self.notes.append("nginx not installed: no nginx-backend rows (apt install nginx)")
        models = {"fast": "bench/model", "burst": "bench/burst", "slow": "bench/slow",
                  "nginx": "bench/nginx"}
        instances = "".join(
            "  - {name: %s, model: %s, engine: sim, engine_args: ['--host 127.0.0.1 "
            "--port %d']}\n" % (name, models[name], port) for name, port in self.ports.items())
        self.ports["kvrouter"] = free_port()
        self.router = start_router(self.ports["kvrouter"], instances)   # one process
        self.children.append(self.router)
        self.ports["workers"] = free_port()
        self.children.append(start_router(self.ports["workers"], instances, workers=workers))
        self.peer = peer_router()
        self.aiohttp = aiohttp and _has_aiohttp()
        if not self.peer:
            self.notes.append("vllm-router not installed: no peer (pip install vllm-router; "
                              "VLLM_ROUTER=path)")
        if aiohttp and not self.aiohttp:
            self.notes.append("aiohttp not installed: no yardstick (pip install '.[bench]')")
        for backend in ("fast", "burst", "nginx"):
            if backend not in self.ports:
                continue
            upstream = f"http://127.0.0.1:{self.ports[backend]}"
            if self.peer:
                port = self.ports[f"vllm-router/{backend}"] = free_port()
                self._start("vllm-router", [self.peer, "--host", "127.0.0.1", "--port",
                                            str(port), "--worker-urls", upstream,
                                            "--prometheus-port", str(free_port()),
                                            "--log-level", "warning"])
            if self.aiohttp and backend != "burst":
                port = self.ports[f"aiohttp/{backend}"] = free_port()
                self._start("aiohttp", [PY, "-m", "kvrouter.bench.backends", "aiohttp-proxy",
                                        "--port", str(port), "--upstream", upstream])

    def _start(self, name: str, argv: List[str]) -> None:
        self.children.append(Child(argv))

    def wait(self) -> None:
        for name, port in self.ports.items():
            try:
                if name.startswith("aiohttp"):
                    wait_port(port, "/", answer=b"HTTP/1.1 ")   # any answer (the backend's 404)
                elif name.startswith("vllm-router"):
                    wait_port(port, "/health", timeout=60)
                else:
                    wait_port(port, "/health" if name in ("kvrouter", "workers") else "/")
            except RuntimeError:
                self.notes.append(f"{name} did not answer on port {port}")
        time.sleep(1.0)   # the routers' readiness probes

    def stop(self) -> None:
        for child in self.children:
            child.stop()

    def targets(self, backend: str) -> Dict[str, int]:
        """Row name -> port, for requests that reach ``backend``."""
        out = {"direct": self.ports[backend], "kvrouter": self.ports["kvrouter"],
               f"kvrouter {self.workers} workers": self.ports["workers"]}
        for peer in ("aiohttp", "vllm-router"):
            if f"{peer}/{backend}" in self.ports:
                out[peer] = self.ports[f"{peer}/{backend}"]
        return out


def non_streamed(bench: Bench, load: Callable[..., dict]) -> Dict[str, dict]:
    """Requests/s and latency at concurrency 1 and 32, per backend and router."""
    out: Dict[str, dict] = {}
    for backend, body in (("fast", BODY), ("nginx", NGINX_BODY)):
        if backend not in bench.ports:
            continue
        rows = {}
        for name, port in bench.targets(backend).items():
            for c in (1, 32):
                load(port, 8, body=body)   # warm connections
                rows[f"{name} c={c}"] = load(port, c, body=body)
        out[backend] = rows
    return out


def streamed(bench: Bench, seconds: float, backend: str, body: bytes,
             events: int) -> Dict[str, dict]:
    """SSE events/s and streams/s at 32 concurrent streams, time to first byte at 1."""
    out = {}
    for name, port in bench.targets(backend).items():
        r = sse_streams(port, 32, seconds=seconds, expect_events=events, body=body)
        single = sse_streams(port, 1, seconds=min(seconds, 2.0), expect_events=events,
                             body=body)
        r["streams_per_s"] = r["streams"] / r["seconds"]
        r["ttfb_c1_p50_ms"] = single["ttfb_p50_ms"]
        out[name] = r
    return out


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def main_rows(bench: Bench, seconds: float, load: Callable[..., dict]) -> dict:
    from kvrouter.bench.harness import STREAM_BODY

    return {"non_stream": non_streamed(bench, load),
            "stream": streamed(bench, seconds, "fast", STREAM_BODY, 100),
            "stream_burst": streamed(bench, seconds, "burst", BURST_BODY, 64),
            "notes": bench.notes, "cpus": os.cpu_count()}
