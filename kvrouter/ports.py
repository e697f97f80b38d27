"""Is a TCP port free, and if not, who holds it (standard library only, Linux /proc).

Used before anything is started (``render --apply``) and when the router cannot listen,
so the message names the port, the program in the way and the key to change."""
from __future__ import annotations

import errno
import os
import socket
from typing import Optional

EXIT_NO_PORT = 2    # a router that cannot start (its port taken, its cluster id in use): a
#                     restart would fail the same way


def in_use(host: str, port: int, reuseport: bool = False) -> bool:
    """Whether binding ``host:port`` fails because something else holds it (``reuseport``:
    as a router worker binds, so other SO_REUSEPORT listeners of this user do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def _listening_inodes(port: int) -> set:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and \
                            int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    return inodes


def holder(port: int) -> Optional[str]:
    """``"pid 123 (nginx)"`` for the process listening on ``port``, when /proc tells."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode(errors="replace") for a in argv[:4] if a)
        return f"pid {pid} ({cmd[:80]})"
    return "a process this user cannot see"


def describe(host: str, port: int) -> str:
    """``127.0.0.1:8080 is in use by pid 123 (nginx)``."""
    who = holder(port)
    return f"{host}:{port} is in use" + (f" by {who}" if who else "")


def cannot_listen(host: str, port: int, err: OSError, source: str) -> str:
    """The router's one line when it cannot listen: where, why, what to change."""
    why = describe(host, port) if err.errno == errno.EADDRINUSE else \
        f"{host}:{port}: {err.strerror}"
    return (f"cannot listen on {host}:{port}: {why}. Set router.router_port (or "
            f"router_host) in {source}, or `kvrouter serve --port N`, or stop that program")
