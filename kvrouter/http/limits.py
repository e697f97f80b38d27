"""What clients may take of the server: per-connection limits and the body budget shared by
all connections."""
from __future__ import annotations

import resource
from typing import Optional

from kvrouter.errors import ServiceUnavailable


def default_max_connections(reserve: int = 64) -> int:
    """Client connections that fit the descriptor limit: each may need a second descriptor
    for its engine connection, and a few are kept for logs, probes and the listener."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - reserve) // 2)


class ServerLimits:
    """What one client may take. ``header_timeout`` bounds the whole header block (not each
    read: a byte every few seconds does not keep a connection); ``max_pipeline_bytes`` is
    what a client may send while its request is served; ``max_pending_body_bytes`` bounds
    the request bodies being received by all connections together."""

    def __init__(self, max_header_bytes: int = 64 * 1024, max_body_bytes: int = 32 * 1024 * 1024,
                 keepalive_timeout: float = 75.0, header_timeout: float = 30.0,
                 write_timeout: float = 120.0, max_pipeline_bytes: int = 1024 * 1024,
                 max_connections: Optional[int] = None,
                 max_pending_body_bytes: Optional[int] = None,
                 max_connections_per_client: Optional[int] = None,
                 trusted_clients: frozenset = frozenset()):
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.max_pipeline_bytes = max_pipeline_bytes
        self.max_connections = max_connections or default_max_connections()
        self.max_pending_body_bytes = max_pending_body_bytes or max(
            4 * max_body_bytes, 256 * 1024 * 1024)
        # one client address may hold this many connections at once (a fair share: an
        # eighth of them, at least 64); the addresses in trusted_clients (proxies in front
        # of the router, which carry many clients) are not capped
        self.max_connections_per_client = max_connections_per_client or \
            fair_share(self.max_connections)
        self.trusted_clients = trusted_clients
        self.keep_alive = True   # False while the server drains: each response closes


def fair_share(max_connections: int) -> int:
    return max(64, max_connections // 8)


class BodyBudget:
    """Bytes of request bodies being received, all connections together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise ServiceUnavailable("the server is receiving too many request bodies; retry",
                                     code="server_busy", headers={"Retry-After": "1"})
        self.used += n
