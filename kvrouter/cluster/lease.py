"""A model's lease in Redis: taken with a fencing token, renewed while its transition runs,
checked before every engine call, given back at the end."""
from __future__ import annotations

from typing import Optional

import gevent

from kvrouter.cluster.store import Store, StoreDown
from kvrouter.control.coordination import Lease, LeaseLost


class RedisLease(Lease):
    def __init__(self, store: Store, router_id: str, model: str, token: int, seconds: float):
        self.store = store
        self.model = model
        self.token = token
        self.holder = router_id
        self.seconds = seconds
        self.key = store.key("lease", model)
        self.value = f"{router_id}|{token}"
        self.lost: Optional[str] = None
        self._keeper = gevent.spawn(self._keep)

    def _keep(self) -> None:
        while self.lost is None:
            gevent.sleep(self.seconds / 3)
            try:
                if not self.store.renew(self.key, self.value, self.seconds):
                    self.lost = "its lease expired or was taken over"
            except StoreDown:
                pass   # nobody can take it while Redis is down; check() asks again

    def check(self) -> None:
        if self.lost is None:
            try:
                now = self.store.get(self.key)
            except StoreDown:
                return   # no other router can take it while Redis is down
            if now != self.value:
                holder = (now or "").split("|")[0]
                self.lost = f"router {holder} holds it now" if holder else "its lease expired"
        if self.lost is not None:
            raise LeaseLost(f"this router lost the lease of model {self.model!r} "
                            f"(token {self.token}): {self.lost}")

    def release(self) -> None:
        self._keeper.kill(block=False)
        if self.lost is None:
            try:
                self.store.release(self.key, self.value)
            except StoreDown:
                pass   # it expires
