"""One router per id: this process's nonce, which its heartbeats carry, and whether another
live process holds the same id (two routers given one cluster host)."""
from __future__ import annotations

import logging
import uuid
from typing import Any, Optional

log = logging.getLogger("kvrouter.cluster")


class Identity:
    def __init__(self, router_id: str):
        self.router_id = router_id
        self.instance = uuid.uuid4().hex
        self.conflict: Optional[str] = None   # why this router stays out, while it does

    def other(self, beat: Any) -> bool:
        """Whether ``beat`` (the live heartbeat under this id) is another process's."""
        return isinstance(beat, dict) and bool(beat.get("instance")) and \
            beat.get("instance") != self.instance

    def message(self, beat: Any) -> str:
        return (f"another live router uses the id {self.router_id!r} ({beat.get('url')}): "
                "give each router its own cluster host (--cluster-host NAME, a host of "
                "cluster.hosts)")

    def observe(self, beat: Any) -> bool:
        """The heartbeat under this id as Redis has it (None: there is none): True while
        another process holds the id (logged once); a conflict ends when the id is free."""
        if self.other(beat):
            message = self.message(beat)
            if self.conflict != message:
                log.error("%s", message)
            self.conflict = message
            return True
        if beat is None:
            self.conflict = None
        return False
