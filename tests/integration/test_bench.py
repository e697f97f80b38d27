"""kvrouter bench against simulated engines: measured figures match the configured ones."""
import json
import subprocess
import sys

from tests.helpers import PY, Router, SimEngine, free_port, instance_yaml


def run(*args, cwd=None):
    return subprocess.run([PY, "-m", "kvrouter", "bench", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_reported_ttft_and_itl_match_the_engine(tmp_path):
    eng = SimEngine("vllm", model="m", args=["--ttft-ms", "60", "--itl-ms", "15",
                                              "--prefill-ms-per-token", "0"])
    try:
        out = tmp_path / "r.json"
        r = run("run", "--base-url", eng.base + "/v1", "--model", "m", "--num-prompts", "8",
                "--concurrency", "2", "--output-tokens", "20", "--prompt-tokens", "16",
                "--output", str(out))
        assert r.returncode == 0, r.stderr
        data = json.loads(out.read_text())
        m = data["models"]["m"]
        assert data["schema"] == "kvrouter-bench/1" and m["completed"] == 8
        assert 0.050 <= m["ttft"]["p50"] <= 0.110, m["ttft"]
        assert 0.013 <= m["itl"]["p50"] <= 0.020, m["itl"]
        assert 0.013 <= m["tpot"]["mean"] <= 0.022
        assert m["output_token_throughput"] > 0 and m["errors"] == {}
        assert "TOTAL" in r.stdout and "m " in r.stdout
        cmp = run("--compare", str(out), str(out))
        assert cmp.returncode == 0 and "requests/s" in cmp.stdout and "+0.0%" in cmp.stdout
    finally:
        eng.stop()


def test_trace_replays_with_the_requested_mix(tmp_path):
    engines = [SimEngine("vllm", model=f"m{i}", args=["--ttft-ms", "1", "--itl-ms", "1"])
               for i in range(3)]
    port = free_port()
    cfg = "router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s" % (
        port, "".join(instance_yaml(f"m{i}", f"m{i}", e.port, "vllm")
                      for i, e in enumerate(engines)))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        trace = tmp_path / "t.jsonl"
        g = run("gen-trace", "--model", "m0", "--model", "m1", "--model", "m2", "--duration",
                "30", "--rate", "3", "--cv", "2", "--on-seconds", "1000", "--off-seconds", "0",
                "--prompt-tokens", "8", "--output-tokens", "4", "--seed", "5",
                "--out", str(trace))
        assert g.returncode == 0, g.stderr
        rows = [json.loads(line) for line in trace.read_text().splitlines()]
        want = {m: sum(1 for x in rows if x["model"] == m) for m in ("m0", "m1", "m2")}
        assert want["m0"] > want["m2"] > 0
        out = tmp_path / "replay.json"
        rep = run("trace", str(trace), "--base-url", r.base + "/v1", "--speed", "10",
                  "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100", "--output", str(out))
        assert rep.returncode == 0, rep.stderr
        data = json.loads(out.read_text())
        got = {m: v["completed"] for m, v in data["models"].items()}
        assert got == want
        assert all(v["goodput"]["attainment"] == 1.0 for v in data["models"].values())
        assert "replaying" in rep.stderr and f"{len(rows)}/{len(rows)} done" in rep.stderr
        # a trace for models the router does not serve stops at once, saying what it serves
        other = tmp_path / "other.jsonl"
        other.write_text("".join(json.dumps({"time": t, "model": m, "prompt_tokens": 4,
                                             "output_tokens": 2}) + "\n"
                                 for t, m in ((0.0, "a"), (0.5, "m1"))))
        rep = run("trace", str(other), "--base-url", r.base + "/v1", "--timeout", "5")
        assert rep.returncode == 2, rep.stdout + rep.stderr
        assert "model(s) of the trace are not in" in rep.stderr and ": a." in rep.stderr
        assert "has: m0, m1, m2" in rep.stderr
        # --models-from takes the config's models, in order
        g = run("gen-trace", "--models-from", r.path, "--duration", "5", "--rate", "2",
                "--out", str(other))
        assert g.returncode == 0 and "m0=" in g.stdout and "m2=" in g.stdout, g.stdout
    finally:
        r.stop()
        for e in engines:
            e.stop()


def test_missing_external_tool_is_a_clear_error():
    r = run("external", "--tool", "guidellm", "--python", sys.executable, "--", "-m", "guidellm")
    assert r.returncode == 2
    assert r.stderr.startswith("Error: benchmark tool 'guidellm' is not installed")
    r = run("external", "--tool", "vllm", "--python", "/nonexistent/bin/python", "--", "-V")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_bad_base_url_and_no_success_are_errors():
    r = run("run", "--base-url", "ftp://x", "--model", "m", "--num-prompts", "1")
    assert r.returncode == 2 and "--base-url must be http" in r.stderr
    port = free_port()
    r = run("run", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m",
            "--num-prompts", "2")
    assert r.returncode == 2 and "no request succeeded" in r.stderr and "connect=2" in r.stdout


def test_ab_without_a_checkout_says_how_to_make_one(tmp_path):
    r = subprocess.run([PY, "-m", "kvrouter.bench.ab", str(tmp_path / "old-checkout"), "."],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a kvrouter checkout" in r.stderr and "git worktree add" in r.stderr


def test_the_router_s_own_access_log_becomes_a_trace(tmp_path):
    """"What would policy X have done with this traffic?": the router's access lines carry
    each request's model, times and tokens, and `import-trace access-log` makes a trace of
    them that `simulate` replays."""
    eng = SimEngine("vllm", model="al/m", args=["--ttft-ms", "1", "--itl-ms", "1"])
    cfg = "router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s" % (
        free_port(), instance_yaml("m", "al/m", eng.port, "vllm"))
    r = Router(cfg, str(tmp_path))
    try:
        r.wait_models_ready()
        from tests.helpers import http, wait_until

        http("POST", r.base + "/v1/completions", {"model": "al/m", "prompt": "one two three",
                                                   "max_tokens": 5, "ignore_eos": True})
        http("POST", r.base + "/v1/completions", {
            "model": "al/m", "prompt": "a b", "max_tokens": 4, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}})
        http("POST", r.base + "/v1/completions", {"model": "al/m", "prompt": "x",
                                                   "max_tokens": 3, "stream": True})
        http("POST", r.base + "/v1/completions", {"model": "nope", "prompt": "x"})
        wait_until(lambda: r.proc.output().count("kvrouter.access: POST") >= 4, 5,
                   what="the access lines")
        log = tmp_path / "kvrouter.log"
        log.write_text(r.proc.output())
        out = tmp_path / "t.jsonl"
        g = run("import-trace", "access-log", str(log), "--out", str(out))
        assert g.returncode == 0, g.stderr
        assert "wrote 3 requests" in g.stdout and "1 without token counts" in g.stdout
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(x["model"], x["prompt_tokens"], x["output_tokens"]) for x in rows] == [
            ("al/m", 3, 5), ("al/m", 2, 4), ("al/m", 256, 128)]
        assert rows[0]["time"] == 0.0 and rows[0]["time"] <= rows[1]["time"] <= rows[2]["time"]
        sim = subprocess.run([PY, "-m", "kvrouter", "simulate", r.path, "--trace", str(out),
                              "--policy", "lru"], capture_output=True, text=True)
        assert sim.returncode == 0 and "\nlru " in sim.stdout, sim.stderr
    finally:
        r.stop()
        eng.stop()


def test_the_upload_benchmark_runs_and_reports_time_and_memory():
    out = subprocess.run([PY, "-m", "kvrouter.bench.uploads", "--size-mb", "2",
                          "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout[:out.stdout.rindex("}") + 1])
    assert figures["direct_s"] > 0 and figures["router_s"] > 0
    assert figures["router_hwm_after_mb"] >= figures["router_rss_rest_mb"] > 0
    assert "2 MB upload (median of 1)" in out.stdout


COUNT_STREAMS = r"""
import json, sys
from kvrouter.bench import harness
port, tokens = int(sys.argv[1]), int(sys.argv[2])
body = json.dumps({"model": "m", "prompt": "x", "max_tokens": tokens, "stream": True,
                   "ignore_eos": True}).encode()
r = harness.sse_streams(port, 2, streams_each=3, expect_events=tokens, body=body)
whole = b"".join(b'data: {"n": %d}\n\n' % i for i in range(tokens)) + b"data: [DONE]\n\n"
split = []
for cut in range(1, len(whole)):    # every place a read can end
    c = harness._EventCounter()
    c.on_body(whole[:cut])
    c.on_body(whole[cut:])
    split.append((c.events, c.done))
print(json.dumps({"run": r, "split": sorted(set(map(tuple, split)))}))
"""


def test_the_stream_load_counts_every_event_wherever_reads_split_them():
    """``make bench``'s stream load counts events in C by their blank lines: as many as the
    engine sent, [DONE] apart, however the reads cut the body."""
    eng = SimEngine("vllm", model="m", args=["--ttft-ms", "1", "--itl-ms", "1"])
    try:
        out = subprocess.run([PY, "-c", COUNT_STREAMS, str(eng.port), "12"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout)
        assert got["run"]["streams"] == 6 and got["run"]["errors"] == 0
        assert got["run"]["events_per_s"] > 0
        assert got["split"] == [[12, True]]
    finally:
        eng.stop()
