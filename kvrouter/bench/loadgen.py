"""The load generator: closed-loop concurrency, constant-rate or Poisson arrivals, or a trace.

Runs in one gevent process with kvrouter's own upstream HTTP client (pooled
keep-alive connections, httptools parser), so it is not the bottleneck of the
endpoint it measures; ``make bench`` prints the request rate it reaches.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

import gevent
from gevent.pool import Pool

from kvrouter.bench.report import Sample, build
from kvrouter.errors import KvrouterError
from kvrouter.http.client import UpstreamError, UpstreamPool, UpstreamTimeout
from kvrouter.http.sse import iter_events


@dataclass
class Job:
    at: float            # seconds after the start (open loop); ignored in closed loop
    model: str
    prompt: str
    output_tokens: int


@dataclass
class LoadSpec:
    base_url: str
    endpoint: str = "chat"           # chat | completions
    stream: bool = True
    concurrency: Optional[int] = None
    request_rate: Optional[float] = None
    arrival: str = "poisson"         # poisson | constant (with request_rate)
    duration: Optional[float] = None
    timeout: float = 600.0
    api_key: Optional[str] = None
    slo: dict = field(default_factory=dict)
    ignore_eos: bool = True


def arrival_times(n: int, rate: Optional[float], arrival: str, seed: int) -> List[float]:
    if not rate:
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
    return out


class LoadGenerator:
    def __init__(self, spec: LoadSpec):
        self.spec = spec
        parts = urlsplit(spec.base_url.rstrip("/"))
        if parts.scheme != "http" or not parts.hostname:
            raise KvrouterError(f"--base-url must be http://HOST:PORT[/v1], got {spec.base_url!r}")
        self.prefix = parts.path if parts.path.endswith("/v1") else parts.path + "/v1"
        self.pool = UpstreamPool(parts.hostname, parts.port or 80, max_idle=4096)
        self.samples: List[Sample] = []
        self.done = 0
        self.sent = 0
        self.first_error: Optional[str] = None
        self.shown_error = False

    def _body(self, job: Job) -> Tuple[str, bytes]:
        s = self.spec
        body = {"model": job.model, "max_tokens": job.output_tokens, "stream": s.stream,
                "temperature": 0}
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.stream:
            body["stream_options"] = {"include_usage": True}
        if s.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": job.prompt}]
            path = self.prefix + "/chat/completions"
        else:
            body["prompt"] = job.prompt
            path = self.prefix + "/completions"
        return path, json.dumps(body).encode()

    def one(self, job: Job) -> None:
        s = self.spec
        path, payload = self._body(job)
        headers = {"Content-Type": "application/json"}
        if s.api_key:
            headers["Authorization"] = f"Bearer {s.api_key}"
        start = time.perf_counter()
        sample = Sample(job.model, start)
        self.sent += 1
        resp = None
        try:
            resp = self.pool.request("POST", path, headers, payload, 10.0, s.timeout, s.timeout)
            if resp.status >= 400:
                body = resp.read()
                sample.error = "http_4xx" if resp.status < 500 else "http_5xx"
                self.first_error = self.first_error or \
                    f"HTTP {resp.status} for {job.model}: {body[:300].decode(errors='replace')}"
                return
            if not s.stream:
                data = json.loads(resp.read())
                usage = data.get("usage") or {}
                sample.output_tokens = usage.get("completion_tokens") or 0
                sample.ttft = time.perf_counter() - start
                sample.ok = True
                return
            self._read_stream(resp, sample, start)
        except UpstreamTimeout:
            sample.error = "timeout"
        except UpstreamError as err:
            sample.error = "connect" if err.phase == "connect" else "stream_error"
            self.first_error = self.first_error or f"{sample.error} for {job.model}: {err}"
        except ValueError:
            sample.error = "stream_error"
        finally:
            if resp is not None:
                resp.close()
            sample.e2e = time.perf_counter() - start
            self.samples.append(sample)
            self.done += 1

    def _read_stream(self, resp, sample: Sample, start: float) -> None:
        last = None
        tokens = 0
        usage_tokens = None
        for event in iter_events(resp.chunks()):
            if event.data == "[DONE]":
                sample.ok = sample.error is None
                continue
            obj = json.loads(event.data)
            if "error" in obj:
                sample.error = "stream_error"
                continue
            if obj.get("usage"):
                usage_tokens = obj["usage"].get("completion_tokens")
            for choice in obj.get("choices") or ():
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    if last is None:
                        sample.ttft = now - start
                    else:
                        sample.itls.append(now - last)
                    last = now
                    tokens += 1
        sample.output_tokens = usage_tokens if usage_tokens is not None else tokens
        if sample.error is None and not sample.ok:
            sample.error = "stream_error"  # ended without [DONE]

    def run(self, jobs: Iterable[Job], progress: bool = False,
            total: Optional[int] = None) -> float:
        """Send ``jobs`` (a list, or with ``total`` an iterator made as it goes: a long
        trace's prompts are never all in memory)."""
        if total is None:
            jobs = list(jobs)
            total = len(jobs)
        s = self.spec
        started = time.perf_counter()
        ticker = gevent.spawn(self._progress, total, started) if progress else None
        deadline = started + s.duration if s.duration else None
        try:
            if s.request_rate:
                pool = Pool(s.concurrency) if s.concurrency else Pool()
                for job in jobs:
                    delay = started + job.at - time.perf_counter()
                    if deadline and started + job.at > deadline:
                        break
                    if delay > 0:
                        gevent.sleep(delay)
                    pool.spawn(self.one, job)
                pool.join()
            else:
                queue = list(jobs)[::-1]

                def worker():
                    while queue and (deadline is None or time.perf_counter() < deadline):
                        self.one(queue.pop())

                gevent.joinall([gevent.spawn(worker) for _ in range(s.concurrency or 1)])
        finally:
            if ticker is not None:
                ticker.kill()
                self._show(total, started, sys.stderr.isatty())
                sys.stderr.write("\n" if sys.stderr.isatty() else "")
        return time.perf_counter() - started

    def _progress(self, total: int, started: float) -> None:
        """A bar redrawn twice a second on a terminal; a line every 10 s elsewhere (a log)."""
        tty = sys.stderr.isatty()
        while True:
            gevent.sleep(0.5 if tty else 10.0)
            self._show(total, started, tty)

    def _show(self, total: int, started: float, tty: bool) -> None:
        """One progress report; the first error's message is shown once, so a run of
        failures is explained early."""
        frac = self.done / total if total else 1.0
        bar = "#" * int(frac * 30)
        if self.first_error and not self.shown_error:
            self.shown_error = True
            sys.stderr.write(("\n" if tty else "") + f"first error: {self.first_error}\n")
        failed = sum(1 for x in self.samples if not x.ok)
        sys.stderr.write(f"{chr(13) if tty else ''}[{bar:<30}] {self.done}/{total} done, "
                         f"{failed} errors, {time.perf_counter() - started:5.1f}s"
                         f"{'' if tty else chr(10)}")
        sys.stderr.flush()

    def result(self, duration: float, config: dict) -> dict:
        return build(self.samples, duration, config, time.time() - duration, self.spec.slo)


def spec_dict(spec: LoadSpec, **extra) -> dict:
    d = asdict(spec)
    d.pop("api_key", None)
    d.update(extra)
    return d
