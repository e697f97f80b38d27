"""A replica's circuit breaker (control/ejection.py): one test per edge, explicit `now`,
exact backoffs."""
import random

import pytest

from kvrouter.control.ejection import (
    BREAKER_ALLOWED,
    Breaker,
    Ejection,
    EjectionConfig,
    IllegalBreakerMove,
    backoff,
    check,
)

CFG = EjectionConfig(failure_threshold=3, success_threshold=1, base_seconds=30,
                     cap_seconds=60, jitter=0.0)


class Fixed:
    def __init__(self, value=0.5):
        self.value = value

    def random(self):
        return self.value

    def randrange(self, n):
        return 0


def test_backoff_doubles_to_its_cap_with_jitter_around_it():
    assert [backoff(n, 30, 60, 0.0, Fixed()) for n in (1, 2, 3, 4)] == [30, 60, 60, 60]
    assert backoff(1, 30, 60, 0.1, Fixed(0.0)) == pytest.approx(27.0)
    assert backoff(1, 30, 60, 0.1, Fixed(1.0)) == pytest.approx(33.0)


def test_closed_to_open_after_the_failure_threshold_of_consecutive_failures():
    e = Ejection()
    for now in (1.0, 2.0):
        e = e.record(False, now, CFG, Fixed())
    assert e.breaker is Breaker.CLOSED and e.failures == 2
    e = e.record(True, 3.0, CFG, Fixed())       # a success in between starts the count again
    assert e.failures == 0
    for now in (4.0, 5.0, 6.0):
        e = e.record(False, now, CFG, Fixed())
    assert e.breaker is Breaker.OPEN and e.open_until == 36.0 and e.ejections == 1
    assert not e.routable


def test_open_ignores_late_outcomes_and_is_due_after_its_backoff():
    e = Ejection(Breaker.OPEN, failures=3, ejections=1, open_until=36.0)
    assert e.record(True, 10.0, CFG, Fixed()) is e
    assert not e.due(35.9) and e.due(36.0)


def test_half_open_closes_on_a_passing_probe_and_reopens_longer_on_a_failing_one():
    e = Ejection(Breaker.OPEN, failures=3, ejections=1, open_until=36.0).half_open()
    assert e.breaker is Breaker.HALF_OPEN
    assert e.record(True, 40.0, CFG, Fixed()).breaker is Breaker.CLOSED
    again = e.record(False, 40.0, CFG, Fixed())
    assert again.breaker is Breaker.OPEN and again.ejections == 2 and again.open_until == 100.0


def test_every_breaker_move_outside_the_table_is_refused():
    for old in Breaker:
        for new in Breaker:
            if old is new or new in BREAKER_ALLOWED[old]:
                check(old, new)
            else:
                with pytest.raises(IllegalBreakerMove):
                    check(old, new)
    with pytest.raises(IllegalBreakerMove):
        Ejection().half_open()            # CLOSED -> HALF_OPEN is not a move


def test_reset_trusts_again_but_remembers_the_ejections():
    e = Ejection(Breaker.OPEN, failures=5, ejections=3, open_until=99.0).reset()
    assert e == Ejection(ejections=3) and e.routable


def test_a_seeded_random_is_the_jitter_source():
    a = backoff(2, 30, 60, 0.1, random.Random(7))
    assert a == backoff(2, 30, 60, 0.1, random.Random(7)) and 54.0 <= a <= 66.0
