"""Transitions left behind: a model left WAKING or DRAINING by a router that died (its
lease expired, or Redis lost it) is settled from what its engine reports."""
from __future__ import annotations

from typing import TYPE_CHECKING

import gevent

from kvrouter.cluster.store import StoreDown
from kvrouter.control.coordination import holding
from kvrouter.control.entry import ModelEntry
from kvrouter.control.states import IN_TRANSITION, State

if TYPE_CHECKING:
    from kvrouter.cluster.member import Cluster


def watch(member: "Cluster") -> None:
    """Every half wake lease: a model in transition whose lease nobody holds is settled."""
    while True:
        gevent.sleep(member.cfg.cluster.wake_lease_seconds / 2)
        if not member.up:
            continue
        for entry in list(member.ctl.entries.values()):
            if entry.state not in IN_TRANSITION or entry.lock.locked():
                continue
            try:
                held = member.store.exists(member.store.key("lease", entry.name))
            except StoreDown as err:
                member._down(err)
                break
            if not held:
                gevent.spawn(settle, member, entry)


def settle(member: "Cluster", entry: ModelEntry) -> None:
    ctl = member.ctl
    with entry.lock:
        if entry.state not in IN_TRANSITION:
            return
        lease = member.acquire(entry)
        if lease is None:
            return
        with holding(entry, lease):
            asleep = entry.adapter.is_sleeping()
            if asleep is None:
                asleep = entry.state is State.WAKING
            state = State.SLEEPING if asleep else State.READY
            reason = ("the router that was changing it is gone; the engine reports it "
                      f"is {'asleep' if asleep else 'awake'}")
            if asleep:
                entry.adapter.mark_released()
            ctl.set_state(entry, state, reason, origin=member.router_id)
    if entry.state is State.SLEEPING and entry.waiters:
        ctl.request_wake(entry, reason="requests waiting")
