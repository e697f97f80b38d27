"""The sleep policy is a pure function of a snapshot."""
import pytest

from kvrouter.control.policy import (
    Action,
    ModelView,
    NoRoom,
    Snapshot,
    decide,
    plan_room,
    room_held,
)
from kvrouter.control.states import State


def view(name, state="ready", idle=0.0, in_flight=0, waiting=0, pinned=False, threshold=300.0,
         stop_after=None, state_seconds=0.0, gpus=("0",), weights=10.0, kv=5.0, last_used=0.0,
         gaps=(), wake=0.0, arrival_gaps=(), kv_wanted=0.0, reserved=False):
    return ModelView(name=name, state=State(state), in_flight=in_flight, waiting=waiting,
                     idle_seconds=idle, state_seconds=state_seconds, pinned=pinned,
                     idle_threshold=threshold, stop_after=stop_after, level=1, gpus=gpus,
                     weights_gb=weights, kv_cache_gb=kv, last_used=last_used, gaps=gaps,
                     wake_seconds=wake, arrival_gaps=arrival_gaps, kv_wanted_gb=kv_wanted,
                     reserved=reserved)


def snap(*models, auto=True, budget=None):
    return Snapshot(tuple(models), auto, budget or {})


def test_sleeps_idle_models_only():
    acts = decide(snap(view("idle", idle=301), view("busy", idle=400, in_flight=1),
                       view("fresh", idle=10), view("pinned", idle=999, pinned=True),
                       view("queued", idle=999, waiting=2),
                       view("asleep", state="sleeping", idle=999)))
    assert acts == [Action("sleep", "idle", 1, "idle 301s >= 300s")]


def test_per_model_threshold_and_auto_switch():
    models = (view("a", idle=61, threshold=60), view("b", idle=61))
    assert [a.model for a in decide(snap(*models))] == ["a"]
    assert decide(snap(*models, auto=False)) == []


def test_deep_sleep_after_stop_after():
    acts = decide(snap(view("a", state="sleeping", stop_after=600, state_seconds=601),
                       view("b", state="sleeping", stop_after=600, state_seconds=10),
                       view("c", state="sleeping", stop_after=None, state_seconds=9999),
                       view("d", state="sleeping", stop_after=600, state_seconds=700,
                            waiting=1)))
    assert [(a.kind, a.model) for a in acts] == [("stop", "a")]


def test_plan_room_evicts_least_recently_used_idle_models_first():
    s = snap(view("target", state="sleeping", weights=20, kv=10),
             view("old", last_used=1.0), view("newer", last_used=5.0),
             view("newest", last_used=9.0), budget={"0": 60})
    # resident 3 x 15 = 45; target needs 30 -> 15 over -> evict exactly one, the oldest
    assert [a.model for a in plan_room(s, "target")] == ["old"]
    s2 = snap(view("target", state="sleeping", weights=35, kv=10), view("old", last_used=1.0),
              view("newer", last_used=5.0), view("newest", last_used=9.0), budget={"0": 60})
    assert [a.model for a in plan_room(s2, "target")] == ["old", "newer"]


def test_plan_room_skips_pinned_busy_and_other_gpus():
    s = snap(view("target", state="sleeping", weights=30, kv=0),
             view("pinned", pinned=True, last_used=0.0),
             view("busy", in_flight=1, last_used=0.0),
             view("other-gpu", gpus=("1",), last_used=0.0),
             view("victim", last_used=5.0), budget={"0": 60, "1": 60})
    assert [a.model for a in plan_room(s, "target")] == ["victim"]


def test_no_room_says_why():
    s = snap(view("target", state="stopped", weights=50, kv=20), view("pinned", pinned=True),
             budget={"0": 80})
    with pytest.raises(NoRoom, match="GPU 0 short by 5.0 GB"):
        plan_room(s, "target")


def test_no_budget_means_no_eviction():
    assert plan_room(snap(view("t", state="sleeping", weights=999), view("x")), "t") == []


