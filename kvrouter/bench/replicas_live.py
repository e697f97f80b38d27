"""Live figures for replicas (``make bench-replicas``): a real router (``kvrouter serve``) in
front of simulated engines on loopback.

- **Wake to first token**: every replica asleep, one streamed request: its time to first
  token against the wake the router measured for the replica it woke.
- **A replica killed under load**: streamed requests from 12 clients over 3 replicas, one
  replica SIGKILLed: how many requests failed before their first byte (the target is
  none), how many streams broke mid-way on the dead replica (the in-band error), how long
  until the router stopped sending to it, and how long until it served again after its
  restart.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import requests  # noqa: E402

from kvrouter.bench import harness  # noqa: E402

MODEL = "bench/live"


def _engine(port: int, extra=()) -> harness.Child:
    return harness.Child([harness.PY, "-m", "kvrouter", "sim-engine", "--dialect", "vllm",
                          "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
                          "--startup-seconds", "0", "--enable-sleep-mode", "--ttft-ms", "5",
                          "--itl-ms", "10", "--weights-gb", "16", *extra],
                         env={"VLLM_SERVER_DEV_MODE": "1"})


def _stack(n: int, extra: str = ""):
    ports = [harness.free_port() for _ in range(n)]
    engines = [_engine(p) for p in ports]
    for p in ports:
        harness.wait_port(p)
    rp = harness.free_port()
    instances = "".join(f"  - {{name: live-{i + 1}, model: {MODEL}, engine: vllm, "
                        f"engine_args: ['--host 127.0.0.1 --port {p}']}}\n"
                        for i, p in enumerate(ports))
    router = harness.start_router(rp, instances, "sleep_manager: {min_sleep_duration: 0}\n"
                                  + extra)
    harness.wait_port(rp)
    base = f"http://127.0.0.1:{rp}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _states(base) != ["ready"] * n:
        time.sleep(0.05)
    return base, ports, engines, router


def _states(base: str) -> List[str]:
    try:
        body = requests.get(base + f"/health/{MODEL}", timeout=2).json()
    except (requests.RequestException, ValueError):
        return []
    return [r["state"] for r in body.get("replicas", [])]


def _seconds_until(base: str, replica: int, state: str, timeout: float) -> Optional[float]:
    """Seconds until the router shows replica ``replica`` in ``state`` (None: not within
    ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _states(base)[replica:replica + 1] == [state]:
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def _stream(base: str, tokens: int, timeout: float = 30.0) -> Dict[str, object]:
    """One streamed completion: its TTFT, whether it finished, and where it failed."""
    t0 = time.monotonic()
    out: Dict[str, object] = {"ttft": None, "ok": False, "failed": None}
    try:
        with requests.post(base + "/v1/completions", stream=True, timeout=timeout,
                           json={"model": MODEL, "prompt": "hello", "max_tokens": tokens,
                                 "stream": True}) as r:
            if r.status_code != 200:
                out["failed"] = f"before first byte: HTTP {r.status_code}"
                return out
            for chunk in r.iter_content(chunk_size=None):
                if out["ttft"] is None:
                    out["ttft"] = time.monotonic() - t0
                if b'"error"' in chunk:
                    out["failed"] = "mid-stream (in-band error)"
                    return out
            out["ok"] = True
    except requests.RequestException as err:
        out["failed"] = ("before first byte: " if out["ttft"] is None else "mid-stream: ") \
            + type(err).__name__
    return out


def wake_to_first_token(rounds: int = 5) -> dict:
    base, _, engines, router = _stack(2, "routing: {wake_at_in_flight: 0}\n")
    gaps: List[float] = []
    ttfts: List[float] = []
    wakes: List[float] = []
    try:
        for _ in range(rounds):
            requests.post(base + f"/model/sleep/{MODEL}", timeout=30)
            time.sleep(0.2)
            res = _stream(base, 4)
            status = requests.get(base + "/model/sleep/status", timeout=5).json()["models"]
            woken = [s for s in status.values() if s["state"] == "ready"]
            wake = woken[0]["last_wake_seconds"] if woken else None
            ttft = res["ttft"]
            if isinstance(ttft, float) and wake is not None:
                ttfts.append(ttft)
                wakes.append(wake)
                gaps.append(ttft - wake)
    finally:
        router.stop()
        for e in engines:
            e.stop()
    return {"rounds": len(gaps), "ttft_median": statistics.median(ttfts) if ttfts else None,
            "wake_median": statistics.median(wakes) if wakes else None,
            "ttft_minus_wake_median": statistics.median(gaps) if gaps else None,
            "ttft_minus_wake_max": max(gaps) if gaps else None}


def killed_under_load(clients: int = 12, seconds: float = 8.0, kill_at: float = 3.0) -> dict:
    base, ports, engines, router = _stack(3, "routing: {policy: least_outstanding}\n")
    results: List[dict] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            results.append(_stream(base, 50))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(kill_at)
        os.killpg(engines[2].p.pid, signal.SIGKILL)
        killed = time.monotonic()
        out_after = _seconds_until(base, 2, "failed", 5.0)
        time.sleep(max(0.0, seconds - kill_at - (time.monotonic() - killed)))
        engines[2] = _engine(ports[2])
        back_after = _seconds_until(base, 2, "ready", 20.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        router.stop()
        for e in engines:
            e.stop()
    failed = [r["failed"] for r in results if r["failed"]]
    return {"requests": len(results), "ok": sum(1 for r in results if r["ok"]),
            "failed_before_first_byte": sum(1 for f in failed
                                            if str(f).startswith("before first byte")),
            "broken_mid_stream": sum(1 for f in failed if str(f).startswith("mid-stream")),
            "out_of_rotation_after_s": out_after, "serving_again_after_restart_s": back_after}


def main() -> dict:
    out = {"wake_to_first_token": wake_to_first_token(), "killed": killed_under_load()}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
