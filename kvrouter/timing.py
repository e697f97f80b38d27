"""How long an engine takes, and how much it holds: the one model of an engine's timing and
memory, used by the simulated engine (``kvrouter sim-engine``, which sleeps these times) and
by the policy lab (``kvrouter simulate``, which schedules them as events). Pure: no clock.

- Prefill: ``ttft_ms + prefill_ms_per_token * prompt_tokens``; the first token comes out of it.
- Decode: one token per step for every running request, a step lasting
  ``itl_ms * (1 + batch_slowdown * (running - 1))`` (continuous batching).
- KV cache: ``kv_bytes_per_token`` per token of prompt and output (by default the size at
  which ``kv_cache_gb`` holds eight sequences of ``max_model_len``); a request is admitted
  when a slot is free (``max_concurrency``) and its tokens fit the pool.
- Sleep and wake: level 1 copies the weights to pinned host memory and back at
  ``wake_bandwidth_gbps`` (about 48 GB/s measured host->GPU on an H100) plus
  ``wake_overhead_seconds``; level 2 discards them, so a wake also reloads them from disk at
  ``disk_bandwidth_gbps``; a stopped engine takes ``startup_seconds`` to start (a new process:
  CUDA context and loading).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

GB = 1024 ** 3
# the simulated engine's sizes when a config does not give them
DEFAULT_WEIGHTS_GB = 2.0
DEFAULT_KV_CACHE_GB = 4.0
DEFAULT_MAX_MODEL_LEN = 4096
WARM_UP_PROMPT_TOKENS = 2   # the router's warm-up request after a wake ("Hi", 1 token out)


@dataclass(frozen=True)
class Timing:
    """Built from an engine's options (``SimConfig.timing``, ``Instance.timing``): the defaults
    are those of the config's ``sim:`` block, declared in ``config.schema.SimOptions``."""

    ttft_ms: float
    prefill_ms_per_token: float
    itl_ms: float
    batch_slowdown: float
    max_concurrency: int
    max_model_len: int
    weights_gb: float
    kv_cache_gb: float
    kv_bytes_per_token: int
    wake_bandwidth_gbps: float
    wake_overhead_seconds: float
    disk_bandwidth_gbps: float
    startup_seconds: float

    @classmethod
    def of(cls, options, **sizes) -> "Timing":
        """From an object with these attributes (``SimConfig``; or a config's ``SimOptions``
        with the sizes given as keywords)."""
        return cls(**{f.name: sizes[f.name] if f.name in sizes else getattr(options, f.name)
                      for f in fields(cls)})

    # --- requests ---------------------------------------------------------------------------
    def prefill_seconds(self, prompt_tokens: int) -> float:
        return (self.ttft_ms + self.prefill_ms_per_token * prompt_tokens) / 1000.0

    def step_seconds(self, running: int) -> float:
        return self.itl_ms / 1000.0 * (1 + self.batch_slowdown * (max(1, running) - 1))

    # --- memory -----------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        if self.kv_bytes_per_token > 0:
            return self.kv_bytes_per_token
        return max(1, int(self.kv_cache_gb * GB / max(1, self.max_model_len * 8)))

    def capacity_tokens(self, limit_bytes: int) -> int:
        return max(0, int(limit_bytes)) // self.bytes_per_token

    # --- sleep, wake, start -----------------------------------------------------------------
    def _transfer(self, gb: float, bandwidth: float) -> float:
        return gb / bandwidth + self.wake_overhead_seconds if bandwidth > 0 \
            else self.wake_overhead_seconds

    def offload_seconds(self) -> float:
        """Weights to host memory (sleep) or back (a level-1 wake)."""
        return self._transfer(self.weights_gb, self.wake_bandwidth_gbps)

    def reload_seconds(self) -> float:
        """Weights from disk (after a level-2 sleep discarded them)."""
        return self._transfer(self.weights_gb, self.disk_bandwidth_gbps)

    def sleep_seconds(self, level: int) -> float:
        return self.offload_seconds()

    def wake_seconds(self, level: int) -> float:
        return self.offload_seconds() + (self.reload_seconds() if level == 2 else 0.0)

    def start_seconds(self) -> float:
        return self.startup_seconds
