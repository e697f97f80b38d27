"""``make bench``'s upload row: a 25 MB multipart upload (Whisper's
``/v1/audio/transcriptions``) to a simulated vLLM engine, directly and through the router, in
turns in one run: the router's added time (median of the rounds), its memory (RSS at
rest, and its high-water mark after the uploads: the kernel's VmHWM, so no peak is missed
between samples) and the CPU time it spent per upload (which, unlike the added time, does
not depend on how the cores were shared during the run). Run alone: ``python -m kvrouter.bench.uploads``."""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import List  # noqa: E402

import requests  # noqa: E402

from kvrouter.bench.harness import PY, Child, free_port, start_router, wait_port  # noqa: E402

BOUNDARY = "kvrouterbench"


def multipart_body(model: str, size: int) -> bytes:
    """The model field first (as the openai SDK sends it), then ``size`` bytes of audio."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}"
            f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + \
        os.urandom(1024) * (size // 1024) + f"\r\n--{BOUNDARY}--\r\n".encode()


def _vm(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload_cost(size_mb: int = 25, rounds: int = 7) -> dict:
    sim_port, router_port = free_port(), free_port()
    sim = Child([PY, "-m", "kvrouter", "sim-engine", "--port", str(sim_port), "--model", "w",
                 "--startup-seconds", "0"])
    router = start_router(router_port, "  - {name: w, model: w, engine: sim, engine_args: "
                          "['--host 127.0.0.1 --port %d']}\n" % sim_port)
    body = multipart_body("w", size_mb * 1024 * 1024 - 1024)   # the whole body: the limit's
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    session = requests.Session()

    def post(port: int) -> float:
        start = time.perf_counter()
        r = session.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions", data=body,
                         headers=headers, timeout=120)
        took = time.perf_counter() - start
        if r.status_code != 200 or "transcribed" not in r.text:
            raise RuntimeError(f"upload failed: {r.status_code} {r.text[:200]}")
        return took

    try:
        wait_port(sim_port)
        wait_port(router_port, "/health")
        time.sleep(1.0)   # the router's readiness probe
        small = multipart_body("w", 1024)
        session.post(f"http://127.0.0.1:{router_port}/v1/audio/transcriptions", data=small,
                     headers=headers, timeout=30)   # warm: code paths, pooled connections
        rest_mb = _vm(router.p.pid, "VmRSS")
        hwm_before = _vm(router.p.pid, "VmHWM")
        cpu_before = _cpu_seconds(router.p.pid)
        direct: List[float] = []
        routed: List[float] = []
        for i in range(rounds):   # in turns, so drift hits both alike
            for port, out in ((sim_port, direct), (router_port, routed))[::1 if i % 2 else -1]:
                out.append(post(port))
        hwm_after = _vm(router.p.pid, "VmHWM")
        cpu = (_cpu_seconds(router.p.pid) - cpu_before) / rounds
    finally:
        router.stop()
        sim.stop()
    direct.sort()
    routed.sort()
    d, r = direct[len(direct) // 2], routed[len(routed) // 2]
    return {"size_mb": size_mb, "rounds": rounds, "direct_s": d, "router_s": r,
            "added_pct": 100.0 * (r - d) / d, "router_rss_rest_mb": rest_mb,
            "router_hwm_before_mb": hwm_before, "router_hwm_after_mb": hwm_after,
            "memory_ratio": hwm_after / rest_mb if rest_mb else None,
            "router_cpu_s_per_upload": cpu}


def report(u: dict) -> str:
    return (f"{u['size_mb']} MB upload (median of {u['rounds']}): direct {u['direct_s']:.3f} s, "
            f"through kvrouter {u['router_s']:.3f} s ({u['added_pct']:+.1f}%); router RSS at "
            f"rest {u['router_rss_rest_mb']:.0f} MB, peak during the uploads "
            f"{u['router_hwm_after_mb']:.0f} MB ({u['memory_ratio']:.2f}x at rest); router CPU "
            f"{u['router_cpu_s_per_upload'] * 1000:.0f} ms per upload")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    u = upload_cost(args.size_mb, args.rounds)
    print(json.dumps(u, indent=2))
    print(report(u))
    return 0


if __name__ == "__main__":
    sys.exit(main())
