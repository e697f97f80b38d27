"""Model states and the transitions allowed between them (standard library only).

    STARTING --ready--> READY --idle--> DRAINING --> SLEEPING --request/wake--> WAKING --warm-up--> READY
       ^                  |                             |                         |
       |                  +------ engine died --> FAILED <-------- wake failed ---+
       +-- process manager starts -- STOPPED <-- long asleep (deep sleep)

``ALLOWED`` is the whole table; ``check`` refuses anything else, so a transition
the design does not have fails loudly where it is attempted (supervisor's
``states.py`` and ``_assertInState`` are the model).
"""
from __future__ import annotations

import enum
from typing import Dict, FrozenSet


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPED = "stopped"
    FAILED = "failed"


class TransitionError(Exception):
    """A sleep, wake or stop that cannot happen now (HTTP 409)."""


class IllegalTransition(RuntimeError):
    """A programming error: a transition the table does not allow."""


S = State
#: state -> states it may move to
ALLOWED: Dict[State, FrozenSet[State]] = {
    # adoption finds the engine up (READY), asleep (SLEEPING) or not running (STOPPED)
    S.STARTING: frozenset({S.READY, S.SLEEPING, S.STOPPED, S.FAILED}),
    # READY -> SLEEPING: the engine was put to sleep outside kvrouter (seen by a probe)
    S.READY: frozenset({S.DRAINING, S.FAILED, S.SLEEPING}),
    # DRAINING -> STARTING: drained for a new command line, the engine restarts with it
    S.DRAINING: frozenset({S.SLEEPING, S.READY, S.FAILED, S.STARTING}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPED, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.FAILED}),
    # a start (request or wake), or an engine started outside kvrouter found by a probe
    S.STOPPED: frozenset({S.STARTING, S.READY, S.SLEEPING}),
    # a probe finds the (restarted) engine up or asleep
    S.FAILED: frozenset({S.READY, S.SLEEPING, S.STOPPED}),
}

#: the engine holds GPU memory (weights and KV cache)
RESIDENT: FrozenSet[State] = frozenset({S.STARTING, S.READY, S.DRAINING, S.WAKING})
#: the model is down on purpose; a request (or a manual wake) brings it back
ASLEEP: FrozenSet[State] = frozenset({S.SLEEPING, S.STOPPED})
#: a transition is running: it owns the model, probes leave it alone
IN_TRANSITION: FrozenSet[State] = frozenset({S.DRAINING, S.WAKING})
#: a request for the model in one of these states waits for a wake
WAKEABLE: FrozenSet[State] = frozenset({S.SLEEPING, S.STOPPED, S.DRAINING, S.WAKING})
#: the engine process is up and answers (whether it holds its memory or not)
ANSWERING: FrozenSet[State] = frozenset({S.READY, S.DRAINING, S.SLEEPING, S.WAKING})
#: the health loop polls slowly in these states (nothing is about to change)
SETTLED: FrozenSet[State] = frozenset({S.READY, S.SLEEPING, S.STOPPED})


def check(old: State, new: State) -> None:
    """Raise IllegalTransition unless ``old -> new`` is in the table (staying is allowed)."""
    if old is not new and new not in ALLOWED[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not an allowed transition")


#: what a model with several replicas shows, the first of its replicas' states found here:
#: ready while any replica is, else the one closest to serving
GROUP_ORDER = (S.READY, S.WAKING, S.DRAINING, S.STARTING, S.SLEEPING, S.STOPPED, S.FAILED)


def group_state(states) -> State:
    """The state a model shows for its replicas' states."""
    found = set(states)
    return next((s for s in GROUP_ORDER if s in found), S.FAILED)


def wake_order(state: State) -> int:
    """Which replica a request for a model with none ready waits on: lowest first (one
    already waking or starting, then one asleep, then one stopped, a failed one last)."""
    return {S.WAKING: 0, S.STARTING: 1, S.DRAINING: 2, S.SLEEPING: 3, S.STOPPED: 4}.get(
        state, 5)
