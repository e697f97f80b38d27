"""What /health, /ui/state and `kvrouter top` say of the cluster, as this router sees it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from kvrouter.cluster.member import Cluster


def status(member: "Cluster") -> Dict[str, object]:
    out: Dict[str, object] = {
        "router_id": member.router_id, "redis": "ok" if member.up else "unreachable",
        "leader": member.leader_id, "this_router_leads": member.decides(),
        "routers": sorted([member.router_id] + [p.router_id for p in member.alive()]),
        "auto_sleep": "on" if member.up else "paused (Redis unreachable)"}
    differ = member.peers.config_differs()
    if differ:
        out["config_differs"] = differ
    dead = [g for g in member._loops if g.dead]
    if member.identity.conflict:
        out["degraded"] = member.identity.conflict
    elif dead:
        out["degraded"] = ("a cluster loop stopped and is being restarted (see the log); "
                           "shared state may lag meanwhile")
    if member.loop_restarts:
        out["loop_restarts"] = member.loop_restarts
    if not member.up:
        out["degraded"] = (f"Redis at {member.redis_name} unreachable for "
                           f"{member.clock() - (member.down_since or member.clock()):.0f}s "
                           f"({member.down_reason}): serving on this router's own state; no "
                           "automatic sleep until it is back")
    return out
