"""Model events (every state change: sleep, wake, stop, start, failure, restart), kept
for a while and pushed to whoever listens (``GET /events``, the dashboard's timeline)."""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Deque, List, Optional

from gevent.event import Event

KEEP = 1000


def kind_of(old: str, new: str) -> str:
    """A name for a move between two states, as people say it."""
    if new == "sleeping":
        return "sleep"
    if new == "stopped":
        return "stop"
    if new == "failed":
        return "failure"
    if new == "ready":
        return {"waking": "wake", "starting": "start", "draining": "sleep cancelled"}.get(
            old, "ready")
    if new == "waking":
        return "waking"
    if new == "starting":
        return "restart" if old == "failed" else "starting"
    if new.startswith("breaker "):   # a replica ejected from routing, or let back
        return {"breaker open": "ejected", "breaker closed": "back"}.get(new, "trial")
    return new


RECENT = 50   # what a new subscriber (or one whose id this process never gave) gets first


class EventLog:
    """Ids grow across restarts of the router (they start from the start time in
    milliseconds), so a dashboard that reconnects to a restarted router with its
    ``Last-Event-ID`` gets what happened since, not nothing."""

    def __init__(self, wall: Callable[[], float] = time.time, keep: int = KEEP):
        self.wall = wall
        self.events: Deque[dict] = deque(maxlen=keep)
        self.first_id = self.last_id = int(wall() * 1000)
        self._new = Event()
        self.listeners: List[Callable[[dict], None]] = []   # called on every event, in order

    def publish(self, model: str, old: str, new: str, reason: str,
                origin: Optional[str] = None, state: bool = True) -> dict:
        """``origin``: the router that made the change, when it is another one; ``state``:
        False for an event that is not a lifecycle state change (a replica's breaker),
        which the listeners (shared memory, the cluster, the KV arbiter) do not get."""
        self.last_id += 1
        event = {"id": self.last_id, "time": self.wall(), "model": model,
                 "kind": kind_of(old, new), "from": old, "to": new, "reason": reason}
        if origin is not None:
            event["router"] = origin
        self.events.append(event)
        for listener in self.listeners if state else ():
            listener(event)
        new_event, self._new = self._new, Event()
        new_event.set()
        return event

    def resume_from(self, last_id: Optional[int]) -> int:
        """Where a subscriber starts: after ``last_id`` when this process gave it, else (none
        given, or an id this process never gave: from another process, or ahead) the recent
        events."""
        recent = max(self.first_id, self.last_id - RECENT)
        if last_id is None or not self.first_id <= last_id <= self.last_id:
            return recent
        return last_id

    def since(self, last_id: int) -> List[dict]:
        return [e for e in self.events if e["id"] > last_id]

    def next(self, last_id: int, timeout: float) -> List[dict]:
        """The events after ``last_id``, waiting (this greenlet) up to ``timeout`` for one."""
        pending = self._new   # taken first: an event published from here on sets it
        found = self.since(last_id)
        if found:
            return found
        pending.wait(timeout)
        return self.since(last_id)
