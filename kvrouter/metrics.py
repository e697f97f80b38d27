"""Prometheus exposition for the router (prometheus_client, its own registry)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvrouter.control.controller import State

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)


class RouterMetrics:
    def __init__(self, controller, traffic):
        self.controller = controller
        self.traffic = traffic
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvrouter_requests", "Requests by model and outcome.",
                                ["model", "outcome"], registry=r)
        self.unrouted = Gauge("kvrouter_unrouted_requests", "Requests rejected before routing "
                              "(no or unknown model, bad JSON, auth).", registry=r)
        self.duration = Histogram("kvrouter_request_duration_seconds",
                                  "Request duration, arrival to last byte.", ["model"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kvrouter_time_to_first_token_seconds",
                              "Streams: time to the first byte from the engine, waits excluded.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvrouter_inter_token_latency_seconds",
                             "Streams: mean gap between chunks of one stream.", ["model"],
                             buckets=ITL_BUCKETS, registry=r)
        self.wait = Histogram("kvrouter_wait_seconds", "Time a request waited for a wake or "
                              "for readiness.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("kvrouter_tokens", "Tokens by model and kind (from usage).",
                              ["model", "kind"], registry=r)
        self.in_flight = Gauge("kvrouter_requests_in_flight", "Requests in flight.", ["model"],
                               registry=r)
        self.queued = Gauge("kvrouter_requests_waiting", "Requests waiting for the model to be "
                            "ready.", ["model"], registry=r)
        self.state = Gauge("kvrouter_model_state", "1 for the model's current state.",
                           ["model", "state"], registry=r)
        self.transitions = Counter("kvrouter_model_transitions", "Sleep and wake operations.",
                                   ["model", "action", "result"], registry=r)
        self.transition_seconds = Histogram("kvrouter_model_transition_seconds",
                                            "Duration of sleep and wake operations.",
                                            ["model", "action"], buckets=LATENCY_BUCKETS,
                                            registry=r)
        self._children = {}
        for m in traffic.models:
            self._children[m] = (self.duration.labels(m), self.ttft.labels(m), self.itl.labels(m),
                                 self.wait.labels(m), self.tokens.labels(m, "prompt"),
                                 self.tokens.labels(m, "completion"))
            for outcome in ("success", "client_error", "upstream_error", "timeout", "disconnect",
                            "rejected"):
                self.requests.labels(m, outcome)

    def on_end(self, model, outcome, rec, latency, prompt, completion, itl) -> None:
        duration, ttft, itl_h, wait, prompt_c, completion_c = self._children[model]
        self.requests.labels(model, outcome).inc()
        duration.observe(latency)
        if rec.stream and rec.first_byte is not None and outcome == "success":
            ttft.observe(rec.first_byte - rec.start - rec.wait)
            if itl is not None:
                itl_h.observe(itl)
        if rec.wait:
            wait.observe(rec.wait)
        if prompt:
            prompt_c.inc(prompt)
        if completion:
            completion_c.inc(completion)

    def transition(self, model: str, action: str, ok: bool, seconds: float) -> None:
        self.transitions.labels(model, action, "ok" if ok else "failed").inc()
        self.transition_seconds.labels(model, action).observe(seconds)

    def exposition(self):
        # gauges read at scrape time
        self.unrouted.set(self.traffic.unrouted)
        for name, entry in self.controller.entries.items():
            self.in_flight.labels(name).set(self.traffic.models[name].in_flight)
            self.queued.labels(name).set(entry.waiters)
            for s in State:
                self.state.labels(name, s.value).set(1 if entry.state is s else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
