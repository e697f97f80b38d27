"""The policy lab's world: the router's gate, engines and policies as discrete events."""
import json
import subprocess

import pytest

from kvrouter.config.load import load_config
from kvrouter.lab import run as lab
from kvrouter.render.argv import Interpreters, engine_argv
from kvrouter.sim.options import parse_sim_args
from tests.helpers import PY


def config(tmp_path, sleep="", instances=2, extra="", sim="ttft_ms: 30, itl_ms: 10"):
    text = "sleep_manager: {auto_sleep_enabled: true, idle_threshold_seconds: 5, " \
           f"check_interval_seconds: 1{sleep}}}\ninstances:\n"
    for i in range(instances):
        text += (f"  - name: m{i}\n    model: m{i}\n    engine: sim\n    weights_gb: 16\n"
                 f"    kv_cache_gb: 8\n    sim: {{{sim}}}\n{extra}"
                 f"    engine_args: ['--port {18500 + i}']\n")
    path = tmp_path / "kvrouter.yaml"
    path.write_text(text)
    return load_config(str(path))


def req(t, model="m0", prompt=100, out=10):
    return {"time": t, "model": model, "prompt_tokens": prompt, "output_tokens": out}


def test_the_lab_models_the_engine_that_render_starts(tmp_path):
    """One timing model: what `kvrouter simulate` assumes is what the sim engine gets."""
    cfg = config(tmp_path, sim="ttft_ms: 12, itl_ms: 7, wake_bandwidth_gbps: 20, "
                 "kv_bytes_per_token: 65536, batch_slowdown: 0.01")
    inst = cfg.instances[0]
    argv = engine_argv(inst, Interpreters())
    engine = parse_sim_args(argv[argv.index("sim-engine") + 1:], environ={})
    assert engine.timing == inst.timing
    assert inst.timing.wake_seconds(1) == pytest.approx(16 / 20 + 0.05)


def test_a_ready_model_serves_at_its_unloaded_latency(tmp_path):
    cfg = config(tmp_path)
    rows = [req(0.0), req(1.0)]
    world, s = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    r = world.requests[0]
    t = cfg.instances[0].timing
    assert r.ttft == pytest.approx(t.prefill_seconds(100))
    assert r.tpot == pytest.approx(t.step_seconds(1))
    assert s["attainment"] == 1.0 and s["wakes"] == 0


def test_an_idle_model_sleeps_and_the_next_request_waits_for_one_wake(tmp_path):
    cfg = config(tmp_path)
    rows = [req(0.0), req(20.0), req(20.01), req(20.02)]
    world, s = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    t = cfg.instances[0].timing
    woken = world.requests[1]
    assert woken.cause == "wake"
    # the wake (weights back at 48 GB/s), the router's warm-up, then its own prefill
    assert woken.ttft == pytest.approx(t.wake_seconds(1) + t.prefill_seconds(2)
                                       + t.prefill_seconds(100))
    assert s["wakes"] == 1 and s["wakes_on_request_path"] == 3
    assert {k: s["per_engine"]["m0"][k] for k in ("wakes", "cold_starts", "sleeps")} == \
        {"wakes": 1, "cold_starts": 0, "sleeps": 1}
    assert s["misses"] == {"wake": 3}
    # m1 never had a request: it went to sleep after the threshold too
    assert s["per_engine"]["m1"]["sleeps"] == 1


def test_static_splits_each_gpu_evenly_and_queues_past_it(tmp_path):
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 40}",
                 sim="ttft_ms: 30, itl_ms: 10, kv_bytes_per_token: 1073741824")
    rows = [req(0.0, out=100), req(0.001, out=100), req(0.002, out=100),
            req(0.003, out=100), req(0.004, out=100)]
    world, s = lab.run(cfg, "static", rows, lab.slos_for(cfg, rows))
    # 20 GB each: 4 GB of KV after the weights = 4 tokens (1 GB a token): one request at a
    # time, the others queue behind it
    assert world.engines["m0"].limit == 4 * 1024 ** 3
    assert [r.cause for r in world.requests] == [""] + ["queue (KV full)"] * 4
    assert s["mean_gpu_memory_gb"] == pytest.approx(40.0)   # all of it, all the time


def test_static_says_when_the_weights_do_not_fit_an_even_share(tmp_path):
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 30}")
    with pytest.raises(ValueError, match="m0's weights .16 GB. do not fit its share of GPU 0"):
        lab.run(cfg, "static", [req(0.0)], {})


def test_no_room_waits_for_a_busy_model_to_go_idle_then_refuses_with_the_reason(tmp_path):
    # one GPU holds one model; m0 is busy for 20 s when m1 is asked for
    rows = [req(0.0, out=2000), req(1.0, model="m1")]
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 30}")
    world, s = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    assert world.requests[1].ok and world.requests[1].cause == "wake"   # waited for room
    assert world.requests[1].first > world.requests[0].end
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 30}, room_wait_seconds: 5")
    world, s = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    assert world.engines["m1"].state.value == "sleeping"   # did not fit at the start
    assert world.requests[1].cause == "refused: no room" and not world.requests[1].ok
    assert s["refused"] == 1 and s["misses"] == {"refused: no room": 1}


