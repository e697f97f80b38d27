"""Fair baselines in the policy lab: static sized by load, Ollama as Ollama behaves, the
policies' parameters, timing profiles, and the slo policy's budget."""
import pytest

from kvrouter.control import policies
from kvrouter.lab import outcome, sizing
from kvrouter.lab import run as lab
from kvrouter.lab.heldout import deployment, diurnal, slower
from tests.unit.test_lab import config, req
from tests.unit.test_policy import snap, view

GB = 1024 ** 3


def test_kv_shares_follow_expected_load_above_each_floor():
    shares = sizing.kv_shares({"0": 30.0}, {"0": ["a", "b", "c"]},
                              {"a": 3.0, "b": 1.0}, {"a": 1 * GB, "b": 1 * GB, "c": 1 * GB})
    assert shares["c"] == pytest.approx(1.0)            # no load: its floor only
    assert shares["a"] == pytest.approx(1 + 27 * 0.75)  # the rest by load
    assert shares["b"] == pytest.approx(1 + 27 * 0.25)
    assert sum(shares.values()) == pytest.approx(30.0)


def test_static_sized_gives_the_busy_model_the_kv_an_even_split_denies_it(tmp_path):
    # two models on a 44 GB GPU: m0 gets every request, m1 one; 1 GB of KV per token
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 44}",
                 sim="ttft_ms: 30, itl_ms: 10, kv_bytes_per_token: 1073741824")
    rows = [req(0.01 * i, prompt=1, out=1) for i in range(6)] + [req(10.0, model="m1",
                                                                    prompt=1, out=1)]
    even, s_even = lab.run(cfg, "static", rows, lab.slos_for(cfg, rows))
    sized, s_sized = lab.run(cfg, "static-sized", rows, lab.slos_for(cfg, rows))
    assert even.engines["m0"].limit == 6 * GB == even.engines["m1"].limit
    # sized from the first fifth of the trace (m0's requests only): each keeps a floor of
    # twice the largest request (m1 had none: twice the largest of any), the rest by load
    assert sized.engines["m1"].limit == 4 * GB
    assert sized.engines["m0"].limit == 8 * GB
    assert s_sized["attainment"] >= s_even["attainment"]
    assert s_sized["mean_gpu_memory_gb"] == pytest.approx(44.0)   # all of it, all the time


def test_ollama_queues_a_request_until_a_loaded_model_goes_idle(tmp_path):
    # room for one model; m0 is busy when m1 is asked for: lru refuses once its wait for
    # room is over, Ollama queues for as long as it takes
    cfg = config(tmp_path, sleep=", gpu_memory_gb: {'0': 30}, room_wait_seconds: 0.5")
    rows = [req(0.0, out=200), req(1.0, model="m1")]
    _, s_lru = lab.run(cfg, "lru", rows, lab.slos_for(cfg, rows))
    world, s = lab.run(cfg, "ollama", rows, lab.slos_for(cfg, rows))
    assert s_lru["refused"] == 1
    assert s["refused"] == 0 and world.requests[1].ok
    assert world.requests[1].first > world.requests[0].end   # after m0 went idle
    assert world.engines["m1"].starts == 1                    # Ollama loads it afresh


def test_ollama_loads_at_most_three_models_per_gpu_from_the_start(tmp_path):
    cfg = config(tmp_path, instances=5)
    world, _ = lab.run(cfg, "ollama", [req(0.0)], lab.slos_for(cfg, [req(0.0)]))
    assert [e.state.value for e in world.engines.values()].count("ready") == 3


def test_a_timing_profile_replaces_the_configs(tmp_path):
    cfg = config(tmp_path)
    rows = [req(0.0), req(30.0)]
    slo = lab.slos_for(cfg, rows)
    fast, _ = lab.run(cfg, "lru", rows, slo)
    slow, _ = lab.run(cfg, "lru", rows, slo, timings=slower(cfg, 3.0))
    assert slow.requests[1].ttft > fast.requests[1].ttft + 0.5   # the wake took 3x as long
    assert slow.engines["m0"].last_wake_seconds == pytest.approx(
        3 * fast.engines["m0"].last_wake_seconds, rel=0.1)


