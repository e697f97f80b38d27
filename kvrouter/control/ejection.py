"""Ejecting a replica that fails: a circuit breaker per replica, as a pure value.

Trust ("does the router send it traffic?") is a machine of its own beside the lifecycle of
``states.py``: a replica may be READY and OPEN. CLOSED lets traffic through; enough
consecutive failures (connect errors, first-byte timeouts, 5xx or 429 before any byte
reached the client) open it for a backoff that grows with each ejection; once that has
passed the owner probes it (HALF_OPEN), and a passing probe closes it again.

``Ejection.record`` returns a new value with the history, as urllib3's ``Retry.increment``
does; time and randomness are passed in. Thresholds follow SGLang's gateway circuit
breaker (failure_threshold, success_threshold, open timeout).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Dict, FrozenSet

from kvrouter.control.routing import Rng


class Breaker(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BREAKER_ALLOWED: Dict[Breaker, FrozenSet[Breaker]] = {
    Breaker.CLOSED: frozenset({Breaker.OPEN}),
    Breaker.OPEN: frozenset({Breaker.HALF_OPEN, Breaker.CLOSED}),
    Breaker.HALF_OPEN: frozenset({Breaker.CLOSED, Breaker.OPEN}),
}


class IllegalBreakerMove(RuntimeError):
    pass


def check(old: Breaker, new: Breaker) -> None:
    if old is not new and new not in BREAKER_ALLOWED[old]:
        raise IllegalBreakerMove(f"{old.value} -> {new.value} is not an allowed breaker move")


@dataclass(frozen=True)
class EjectionConfig:
    failure_threshold: int = 5      # consecutive failures that open the breaker
    success_threshold: int = 1      # passing probes, half-open, that close it
    base_seconds: float = 30.0      # the first ejection's length
    cap_seconds: float = 60.0       # the longest
    jitter: float = 0.1             # +- this share of the length, at random


def backoff(n: int, base: float, cap: float, jitter: float, rng: Rng) -> float:
    """The ``n``-th ejection's length (n >= 1): base x 2^(n-1), at most ``cap``, with
    +-``jitter`` of it at random so replicas ejected together do not come back together."""
    length = min(cap, base * 2 ** max(0, n - 1))
    return length * (1 + jitter * (2 * rng.random() - 1))


@dataclass(frozen=True)
class Ejection:
    breaker: Breaker = Breaker.CLOSED
    failures: int = 0           # consecutive
    successes: int = 0          # consecutive, while half-open
    ejections: int = 0          # how many times it was opened (drives the backoff)
    open_until: float = 0.0

    @property
    def routable(self) -> bool:
        return self.breaker is Breaker.CLOSED

    def _to(self, breaker: Breaker, **kw) -> "Ejection":
        check(self.breaker, breaker)
        return replace(self, breaker=breaker, **kw)

    def record(self, ok: bool, now: float, cfg: EjectionConfig, rng: Rng) -> "Ejection":
        """An outcome: a request's (CLOSED) or a probe's (HALF_OPEN). While OPEN, nothing
        reaches the replica, so a late outcome of a request sent before changes nothing."""
        if self.breaker is Breaker.OPEN:
            return self
        if ok:
            if self.breaker is Breaker.HALF_OPEN:
                if self.successes + 1 >= cfg.success_threshold:
                    return self._to(Breaker.CLOSED, failures=0, successes=0)
                return replace(self, successes=self.successes + 1)
            return replace(self, failures=0)
        failures = self.failures + 1
        if self.breaker is Breaker.HALF_OPEN or failures >= cfg.failure_threshold:
            n = self.ejections + 1
            return self._to(Breaker.OPEN, failures=failures, successes=0, ejections=n,
                            open_until=now + backoff(n, cfg.base_seconds, cfg.cap_seconds,
                                                     cfg.jitter, rng))
        return replace(self, failures=failures)

    def due(self, now: float) -> bool:
        """OPEN and its time is up: probe it (``half_open``)."""
        return self.breaker is Breaker.OPEN and now >= self.open_until

    def half_open(self) -> "Ejection":
        return self._to(Breaker.HALF_OPEN, successes=0)

    def reset(self) -> "Ejection":
        """The replica came back by itself (a restart, a probe of the health loop): trust
        it again, keeping the count of past ejections for the next backoff."""
        return Ejection(ejections=self.ejections)
