"""Finished requests, from the router that served them to the other routers' traffic
monitors (shared statistics, idle gaps), in batches of one message per heartbeat."""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional

from kvrouter.traffic import TrafficMonitor


class Records:
    def __init__(self, wall: Callable[[], float]):
        self.wall = wall
        self.pending: List[str] = []          # finished requests, each a JSON array already
        self.ended: Dict[str, float] = {}     # model -> when its last request here ended
        self._names: Dict[str, str] = {}      # model -> its name as a JSON string

    def add(self, model, outcome, rec, latency, prompt, completion, itl) -> None:
        """A request this router (or one of its workers) finished (``TrafficMonitor.on_end``).
        Encoded here, a few microseconds each, rather than all at once every heartbeat (a
        thousand records encoded in one go would hold the hub for a millisecond)."""
        end_wall = self.wall()
        self.ended[model] = round(end_wall, 3)
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
        return '{"router":%s,"records":[%s]}' % (json.dumps(router_id), ",".join(batch))

    def replay(self, doc: dict, traffic: TrafficMonitor) -> None:
        """Another router's message into this router's traffic monitor (not its metrics)."""
        offset = traffic.clock() - self.wall()   # wall time -> this process's clock
        replay = traffic.replay
        for (model, start, end, outcome, wait, first, stream, prompt, completion,
             itl) in doc.get("records", []):
            replay(model, start + offset, end + offset, outcome, wait,
                   None if first is None else start + offset + first, stream, prompt,
                   completion, itl, remote=True)
