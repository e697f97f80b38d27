"""The policy lab suite's judgement: the best fixed timer in hindsight and slo's targets."""
from kvrouter.lab import suite


def res(att, gb_h, max_rate):
    return {"summary": {"attainment": att, "gpu_memory_gb_seconds": gb_h * 3600.0},
            "max_rate": {"max_rate": max_rate}}


def test_the_oracle_is_the_cheapest_timer_at_99_and_the_fastest_one():
    results = {"lru:10": res(0.985, 10, 0), "lru:30": res(0.991, 20, 30),
               "lru:60": res(0.995, 30, 35), "lru:120": res(0.997, 40, 34),
               "lru": res(0.999, 50, 20)}
    o = suite.oracle(results)
    assert (o["memory"], o["memory_gb_h"]) == ("lru:30", 20)   # lru:10 misses 99%
    assert (o["rate"], o["max_rate"]) == ("lru:60", 35)


def test_slo_targets_compare_with_every_baseline_and_the_oracle():
    results = {p: res(0.99, 100, 10) for p in suite.BASELINES}
    results.update({"lru:10": res(0.98, 10, 5), "lru:30": res(0.992, 20, 12),
                    "lru:60": res(0.995, 30, 9), "lru:120": res(0.996, 40, 8),
                    "lru": res(0.999, 50, 10), "adaptive": res(0.99, 1, 99)})
    results["slo"] = res(0.991, 21.5, 12)
    c = suite.checks(results, suite.oracle(results))
    assert c == {"reaches_99_where_any_baseline_does": True,
                 "memory_within_10pct_of_best_baseline": True,   # 21.5 <= 1.1 x 20
                 "memory_below_best_fixed_timer": False,          # 21.5 > 20
                 "max_rate_at_least_best_baseline": True}         # adaptive is not one
    results["slo"] = res(0.989, 5, 12)      # cheaper, but under 99%: no memory target met
    c = suite.checks(results, suite.oracle(results))
    assert not c["reaches_99_where_any_baseline_does"]
    assert not c["memory_within_10pct_of_best_baseline"]
    assert not c["memory_below_best_fixed_timer"]
    none = {p: res(0.9, 10, 0) for p in suite.BASELINES + suite.timers()}
    none["slo"] = res(0.95, 10, 0)
    c = suite.checks(none, suite.oracle(none))   # no baseline reaches 99%: not applicable
    assert c["reaches_99_where_any_baseline_does"] is None
    assert c["memory_below_best_fixed_timer"] is None
