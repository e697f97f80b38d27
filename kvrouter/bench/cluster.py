"""``make bench`` (cluster part): what sharing state through Redis costs and how fast it is.

On this machine, with a real redis-server on a free loopback port:
  1. added latency of a request to a READY model through a cluster member against the same
     router with no ``cluster`` section: wrk (or the built-in load) at concurrency 1 and
     32, runs alternated; first with the member alone in its cluster (its own cost:
     heartbeats, its finished requests published), then with two more routers on the same
     cores (which replay what it serves); the hot path of a ready model has no Redis round
     trip;
  2. time for every router to see a state change one router made (sleep and wake of a
     simulated engine through router 1; each router stamps the change when it applies it);
  3. leader failover: SIGKILL the leader, time until another router holds the lease.
Prints a report and writes bench-results/cluster.json. Figures, not assertions.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Dict, List  # noqa: E402

from kvrouter.bench.harness import (  # noqa: E402
    PY,
    Child,
    free_port,
    load_tool,
    save_results,
    wait_port,
)

ROUTERS = ("r1", "r2", "r3")


def _get(url: str, method: str = "GET", timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def _config(path: str, instances: str, redis_url: str, ports: Dict[str, int],
            lease: float) -> None:
    hosts = "".join(f"    - {{name: {n}, address: 127.0.0.1, router: true, "
                    f"router_port: {p}}}\n" for n, p in ports.items())
    with open(path, "w") as fh:
        fh.write("router: {router_host: 127.0.0.1, log_level: warning}\n"
                 f"cluster:\n  redis_url: {redis_url}\n  leader_lease_seconds: {lease}\n"
                 f"  hosts:\n{hosts}"
                 "sleep_manager: {min_sleep_duration: 0}\n"
                 f"instances:\n{instances}")


def _instances(fast_port: int, sim_port: int, host: str = "") -> str:
    where = f", host: {host}" if host else ""
    return (f"  - {{name: fast, model: bench/model, engine: sim{where}, "
            f"engine_args: ['--host 127.0.0.1 --port {fast_port}']}}\n"
            f"  - {{name: prop, model: bench/prop, engine: sim{where}, "
            "engine_env: ['VLLM_SERVER_DEV_MODE=1'], "
            f"engine_args: ['--host 127.0.0.1 --port {sim_port}', '--enable-sleep-mode']}}\n")


def added_latency(load, solo: int, member: int, rounds: int = 3) -> dict:
    out = {}
    for c in (1, 32):
        load(solo, 8)
        load(member, 8)
        runs: Dict[str, List[dict]] = {"off": [], "on": []}
        for _ in range(rounds):   # alternated: drift of the machine hits both
            runs["off"].append(load(solo, c))
            runs["on"].append(load(member, c))
        for k, v in runs.items():
            out[f"cluster {k} c={c}"] = {
                "p50_ms": statistics.median(r["p50_ms"] or 0 for r in v),
                "p99_ms": statistics.median(r["p99_ms"] or 0 for r in v),
                "rps": statistics.median(r["rps"] for r in v),
                "errors": sum(r["errors"] for r in v)}
    return out


def propagation(bases: Dict[str, str], rounds: int) -> dict:
    """Sleep and wake through r1; for each change, the time between r1's applying it and
    the last router's (every router stamps its event with the wall clock: one machine)."""
    delays: Dict[str, List[float]] = {"sleeping": [], "ready": []}
    model = "bench%2Fprop"
    for _ in range(rounds):
        for action, state in (("sleep", "sleeping"), ("wake", "ready")):
            _get(f"{bases['r1']}/model/{action}/{model}", "POST", timeout=60)
            deadline = time.monotonic() + 5
            stamps: Dict[str, float] = {}
            while time.monotonic() < deadline and len(stamps) < len(bases):
                for name, base in bases.items():
                    if name in stamps:
                        continue
                    events = _get(base + "/ui/state")["events"]
                    mine = [e for e in events if e["model"] == "bench/prop" and e["to"] == state]
                    if mine:
                        stamps[name] = mine[-1]["time"]
                time.sleep(0.01)
            if len(stamps) == len(bases):
                delays[state].append(max(stamps.values()) - stamps["r1"])
            time.sleep(0.2)
    out = {}
    for state, values in delays.items():
        values.sort()
        out[state] = {"p50_ms": values[len(values) // 2] * 1000 if values else None,
                      "max_ms": values[-1] * 1000 if values else None, "rounds": len(values)}
    return out


def failover(start, bases: Dict[str, str], routers: Dict[str, Child], rounds: int) -> dict:
    took = []
    for _ in range(rounds):
        leader = None
        deadline = time.monotonic() + 15
        while leader is None and time.monotonic() < deadline:
            for name, base in bases.items():
                try:
                    if _get(base + "/health")["cluster"]["this_router_leads"]:
                        leader = name
                except OSError:
                    pass
            time.sleep(0.05)
        if leader is None:
            break
        os.killpg(routers[leader].p.pid, signal.SIGKILL)
        killed = time.monotonic()
        others = [n for n in bases if n != leader]
        new = None
        while new is None and time.monotonic() - killed < 30:
            for name in others:
                try:
                    if _get(bases[name] + "/health", timeout=1)["cluster"]["this_router_leads"]:
                        new = name
                except OSError:
                    pass
            time.sleep(0.005)
        if new is None:
            break
        took.append(time.monotonic() - killed)
        routers[leader] = start(leader)
        wait_port(int(bases[leader].rsplit(":", 1)[1]), "/health")
    return {"seconds": took}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--lease", type=float, default=3.0)
    ap.add_argument("--out", default="bench-results/cluster.json")
    args = ap.parse_args(argv)
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        print("redis-server not installed (apt-get install redis-server): no cluster figures")
        return 0
    tool, load = load_tool(args.seconds)
    redis_port, fast_port, sim_port, solo_port = (free_port() for _ in range(4))
    ports = {n: free_port() for n in ROUTERS}
    redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    folder = tempfile.mkdtemp(prefix="kvr-bench-cluster-")
    cluster_cfg = os.path.join(folder, "cluster.yaml")
    _config(cluster_cfg, _instances(fast_port, sim_port, "r1"),
            f"redis://127.0.0.1:{redis_port}/0", ports, args.lease)
    solo_cfg = os.path.join(folder, "solo.yaml")
    with open(solo_cfg, "w") as fh:
        fh.write(f"router: {{router_host: 127.0.0.1, router_port: {solo_port}, "
                 f"log_level: warning}}\ninstances:\n{_instances(fast_port, sim_port)}")
    children = [
        Child([PY, "-m", "kvrouter.bench.backends", "fast", "--port", str(fast_port)]),
        Child([PY, "-m", "kvrouter", "sim-engine", "--model", "bench/prop", "--host",
               "127.0.0.1", "--port", str(sim_port), "--startup-seconds", "0",
               "--enable-sleep-mode"], env={"VLLM_SERVER_DEV_MODE": "1"}),
        Child([PY, "-m", "kvrouter", "serve", solo_cfg]),
    ]

    def start(name: str) -> Child:
        d = os.path.join(folder, name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "kvrouter.yaml")   # a state file of its own
        shutil.copy(cluster_cfg, path)
        return Child([PY, "-m", "kvrouter", "serve", path, "--cluster-host", name])

    routers = {"r2": start("r2")}
    bases = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    results: dict = {"machine": {"cpus": os.cpu_count()}, "load_tool": tool,
                     "lease_seconds": args.lease}
    try:
        for port in (fast_port, solo_port, ports["r2"]):
            wait_port(port, "/health")
        time.sleep(1.5)   # readiness probes
        # r2 alone in its cluster: its own cost (heartbeats, records out), no peer beside it
        results["latency_alone"] = added_latency(load, solo_port, ports["r2"])
        for n in ROUTERS:
            if n not in routers:
                routers[n] = start(n)
                wait_port(ports[n], "/health")
        time.sleep(1.5)
        # with two peers on the same cores, replaying what r2 serves
        results["latency"] = added_latency(load, solo_port, ports["r2"])
        results["propagation"] = propagation(bases, args.rounds)
        results["failover"] = failover(start, bases, routers, 3)
    finally:
        for ch in children + list(routers.values()):
            ch.stop()
        redis.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    save_results(args.out, results, report(results))
    return 0


def report(r: dict) -> str:
    lines = [f"kvrouter cluster ({r['machine']['cpus']} CPUs, 3 routers + Redis on loopback, "
             f"load tool: {r['load_tool']})", "",
             "ready model, non-streamed      req/s     p50 ms   p99 ms   errors"]
    for key, title in (("latency_alone", "one router in the cluster (no peer)"),
                       ("latency", "three routers, peers on the same cores")):
        lat = r[key]
        lines.append(f" {title}:")
        for name, v in lat.items():
            lines.append(f"  {name:<26} {v['rps']:>8.0f} {v['p50_ms']:>9.3f} "
                         f"{v['p99_ms']:>8.3f} {v['errors']:>8}")
        for c in (1, 32):
            on, off = lat[f"cluster on c={c}"], lat[f"cluster off c={c}"]
            lines.append(f"  added by the cluster at c={c}: p50 "
                         f"{on['p50_ms'] - off['p50_ms']:+.3f} ms, p99 "
                         f"{on['p99_ms'] - off['p99_ms']:+.3f} ms, throughput "
                         f"{on['rps'] / max(1.0, off['rps']):.2f}x")
    lines.append("")
    for state, v in r["propagation"].items():
        if v["rounds"]:
            lines.append(f"state change seen by all 3 routers ({state}): p50 "
                         f"{v['p50_ms']:.1f} ms, max {v['max_ms']:.1f} ms ({v['rounds']} rounds)")
    took = r["failover"]["seconds"]
    if took:
        lines.append(f"leader failover (lease {r['lease_seconds']:g} s, leader SIGKILLed): "
                     f"{', '.join(f'{t:.2f}' for t in took)} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
