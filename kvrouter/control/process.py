"""Process control behind one small interface: supervisord (XML-RPC), systemd --user, or none.

The router finds supervisord through ``SUPERVISOR_SERVER_URL``, which
supervisord sets for the programs it runs (``unix:///path/supervisor.sock``).
"""
from __future__ import annotations

import logging
import os
import subprocess
import xmlrpc.client
from typing import Dict, Mapping, Optional

from kvrouter.config.schema import Config, Instance
from kvrouter.control.supervisor import Supervisor

log = logging.getLogger("kvrouter.process")


LOG_TAIL_BYTES = 16384


class ProcessControlError(Exception):
    pass


class ProcessControl:
    """Start and stop engine processes. ``available`` is False when nothing can be done."""

    available = False
    kind = "none"

    def start(self, inst: Instance) -> None:
        raise ProcessControlError("no process manager: run the router under supervisord or "
                                  "systemd to stop and start engines")

    def stop(self, inst: Instance) -> None:
        self.start(inst)

    def restart(self, inst: Instance) -> None:
        self.stop(inst)
        self.start(inst)

    def renew(self, inst: Instance) -> None:
        """Restart the engine with the process manager's current definition of it (a
        changed command line or environment that ``kvrouter render`` wrote)."""
        self.restart(inst)

    def is_running(self, inst: Instance) -> Optional[bool]:
        """Whether the process manager runs (or is starting) the engine; None: cannot say."""
        return None

    def pid(self, inst: Instance) -> Optional[int]:
        """The engine's main process id, when the process manager knows it."""
        return None

    def log_tail(self, program: str, unit: str, nbytes: int = LOG_TAIL_BYTES) -> str:
        """The end of a program's log (supervisord program ``program``, systemd ``unit``)."""
        raise ProcessControlError("no process manager: logs are wherever the router and "
                                  "engines were started")

    def can_control(self, inst: Instance) -> bool:
        """Whether this can start and stop ``inst``'s engine (deep sleep, restarts)."""
        return self.available


class SupervisorControl(ProcessControl):
    available = True
    kind = "supervisord"

    def __init__(self, socket_path: str, username: str = "", password: str = ""):
        self.sup = Supervisor(socket_path, timeout=30.0, username=username, password=password)

    def _call(self, verb: str, inst: Instance, harmless_fault: str, wait: bool) -> None:
        name = inst.supervisor_name
        try:
            getattr(self.sup, verb)(name, wait=wait)
        except xmlrpc.client.Fault as err:
            if harmless_fault not in err.faultString:
                raise ProcessControlError(f"supervisord {verb} {name}: {err.faultString}") \
                    from None
        except OSError as err:
            raise ProcessControlError(f"supervisord unreachable: {err}") from None

    def start(self, inst: Instance) -> None:
        self._call("start", inst, "ALREADY_STARTED", wait=False)

    def is_running(self, inst: Instance) -> Optional[bool]:
        try:
            state = self.sup.process_info(inst.supervisor_name)["statename"]
        except (OSError, xmlrpc.client.Error, KeyError, TypeError):
            return None
        if state in ("STOPPED", "EXITED", "FATAL"):
            return False
        return True  # STARTING, RUNNING, BACKOFF (it retries), STOPPING

    def pid(self, inst: Instance) -> Optional[int]:
        try:
            return int(self.sup.process_info(inst.supervisor_name)["pid"]) or None
        except (OSError, xmlrpc.client.Error, KeyError, TypeError, ValueError):
            return None

    def stop(self, inst: Instance) -> None:
        self._call("stop", inst, "NOT_RUNNING", wait=True)

    def renew(self, inst: Instance) -> None:
        """What ``supervisorctl reread`` then ``update NAME`` do: read the config file again
        and, when the program changed, stop it and add it back (autostart starts it)."""
        name = inst.supervisor_name
        try:
            _added, changed, _removed = self.sup.rpc.reloadConfig()[0]
            if name not in changed:
                self.restart(inst)
                return
            self.stop(inst)
            self.sup.rpc.removeProcessGroup(name)
            self.sup.rpc.addProcessGroup(name)
        except xmlrpc.client.Fault as err:
            raise ProcessControlError(f"supervisord update {name}: {err.faultString}") from None
        except OSError as err:
            raise ProcessControlError(f"supervisord unreachable: {err}") from None

    def log_tail(self, program: str, unit: str, nbytes: int = LOG_TAIL_BYTES) -> str:
        try:
            text, _, _ = self.sup.rpc.tailProcessStdoutLog(program, 0, nbytes)
        except xmlrpc.client.Fault as err:
            raise ProcessControlError(f"supervisord log of {program}: {err.faultString}") \
                from None
        except OSError as err:
            raise ProcessControlError(f"supervisord unreachable: {err}") from None
        return text


