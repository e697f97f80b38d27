"""`kvrouter bench calibrate` measures a running engine (the simulated one, whose timing
is known) and `kvrouter simulate --timing` replays traces with what it measured."""
import json
import subprocess

import pytest
import yaml

from tests.helpers import PY, SimEngine


def _kvrouter(*args):
    return subprocess.run([PY, "-m", "kvrouter", *args], capture_output=True, text=True,
                          timeout=300)


def test_calibrate_measures_the_engine_and_the_lab_replays_with_it(tmp_path):
    engine = SimEngine("vllm", "cal/m", args=[
        "--ttft-ms", "40", "--prefill-ms-per-token", "0.2", "--itl-ms", "15",
        "--batch-slowdown", "0.1", "--weights-gb", "4.8", "--wake-bandwidth-gbps", "24",
        "--wake-overhead-seconds", "0.05", "--enable-sleep-mode"])
    try:
        profile = tmp_path / "profile.yaml"
        r = _kvrouter("bench", "calibrate", "--engine-url", engine.base, "--model", "cal/m",
                      "--rounds", "3", "--sleep", "--out", str(profile))
        assert r.returncode == 0, r.stderr
        assert engine.stats()["sleeping"] is False     # left awake, as found
    finally:
        engine.stop()
    doc = yaml.safe_load(profile.read_text())
    p, m = doc["profiles"]["cal/m"], doc["measured"]["cal/m"]
    assert 35 <= p["ttft_ms"] <= 90, p                 # 40 ms plus HTTP
    assert p["prefill_ms_per_token"] == pytest.approx(0.2, rel=0.3), p
    assert p["itl_ms"] == pytest.approx(15, rel=0.3), p
    assert 0.04 <= p["batch_slowdown"] <= 0.25, p      # 0.1 per extra running request
    # level-1 wake: 4.8 GB at 24 GB/s + 0.05 s, and the first token after it
    assert 0.25 <= m["wake_seconds"] <= 0.7, m
    assert 0.2 <= m["sleep_seconds"] <= 0.6, m
    assert p["wake_bandwidth_gbps"] == 0   # the wake as measured, less its first token
    assert p["wake_overhead_seconds"] == pytest.approx(
        m["wake_seconds"] - (p["ttft_ms"] + 2 * p["prefill_ms_per_token"]) / 1000, abs=2e-3)

    # the lab with the profile: the first request after an idle period waits one wake
    cfg = tmp_path / "kvrouter.yaml"
    cfg.write_text("sleep_manager: {auto_sleep_enabled: true, idle_threshold_seconds: 5, "
                   "check_interval_seconds: 1}\n"
                   "instances:\n  - {name: m, model: cal/m, engine: sim, weights_gb: 4.8, "
                   "engine_args: ['--port 18990', '--enable-sleep-mode'], "
                   "engine_env: [VLLM_SERVER_DEV_MODE=1]}\n")
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"time": t, "model": "cal/m", "prompt_tokens": 1000,
                                         "output_tokens": 2}) + "\n" for t in (0.0, 30.0)))
    out = tmp_path / "sim.json"
    r = _kvrouter("simulate", str(cfg), "--trace", str(trace), "--policy", "lru",
                  "--timing", str(profile), "--json", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["policies"]["lru"]["summary"]
    first = (p["ttft_ms"] + 1000 * p["prefill_ms_per_token"]) / 1000
    assert s["ttft"]["p99"] == pytest.approx(first + m["wake_seconds"], rel=0.05)   # 2nd
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: {cal/m: {itl: 3}}\n")
    r = _kvrouter("simulate", str(cfg), "--trace", str(trace), "--timing", str(bad))
    assert r.returncode == 2 and "bad.yaml: profiles.cal/m.itl: unknown" in r.stderr
    bad.write_text("profiles: {other/m: {itl_ms: 3}}\n")
    r = _kvrouter("simulate", str(cfg), "--trace", str(trace), "--timing", str(bad))
    assert r.returncode == 2 and "lacks: other/m" in r.stderr


def test_calibrate_refuses_an_engine_that_is_asleep_and_says_what_to_do(tmp_path):
    import requests

    engine = SimEngine("vllm", "cal/asleep", args=["--enable-sleep-mode"])
    try:
        assert requests.post(engine.base + "/sleep?level=1", timeout=10).ok
        r = _kvrouter("bench", "calibrate", "--engine-url", engine.base, "--model",
                      "cal/asleep", "--out", str(tmp_path / "p.yaml"))
    finally:
        engine.stop()
    assert r.returncode != 0 and "the engine is asleep; wake it first" in r.stderr, r.stderr
    assert not (tmp_path / "p.yaml").exists()
