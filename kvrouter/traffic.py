"""Per-model traffic statistics, recorded on the request path at constant cost, bounded memory.

- Counts per outcome since start, requests in flight, end time of the last request.
- Rates over any window up to an hour from per-second buckets (a ring of 3600).
- Latency percentiles over a window from a ring of the most recent samples
  (``SAMPLES`` per series), so memory stays bounded whatever the load.
- Streams: time to first token is the time to the first body byte from the
  engine; inter-token latency is the mean gap between later body chunks of a
  stream (one SSE event per chunk, as engines send them); tokens come from the
  ``usage`` the engine sends (a stream reports them only when the client asked
  for ``stream_options.include_usage``; the router never changes the request).
- Waiting for a wake or for readiness is recorded per request.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

WINDOW_MAX = 3600
SAMPLES = 4096
GAPS = 64          # idle gaps remembered per model (the adaptive policy learns from them)
ARRIVALS = 32      # request starts remembered per model (its rate while active)
WAKE_WINDOW = 600  # seconds over which the share of requests that waited for a wake is kept
OUTCOMES = ("success", "client_error", "upstream_error", "timeout", "disconnect", "rejected")


class _Buckets:
    """Per-second sums in a ring; a slot is valid only for the second stamped on it."""

    __slots__ = ("stamp", "count", "success", "failed", "latency", "tokens")

    def __init__(self):
        n = WINDOW_MAX
        self.stamp = [-1] * n
        self.count = [0] * n
        self.success = [0] * n
        self.failed = [0] * n
        self.latency = [0.0] * n
        self.tokens = [0] * n

    def add(self, sec: int, ok: bool, latency: float, tokens: int) -> None:
        i = sec % WINDOW_MAX
        if self.stamp[i] != sec:
            self.stamp[i] = sec
            self.count[i] = self.success[i] = self.failed[i] = self.tokens[i] = 0
            self.latency[i] = 0.0
        self.count[i] += 1
        if ok:
            self.success[i] += 1
        else:
            self.failed[i] += 1
        self.latency[i] += latency
        self.tokens[i] += tokens

    def window(self, now_sec: int, window: int) -> dict:
        count = success = failed = tokens = 0
        latency = 0.0
        stamp = self.stamp
        for sec in range(now_sec - window + 1, now_sec + 1):
            i = sec % WINDOW_MAX
            if stamp[i] == sec:
                count += self.count[i]
                success += self.success[i]
                failed += self.failed[i]
                latency += self.latency[i]
                tokens += self.tokens[i]
        return {"count": count, "success": success, "failed": failed, "latency": latency,
                "tokens": tokens}


def _percentiles(values: List[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    values = sorted(values)
    n = len(values)

    def pick(q):
        return round(values[min(n - 1, int(q * n))], 6)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99),
            "mean": round(sum(values) / n, 6)}


def arrival_gaps(arrivals: Sequence[float]) -> Tuple[float, ...]:
    a = list(arrivals)
    return tuple(y - x for x, y in zip(a, a[1:]))


class WakeWindow:
    """Requests ended, those of them that waited for a wake, and those that waited and were
    late for it (``late``: ``late_for_wake``), per second over the last
    WAKE_WINDOW seconds (all models): how much of the traffic sleep is costing."""

    __slots__ = ("stamp", "requests", "waited", "late")

    def __init__(self):
        self.stamp = [-1] * WAKE_WINDOW
        self.requests = [0] * WAKE_WINDOW
        self.waited = [0] * WAKE_WINDOW
        self.late = [0] * WAKE_WINDOW

    def add(self, now: float, waited: bool, late: Optional[bool] = None) -> None:
        """``late`` defaults to ``waited`` (no SLO: every wait is late)."""
        sec = int(now)
        i = sec % WAKE_WINDOW
        if self.stamp[i] != sec:
            self.stamp[i], self.requests[i], self.waited[i], self.late[i] = sec, 0, 0, 0
        self.requests[i] += 1
        if waited:
            self.waited[i] += 1
            if late is None or late:
                self.late[i] += 1

    def totals(self, now: float) -> Tuple[int, int, int]:
        """(requests, requests that waited for a wake, those of them late) over the window."""
        low = int(now) - WAKE_WINDOW
        n = w = k = 0
        for i, stamp in enumerate(self.stamp):
            if stamp > low:
                n += self.requests[i]
                w += self.waited[i]
                k += self.late[i]
        return n, w, k


class ModelTraffic:
    def __init__(self, name: str, now_mono: float):
        self.name = name
        self.total = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.in_flight = 0
        self.gaps: Deque[float] = deque(maxlen=GAPS)   # idle gaps: last end to next start
        self.arrivals: Deque[float] = deque(maxlen=ARRIVALS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.streams = 0
        self.last_end_mono: Optional[float] = None
        self.last_end_wall: Optional[float] = None
        self.last_start_wall = 0.0     # start of the last finished request (the seed's meaning)
        self.success_seconds = 0.0     # response times of successful requests, summed
        self.created_mono = now_mono
        self.buckets = _Buckets()
        self.latency: Deque[Tuple[float, float]] = deque(maxlen=SAMPLES)   # (t, seconds)
        self.ttft: Deque[Tuple[float, float]] = deque(maxlen=SAMPLES)
        self.itl: Deque[Tuple[float, float]] = deque(maxlen=SAMPLES)
        self.wait: Deque[Tuple[float, float]] = deque(maxlen=SAMPLES)
        self.wait_total = 0.0
        self.ttft_slo: Optional[float] = None   # seconds (sleep ttft_slo_ms), None: none
        self.last_wake_seconds = 0.0   # what its last wake took (``woke``)
        self.arrived = 0               # requests started (``total`` counts those ended)
        self.idle_arrivals = 0         # of them, those that found it idle (ended a gap)


class RequestRecord:
    __slots__ = ("model", "group", "start", "wait", "first_byte", "stream", "ended", "outcome",
                 "prompt_tokens", "completion_tokens")

    def __init__(self, model: ModelTraffic, start: float,
                 group: Optional[ModelTraffic] = None):
        self.model = model            # the engine's (a replica's, or the model's only one)
        self.group = group            # the model's, when it has several replicas
        self.start = start
        self.wait = 0.0
        self.first_byte: Optional[float] = None
        self.stream = False
        self.ended = False
        self.outcome = ""
        self.prompt_tokens = 0        # from the engine's usage, when it reported one
        self.completion_tokens = 0

    @property
    def ttft(self) -> Optional[float]:
        """Time to first token as the engine served it: the wait for a wake is not in it."""
        if self.first_byte is None:
            return None
        return self.first_byte - self.start - self.wait


def late_for_wake(slo: Optional[float], wake: float, ttft: Optional[float],
                  wait: float) -> bool:
    """Whether a request that waited ``wait`` seconds for a wake that took ``wake`` counts
    as late for it: always with no TTFT SLO (``slo`` None); with one, when the wake alone
    outlasted the SLO (all its waiters count, as the slo policy predicts them), or the
    request's TTFT (``ttft``, waits included; None when no token was seen: its wait)
    passed it."""
    if slo is None or wake > slo:
        return True
    return (wait if ttft is None else ttft) > slo


def traffic_keys(cfg) -> Tuple[List[str], Dict[str, str]]:
    """A config's engines for a TrafficMonitor: every engine's key, and each replica's
    model (``TrafficMonitor(*traffic_keys(cfg))``)."""
    return ([i.key for i in cfg.instances],
            {i.key: i.model for i in cfg.instances if i.replica_of > 1})


class TrafficMonitor:
    """All models' traffic. One instance per router process (gevent: no locks needed)."""

    def __init__(self, models: Iterable[str], clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, on_end: Optional[Callable] = None,
                 parents: Optional[Dict[str, str]] = None):
        """``models``: every engine's key; ``parents``: a replica's key -> its model (the
        model's totals are kept too, under its name)."""
        self.clock = clock
        self.wall = wall
        now = clock()
        self.models: Dict[str, ModelTraffic] = {m: ModelTraffic(m, now) for m in models}
        self.parents: Dict[str, str] = {}
        self.children: Dict[str, List[str]] = {}
        self.unrouted = 0
        self.wakes = WakeWindow()
        self.on_end = on_end  # metrics hook: on_end(model, outcome, record, now, tokens)
        # requests other processes serve now (router workers), by model
        self.external: Optional[Callable[[str], int]] = None
        # requests the other routers of a cluster serve now, by model
        self.peers: Optional[Callable[[str], int]] = None
        for key, model in (parents or {}).items():
            self.add_model(key, model)

    @classmethod
    def for_config(cls, cfg, **kw) -> "TrafficMonitor":
        keys, parents = traffic_keys(cfg)
        monitor = cls(keys, parents=parents, **kw)
        monitor.set_slos(cfg)
        return monitor

    def set_slos(self, cfg) -> None:
        """Each engine's TTFT SLO (``ttft_slo_ms``) from a config (at start and reload)."""
        for i in cfg.instances:
            m = self.models.get(i.key)
            if m is not None:
                m.ttft_slo = i.ttft_slo_seconds

    def add_model(self, model: str, parent: Optional[str] = None) -> None:
        """An engine's key; with ``parent``, a replica of that model (counted there too)."""
        for name in (model, parent):
            if name is not None and name not in self.models:
                self.models[name] = ModelTraffic(name, self.clock())
        if parent is not None and parent != model:
            self.parents[model] = parent
            kids = self.children.setdefault(parent, [])
            if model not in kids:
                kids.append(model)

    def remove_model(self, model: str) -> None:
        """Forget a model (a reload removed it); its requests in flight end normally."""
        self.models.pop(model, None)
        parent = self.parents.pop(model, None)
        if parent is not None:
            kids = self.children.get(parent, [])
            if model in kids:
                kids.remove(model)
            if not kids:
                self.children.pop(parent, None)
                self.models.pop(parent, None)

    def replicas(self, model: str) -> List[str]:
        """The keys of ``model``'s replicas (none when it has one engine)."""
        return self.children.get(model, [])

    def models_shown(self) -> List[str]:
        """What the per-model views list: the models, not their replicas."""
        return [m for m in self.models if m not in self.parents]

    # --- recording (hot path) --------------------------------------------------------------
    @staticmethod
    def _arrive(m: ModelTraffic, now: float) -> None:
        m.arrived += 1
        if not m.in_flight and m.last_end_mono is not None:
            m.gaps.append(now - m.last_end_mono)
            m.idle_arrivals += 1
        m.arrivals.append(now)
        m.in_flight += 1

    def start(self, model: str) -> RequestRecord:
        m = self.models[model]
        now = self.clock()
        self._arrive(m, now)
        parent = self.parents.get(model)
        if parent is None:
            return RequestRecord(m, now)
        g = self.models[parent]
        self._arrive(g, now)
        return RequestRecord(m, now, g)

    def move(self, rec: RequestRecord, model: str) -> None:
        """The request goes to another replica of its model (a retry elsewhere)."""
        m = self.models[model]
        if m is rec.model:
            return
        rec.model.in_flight -= 1
        m.in_flight += 1
        m.arrivals.append(rec.start)
        rec.model = m

    def woke(self, model: str, seconds: float) -> None:
        """The model's wake (or start) took ``seconds``: its waiters end after this."""
        m = self.models.get(model)
        if m is not None:
            m.last_wake_seconds = seconds

    def waited(self, rec: RequestRecord, seconds: float) -> None:
        rec.wait += seconds

    def end(self, rec: RequestRecord, outcome: str, prompt_tokens: int = 0,
            completion_tokens: int = 0, itl: Optional[float] = None,
            now: Optional[float] = None, remote: bool = False) -> None:
        m = rec.model
        if rec.ended:
            return
        rec.ended = True
        rec.outcome = outcome
        rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens
        now = self.clock() if now is None else now
        latency = now - rec.start
        wall = self.wall()
        self._account(m, rec, outcome, prompt_tokens, completion_tokens, itl, now, wall,
                      latency)
        if rec.group is not None:
            self._account(rec.group, rec, outcome, prompt_tokens, completion_tokens, itl, now,
                          wall, latency)
        if rec.wait > 0:
            self.wakes.add(now, True, late_for_wake(
                m.ttft_slo, m.last_wake_seconds, rec.first_byte - rec.start
                if rec.stream and rec.first_byte is not None else None, rec.wait))
        else:
            self.wakes.add(now, False)
        if self.on_end is not None and not remote:
            self.on_end(m.name, outcome, rec, latency, prompt_tokens, completion_tokens, itl)

    @staticmethod
    def _account(m: ModelTraffic, rec: RequestRecord, outcome: str, prompt_tokens: int,
                 completion_tokens: int, itl: Optional[float], now: float, wall: float,
                 latency: float) -> None:
        m.in_flight -= 1
        m.total += 1
        m.outcomes[outcome] += 1
        m.last_end_mono = now
        m.last_end_wall = wall
        m.prompt_tokens += prompt_tokens
        m.completion_tokens += completion_tokens
        m.last_start_wall = wall - latency
        ok = outcome == "success"
        m.buckets.add(int(now), ok, latency, completion_tokens)
        if ok:
            m.success_seconds += latency
            m.latency.append((now, latency))
            if rec.stream:
                m.streams += 1
                ttft = rec.ttft
                if ttft is not None:
                    m.ttft.append((now, ttft))
                if itl is not None:
                    m.itl.append((now, itl))
        if rec.wait:
            m.wait.append((now, rec.wait))
            m.wait_total += rec.wait

    def replay(self, model: str, start: float, end: float, outcome: str, wait: float = 0.0,
               first_byte: Optional[float] = None, stream: bool = False, prompt_tokens: int = 0,
               completion_tokens: int = 0, itl: Optional[float] = None,
               remote: bool = False) -> None:
        """Count a request another process served (a router worker; with ``remote``, another
        router of the cluster: not this router's own metrics), as if served here."""
        m = self.models.get(model)
        if m is None:
            return
        parent = self.parents.get(model)
        g = self.models.get(parent) if parent is not None else None
        for t in (m, g):
            if t is None:
                continue
            t.arrived += 1
            if t.last_end_mono is not None and start > t.last_end_mono and \
                    not self.in_flight(t.name):
                t.gaps.append(start - t.last_end_mono)
                t.idle_arrivals += 1
            t.arrivals.append(start)
            t.in_flight += 1
        rec = RequestRecord(m, start, g)
        rec.wait, rec.first_byte, rec.stream = wait, first_byte, stream
        lasts = [(t, t.last_end_mono) for t in (m, g) if t is not None]
        self.end(rec, outcome, prompt_tokens, completion_tokens, itl, now=end, remote=remote)
        for t, last in lasts:
            if last is not None and last > end:
                t.last_end_mono = last   # records may arrive out of order

    # --- queries -----------------------------------------------------------------------------
    def local_in_flight(self, model: str) -> int:
        """Requests in flight for ``model`` on this router (this process and its workers)."""
        n = self.models[model].in_flight
        if self.external is None:
            return n
        kids = self.children.get(model)
        return n + (sum(map(self.external, kids)) if kids else self.external(model))

    def in_flight(self, model: str) -> int:
        """Requests in flight for ``model``: this router's, and the other routers'."""
        n = self.local_in_flight(model)
        if self.peers is None:
            return n
        kids = self.children.get(model)
        return n + (sum(map(self.peers, kids)) if kids else self.peers(model))

    def arrival_gaps(self, model: str) -> Tuple[float, ...]:
        """Seconds between the model's last ARRIVALS request starts."""
        return arrival_gaps(self.models[model].arrivals)

    def served_ttfts(self, model: str, n: int = GAPS) -> Tuple[float, ...]:
        """The model's last ``n`` streamed TTFTs as the engine served them (waits left out)."""
        last = [v for _, v in itertools.islice(reversed(self.models[model].ttft), n)]
        return tuple(reversed(last))

    def idle_seconds(self, model: str) -> float:
        m = self.models[model]
        if self.in_flight(model):
            return 0.0
        since = m.last_end_mono if m.last_end_mono is not None else m.created_mono
        return max(0.0, self.clock() - since)

    def stats(self, model: str, window: float = 60.0, idle_threshold: float = 300.0) -> dict:
        m = self.models[model]
        now = self.clock()
        w = max(1, int(round(window)))
        agg = m.buckets.window(int(now), w)
        since = now - w

        def recent(series):
            return [v for t, v in series if t >= since]

        idle = self.idle_seconds(model)
        failed = m.total - m.outcomes["success"]
        return {
            "model": model,
            "window_seconds": w,
            "total_requests": m.total,
            "successful_requests": m.outcomes["success"],
            "failed_requests": failed,
            "failures": {k: v for k, v in m.outcomes.items() if k != "success"},
            "success_rate": round(m.outcomes["success"] / m.total, 6) if m.total else None,
            "requests_in_flight": self.in_flight(model),
            "request_rate": round(agg["count"] / w, 6),
            "window_requests": agg["count"],
            "window_failed": agg["failed"],
            # the seed's meaning: successful requests since start (0.0 before any)
            "avg_response_time": round(m.success_seconds / m.outcomes["success"], 6)
            if m.outcomes["success"] else 0.0,
            "window_avg_response_time": round(agg["latency"] / agg["count"], 6)
            if agg["count"] else None,
            "response_time": _percentiles(recent(m.latency)),
            "time_to_first_token": _percentiles(recent(m.ttft)),
            "inter_token_latency": _percentiles(recent(m.itl)),
            "wait_time": _percentiles(recent(m.wait)),
            "wait_time_total_seconds": round(m.wait_total, 6),
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "completion_tokens_per_second": round(agg["tokens"] / w, 6),
            "streams": m.streams,
            "last_activity_time": m.last_start_wall,  # the seed's: start of the last request
            "last_end_time": m.last_end_wall,
            "idle_time_seconds": round(idle, 3),
            "is_idle": idle >= idle_threshold,
        }

    def history(self, model: str, span: int = 900, step: int = 30) -> List[dict]:
        """The last ``span`` seconds in ``step``-second bins, oldest first: requests/s ended
        and the median TTFT of the streams that ended in the bin."""
        m = self.models[model]
        now = int(self.clock())
        first = now - span + 1
        bins = []
        ttfts = [(t, v) for t, v in m.ttft if t >= first]
        for start in range(first, now + 1, step):
            agg = m.buckets.window(min(now, start + step - 1), min(step, now - start + 1))
            in_bin = sorted(v for t, v in ttfts if start <= t < start + step)
            bins.append({"ago": now - start, "rate": round(agg["count"] / step, 4),
                         "ttft_p50": round(in_bin[len(in_bin) // 2], 6) if in_bin else None})
        return bins

    def with_activity(self) -> List[str]:
        """Models that have had a request (the seed's traffic views list only these)."""
        return [m for m in self.models_shown() if self.models[m].total]

    def idle(self, threshold: float) -> List[str]:
        return [m for m in self.models_shown() if self.idle_seconds(m) >= threshold]

    def active(self, threshold: float) -> List[str]:
        return [m for m in self.models_shown() if self.idle_seconds(m) < threshold]