def test_a_wake_evicts_the_least_recently_used_idle_model(tmp_path):
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 30}")
    rows = [req(0.0), req(2.0, model="m1"), req(3.0)]
    world, s = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    assert [r.cause for r in world.requests] == ["", "wake", "wake"]
    assert {k: s["per_engine"]["m0"][k] for k in ("wakes", "cold_starts", "sleeps")} == \
        {"wakes": 1, "cold_starts": 0, "sleeps": 1}


def test_unloading_policies_pay_a_cold_start(tmp_path):
    cfg = config(tmp_path, sim="ttft_ms: 30, itl_ms: 10, startup_seconds: 14")
    rows = [req(0.0), req(400.0)]
    world, s = lab.run(cfg, "ollama", rows, lab.slos_for(cfg, rows))
    assert world.requests[1].cause == "cold start"
    assert world.requests[1].ttft > 14
    assert s["cold_starts"] == 1


def test_max_rate_finds_where_attainment_drops(tmp_path):
    cfg = config(tmp_path, instances=1, sim="ttft_ms: 30, itl_ms: 10, max_concurrency: 4")
    rows = [req(i * 1.0, out=50) for i in range(200)]       # 1 req/s, 0.5 s each
    m = lab.max_rate(cfg, "lru", rows, lab.slos_for(cfg, rows))
    # 4 slots of 0.5 s: about 8 req/s before requests queue past the TTFT SLO
    assert 4 <= m["max_rate"] <= 10, m
    assert any(c["attainment"] < 0.99 for c in m["curve"])


def test_simulate_command(tmp_path):
    cfg = config(tmp_path)
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(req(i * 0.5, model=f"m{i % 2}")) + "\n"
                             for i in range(40)) + json.dumps(req(30, model="other")) + "\n")
    refused = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace",
                              str(trace), "--policy", "lru"], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"1 model(s) of the trace are not in {cfg.source}: other. {cfg.source} has: " \
        "m0, m1." in refused.stderr
    run = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace", str(trace),
                          "--policy", "lru:2", "--policy", "static", "--out-dir",
                          str(tmp_path / "out"), "--json", str(tmp_path / "s.json"),
                          "--skip-unknown"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "1 model(s) not in" in run.stderr and "[1/2] lru:2: replaying 40 requests" in \
        run.stderr
    assert run.stdout.splitlines()[1].split()[:3] == ["policy", "SLO", "att."]
    doc = json.loads((tmp_path / "s.json").read_text())
    assert set(doc["policies"]) == {"lru:2", "static"}
    assert doc["policies"]["lru:2"]["summary"]["requests"] == 40
    cmp = subprocess.run([PY, "-m", "kvrouter", "bench", "--compare",
                          str(tmp_path / "out" / "lru:2.json"), str(tmp_path / "out" /
                                                                  "static.json")],
                         capture_output=True, text=True)
    assert cmp.returncode == 0 and "[m0]" in cmp.stdout, cmp.stderr

    bad = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace", str(trace),
                          "--policy", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--policy nope: unknown sleep policy 'nope'; choose one " \
        "of lru" in bad.stderr
    bad = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace", str(trace),
                          "--policy", "slo:7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must be from 0.5 to 0.9999" in bad.stderr
    bad = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace", str(trace),
                          "--plot", str(tmp_path / "p.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--plot draws attainment against rate" in bad.stderr


def test_plot_without_matplotlib_fails_before_any_run(tmp_path, monkeypatch):
    import importlib.util

    from kvrouter.errors import KvrouterError
    from kvrouter.lab import cli as lab_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    ran = []
    monkeypatch.setattr(lab, "run", lambda *a, **k: ran.append(a))
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(req(0.0)) + "\n")
    with pytest.raises(KvrouterError, match=r"--plot needs matplotlib: pip install"):
        lab_cli.simulate(config(tmp_path), str(trace), ["lru"], 1.0, True, 0.99, 5, 5, False,
                         None, None, str(tmp_path / "p.png"))
    assert ran == []


def test_simulate_leaves_out_a_policy_the_deployment_cannot_run(tmp_path):
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 30}")   # 16 GB models: 15 GB each
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(req(0.0)) + "\n")
    both = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace", str(trace),
                           "--policy", "static", "--policy", "lru"], capture_output=True,
                          text=True)
    assert both.returncode == 0, both.stderr
    assert "warning: policy static left out: static partitioning: m0's weights" in both.stderr
    assert "\nlru " in both.stdout and "\nstatic " not in both.stdout
    alone = subprocess.run([PY, "-m", "kvrouter", "simulate", cfg.source, "--trace",
                            str(trace), "--policy", "static"], capture_output=True, text=True)
    assert alone.returncode == 2 and "Error: policy static: static partitioning" in alone.stderr


def test_a_model_being_woken_holds_no_memory_until_its_evictions_are_done(tmp_path):
    # three of five fit; m3's wake evicts m0; while m0 drains, m4 asks for room: as live,
    # m3 is still asleep (its make_room runs), so one more eviction (m1) is enough
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 72}", instances=5)
    rows = [req(0.0), req(0.1, model="m1"), req(0.2, model="m2"),
            req(1.0, model="m3"), req(1.1, model="m4")]
    world, s = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    assert all(r.ok for r in world.requests)
    sleeps = {k: v["sleeps"] for k, v in s["per_engine"].items()}
    assert sleeps == {"m0": 1, "m1": 1, "m2": 0, "m3": 0, "m4": 0}
