"""The processes and load tools of the benchmarks (``make bench``, ``make bench-kv``, the
A/B runner): free ports, child processes in their own process group, a router started on a
config, wrk or the built-in load, SSE stream counting."""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional, Tuple  # noqa: E402

import gevent  # noqa: E402
import httptools  # noqa: E402

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    def __init__(self, argv, env=None):
        self.log = tempfile.TemporaryFile()
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=dict(os.environ, **(env or {})))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.p.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_router(port: int, instances: str, extra: str = "", workers: int = 1):
    """Write a router config (``instances`` is YAML list items) and run ``kvrouter serve``."""
    path = os.path.join(tempfile.mkdtemp(prefix="kvr-bench-"), "kvrouter.yaml")
    with open(path, "w") as fh:
        fh.write("router: {router_host: 127.0.0.1, router_port: %d, log_level: warning, "
                 "workers: %d}\n%sinstances:\n%s" % (port, workers, extra, instances))
    return Child([PY, "-m", "kvrouter", "serve", path])


def peer_router() -> Optional[str]:
    """The Rust vllm-router, when installed (``VLLM_ROUTER`` or on PATH; `make bench`
    installs it into .venv-peer when PyPI has it)."""
    path = os.environ.get("VLLM_ROUTER") or shutil.which("vllm-router")
    return path if path and os.access(path, os.X_OK) else None


