"""How this router agrees with the other routers before it acts on a model.

The controller asks its ``Coordinator`` before every transition: hold the model's lease (a
wake, a sleep or a deep sleep runs on one router at a time), check the lease is still held
before each engine call (fencing: a router that lost it must not act on stale ownership),
wait until the other routers have stopped sending to a model before it sleeps, and whether
this router makes the sleep decisions (the leader). This module's ``Coordinator`` is one
router alone: every lease is granted and it always decides. ``kvrouter.cluster`` gives the
one that shares state through Redis.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Dict, Iterator, Optional

if TYPE_CHECKING:
    from kvrouter.control.entry import ModelEntry


class LeaseLost(Exception):
    """Another router holds the model now: this one must not touch its engine."""


class Lease:
    """The right to change one model's state; ``token`` orders holders (fencing)."""

    token = 0
    holder = ""

    def check(self) -> None:
        """Raise LeaseLost when the lease is no longer this router's."""

    def release(self) -> None:
        """Give the lease up (the transition is over)."""


@contextlib.contextmanager
def holding(entry: "ModelEntry", lease: Lease) -> Iterator[Lease]:
    """The model's transition runs under ``lease`` (its state changes carry the lease's
    token); given back at the end, however it ends."""
    entry.lease = lease
    try:
        yield lease
    finally:
        entry.lease = None
        lease.release()


class Coordinator:
    """One router alone: no other router to agree with."""

    router_id = "local"

    def acquire(self, entry: "ModelEntry") -> Optional[Lease]:
        """The model's lease, or None while another router holds it (its transition's
        outcome arrives as a state change of the entry)."""
        return Lease()

    def refuse_wake(self, entry: "ModelEntry") -> Optional[str]:
        """Why this router must not wake the model now (None: it may)."""
        return None

    def refuse_sleep(self, entry: "ModelEntry") -> Optional[str]:
        """Why this router must not put the model to sleep now (None: it may)."""
        return None

    def drain(self, entry: "ModelEntry", lease: Lease, manual: bool,
              deadline: float) -> Optional[str]:
        """Wait until no other router sends requests to the model, which is DRAINING now;
        why the sleep cannot go on, or None."""
        return None

    def decides(self, model: Optional[str] = None) -> bool:
        """Whether this router makes the sleep decisions (the leader), for ``model`` or
        for any model."""
        return True

    def peers_waiting(self, model: str) -> int:
        """Requests waiting for the model on the other routers."""
        return 0

    def peers_idle_seconds(self, model: str) -> Optional[float]:
        """How long since the model's last request ended on any other router (None: no
        other router has served it)."""
        return None

    def status(self) -> Dict[str, object]:
        """For /health: the cluster as this router sees it (empty when alone)."""
        return {}
