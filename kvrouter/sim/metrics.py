"""Prometheus text for the simulated engine, with the real engines' metric names."""
from __future__ import annotations

import bisect
from typing import Dict, List, Tuple

from kvrouter.sim.state import EngineState

BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> List[str]:
        out, cum = [], 0
        for bound, c in zip(BUCKETS, self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cum}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class EngineMetrics:
    def __init__(self):
        self.hist: Dict[str, Histogram] = {"ttft": Histogram(), "itl": Histogram(),
                                           "e2e": Histogram(), "queue": Histogram()}
        self.finished: Dict[str, int] = {"stop": 0, "length": 0, "abort": 0}

    def render(self, state: EngineState) -> str:
        cfg = state.cfg
        c = state.counters
        if cfg.dialect == "vllm":
            labels = f'engine="0",model_name="{cfg.served_name}"'
            p = "vllm:"
            gauges: List[Tuple[str, float]] = [
                ("num_requests_running", state.running),
                ("num_requests_waiting", state.waiting),
                ("kv_cache_usage_perc", state.kv_usage()),
            ]
            hist_names = {"ttft": "time_to_first_token_seconds",
                          "itl": "inter_token_latency_seconds",
                          "e2e": "e2e_request_latency_seconds",
                          "queue": "request_queue_time_seconds"}
        else:
            labels = f'model_name="{cfg.served_name}"'
            p = "sglang:"
            gauges = [("num_running_reqs", state.running), ("num_queue_reqs", state.waiting),
                      ("token_usage", state.kv_usage()),
                      ("num_used_tokens", state.tokens_in_flight),
                      ("max_total_num_tokens", cfg.max_model_len * 8),
                      ("num_paused_reqs", state.waiting if state.paused else 0)]
            hist_names = {"ttft": "time_to_first_token_seconds",
                          "itl": "inter_token_latency_seconds",
                          "e2e": "e2e_request_latency_seconds"}
        lines: List[str] = []
        for name, value in gauges:
            lines += [f"# TYPE {p}{name} gauge", f"{p}{name}{{{labels}}} {value}"]
        if cfg.dialect == "vllm":
            lines.append(f"# TYPE {p}engine_sleep_state gauge")
            for s in ("awake", "weights_offloaded", "discard_all"):
                v = 1 if state.sleep_state_label() == s else 0
                lines.append(f'{p}engine_sleep_state{{{labels},sleep_state="{s}"}} {v}')
            lines.append(f"# TYPE {p}request_success counter")
            for reason, n in self.finished.items():
                lines.append(f'{p}request_success_total{{{labels},finished_reason="{reason}"}} {n}')
        else:
            lines += [f"# TYPE {p}num_requests counter", f"{p}num_requests_total{{{labels}}} "
                      f"{c['requests']}", f"# TYPE {p}num_aborted_requests counter",
                      f"{p}num_aborted_requests_total{{{labels}}} {c['aborted']}"]
        lines += [f"# TYPE {p}prompt_tokens counter",
                  f"{p}prompt_tokens_total{{{labels}}} {c['prompt_tokens']}",
                  f"# TYPE {p}generation_tokens counter",
                  f"{p}generation_tokens_total{{{labels}}} {c['generation_tokens']}"]
        for key, name in hist_names.items():
            lines.append(f"# TYPE {p}{name} histogram")
            lines += self.hist[key].lines(p + name, labels)
        lines += ["# TYPE sim_gpu_memory_bytes gauge",
                  f"sim_gpu_memory_bytes{{{labels}}} {state.gpu_memory_bytes()}"]
        return "\n".join(lines) + "\n"
