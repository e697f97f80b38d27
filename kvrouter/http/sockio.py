"""Socket and descriptor helpers shared by the server, the upstream client and the sim."""
import logging
import resource
import socket
from typing import Optional

import gevent
from gevent.socket import socket as _GeventSocket

log = logging.getLogger("kvrouter.http")
NOFILE_CAP = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (capped at 1,048,576, as the seed
    does); systemd user services start with 1,024, about 500 concurrent streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, err)
    return soft


def send_all(sock, data, seconds: Optional[float] = None) -> None:
    """Like ``sendall`` but one plain ``send`` in the common case.

    gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call (one more
    syscall per response); a small response fits the socket buffer at once.
    ``seconds``: how long to wait for the peer to take what does not fit (the socket's
    timeout is set to it only then: a gevent ``settimeout`` per response and per request
    sent on costs more than the send that needs none).
    """
    if seconds is not None:
        if not isinstance(sock, _GeventSocket):
            sock.settimeout(seconds)
        else:
            try:
                sent = sock.send(data, 0, 0.0)   # type: ignore[call-arg]  # gevent's: never wait
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                sock.settimeout(seconds)
                sock.sendall(memoryview(data)[sent:])
            return
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


class Deadline:
    """Times out a blocking read: ``recv(sock, n, seconds)`` raises ``socket.timeout`` when
    nothing came within ``seconds``. One libev timer, re-armed per read, for a connection's
    reads of one length (keep-alive, first byte, between body pieces); a socket timeout
    builds a new ``gevent.Timeout``, a watcher and an exception, at every read that waits,
    6% of the router's time under load. A plain socket (no hub runs to time it, e.g. the
    client in a test without gevent), or no time at all, is the socket's own timeout.

    ``wait``: nothing can have come yet (the next request on a keep-alive connection, the
    engine's answer to what was just sent): wait for the socket to turn readable, then
    read. gevent's ``recv`` reads first, and a read that finds nothing costs a syscall and
    an exception before it waits (two per proxied request: 5-8% of the router's time)."""

    __slots__ = ("_loop", "_timer", "_seconds")

    def __init__(self, loop=None):
        self._loop = loop   # (the hub's, when first needed)
        self._timer = None
        self._seconds = -1.0

    def recv(self, sock, n: int, seconds: float, wait: bool = False) -> bytes:
        if seconds <= 0 or not isinstance(sock, _GeventSocket):
            sock.settimeout(seconds)
            return sock.recv(n)
        if sock.timeout is not None:
            sock.settimeout(None)
        timer = self._timer
        if timer is None or seconds != self._seconds:
            if timer is not None:
                timer.close()
            if self._loop is None:
                self._loop = gevent.get_hub().loop
            timer = self._timer = self._loop.timer(seconds, seconds)
            self._seconds = seconds
        timer.again(_time_out, gevent.getcurrent())
        try:
            if wait:
                event = sock._read_event   # type: ignore[attr-defined]  # None once closed
                if event is not None:
                    sock._wait(event)   # type: ignore[attr-defined]
            return sock.recv(n)
        finally:
            timer.stop()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None


def _time_out(glet) -> None:
    glet.throw(socket.timeout("timed out"))
