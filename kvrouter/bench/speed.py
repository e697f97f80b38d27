"""``make bench``: speed figures of the router, the simulated engine and the load generator.

Runs side by side, on this machine, in one run:
  1. non-streamed requests/s and latency at concurrency 1 and 32: direct to a
     fixed-JSON backend and to nginx, through kvrouter (one process, and N workers),
     through an aiohttp proxy yardstick and the Rust vllm-router when installed (wrk when
     installed, else kvrouter's own load generator; ``sidebyside.py``, ``harness.py``);
  2. streamed SSE events/s, streams/s and time to first byte through each, with events
     spaced (a write each) and bursty (64 in one write);
  3. kvrouter's RSS with 1,000 concurrent streams, and their errors;
  4. the simulated engine with 500 concurrent streams at 20 ms inter-token latency;
  5. the load generator's own request rate against the fast backend;
  6. the traffic monitor's cost per request;
  7. a 25 MB upload, direct and through kvrouter: added time and the router's memory.
Prints a report and writes bench-results/speed.json. Figures, not assertions.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from kvrouter.bench import sidebyside, sidebyside_report, uploads  # noqa: E402
from kvrouter.bench.harness import (  # noqa: E402
    PY,
    Child,
    free_port,
    load_tool,
    save_results,
    sse_streams,
    start_router,
    wait_port,
)


def sim_itl(streams: int, itl_ms: float, tokens: int) -> dict:
    port = free_port()
    sim = Child([PY, "-m", "kvrouter", "sim-engine", "--port", str(port), "--model", "m",
                 "--startup-seconds", "0", "--itl-ms", str(itl_ms), "--ttft-ms", "10",
                 "--max-concurrency", str(streams), "--batch-slowdown", "0"])
    try:
        wait_port(port)
        body = json.dumps({"model": "m", "prompt": "x", "max_tokens": tokens, "stream": True,
                           "ignore_eos": True}).encode()
        r = sse_streams(port, streams, streams_each=1, expect_events=tokens, body=body)
        realised = r["itl_mean_ms"] or 0.0
        return {"streams": streams, "configured_itl_ms": itl_ms, "tokens": tokens,
                "realised_itl_ms": realised,
                "steady_events_per_s": streams * 1000.0 / realised if realised else 0.0,
                "events_per_s_with_ramp": r["events_per_s"],
                "errors": r["errors"], "within_10pct": abs(realised - itl_ms) <= itl_ms * 0.1}
    finally:
        sim.stop()


def loadgen_rate(port: int, seconds: float) -> dict:
    from kvrouter.bench.loadgen import Job, LoadGenerator, LoadSpec

    spec = LoadSpec(base_url=f"http://127.0.0.1:{port}/v1", endpoint="completions",
                    stream=False, concurrency=64, duration=seconds, ignore_eos=False)
    gen = LoadGenerator(spec)
    jobs = [Job(0, "bench/model", "hello", 1) for _ in range(200000)]
    elapsed = gen.run(jobs)
    ok = sum(1 for s in gen.samples if s.ok)
    return {"requests_per_s": ok / elapsed, "errors": len(gen.samples) - ok}


def monitor_cost(n: int = 50000) -> dict:
    from kvrouter.metrics import RouterMetrics
    from kvrouter.traffic import TrafficMonitor

    t = TrafficMonitor(["m"])  # wired as the router wires them: metrics on every request end
    t.on_end = RouterMetrics(None, t).on_end
    start = time.perf_counter()
    for _ in range(n):
        rec = t.start("m")
        t.end(rec, "success", 10, 20)
    return {"us_per_request": (time.perf_counter() - start) / n * 1e6}


def access_log_cost(n: int = 20000) -> dict:
    """One access-log line as the router writes it (format + a stream write), per request."""

    from kvrouter import logs

    class _Rec:
        start, stream, outcome = 0.0, True, "success"
        ttft = 0.0123

    class _Req:
        method, path = "POST", "/v1/chat/completions"

    with open(os.devnull, "w") as sink:
        out = logs.AccessLog(sink)
        rec, req = _Rec(), _Req()
        start = time.perf_counter()
        for _ in range(n):  # the router's line, as Proxy.access builds it
            ttft = rec.ttft if rec.stream else None
            out.write(f"{req.method} {req.path} model=org/model status=200 bytes=1234 "
                      f"duration={time.perf_counter() - start:.3f}s"
                      f"{f' ttft={ttft:.3f}s' if ttft else ''} rid=0123456789abcdef "
                      f"outcome={rec.outcome}")
        took = time.perf_counter() - start
    return {"us_per_request": took / n * 1e6}


def wake_and_readiness(rounds: int = 5) -> dict:
    """First token of a request to a sleeping model minus the engine's configured wake time;
    how long after an engine turns healthy the router routes to it."""
    import urllib.request

    from kvrouter.sim.options import parse_sim_args

    sim_port, router_port = free_port(), free_port()
    sim_args = ["--port", str(sim_port), "--model", "w", "--startup-seconds", "0",
                "--enable-sleep-mode", "--weights-gb", "5", "--ttft-ms", "10"]
    timing = parse_sim_args(sim_args, environ={}).timing
    wake_s, ttft_ms = timing.wake_seconds(1), timing.ttft_ms   # what the sim engine sleeps
    router = start_router(
        router_port, "  - {name: w, model: w, engine: sim, engine_env: "
        "['VLLM_SERVER_DEV_MODE=1'], engine_args: ['--host 127.0.0.1 --port %d "
        "--enable-sleep-mode']}\n" % sim_port, "sleep_manager: {min_sleep_duration: 0}\n")
    base = f"http://127.0.0.1:{router_port}"

    def status(url):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except OSError as err:
            return getattr(err, "code", 0)

    try:
        wait_port(router_port, "/health")
        sim = Child([PY, "-m", "kvrouter", "sim-engine", *sim_args],
                    env={"VLLM_SERVER_DEV_MODE": "1"})
        healthy_at = None
        while True:  # the engine turns healthy; when does the router call it ready?
            now = time.perf_counter()
            if healthy_at is None and status(f"http://127.0.0.1:{sim_port}/health") == 200:
                healthy_at = now
            if healthy_at is not None and status(base + "/health/w") == 200:
                noticed_ms = (time.perf_counter() - healthy_at) * 1000
                break
            time.sleep(0.002)
        extra = []
        body = json.dumps({"model": "w", "prompt": "x", "max_tokens": 2, "stream": True}).encode()
        for _ in range(rounds):
            req = urllib.request.Request(base + "/model/sleep/w", data=b"", method="POST")
            urllib.request.urlopen(req, timeout=30).read()
            r = sse_streams(router_port, 1, streams_each=1, body=body)
            extra.append(r["ttfb_p50_ms"] - (wake_s * 1000 + ttft_ms))
        sim.stop()
    finally:
        router.stop()
    extra.sort()
    return {"readiness_noticed_ms": noticed_ms, "configured_wake_ms": wake_s * 1000,
            "first_token_minus_wake_ms_p50": extra[len(extra) // 2],
            "first_token_minus_wake_ms_max": extra[-1], "rounds": rounds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default="bench-results/speed.json")
    ap.add_argument("--skip-aiohttp", action="store_true")
    ap.add_argument("--runs", type=int, default=1,
                    help="side-by-side passes; figures are their medians (default 1)")
    ap.add_argument("--workers", type=int, default=0,
                    help="router processes of the multi-worker run (default: CPU cores)")
    args = ap.parse_args(argv)
    secs = args.seconds
    tool, load = load_tool(secs)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "load_tool": tool}
    bench = sidebyside.Bench(args.workers or os.cpu_count() or 2, not args.skip_aiohttp)
    for note in bench.notes:
        print(note)
    try:
        bench.wait()
        results.update(sidebyside_report.medians(
            [sidebyside.main_rows(bench, secs, load) for _ in range(max(1, args.runs))]))
        router = bench.router
        peak = {"rss_mb": 0.0}

        def sample():
            while True:
                peak["rss_mb"] = max(peak["rss_mb"], router.rss_mb())
                gevent.sleep(0.2)

        slow_body = json.dumps({"model": "bench/slow", "prompt": "x", "max_tokens": 50,
                                "stream": True}).encode()
        results["router_rss_idle_mb"] = router.rss_mb()
        results["streams_1000"] = sse_streams(bench.ports["kvrouter"], 1000, streams_each=1,
                                              expect_events=50, body=slow_body, sample=sample)
        results["streams_1000"]["router_peak_rss_mb"] = peak["rss_mb"]
        results["loadgen"] = loadgen_rate(bench.ports["fast"], secs)
    finally:
        bench.stop()
    results["sim_engine"] = sim_itl(500, 20.0, 100)
    results["wake"] = wake_and_readiness()
    results["monitor"] = monitor_cost()
    results["access_log"] = access_log_cost()
    results["upload"] = uploads.upload_cost()
    save_results(args.out, results, report(results))
    return 0


def report(r: dict) -> str:
    lines = [f"kvrouter speed ({r['machine']['cpus']} CPUs, load tool: {r['load_tool']})"]
    lines += [f"  ({note})" for note in r.get("notes", [])]
    lines += sidebyside_report.report(r)
    s = r["streams_1000"]
    lines += ["", f"1,000 concurrent streams through kvrouter: {s['streams']} done, "
              f"{s['errors']} errors, router RSS idle {r['router_rss_idle_mb']:.0f} MB, "
              f"peak {s['router_peak_rss_mb']:.0f} MB"]
    e = r["sim_engine"]
    lines.append(f"sim engine, {e['streams']} streams at {e['configured_itl_ms']:g} ms ITL: "
                 f"realised {e['realised_itl_ms']:.2f} ms (per stream), "
                 f"{e['steady_events_per_s']:.0f} events/s steady, "
                 f"{e['errors']} errors, within 10%: {e['within_10pct']}")
    lines.append(f"load generator (non-streamed, 64 concurrent): "
                 f"{r['loadgen']['requests_per_s']:.0f} req/s, {r['loadgen']['errors']} errors")
    lines.append(f"traffic monitor + metrics: {r['monitor']['us_per_request']:.2f} us per request")
    lines.append(f"access log line: {r['access_log']['us_per_request']:.2f} us per request "
                 "(on by default: the router figures above include it)")
    w = r["wake"]
    lines.append(f"request to a sleeping model: first token - configured wake "
                 f"({w['configured_wake_ms']:.0f} ms) - TTFT = p50 "
                 f"{w['first_token_minus_wake_ms_p50']:.1f} ms, max "
                 f"{w['first_token_minus_wake_ms_max']:.1f} ms ({w['rounds']} rounds)")
    lines.append(f"readiness noticed {w['readiness_noticed_ms']:.0f} ms after the engine turned "
                 "healthy")
    if "upload" in r:
        lines.append(uploads.report(r["upload"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
