"""Engine adapters: how kvrouter asks each engine kind whether it is up, busy or asleep,
and how it puts it to sleep and wakes it (each engine's sleep API is described below).

Probes never generate: vLLM's /health is cheap; SGLang's /health runs a
1-token generation by default, which is dangerous on a released engine, so it
is only used while the engine holds its memory; otherwise /model_info.
"""
from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from typing import FrozenSet, Optional, Set, Tuple

import gevent

from kvrouter.config.schema import Instance
from kvrouter.http.client import UpstreamError, UpstreamPool
from kvrouter.versions import Version, dotted, parse_version

log = logging.getLogger("kvrouter.engines")
PROBE_TIMEOUT = 2.0
OP_TIMEOUT = 300.0
SGLANG_ALL_TAGS = frozenset({"weights", "kv_cache", "cuda_graph"})


class EngineError(Exception):
    """An engine refused or failed a control call."""


def metric_value(text: str, name: str) -> Optional[float]:
    """Sum of a metric's samples in Prometheus text (all label sets)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name):len(name) + 1] in ("{", " ")):
            try:
                total += float(line.rsplit(" ", 1)[1])
                found = True
            except ValueError:
                pass
    return total if found else None


class EngineAdapter(ABC):
    """What the controller may ask of an engine. The controller asks capabilities
    (``sleep_levels``, ``refuse_level``, ``observed_level``), never the dialect."""

    dialect = "base"
    #: sleep levels this engine kind has (a level outside is refused before any call)
    sleep_levels: FrozenSet[int] = frozenset({1})

    def __init__(self, inst: Instance, pool: UpstreamPool):
        self.inst = inst
        self.pool = pool
        self.version: Version = ()
        self._warm_route: Optional[int] = None   # which WARM_UPS request the model serves

    # --- capabilities -------------------------------------------------------------------------
    def refresh_version(self) -> Version:
        """Ask the engine its version where it says (``()`` when unknown)."""
        return self.version

    def refuse_level(self, level: int) -> Optional[str]:
        """Why this engine cannot sleep at ``level`` now; None when it can."""
        if level not in self.sleep_levels:
            return f"{self.dialect} has no sleep level {level}"
        return None

    def observed_level(self) -> Optional[int]:
        """The sleep level the engine reports it is in (None when it cannot say)."""
        return None

    def _call(self, method: str, path: str, body: Optional[dict] = None,
              timeout: float = PROBE_TIMEOUT) -> tuple[int, bytes]:
        payload = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        resp = self.pool.request(method, path, headers, payload, connect_timeout=min(timeout, 5),
                                 first_byte_timeout=timeout, idle_timeout=timeout)
        return resp.status, resp.read()

    def _ok(self, method: str, path: str, body: Optional[dict] = None,
            timeout: float = OP_TIMEOUT) -> bytes:
        try:
            status, data = self._call(method, path, body, timeout)
        except UpstreamError as err:
            raise EngineError(f"{method} {path}: {err}") from None
        if status >= 400:
            raise EngineError(f"{method} {path}: HTTP {status} "
                              f"{data.decode('utf-8', 'replace')[:300]}")
        return data

    @abstractmethod
    def probe(self, memory_released: Optional[bool] = False) -> bool:
        """True when the engine answers as up. Never wakes it, and never generates on an
        engine whose memory is (``True``) or may be (``None``: not known yet) released."""

    def model_info(self) -> dict:
        """What /v1/models says of this engine (max_model_len), {} when unreachable."""
        try:
            status, body = self._call("GET", "/v1/models")
            if status != 200:
                return {}
            data = json.loads(body).get("data") or []
            return data[0] if data else {}
        except (UpstreamError, ValueError, AttributeError):
            return {}

    def load(self) -> Optional[Tuple[int, int]]:
        """(requests running, requests waiting) in the engine; None when it cannot tell."""
        return None

    def busy(self) -> Optional[int]:
        """Requests running or queued in the engine, None when it cannot tell."""
        load = self.load()
        return None if load is None else load[0] + load[1]

    def _metrics(self) -> Optional[str]:
        try:
            status, body = self._call("GET", "/metrics")
        except UpstreamError:
            return None
        return body.decode("utf-8", "replace") if status == 200 else None

    def _load_from_metrics(self, running_name: str,
                           waiting_name: str) -> Optional[Tuple[int, int]]:
        text = self._metrics()
        if not text:
            return None
        running = metric_value(text, running_name)
        if running is None:
            return None
        return int(running), int(metric_value(text, waiting_name) or 0)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            n = self.busy()
            if not n:
                return True
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(0.05)

    # one request each kind of model serves: a generative model's completion, a pooling
    # model's (embedding, reranker, classifier) embedding or pooling
    WARM_UPS = (("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "temperature": 0},
                 "choices"),
                ("/v1/embeddings", {"input": "Hi"}, "data"),
                ("/pooling", {"input": "Hi"}, "data"))

    def warm_up(self) -> None:
        """One small request before traffic is admitted again, of a kind the model serves
        (the first route that is not a 404 is remembered); none when it serves none of them."""
        routes = self.WARM_UPS[self._warm_route:] if self._warm_route is not None \
            else self.WARM_UPS
        for path, body, key in routes:
            try:
                status, data = self._call("POST", path, dict(body, model=self.inst.upstream_model),
                                          timeout=120)
            except UpstreamError as err:
                raise EngineError(f"POST {path}: {err}") from None
            if status == 404 and b"Not Found" in data:   # no such route for this model
                continue
            if status >= 400:
                raise EngineError(f"POST {path}: HTTP {status} "
                                  f"{data.decode('utf-8', 'replace')[:300]}")
            self._warm_route = self.WARM_UPS.index((path, body, key))
            if not json.loads(data).get(key):
                raise EngineError(f"warm-up answered without {key}: {data[:200]!r}")
            return
        log.info("%s: no warm-up request this model serves; none sent", self.inst.name)

    @abstractmethod
    def is_sleeping(self) -> Optional[bool]:
        """Whether the engine is asleep; None when it cannot say."""

    def mark_released(self) -> None:
        """The router knows (from before a restart) that this engine's memory is released."""

    def process_started(self) -> None:
        """The process manager (re)started the engine: it holds its memory again."""

    @abstractmethod
    def sleep(self, level: int) -> None:
        """Put the (drained) engine to sleep; returns once it is asleep."""

    @abstractmethod
    def wake(self, level: int) -> None:
        """Wake the engine from ``level``; returns once it can serve."""