def wait_port(port: int, path: str = "/health", timeout: float = 20.0,
              answer: bytes = b"HTTP/1.1 200") -> None:
    """Until ``GET path`` on the port is answered with a response that starts ``answer``
    (RuntimeError after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if s.recv(100).startswith(answer):
                s.close()
                return
            s.close()
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


BODY = json.dumps({"model": "bench/model", "prompt": "hello", "max_tokens": 1}).encode()
BURST_BODY = json.dumps({"model": "bench/burst", "prompt": "hello", "max_tokens": 64,
                        "stream": True}).encode()
NGINX_BODY = json.dumps({"model": "bench/nginx", "prompt": "hello", "max_tokens": 1}).encode()
STREAM_BODY = json.dumps({"model": "bench/model", "prompt": "hello", "max_tokens": 100,
                          "stream": True}).encode()


# --- non-streamed ------------------------------------------------------------------------------
def wrk(port: int, conns: int, seconds: float, body: bytes = BODY) -> dict:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write('wrk.method = "POST"\nwrk.body = \'%s\'\n'
                 'wrk.headers["Content-Type"] = "application/json"\n' % body.decode())
    script.close()
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{max(1, int(round(seconds)))}s", "--latency", "-s",
                          script.name, f"http://127.0.0.1:{port}/v1/completions"],
                         capture_output=True, text=True).stdout
    os.unlink(script.name)

    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return None
        v = float(m.group(1))
        return v / 1000.0 if m.group(2) == "us" else v if m.group(2) == "ms" else v * 1000

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50_ms": ms("50"), "p99_ms": ms("99"),
            "errors": int(errors.group(1)) if errors else 0, "tool": "wrk"}


def builtin_load(port: int, conns: int, seconds: float, body: bytes = BODY) -> dict:
    from kvrouter.http.client import UpstreamError, UpstreamPool

    pool = UpstreamPool("127.0.0.1", port, max_idle=conns)
    lat, errors = [], 0
    deadline = time.perf_counter() + seconds

    def worker():
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = pool.request("POST", "/v1/completions", {"Content-Type": "application/json"},
                                 body)
                r.read()
                if r.status != 200:
                    errors += 1
            except UpstreamError:
                errors += 1
            lat.append(time.perf_counter() - t0)

    start = time.perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(conns)])
    elapsed = time.perf_counter() - start
    lat.sort()
    return {"rps": len(lat) / elapsed, "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "errors": errors, "tool": "kvrouter-bench"}


def load_tool(seconds: float) -> Tuple[str, Callable[..., dict]]:
    """wrk when installed, else kvrouter's own load: (its name, load(port, connections,
    body=BODY))."""
    if shutil.which("wrk") is not None:
        return "wrk", lambda port, conns, body=BODY: wrk(port, conns, seconds, body)
    return "kvrouter-bench", lambda port, conns, body=BODY: builtin_load(port, conns, seconds,
                                                                         body)


def start_nginx(port: int, fixed: bytes, models: bytes) -> Optional[Child]:
    """nginx answering every POST with ``fixed`` (one process, no access log): the
    backend whose own cost is least, so a router's cost shows. None when not installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx",
                                                                       os.X_OK) else None)
    if binary is None:
        return None
    root = tempfile.mkdtemp(prefix="kvr-nginx-")
    temps = "".join(f"{kind}_temp_path {root}/{kind};\n" for kind in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(os.path.join(root, "nginx.conf"), "w") as fh:
        fh.write(f"""worker_processes 1;
error_log stderr warn;
pid {root}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  {temps}
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    location = /v1/models {{ return 200 '{models.decode()}'; }}
    location / {{ return 200 '{fixed.decode()}'; }}
  }}
}}
""")
    return Child([binary, "-p", root, "-c", os.path.join(root, "nginx.conf"), "-g",
                  "daemon off; master_process off;"])


def save_results(path: str, results: dict, text: str) -> None:
    """Write a benchmark's raw figures as JSON and print its report."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(text)
    print(f"\n(raw figures: {path})")


# --- streams -----------------------------------------------------------------------------------
class _EventCounter:
    """httptools callbacks: count the de-chunked body's SSE events ([DONE] apart) by the
    blank lines that end them, in C (``bytes.count``). The load tool must cost less than
    what it measures: decoding each event in Python made it the bottleneck of the bursty
    rows (direct 5.2k streams/s, one router process 4.6k). The bench's engines and
    backends end events with ``\\n\\n``."""

    def __init__(self):
        self.ends = 0
        self.tail = b""
        self.finished = False   # [DONE] seen
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.ends += data.count(b"\n\n")
        if self.tail.endswith(b"\n") and data.startswith(b"\n"):
            self.ends += 1      # a blank line split between two reads
        if not self.finished and (b"[DONE]" in data or b"[DONE]" in self.tail + data[:8]):
            self.finished = self.done = True   # (the second: one split between two reads)
        self.tail = data[-8:]

    @property
    def events(self) -> int:
        return self.ends - (1 if self.finished else 0)

    def on_message_complete(self) -> None:
        self.done = True


def sse_streams(port: int, conns: int, seconds: Optional[float] = None,
                streams_each: Optional[int] = None, expect_events: Optional[int] = None,
                body: bytes = STREAM_BODY, sample=None) -> dict:
    """Each connection runs streams back to back; count events, time to first byte."""
    events = 0
    ttfb = []
    itls = []
    errors = 0
    done = 0
    deadline = time.perf_counter() + seconds if seconds else None
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def worker():
        nonlocal events, errors, done
        n = 0
        while (deadline is None or time.perf_counter() < deadline) and \
                (streams_each is None or n < streams_each):
            n += 1
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=60)
                t0 = time.perf_counter()
                s.sendall(req)
                first = True
                body = _EventCounter()
                parser = httptools.HttpResponseParser(body)
                while not body.done:
                    data = s.recv(65536)
                    if not data:
                        break
                    now = time.perf_counter()
                    if first:
                        ttfb.append(now - t0)
                        first_at = now
                        first = False
                    last_at = now
                    parser.feed_data(data)
                s.close()
                got = body.events
                events += got
                if got > 1:
                    itls.append((last_at - first_at) / (got - 1))
                if expect_events is not None and got != expect_events:
                    errors += 1
                done += 1
            except OSError:
                errors += 1

    start = time.perf_counter()
    workers = [gevent.spawn(worker) for _ in range(conns)]
    if sample:
        sampler = gevent.spawn(sample)
    gevent.joinall(workers)
    if sample:
        sampler.kill()
    elapsed = time.perf_counter() - start
    ttfb.sort()
    return {"events_per_s": events / elapsed, "streams": done, "errors": errors,
            "ttfb_p50_ms": ttfb[len(ttfb) // 2] * 1000 if ttfb else None,
            "itl_mean_ms": sum(itls) / len(itls) * 1000 if itls else None,
            "seconds": elapsed}
