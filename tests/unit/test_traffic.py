"""Traffic monitor with a fake clock: counts, windows, percentiles, idle time, bounds."""
import pytest

from kvrouter.traffic import SAMPLES, TrafficMonitor


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def mon():
    clock = Clock()
    m = TrafficMonitor(["a", "b"], clock=clock, wall=lambda: 1.7e9 + clock.t)
    m.clock_obj = clock
    return m


def req(mon, model, seconds, outcome="success", **kw):
    rec = mon.start(model)
    mon.clock_obj.t += seconds
    mon.end(rec, outcome, **kw)


def test_counts_and_outcomes(mon):
    for _ in range(10):
        req(mon, "a", 0.1, prompt_tokens=5, completion_tokens=7)
    req(mon, "a", 0.1, "upstream_error")
    req(mon, "a", 0.1, "client_error")
    s = mon.stats("a", window=60)
    assert s["total_requests"] == 12 and s["successful_requests"] == 10
    assert s["failed_requests"] == 2
    assert s["failures"]["upstream_error"] == 1 and s["failures"]["client_error"] == 1
    assert s["prompt_tokens"] == 50 and s["completion_tokens"] == 70
    assert s["success_rate"] == pytest.approx(10 / 12)
    assert s["avg_response_time"] == pytest.approx(0.1)
    assert s["response_time"]["p50"] == pytest.approx(0.1)


def test_rate_over_window_uses_only_recent_seconds(mon):
    for _ in range(30):  # 30 requests, one per second
        req(mon, "a", 1.0)
    mon.clock_obj.t += 100
    for _ in range(10):  # 10 requests in the last 10 seconds
        req(mon, "a", 1.0)
    assert mon.stats("a", window=10)["window_requests"] == 10
    assert mon.stats("a", window=10)["request_rate"] == pytest.approx(1.0)
    assert mon.stats("a", window=3600)["window_requests"] == 40
    assert mon.stats("a", window=20)["request_rate"] == pytest.approx(0.5)


def test_idle_time_counts_from_end_of_last_request_and_never_while_in_flight(mon):
    assert mon.idle_seconds("b") == 0
    mon.clock_obj.t += 50
    assert mon.idle_seconds("b") == 50  # never requested: idle since the router started
    rec = mon.start("a")
    mon.clock_obj.t += 400
    assert mon.idle_seconds("a") == 0  # in flight
    assert mon.idle(300) == ["b"]
    mon.end(rec, "success")
    mon.clock_obj.t += 301
    assert mon.idle(300) == ["a", "b"] and mon.active(300) == []
    s = mon.stats("a", idle_threshold=300)
    assert s["is_idle"] and s["idle_time_seconds"] == pytest.approx(301)
    assert s["last_activity_time"] == pytest.approx(1.7e9 + 1050)  # the seed's: its start
    assert s["last_end_time"] == pytest.approx(1.7e9 + 1450)


def test_seed_meanings_of_avg_response_time_and_last_activity_time(mon):
    s = mon.stats("a")
    assert s["avg_response_time"] == 0.0 and s["last_activity_time"] == 0.0  # no request yet
    assert mon.with_activity() == []
    req(mon, "a", 0.2)
    req(mon, "a", 5.0, "upstream_error")       # failures are not in the seed's average
    req(mon, "a", 0.4)
    mon.clock_obj.t += 3600                     # long ago: still in the since-start mean
    s = mon.stats("a", window=60)
    assert s["avg_response_time"] == pytest.approx(0.3)
    assert s["window_avg_response_time"] is None
    assert s["last_activity_time"] == pytest.approx(1.7e9 + 1000 + 5.2)
    assert mon.with_activity() == ["a"]


def test_stream_ttft_itl_and_wait(mon):
    rec = mon.start("a")
    rec.stream = True
    mon.waited(rec, 2.0)
    mon.clock_obj.t += 2.5
    rec.first_byte = mon.clock_obj.t
    mon.clock_obj.t += 1.0
    mon.end(rec, "success", itl=0.02, completion_tokens=51)
    s = mon.stats("a")
    assert s["time_to_first_token"]["p50"] == pytest.approx(0.5)  # wait excluded
    assert s["inter_token_latency"]["mean"] == pytest.approx(0.02)
    assert s["wait_time"]["p50"] == pytest.approx(2.0) and s["streams"] == 1


def test_memory_is_bounded(mon):
    for _ in range(SAMPLES * 3):
        req(mon, "a", 0.001)
    m = mon.models["a"]
    assert len(m.latency) == SAMPLES and m.total == SAMPLES * 3


def test_percentiles_over_window(mon):
    for i in range(100):
        req(mon, "a", (i + 1) / 100.0)
    s = mon.stats("a", window=3600)
    assert s["response_time"]["p50"] == pytest.approx(0.51)
    assert s["response_time"]["p99"] == pytest.approx(1.0)


def test_waits_for_a_wake_count_late_only_past_the_models_ttft_slo(mon):
    mon.models["a"].ttft_slo = 0.5

    def woken(model, wait, first_byte_after, stream=True):
        rec = mon.start(model)
        rec.stream = stream
        mon.woke(model, wait)
        mon.waited(rec, wait)
        mon.clock_obj.t += first_byte_after
        rec.first_byte = mon.clock_obj.t
        mon.clock_obj.t += 0.1
        mon.end(rec, "success")

    woken("a", 0.2, 0.3)     # a wake of 0.2 s, first byte 0.3 s after arrival: on time
    woken("a", 0.2, 0.7)     # the same wake, but its first byte came after 0.7 s: late
    woken("a", 0.2, 0.7, stream=False)   # no token seen: its wait (0.2 s) was within it
    woken("a", 0.6, 0.7)     # the wake alone outlasted the SLO: late
    req(mon, "a", 0.1)       # no wait
    woken("b", 0.2, 0.3)     # no SLO stated: every wait is late
    assert mon.wakes.totals(mon.clock_obj.t) == (6, 5, 3)
    # every request is counted as it starts, and those that ended an idle gap
    assert (mon.models["a"].arrived, mon.models["a"].idle_arrivals) == (5, 4)


def test_slos_come_from_the_config_and_a_reload(tmp_path):
    from kvrouter.config import parse_config_text

    def cfg(slo):
        return parse_config_text(
            f"sleep_manager: {{ttft_slo_ms: {slo}}}\ninstances:\n"
            "  - {name: a, model: m/a, engine: vllm, engine_args: ['--port 9001']}\n"
            "  - {name: b, model: m/b, engine: vllm, engine_args: ['--port 9002'],"
            " sleep: {ttft_slo_ms: 2000}}\n", base_dir=str(tmp_path))
    mon = TrafficMonitor.for_config(cfg(250))
    assert (mon.models["m/a"].ttft_slo, mon.models["m/b"].ttft_slo) == (0.25, 2.0)
    mon.set_slos(cfg(400))
    assert mon.models["m/a"].ttft_slo == 0.4
