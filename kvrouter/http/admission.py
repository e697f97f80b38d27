"""Who gets in: the accept loop that survives running out of descriptors, and one client
address's share of the connections (``router.max_connections_per_client``)."""
from __future__ import annotations

import errno
import logging
import resource
from typing import Callable, Dict

from gevent.server import StreamServer

from kvrouter.http.limits import ServerLimits

log = logging.getLogger("kvrouter.http")

BUSY = (b'{"error": {"message": "too many connections from your address; close some or '
         b'retry", "type": "server_error", "param": null, "code": "too_many_connections"}}')
TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
             b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
             str(len(BUSY)).encode() + b"\r\n\r\n" + BUSY)

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class AcceptServer(StreamServer):
    """gevent's StreamServer, quiet when accept() runs out of descriptors: one warning line
    (at most every 10 s, with a count) and accepting pauses with backoff, as nginx does."""

    _fd_delay = 0.0
    _fd_warned_at = -1e9
    _fd_errors = 0
    drain: Callable[[int], int] = staticmethod(lambda n: 0)

    def do_read(self):
        try:
            args = super().do_read()
        except OSError as err:
            if err.errno not in OUT_OF_DESCRIPTORS:
                raise
            self._out_of_descriptors(err)
            return None
        self._fd_delay = 0.0
        return args

    def _out_of_descriptors(self, err: OSError) -> None:
        self._fd_errors += 1
        now = self.loop.now()
        if now - self._fd_warned_at >= 10.0:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning("accept: %s (open files limit %d); pausing new connections "
                        "(%d such errors since the last warning)", err.strerror, soft,
                        self._fd_errors)
            self._fd_warned_at, self._fd_errors = now, 0
        if self.drain(8):
            self._fd_delay = 0.0  # descriptors were freed: accept again soon
        self._fd_delay = min(1.0, max(0.01, self._fd_delay * 2))
        self.stop_accepting()
        self._timer = self.loop.timer(self._fd_delay)
        self._timer.start(self._start_accepting_if_started)  # type: ignore[call-arg,attr-defined]


class ClientShares:
    """Connections per client address. An address holding its share is answered 503 at
    once, with one warning a minute (and how many were refused since the last one); the
    limits' trusted clients (proxies carrying many clients) are not capped."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.held: Dict[str, int] = {}   # client address -> connections it holds
        self.refused = 0
        self._warned_at = -1e9

    def admit(self, client: str) -> bool:
        held = self.held.get(client, 0)
        if held >= self.limits.max_connections_per_client and \
                client not in self.limits.trusted_clients:
            return False
        self.held[client] = held + 1
        return True

    def release(self, client: str) -> None:
        left = self.held.get(client, 1) - 1
        if left > 0:
            self.held[client] = left
        else:
            self.held.pop(client, None)

    def refuse(self, sock, client: str, now: float) -> None:
        self.refused += 1
        if now - self._warned_at >= 60.0:
            log.warning("client %s holds %d connections (router.max_connections_per_client); "
                        "refusing more from it (%d refused since the last warning; list a "
                        "proxy in router.trusted_proxies)", client,
                        self.limits.max_connections_per_client, self.refused)
            self._warned_at, self.refused = now, 0
        for close in (lambda: sock.sendall(TOO_MANY), sock.close):
            try:
                close()
            except OSError:
                pass
