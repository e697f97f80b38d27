"""Finished requests, from the router that served them to the other routers' traffic
monitors (shared statistics, idle gaps), in batches of one message per heartbeat.

Times are on the sender's monotonic clock, with the clock's reading when the batch was
sent: the receiver places each request that long before it received the batch. No wall
clock is trusted, so a router whose clock is off shifts nothing."""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional

from kvrouter.cluster import wire
from kvrouter.traffic import TrafficMonitor


class Records:
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.pending: List[str] = []          # finished requests, each a JSON array already
        self.ended: Dict[str, float] = {}     # model -> when its last request here ended
        self._names: Dict[str, str] = {}      # model -> its name as a JSON string

    def add(self, model, outcome, rec, latency, prompt, completion, itl) -> None:
        """A request this router (or one of its workers) finished (``TrafficMonitor.on_end``).
        Encoded here, a few microseconds each, rather than all at once every heartbeat (a
        thousand records encoded in one go would hold the hub for a millisecond)."""
        end_wall = self.clock()
        self.ended[model] = end_wall
        name = self._names.get(model)
        if name is None:
            name = self._names[model] = json.dumps(model)
        first = "null" if rec.first_byte is None else f"{rec.first_byte - rec.start:.5f}"
        self.pending.append(
            f'[{name},{end_wall - latency:.4f},{end_wall:.4f},"{outcome}",{rec.wait:.4f},'
            f'{first},{"true" if rec.stream else "false"},{int(prompt)},{int(completion)},'
            f'{"null" if itl is None else f"{itl:.5f}"}]')

    def take(self, router_id: str) -> Optional[str]:
        """The message of what finished since the last one (None: nothing did)."""
        if not self.pending:
            return None
        batch, self.pending = self.pending, []
        return '{"router":%s,"now":%.4f,"records":[%s]}' % (
            json.dumps(router_id), self.clock(), ",".join(batch))

    def age(self, model: str) -> float:
        """Seconds since a request for ``model`` last ended here (-1: none has)."""
        ended = self.ended.get(model)
        return -1.0 if ended is None else round(max(0.0, self.clock() - ended), 3)

    def replay(self, doc: dict, traffic: TrafficMonitor) -> None:
        """Another router's message into this router's traffic monitor (not its metrics).
        Raises wire.BadMessage, before replaying any of it, when it is malformed."""
        sent, rows = wire.records_doc(doc)
        offset = traffic.clock() - sent   # the sender's clock -> this process's clock
        replay = traffic.replay
        for (model, start, end, outcome, wait, first, stream, prompt, completion,
             itl) in rows:
            replay(model, start + offset, end + offset, outcome, wait,
                   None if first is None else start + offset + first, stream, prompt,
                   completion, itl, remote=True)