class SystemdControl(ProcessControl):
    available = True
    kind = "systemd"

    def _run(self, verb: str, inst: Instance) -> None:
        try:
            out = subprocess.run(["systemctl", "--user", verb, "--no-block", inst.unit_name],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ProcessControlError(f"systemctl --user {verb}: {err}") from None
        if out.returncode != 0:
            raise ProcessControlError(f"systemctl --user {verb} {inst.unit_name}: "
                                      f"{out.stderr.strip()}")

    def start(self, inst: Instance) -> None:
        self._run("start", inst)

    def is_running(self, inst: Instance) -> Optional[bool]:
        try:
            out = subprocess.run(["systemctl", "--user", "is-active", inst.unit_name],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        state = out.stdout.strip()
        if state in ("inactive", "failed"):
            return False
        if state in ("active", "activating", "reloading", "deactivating"):
            return True
        return None

    def pid(self, inst: Instance) -> Optional[int]:
        try:
            out = subprocess.run(["systemctl", "--user", "show", "-p", "MainPID", "--value",
                                  inst.unit_name], capture_output=True, text=True, timeout=10)
            return int(out.stdout.strip() or 0) or None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return None

    def stop(self, inst: Instance) -> None:
        self._run("stop", inst)

    def renew(self, inst: Instance) -> None:
        try:
            subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True,
                           timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ProcessControlError(f"systemctl --user daemon-reload: {err}") from None
        self._run("restart", inst)

    def log_tail(self, program: str, unit: str, nbytes: int = LOG_TAIL_BYTES) -> str:
        try:
            out = subprocess.run(["journalctl", "--user-unit", unit, "-n", "200", "-o", "cat",
                                  "--no-pager"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ProcessControlError(f"journalctl --user-unit {unit}: {err}") from None
        if out.returncode != 0:
            raise ProcessControlError(f"journalctl --user-unit {unit}: {out.stderr.strip()}")
        return out.stdout[-nbytes:]


class HostsControl(ProcessControl):
    """Engines on several hosts (cluster.hosts): this host's through its own process
    manager, another host's through that host's supervisord over TCP (``inet_http_server``
    with the cluster's credentials), never a shell over ssh."""

    available = True

    def __init__(self, cfg: Config, local: ProcessControl):
        self.local = local
        self.kind = local.kind
        self.by_host: Dict[str, ProcessControl] = {}
        cl = cfg.cluster
        for h in cl.hosts:
            if h.name == cfg.node and local.available:
                self.by_host[h.name] = local
            elif h.supervisor_url and cfg.process_manager == "supervisord":
                self.by_host[h.name] = SupervisorControl(
                    h.supervisor_url, cl.supervisor_username or "", cl.supervisor_password or "")
            else:
                self.by_host[h.name] = _Unreachable(h.name)

    def _for(self, inst: Instance) -> ProcessControl:
        return self.by_host.get(inst.host or "", self.local)

    def can_control(self, inst: Instance) -> bool:
        return self._for(inst).available

    def start(self, inst: Instance) -> None:
        self._for(inst).start(inst)

    def stop(self, inst: Instance) -> None:
        self._for(inst).stop(inst)

    def restart(self, inst: Instance) -> None:
        self._for(inst).restart(inst)

    def renew(self, inst: Instance) -> None:
        self._for(inst).renew(inst)

    def is_running(self, inst: Instance) -> Optional[bool]:
        return self._for(inst).is_running(inst)

    def pid(self, inst: Instance) -> Optional[int]:
        return self._for(inst).pid(inst) if self._for(inst) is self.local else None

    def log_tail(self, program: str, unit: str, nbytes: int = LOG_TAIL_BYTES) -> str:
        return self.local.log_tail(program, unit, nbytes)


class _Unreachable(ProcessControl):
    def __init__(self, host: str):
        self.host = host

    def start(self, inst: Instance) -> None:
        raise ProcessControlError(f"the engine runs on host {self.host!r}, whose process "
                                  "manager this router cannot reach (give that host a "
                                  "supervisor_port in cluster.hosts)")


def process_control_for(cfg: Config,
                        environ: Optional[Mapping[str, str]] = None) -> ProcessControl:
    local = _local_control(cfg, environ)
    return HostsControl(cfg, local) if cfg.cluster.hosts else local


def _local_control(cfg: Config, environ: Optional[Mapping[str, str]]) -> ProcessControl:
    environ = os.environ if environ is None else environ
    if cfg.process_manager == "systemd":
        return SystemdControl()
    url = environ.get("SUPERVISOR_SERVER_URL", "")
    if url.startswith("unix://"):
        return SupervisorControl(url[len("unix://"):])
    log.warning("not running under supervisord (no SUPERVISOR_SERVER_URL): deep sleep and "
                "restarts are disabled")
    return ProcessControl()
