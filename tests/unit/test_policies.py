"""The named policies: each one's rules, on snapshots (pure, no clock)."""
import pytest

from kvrouter.config.schema import SLEEP_POLICIES
from kvrouter.control import policies
from kvrouter.control.policies import misses_per_wake, ski_rental_threshold
from kvrouter.control.policy import NoRoom
from tests.unit.test_policy import snap, view


def test_every_policy_is_a_config_choice():
    assert tuple(policies.POLICIES) == SLEEP_POLICIES
    with pytest.raises(KeyError, match="unknown sleep policy 'nope'; choose one of lru"):
        policies.get("nope")


def test_seed_is_the_seed_timer_whatever_the_config_says():
    p = policies.get("seed")
    assert p.interval(5.0) == 60.0
    s = snap(view("a", idle=299, threshold=10), view("b", idle=301, threshold=10))
    assert [a.model for a in p.decide(s)] == ["b"]


def test_static_never_sleeps_nor_evicts():
    p = policies.get("static")
    assert not p.elastic_kv
    s = snap(view("a", idle=1e6, threshold=0), view("t", state="sleeping", weights=70),
             budget={"0": 80})
    assert p.decide(s) == []


def test_unloading_policies_stop_a_model_once_asleep():
    for name in ("ttl", "ollama"):
        p = policies.get(name)
        acts = p.decide(snap(view("a", state="sleeping", state_seconds=0.0)))
        assert [(a.kind, a.model) for a in acts] == [("stop", "a")]
        assert p.interval(60.0) == 1.0
    ollama = policies.get("ollama")
    assert [a.model for a in ollama.decide(snap(view("a", idle=299), view("b", idle=300)))] \
        == ["b"]


def test_ollama_keeps_at_most_three_models_per_gpu_in_all():
    p = policies.get("ollama")
    # one GPU: three loaded, the fourth evicts the one with the shortest keep-alive left
    s = snap(view("t", state="sleeping", weights=1, kv=0),
             *[view(f"m{i}", weights=1, kv=0, last_used=float(i)) for i in range(3)])
    assert [a.model for a in p.plan_room(s, "t")] == ["m0"]
    assert policies.get("lru").plan_room(s, "t") == []        # no budget, no limit
    # two GPUs: the cap is six in all (OLLAMA_MAX_LOADED_MODELS' default), not three each
    s = snap(view("t", state="sleeping", weights=1, kv=0),
             *[view(f"m{i}", weights=1, kv=0, last_used=float(i)) for i in range(4)],
             view("other", gpus=("1",), weights=1, kv=0, last_used=9.0))
    assert p.plan_room(s, "t") == []
    s = snap(view("t", state="sleeping", weights=1, kv=0),
             *[view(f"m{i}", weights=1, kv=0, last_used=float(i + 1)) for i in range(4)],
             view("x", gpus=("1",), weights=1, kv=0, last_used=0.5),
             view("y", gpus=("1",), weights=1, kv=0, last_used=9.0))
    assert [a.model for a in p.plan_room(s, "t")] == ["x"]   # any GPU's, for the count
    busy = snap(view("t", state="sleeping", weights=1, kv=0),
                *[view(f"m{i}", weights=1, kv=0, in_flight=1) for i in range(3)])
    with pytest.raises(NoRoom, match="3 models loaded already"):
        p.plan_room(busy, "t")
    assert p.queue_when_full   # the lab queues that request, as Ollama does


def test_policy_names_carry_their_parameter():
    assert policies.get("lru:30").threshold(view("m", threshold=300)) == 30
    assert policies.get("ttl:5").threshold(view("m")) == 5
    assert policies.get("slo:0.995").target == 0.995
    assert policies.get("lru:30").label == "lru:30"
    for bad, why in (("static:3", "takes no parameter"), ("slo:5", "from 0.5 to 0.9999"),
                     ("lru:x", "must be from 0"), ("nope:3", "unknown sleep policy")):
        with pytest.raises(KeyError, match=why):
            policies.get(bad)


def test_ski_rental_threshold_sits_between_bursts_and_pauses():
    gaps = [0.5] * 40 + [1.0] * 10 + [120.0] * 10   # short gaps in bursts, long pauses
    t = ski_rental_threshold(gaps, penalty=20.0)
    assert 1.0 <= t < 120.0
    # a costly wake (penalty longer than the pauses) is never worth it: stay up through all
    assert ski_rental_threshold(gaps, penalty=1000.0) == 120.0
    # a free wake: sleep at once
    assert ski_rental_threshold(gaps, penalty=0.0) == 0.0


def test_misses_per_wake_grows_with_clumped_arrivals():
    quiet = view("a", wake=0.4)
    assert misses_per_wake(quiet) == 1.0
    clumped = view("a", wake=0.4, arrival_gaps=(0.01,) * 30 + (5.0,) * 10)  # 3/4 within a wake
    assert misses_per_wake(clumped) == pytest.approx(4.0)


def test_adaptive_learns_thresholds_within_the_configured_one():
    p = policies.get("adaptive")
    few = view("a", gaps=(1.0,) * 3, threshold=300)
    assert p.threshold(few) == 300            # too little history: the configured threshold
    bursty = view("b", gaps=(0.5,) * 50 + (200.0,) * 10, threshold=300, weights=16, wake=0.4)
    t = p.threshold(bursty)
    assert 0.5 < t < 200
    assert p.threshold(view("c", gaps=bursty.gaps, threshold=1, wake=0.4)) == 1   # the cap
    acts = p.decide(snap(view("b2", idle=t + 0.1, gaps=bursty.gaps, weights=16, wake=0.4)))
    assert [a.model for a in acts] == ["b2"]


def test_adaptive_frees_memory_for_a_model_that_wants_kv():
    p = policies.get("adaptive")
    # bursts with a rare long pause, and costly wakes: the ski rental keeps them all up
    quiet = dict(gaps=(1.0,) * 19 + (50.0,), wake=2.0, arrival_gaps=(0.1,) * 3 + (5.0,))
    s = snap(view("busy", in_flight=50, kv_wanted=10.0, weights=16),
             view("small", idle=30, weights=2, kv=1, **quiet),
             view("big", idle=30, weights=16, kv=2, **quiet),
             view("fresh", idle=1.5, weights=16, **quiet),            # inside its burst
             view("elsewhere", idle=30, gpus=("1",), weights=16, **quiet))
    acts = p.decide(s)
    assert [a.model for a in acts] == ["big"]      # the most memory per delayed request
    assert "want 10.0 GB more KV" in acts[0].reason
    assert p.decide(snap(*[m for m in s.models if m.name != "busy"])) == []