def test_parametrized_timers_and_the_slo_target_in_the_lab(tmp_path):
    cfg = config(tmp_path)
    rows = [req(0.0), req(20.0)]
    slo = lab.slos_for(cfg, rows)
    assert lab.run(cfg, "lru:30", rows, slo)[1]["wakes"] == 0   # 20 s idle < 30 s
    assert lab.run(cfg, "lru:10", rows, slo)[1]["wakes"] == 1
    assert lab.run(cfg, "lru", rows, slo)[1]["wakes"] == 1      # the config's 5 s


def test_the_slo_policy_sleeps_between_bursts_and_less_as_the_target_rises():
    # bursts (gaps of 1 s) separated by pauses of 100 s, on a model alone on its GPU
    gaps = tuple([1.0] * 48 + [100.0] * 16)
    m = view("m", idle=0.0, gaps=gaps, wake=0.5, arrival_gaps=(1.0,) * 31, threshold=300,
             weights=16, kv=4)
    m = m.__class__(**{**m.__dict__, "requests": 640, "idle_arrivals": 64})
    loose, tight = policies.get("slo:0.9"), policies.get("slo:0.9999")
    s = snap(m)
    loose.decide(s)
    tight.decide(s)
    assert 1.0 <= loose.threshold(m) < 100.0     # asleep through the pauses, not the bursts
    assert tight.threshold(m) >= 100.0 or tight.threshold(m) == 300   # awake through both


def test_deployments_of_other_sizes_keep_four_models_per_gpu():
    cfg = deployment(8)
    assert len(cfg.instances) == 8
    assert cfg.sleep_manager.gpu_memory_gb == {"0": 80, "1": 80}
    assert len({i.model for i in cfg.instances}) == 8


def test_diurnal_keeps_every_request_and_moves_them_to_the_peak():
    rows = [{"time": float(t), "model": "m", "prompt_tokens": 1, "output_tokens": 1}
            for t in range(1000)]
    out = diurnal(rows, 0.8, 1000.0)
    assert len(out) == 1000
    first_half = sum(1 for r in out if r["time"] < 500)
    assert first_half > 700          # the rate peaks in the first half of the period


def test_a_wake_within_the_ttft_slo_makes_few_requests_late_so_slo_sleeps_sooner():
    from kvrouter.control.policies import late_per_wake

    gaps = tuple([1.0] * 48 + [100.0] * 16)
    base = view("m", idle=0.0, gaps=gaps, wake=0.5, arrival_gaps=(0.2,) * 31, threshold=300,
                weights=16, kv=4)
    base = base.__class__(**{**base.__dict__, "requests": 640, "idle_arrivals": 64,
                             "ttfts": (0.1,) * 62})
    unstated = late_per_wake(base)
    assert unstated == pytest.approx(1 + 2, rel=0.02)   # the first, two within the wake
    roomy = base.__class__(**{**base.__dict__, "ttft_slo": 2.0})
    # each on time: 1 in 64 (62 samples on time, plus one each way) for what it is worth
    assert late_per_wake(roomy) == pytest.approx(unstated / 64)
    tight = base.__class__(**{**base.__dict__, "ttft_slo": 0.45})
    # a wake longer than the SLO: every request it keeps waiting counts, as with none
    assert late_per_wake(tight) == unstated
    thresholds = []
    for m in (base, roomy):
        p = policies.get("slo:0.99")
        p.decide(snap(m))
        thresholds.append(p.threshold(m))
    # with every wait late it stays awake through the pauses; with a wake that fits the
    # SLO it sleeps in them (after at least 1 s and its wake time)
    assert thresholds[0] >= 100 and 1.0 <= thresholds[1] < 100


def test_the_lab_counts_a_wait_late_only_past_the_stated_slo(tmp_path):
    cfg = config(tmp_path)
    rows = [req(0.0), req(30.0)]            # the second wakes the model (idle 5 s)
    slo = lab.slos_for(cfg, rows)
    unstated, _ = lab.run(cfg, "lru", rows, slo)
    assert unstated.wake_window.totals(31.0)[1:] == (1, 1)
    roomy = {m: outcome.Slo(60.0, s.tpot) for m, s in slo.items()}
    stated, _ = lab.run(lab.stating_slos(cfg, roomy), "lru", rows, slo)
    assert stated.wake_window.totals(31.0)[1:] == (1, 0)
