"""The router's listening side, the same for the single process, the owner and each worker:
its HTTP server (limits from the config, the API key checked on the headers), the
SO_REUSEPORT listener workers share, and the header a worker proves itself to the owner
with."""
from __future__ import annotations

import socket
from typing import Callable, Optional

from kvrouter.config.schema import Config
from kvrouter.errors import ApiError, PayloadTooLarge
from kvrouter.http.limits import ServerLimits, fair_share
from kvrouter.http.multipart import is_multipart
from kvrouter.http.server import HTTPServer
from kvrouter.router.auth import require_client_key
from kvrouter.router.errors import anthropic_path
from kvrouter.router.routes import client_route, streamed_body
from kvrouter.router.uploads import too_large

SECRET_HEADER = "x-kvrouter-owner-secret"


def apply_limits(limits: ServerLimits, cfg: Config) -> None:
    r = cfg.router
    limits.max_body_bytes = int(r.max_body_mb * 1024 * 1024)
    limits.write_timeout = r.stream_idle_timeout_seconds
    limits.header_timeout = r.header_timeout_seconds
    limits.keepalive_timeout = r.keepalive_timeout_seconds
    limits.max_connections_per_client = r.max_connections_per_client or \
        fair_share(limits.max_connections)
    limits.trusted_clients = frozenset(r.trusted_proxies)


def too_large_upload(length: Optional[str], max_bytes: int) -> Optional[PayloadTooLarge]:
    """The 413 for an upload whose Content-Length passes ``max_bytes``, else None."""
    try:
        n = int(length) if length is not None else 0
    except ValueError:
        return None
    return too_large(n, max_bytes) if n > max_bytes else None


def router_http_server(listener, handler, get_cfg: Callable[[], Config]) -> HTTPServer:
    """The router's HTTP server (the single process, the owner, each worker): its limits
    from the config, the API key checked on the headers, so an unauthenticated body is
    never read (``get_cfg``: the config in force, which a reload replaces)."""
    cfg = get_cfg()
    limits = ServerLimits(max_connections=cfg.router.max_connections)
    apply_limits(limits, cfg)

    def precheck(req) -> None:
        r = get_cfg().router
        if r.api_keys and client_route(req.path):
            try:
                require_client_key(req.headers, r.api_keys)
            except ApiError as refused:
                raise refused.for_anthropic() if anthropic_path(req.path) else refused
        if is_multipart(req.headers):   # an upload too big is refused before it is read
            err = too_large_upload(req.headers.get("content-length"),
                                   int(r.max_upload_mb * 1024 * 1024))
            if err is not None:
                raise err

    return HTTPServer(listener, handler, limits, precheck=precheck, stream_body=streamed_body)


def reuseport_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
