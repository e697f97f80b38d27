"""The shared state in Redis (or Valkey): keys, channels and the atomic scripts.

Every call fails fast (short timeouts, no retries) with ``StoreDown``: a router whose Redis
is gone keeps serving on its own state (``member.py`` decides what it then may not do).

Keys (``P`` = cluster.key_prefix):
  P:states           hash, model -> its last published state (JSON, with the lease token)
  P:lease:MODEL      "ROUTER|TOKEN" while a router wakes or sleeps the model (expires)
  P:fence            the lease token counter (only grows; fencing)
  P:leader           the router that makes the sleep decisions (expires)
  P:router:ID        a router's heartbeat: in-flight, waiting, acks per model (expires)
  P:resp:ID          /v1/responses id -> model
Channels: P:ch:KIND:ROUTER, KIND one of states (state changes), beats (heartbeats),
records (finished requests); a router subscribes to P:ch:* and skips its own unread.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar

T = TypeVar("T")
RESPONSE_TTL_SECONDS = 7 * 24 * 3600

# the model's lease: free -> taken with the next token; returns the token, or 0 when held
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. t, 'PX', ARGV[2])
return t
"""
# keep a lease (or the leader's) while its value is still ours
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""
# a state change, unless a holder of a newer lease wrote one already; then published
_PUT_STATE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  -- a record that is not a well-formed state is overwritten (repaired), never trusted
  local fence = ok and type(doc) == 'table' and tonumber(doc['fence'])
  if fence and fence > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""
# after Redis lost its data: the token counter never goes below what routers have seen
_FENCE_FLOOR = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


class StoreDown(Exception):
    """Redis did not answer (down, unreachable, loading)."""


class Store:
    def __init__(self, url: str, prefix: str, timeout: float = 0.5):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: Tuple[Type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        options = dict(socket_connect_timeout=timeout, socket_timeout=timeout,
                       retry=Retry(NoBackoff(), 0), decode_responses=True)
        self.r = redis.Redis.from_url(url, **options)
        # pub/sub waits longer than a command for its messages
        self.sub_client = redis.Redis.from_url(url, **dict(options, socket_timeout=None))
        self.prefix = prefix
        self._acquire = self.r.register_script(_ACQUIRE)
        self._renew = self.r.register_script(_RENEW)
        self._release = self.r.register_script(_RELEASE)
        self._put_state = self.r.register_script(_PUT_STATE)
        self._fence_floor = self.r.register_script(_FENCE_FLOOR)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    def _do(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as err:   # connection, timeout, loading, READONLY, ...
            raise StoreDown(f"{type(err).__name__}: {err}") from None

    # --- leases -----------------------------------------------------------------------------
    def acquire(self, name: str, holder: str, seconds: float) -> int:
        return int(self._do(lambda: self._acquire(
            keys=[self.key("lease", name), self.key("fence")],
            args=[holder, int(seconds * 1000)])))

    def renew(self, key: str, value: str, seconds: float) -> bool:
        return bool(self._do(lambda: self._renew(keys=[key], args=[value, int(seconds * 1000)])))

    def release(self, key: str, value: str) -> bool:
        return bool(self._do(lambda: self._release(keys=[key], args=[value])))

    def get(self, key: str) -> Optional[str]:
        return self._text(self._do(lambda: self.r.get(key)))

    @staticmethod
    def _text(value: Any) -> Optional[str]:
        return None if value is None else str(value)

    def exists(self, key: str) -> bool:
        return bool(self._do(lambda: self.r.exists(key)))

    def take(self, key: str, value: str, seconds: float) -> bool:
        """SET NX with an expiry (the leader's lease)."""
        return bool(self._do(lambda: self.r.set(key, value, nx=True, px=int(seconds * 1000))))

    def fence_floor(self, floor: int) -> None:
        self._do(lambda: self._fence_floor(keys=[self.key("fence")], args=[floor]))

    # --- states, heartbeats, records ----------------------------------------------------------
    def channel(self, kind: str, router_id: str) -> str:
        return self.key("ch", kind, router_id)

    def put_state(self, model: str, fence: int, doc: Dict[str, Any]) -> bool:
        text = json.dumps(doc, separators=(",", ":"))
        return bool(self._do(lambda: self._put_state(
            keys=[self.key("states"), self.channel("states", doc["router"])],
            args=[model, fence, text])))

    def states(self) -> Dict[str, dict]:
        raw = self._do(lambda: self.r.hgetall(self.key("states")))
        out: Dict[str, dict] = {}
        for model, text in raw.items():
            try:
                out[str(model)] = json.loads(text)
            except ValueError:
                continue
        return out

    def beat(self, router_id: str, doc: Dict[str, Any], ttl: float) -> None:
        text = json.dumps(doc, separators=(",", ":"))

        def send():
            pipe = self.r.pipeline(transaction=False)
            pipe.set(self.key("router", router_id), text, px=int(ttl * 1000))
            pipe.publish(self.channel("beats", router_id), text)
            pipe.execute()

        self._do(send)

    def router(self, router_id: str) -> Optional[Any]:
        """The live heartbeat under ``router_id`` (decoded JSON, unchecked), or None."""
        text = self._do(lambda: self.r.get(self.key("router", router_id)))
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def routers(self) -> List[dict]:
        """Every router's last heartbeat that has not expired."""
        def read():
            keys = list(self.r.scan_iter(match=self.key("router", "*"), count=100))
            return self.r.mget(keys) if keys else []

        out = []
        for text in self._do(read):
            if text:
                try:
                    out.append(json.loads(text))
                except ValueError:
                    continue
        return out

    def publish_text(self, kind: str, router_id: str, text: str) -> None:
        """Publish a message encoded already (JSON)."""
        self._do(lambda: self.r.publish(self.channel(kind, router_id), text))

    def remember_response(self, response_id: str, model: str) -> None:
        self._do(lambda: self.r.set(self.key("resp", response_id), model,
                                    ex=RESPONSE_TTL_SECONDS))

    def response_model(self, response_id: str) -> Optional[str]:
        return self._text(self._do(lambda: self.r.get(self.key("resp", response_id))))

    def forget(self, router_id: str) -> None:
        """A router leaves: its heartbeat goes now rather than at its expiry."""
        self._do(lambda: self.r.delete(self.key("router", router_id)))

    def subscribe(self) -> "Subscription":
        """Every router's messages (P:ch:*)."""
        return Subscription(self)

    def ping(self) -> bool:
        return bool(self._do(self.r.ping))


class Subscription:
    """The routers' pub/sub messages (errors are StoreDown)."""

    def __init__(self, store: Store):
        self.store = store
        self.prefix = store.key("ch") + ":"
        self.pubsub = store._do(lambda: store.sub_client.pubsub(ignore_subscribe_messages=True))
        store._do(lambda: self.pubsub.psubscribe(self.prefix + "*"))

    def next(self, timeout: float) -> Optional[Tuple[str, str, str]]:
        """(kind, sending router, data) of the next message, or None after ``timeout``."""
        msg = self.store._do(lambda: self.pubsub.get_message(timeout=timeout))
        if msg is None or msg.get("type") not in ("message", "pmessage"):
            return None
        kind, _, sender = str(msg["channel"])[len(self.prefix):].partition(":")
        return kind, sender, str(msg["data"])

    def close(self) -> None:
        try:
            self.store._do(self.pubsub.close)
        except StoreDown:
            pass
