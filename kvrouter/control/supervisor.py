"""supervisord control: XML-RPC over its unix socket (standard library only), start and update."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import xmlrpc.client
from urllib.parse import quote

from kvrouter.errors import KvrouterError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float):
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host):
        return _UnixConnection(self._path, self._timeout)


class _TcpTransport(xmlrpc.client.Transport):
    """HTTP with a timeout (the standard transport has none)."""

    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


class Supervisor:
    """A running supervisord, reached through its unix socket, or over TCP
    (``inet_http_server``) when ``socket_path`` is an ``http://HOST:PORT`` URL; ``username``
    and ``password`` are its credentials."""

    def __init__(self, socket_path: str, timeout: float = 10.0, username: str = "",
                 password: str = ""):
        self.socket_path = socket_path
        if socket_path.startswith("http://"):
            hostport = socket_path[len("http://"):].rstrip("/")
            auth = f"{quote(username, safe='')}:{quote(password, safe='')}@" if username else ""
            self._proxy = xmlrpc.client.ServerProxy(
                f"http://{auth}{hostport}/RPC2", transport=_TcpTransport(timeout),
                allow_none=True)
        else:
            self._proxy = xmlrpc.client.ServerProxy(
                "http://localhost", transport=_UnixTransport(socket_path, timeout),
                allow_none=True)

    @property
    def rpc(self):
        return self._proxy.supervisor

    def is_running(self) -> bool:
        try:
            return self.rpc.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def process_info(self, name: str) -> dict:
        return self.rpc.getProcessInfo(name)

    def all_processes(self) -> list:
        return self.rpc.getAllProcessInfo()

    def start(self, name: str, wait: bool = True) -> bool:
        return self.rpc.startProcess(name, wait)

    def stop(self, name: str, wait: bool = True) -> bool:
        return self.rpc.stopProcess(name, wait)

    def shutdown(self, timeout: float = 90.0) -> None:
        """Ask supervisord to exit and wait until its process is gone (the XML-RPC call
        returns before it has stopped its programs and exited)."""
        try:
            pid = self.rpc.getPID()
            self.rpc.shutdown()
        except (OSError, xmlrpc.client.Error):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.05)


def supervisorctl(conf: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf, *args],
                          capture_output=True, text=True, check=check)


def ensure_supervisord(conf: str, socket_path: str, timeout: float = 20.0) -> str:
    """Start supervisord with ``conf``, or reread+update a running one. Returns what it did."""
    sup = Supervisor(socket_path)
    if sup.is_running():
        out = supervisorctl(conf, "update", check=False)
        if out.returncode not in (0,):
            raise KvrouterError(f"supervisorctl update failed: {out.stdout}{out.stderr}".strip())
        return "updated"
    os.makedirs(os.path.dirname(socket_path), exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", conf],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise KvrouterError(f"supervisord failed to start: {proc.stdout}{proc.stderr}".strip())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sup.is_running():
            return "started"
        time.sleep(0.05)
    raise KvrouterError(f"supervisord did not answer on {socket_path} within {timeout:g}s")