def test_multi_gpu_models_count_a_share_per_gpu():
    s = snap(view("target", state="sleeping", gpus=("0", "1"), weights=40, kv=0),
             view("a", gpus=("0",), weights=50, kv=0, last_used=1),
             budget={"0": 60, "1": 60})
    assert [a.model for a in plan_room(s, "target")] == ["a"]


def test_a_gpu_over_its_budget_has_idle_models_slept_until_it_fits():
    from kvrouter.control.policy import over_budget
    # engines came up together: three of 15 GB on a 40 GB GPU; the busy one stays
    s = snap(view("a", last_used=5.0), view("b", last_used=1.0),
             view("c", in_flight=1, last_used=0.0), budget={"0": 40.0})
    actions = decide(s)
    assert [(a.kind, a.model) for a in actions] == [("sleep", "b")]
    assert "holds more than its budget" in actions[0].reason
    # ties (all unused yet): the later in the config sleeps first, as the lab places them
    s = snap(view("a"), view("b"), view("c"), budget={"0": 40.0})
    assert [a.model for a in over_budget(s, set())] == ["c"]
    assert over_budget(snap(view("a"), view("b"), budget={"0": 40.0}), set()) == []
    # one is draining already (its sleep takes a while): the GPU fits once it is done, no
    # second model is slept on the next tick
    s = snap(view("a"), view("b"), view("c", state="draining"), budget={"0": 40.0})
    assert over_budget(s, set()) == []


def test_no_room_is_worth_waiting_for_only_when_the_model_could_fit():
    from kvrouter.control.policy import could_fit
    s = snap(view("t", state="sleeping"), view("busy", in_flight=1), budget={"0": 20.0})
    with pytest.raises(NoRoom):
        plan_room(s, "t")
    assert could_fit(s, "t")               # once "busy" goes idle
    pinned = snap(view("t", state="sleeping"), view("p", pinned=True), budget={"0": 20.0})
    assert not could_fit(pinned, "t")      # a pinned model never leaves


def test_a_model_going_to_sleep_makes_room_a_wake_waits_for_not_another_eviction():
    """Room for two (15 GB each): ``idle`` drains for an idle sleep while ``target`` wakes.
    Counting the draining model's memory as held evicted ``other`` as well."""
    draining = view("idle", state="draining", last_used=1.0)
    s = snap(draining, view("other", last_used=2.0), view("target", state="sleeping"),
             budget={"0": 30})
    assert plan_room(s, "target") == []
    assert not room_held(s, "target")   # the wake waits for that sleep to end
    slept = snap(view("idle", state="sleeping"), view("other", last_used=2.0),
                 view("target", state="sleeping"), budget={"0": 30})
    assert room_held(slept, "target")


def test_a_wake_making_room_holds_its_memory_for_the_next_plan():
    """``a`` is being woken (asleep, its room planned): a second wake plans around it."""
    s = snap(view("a", state="sleeping", reserved=True), view("x", last_used=1.0),
             view("y", last_used=2.0), view("b", state="sleeping"), budget={"0": 45})
    assert [act.model for act in plan_room(s, "b")] == ["x"]
    assert not room_held(s, "b", freed=set())
    assert room_held(s, "b", freed={"x"})
    # and the tick's budget check does not count it as room to spare either
    over = snap(view("a", state="sleeping", reserved=True), view("x", last_used=1.0),
                view("y", last_used=2.0), view("z", last_used=3.0), budget={"0": 45})
    assert [act.model for act in decide(over)] == ["x"]


def test_a_cap_on_loaded_models_counts_them_as_a_plan_does():
    """Ollama's cap (3 loaded): one unloading frees its slot; one loading holds one."""
    unloading = snap(view("x", last_used=1.0), view("y", last_used=2.0),
                     view("z", state="draining"), view("b", state="sleeping"))
    assert plan_room(unloading, "b", max_loaded=3) == []
    loading = snap(view("x", last_used=1.0), view("y", last_used=2.0),
                   view("z", state="draining"), view("a", state="sleeping", reserved=True),
                   view("b", state="sleeping"))
    assert [act.model for act in plan_room(loading, "b", max_loaded=3)] == ["x"]
