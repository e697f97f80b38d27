"""A/B the router of two checkouts on this machine: ``python -m kvrouter.bench.ab OLD NEW``.

OLD and NEW are folders holding a kvrouter checkout; make the old one from this repository
with ``git worktree add ../old-checkout HEAD~5`` (any commit), and compare with
``python -m kvrouter.bench.ab ../old-checkout .``. Each checkout runs with the Python of
this command (its dependencies must import there).

Each round starts OLD's router, then NEW's (``PYTHONPATH`` set to the checkout), in front
of the same fixed-JSON backend, and measures SSE events/s (32 streams) and non-streamed
req/s (wrk c=32, or the built-in load generator); it prints every round and the medians.
Interleaving rounds is what makes a few-percent difference visible on a noisy machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from kvrouter.bench import harness


def _router(tree: str, backend: int, router_extra: str = ""):
    port = harness.free_port()
    cfg = os.path.join(tempfile.mkdtemp(prefix="kvr-ab-"), "kvrouter.yaml")
    with open(cfg, "w") as fh:
        fh.write("router: {router_host: 127.0.0.1, router_port: %d%s}\ninstances:\n"
                 "  - {name: fast, model: bench/model, engine: sim,"
                 " engine_args: ['--host 127.0.0.1 --port %d']}\n"
                 % (port, f", {router_extra}" if router_extra else "", backend))
    log = cfg + ".log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvrouter", "serve", cfg], cwd=tree,
                                env=dict(os.environ, PYTHONPATH=os.path.abspath(tree)),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        harness.wait_port(port, "/health")
    except RuntimeError:
        proc.kill()
        with open(log, errors="replace") as fh:
            tail = fh.read()[-1500:]
        raise SystemExit(f"the router of {tree} did not start:\n{tail}") from None
    time.sleep(0.5)
    return proc, port


def checkout(path: str) -> str:
    """``path`` when it holds a kvrouter checkout; else an error that says how to make one."""
    if not os.path.isfile(os.path.join(path, "kvrouter", "__init__.py")):
        raise argparse.ArgumentTypeError(
            f"{path}: not a kvrouter checkout (no kvrouter/__init__.py there). Make one from "
            f"this repository: git worktree add {path} COMMIT (e.g. HEAD~5)")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=checkout, help="the checkout to compare against")
    ap.add_argument("new", type=checkout, help="the checkout measured against it (e.g. .)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--new-router", default="", metavar="YAML",
                    help="more router settings for NEW only, e.g. 'access_log: false'")
    args = ap.parse_args(argv)
    backend = harness.free_port()
    child = harness.Child([sys.executable, "-m", "kvrouter.bench.backends", "fast", "--port",
                         str(backend), "--events", "100"])
    load = harness.wrk if shutil.which("wrk") else harness.builtin_load
    results: dict = {args.old: [], args.new: []}
    try:
        harness.wait_port(backend)
        for n in range(args.rounds):
            for tree in (args.old, args.new):
                proc, port = _router(tree, backend,
                                     args.new_router if tree == args.new else "")
                try:
                    harness.sse_streams(port, 8, seconds=1, expect_events=100)  # warm up
                    sse = harness.sse_streams(port, 32, seconds=args.seconds, expect_events=100)
                    plain = load(port, 32, args.seconds)
                finally:
                    proc.terminate()
                    proc.wait()
                results[tree].append((sse["events_per_s"], plain["rps"]))
                print(f"round {n + 1} {tree}: {sse['events_per_s']:,.0f} events/s, "
                      f"{plain['rps']:,.0f} req/s", flush=True)
    finally:
        child.stop()
    for tree, rows in results.items():
        print(f"median {tree}: {statistics.median(r[0] for r in rows):,.0f} events/s, "
              f"{statistics.median(r[1] for r in rows):,.0f} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
