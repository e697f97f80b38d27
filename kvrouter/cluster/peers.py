"""The other routers of a cluster, as their heartbeats tell: what each has in flight and
waiting per model, when a request last ended there (an age on the sender's clock, placed on
this router's), the lease tokens it has seen, its config's digest. Warnings when a peer's
clock is off or its config differs."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

from kvrouter.config.schema import Config

log = logging.getLogger("kvrouter.cluster")


def config_digest(cfg: Config) -> str:
    """The config file's digest, which heartbeats carry so that routers notice they differ."""
    try:
        with open(cfg.source, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError:
        return ""


@dataclass
class Peer:
    """Another router, as its last heartbeat told."""

    router_id: str
    seen: float
    # model -> (in flight, waiting, when its last request ended there on this router's
    # clock, or None: never); the sender says how long ago, never at what wall time
    models: Dict[str, tuple] = field(default_factory=dict)
    acks: Dict[str, int] = field(default_factory=dict)           # model -> lease token seen
    config: str = ""                                             # its config's digest


class Peers(dict):
    """router id -> Peer, and what the live ones add up to."""

    def __init__(self, clock: Callable[[], float], wall: Callable[[], float], ttl: float,
                 digest: str, source: str):
        super().__init__()
        self.clock, self.wall, self.ttl = clock, wall, ttl
        self.digest, self.source = digest, source
        self._clock_warned: Dict[str, float] = {}
        self._config_warned: Dict[str, str] = {}

    def heard(self, doc: dict, mine: Iterable[str]) -> None:
        """A checked heartbeat (wire.beat_doc) of another router; ``mine``: this router's
        models, for the warning when the configs differ."""
        rid, now = doc["id"], self.clock()
        models = {m: (n, w, None if age < 0 else now - age)
                  for m, (n, w, age) in doc["models"].items()}
        self[rid] = Peer(rid, now, models, doc["acks"], doc["config"])
        skew = doc["time"] - self.wall()
        if abs(skew) > 1.0 and now - self._clock_warned.get(rid, -1e9) >= 600:
            self._clock_warned[rid] = now
            log.warning("router %s's clock is %+.1fs from this one's: kvrouter exchanges "
                        "ages, not times, so nothing is shifted; set the clocks right (NTP)",
                        rid, skew)
        if doc["config"] and doc["config"] != self.digest and \
                self._config_warned.get(rid) != doc["config"]:
            self._config_warned[rid] = doc["config"]
            here, there = set(mine), set(doc["models"])
            log.warning("router %s runs another config than this one (%s); each model is "
                        "decided among the routers that serve it%s", rid, self.source,
                        f" (only here: {', '.join(sorted(here - there))}; only there: "
                        f"{', '.join(sorted(there - here))})" if here != there else "")

    def alive(self) -> List[Peer]:
        now = self.clock()
        return [p for p in self.values() if now - p.seen <= self.ttl]

    def waiting(self, model: str) -> int:
        return sum((p.models.get(model) or [0, 0])[1] for p in self.alive())

    def in_flight(self, model: str) -> int:
        return sum((p.models.get(model) or [0, 0])[0] for p in self.alive())

    def idle_seconds(self, model: str) -> Optional[float]:
        ends = [m[2] for m in (p.models.get(model) for p in self.alive())
                if m and m[2] is not None]
        return max(0.0, self.clock() - max(ends)) if ends else None

    def config_differs(self) -> List[str]:
        return sorted(p.router_id for p in self.alive() if p.config and p.config != self.digest)