class VllmAdapter(EngineAdapter):
    dialect = "vllm"
    sleep_levels = frozenset({1, 2})

    def probe(self, memory_released: Optional[bool] = False) -> bool:
        try:
            status, _ = self._call("GET", "/health")
        except UpstreamError as err:
            if err.local:
                raise  # the router is out of descriptors: says nothing about the engine
            return False
        return status == 200

    def refresh_version(self) -> Version:
        try:
            status, body = self._call("GET", "/version")
            if status == 200:
                self.version = parse_version(json.loads(body).get("version", ""))
        except (UpstreamError, ValueError, AttributeError):
            pass
        return self.version

    def load(self) -> Optional[Tuple[int, int]]:
        return self._load_from_metrics("vllm:num_requests_running", "vllm:num_requests_waiting")

    def is_sleeping(self) -> Optional[bool]:
        try:
            status, body = self._call("GET", "/is_sleeping")
        except UpstreamError:
            return None
        if status != 200:
            return None
        try:
            return bool(json.loads(body).get("is_sleeping"))
        except (ValueError, AttributeError):
            return None

    def observed_level(self) -> Optional[int]:
        """From vllm:engine_sleep_state (>= 0.11.1): 1 offloaded, 2 discarded, None unknown."""
        for line in (self._metrics() or "").splitlines():
            if line.startswith("vllm:engine_sleep_state{") and line.endswith(" 1"):
                if 'sleep_state="weights_offloaded"' in line:
                    return 1
                if 'sleep_state="discard_all"' in line:
                    return 2
        return None

    def refuse_level(self, level: int) -> Optional[str]:
        # the HTTP reload recipe (collective_rpc) that level 2 needs exists from 0.10.2 on
        if level == 2 and self.version and self.version < (0, 10, 2):
            return (f"vLLM {dotted(self.version)} cannot reload weights over HTTP "
                    "(needs >= 0.10.2): use level 1")
        return super().refuse_level(level)

    def _confirm(self, asleep: bool, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.is_sleeping()
            if state is asleep:
                return
            if time.monotonic() >= deadline:
                raise EngineError(f"/is_sleeping still says {state} after {timeout:g}s")
            gevent.sleep(0.05)

    def sleep(self, level: int) -> None:
        query = f"/sleep?level={level}"
        if self.version >= (0, 17):
            query += "&mode=wait"  # drain in the engine too
        self._ok("POST", query)  # the level is a query parameter: a JSON body is ignored
        self._confirm(True)

    def wake(self, level: int) -> None:
        if level == 2:
            # a plain /wake_up after level 2 gives gibberish: reload the weights first
            self._ok("POST", "/wake_up?tags=weights")
            self._ok("POST", "/collective_rpc", {"method": "reload_weights"})
            self._ok("POST", "/wake_up?tags=kv_cache")
            self._ok("POST", "/reset_prefix_cache")
        else:
            self._ok("POST", "/wake_up")
        self._confirm(False)


class SglangAdapter(EngineAdapter):
    """SGLang has one way to sleep (release memory occupation): every level maps to it."""

    dialect = "sglang"
    sleep_levels = frozenset({1, 2})

    def __init__(self, inst: Instance, pool: UpstreamPool):
        super().__init__(inst, pool)
        self.released: Set[str] = set()
        self.cpu_backup = "--enable-weights-cpu-backup" in inst.argv_args

    def probe(self, memory_released: Optional[bool] = False) -> bool:
        released = bool(memory_released or self.released)
        if memory_released is None and not released:
            # not known yet (adoption): ask without generating whether memory is released
            released = bool(self.is_sleeping())
        # /health generates a token, which crashes an engine whose memory is released
        path = "/model_info" if released else "/health"
        try:
            status, _ = self._call("GET", path)
        except UpstreamError as err:
            if err.local:
                raise  # the router is out of descriptors: says nothing about the engine
            return False
        return status == 200

    def load(self) -> Optional[Tuple[int, int]]:
        try:
            status, body = self._call("GET", "/get_load")
            if status == 200:
                loads = json.loads(body)
                if isinstance(loads, dict):
                    loads = [loads]
                total = sum(int(x.get("num_reqs", 0)) for x in loads)
                waiting = sum(int(x.get("num_waiting_reqs", 0)) for x in loads)
                return total - waiting, waiting
        except (UpstreamError, ValueError, TypeError, AttributeError):
            pass
        return self._load_from_metrics("sglang:num_running_reqs", "sglang:num_queue_reqs")

    def mark_released(self) -> None:
        self.released = set(SGLANG_ALL_TAGS)

    def process_started(self) -> None:
        self.released = set()  # resuming a tag that was not released would kill it

    def is_sleeping(self) -> Optional[bool]:
        """Released tags from /server_info where the engine reports them (the simulator does)."""
        try:
            status, body = self._call("GET", "/server_info")
            if status == 200:
                tags = json.loads(body).get("released_tags")
                if isinstance(tags, list):
                    self.released = set(tags)
                    return bool(tags)
        except (UpstreamError, ValueError, AttributeError):
            pass
        return bool(self.released) if self.released else None

    def sleep(self, level: int) -> None:
        # Releasing with requests running kills the scheduler: the controller drained
        # the router, and the engine must report no request either.
        if self.busy():
            raise EngineError("engine still has requests running; not releasing memory")
        self._ok("POST", "/release_memory_occupation", {"tags": None})
        self.released = set(SGLANG_ALL_TAGS)

    def wake(self, level: int) -> None:
        if not self.released:
            return  # resuming a tag that was not released kills the scheduler
        self._ok("POST", "/resume_memory_occupation", {"tags": None})
        self.released = set()
        if not self.cpu_backup:
            # without --enable-weights-cpu-backup the released weights are gone
            self._ok("POST", "/update_weights_from_disk", {"model_path": self.inst.model})
            self._ok("POST", "/flush_cache")


def adapter_for(inst: Instance, pool: Optional[UpstreamPool] = None) -> EngineAdapter:
    pool = pool or UpstreamPool(inst.connect_host, inst.port)
    cls = VllmAdapter if inst.dialect == "vllm" else SglangAdapter
    return cls(inst, pool)
