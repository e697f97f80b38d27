"""Bring a running stack to what ``kvrouter render`` wrote (``render --apply``): start
supervisord or update it, or install the systemd user units; never cut a request on the way
(ports are checked before anything starts, engines whose command line changed are drained
by the router before they restart, and the router re-reads its YAML by a reload)."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from typing import Callable, Iterable, List

from kvrouter.config.schema import Config
from kvrouter.errors import KvrouterError

Echo = Callable[..., None]
UNIT_DIR = os.path.join("~", ".config", "systemd", "user")


def config_changed(source: str, digest_path: str) -> bool:
    """Whether the YAML differs from the one of the last render (and remember this one)."""
    with open(source, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    try:
        with open(digest_path, encoding="utf-8") as fh:
            before = fh.read().strip()
    except OSError:
        before = ""
    os.makedirs(os.path.dirname(digest_path), exist_ok=True)
    with open(digest_path, "w", encoding="utf-8") as fh:
        fh.write(digest + "\n")
    return before != digest


def apply_supervisord(cfg: Config, out_abs: str, sock: str, changed: bool, echo: Echo) -> None:
    from kvrouter.control.supervisor import Supervisor, ensure_supervisord, supervisorctl

    conf = os.path.join(out_abs, "supervisord.conf")
    if not Supervisor(sock).is_running():
        refuse_busy_ports(cfg)
    else:
        out = supervisorctl(conf, "reread", check=False).stdout
        renew_engines(cfg, [i for i in cfg.instances if f"{i.program_name}: changed"
                            in out.splitlines()], "supervisord", echo)
    what = ensure_supervisord(conf, sock)
    echo(f"supervisord {what} ({sock}): it runs every engine and the router; "
         "`supervisorctl start all` starts any of them that was stopped (never a benchmark "
         "client: `kvrouter bench start`)")
    if what == "updated" and changed and cfg.router.enable_router:
        # the router reads the YAML itself: an edit reaches it by a reload (SIGHUP)
        res = supervisorctl(conf, "signal", "HUP", "kvrouter", check=False)
        echo("router reloaded its config" if res.returncode == 0 else
             f"could not signal the router: {(res.stdout + res.stderr).strip()}")


def _systemctl(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KvrouterError(f"systemctl --user {' '.join(args)}: {err}") from None


def apply_systemd(cfg: Config, out_abs: str, touched: Iterable[str], changed: bool,
                  echo: Echo) -> None:
    """``process_manager: systemd``: the units go to ~/.config/systemd/user and systemd
    reloads them; supervisord is never started. Running engines whose unit changed are
    drained, then restarted; a running router reloads the YAML."""
    unit_dir = os.path.expanduser(UNIT_DIR)
    os.makedirs(unit_dir, exist_ok=True)
    changed_units, new_units = set(), set()
    for path in sorted(glob.glob(os.path.join(out_abs, "systemd", "*"))):
        name = os.path.basename(path)
        dest = os.path.join(unit_dir, name)
        with open(path, "rb") as fh:
            text = fh.read()
        try:
            with open(dest, "rb") as fh:
                if fh.read() == text:
                    continue
            changed_units.add(name)
        except FileNotFoundError:
            new_units.add(name)
        shutil.copyfile(path, dest)
    for rel in touched:   # units a render removed leave the unit folder too
        name = os.path.basename(rel)
        if rel.startswith("systemd/") and not os.path.exists(os.path.join(out_abs, rel)):
            try:
                os.remove(os.path.join(unit_dir, name))
            except FileNotFoundError:
                pass
    reload = _systemctl("daemon-reload")
    if reload.returncode != 0:
        raise KvrouterError("systemctl --user daemon-reload failed: "
                            f"{(reload.stdout + reload.stderr).strip()} (is a user manager "
                            "running? `systemctl --user status`)")
    echo(f"installed the units in {unit_dir} and reloaded systemd: `systemctl --user start "
         "kvrouter` starts the router and every engine")
    active = _systemctl("is-active", "kvrouter.service").stdout.strip() == "active"
    renew_engines(cfg, [i for i in cfg.instances if i.unit_name in changed_units and
                        _systemctl("is-active", i.unit_name).stdout.strip() == "active"],
                  "systemd", echo)
    added = sorted(u for u in new_units if u.startswith("kvrouter-engine-"))
    if active and added:   # an engine added to a running stack starts with it
        res = _systemctl("start", *added)
        echo(f"started {', '.join(added)}" if res.returncode == 0 else
             f"could not start {', '.join(added)}: {(res.stdout + res.stderr).strip()}")
    if active and changed and cfg.router.enable_router:
        res = _systemctl("reload", "kvrouter.service")
        echo("router reloaded its config" if res.returncode == 0 else
             f"could not reload the router: {(res.stdout + res.stderr).strip()}")


def renew_engines(cfg: Config, instances: List, manager: str, echo: Echo) -> None:
    """Engines whose command line changed are restarted by the router, one at a time, after
    it has drained them (no stream in flight is cut). Without a router that answers, the
    process manager restarts them as it would (supervisord's update at once; systemd not
    until they are restarted)."""
    from kvrouter import admin

    for inst in instances:
        if not cfg.router.enable_router:
            break
        echo(f"{inst.name}: command line changed: draining {inst.key}, then restarting it")
        try:   # one engine at a time: a model's other replicas keep serving
            code, body = admin.call(cfg, "POST", admin.model_path("/model/restart", inst.key))
        except KvrouterError as err:
            echo(f"{inst.name}: the router did not answer ({err}); {manager} applies the "
                 "change", err=True)
            continue
        if code == 200:
            echo(f"{inst.name}: restarted with its new command line")
        else:
            echo(f"{inst.name}: the router could not restart it "
                 f"({body.get('error', {}).get('message', code)}); {manager} applies the "
                 "change", err=True)


def refuse_busy_ports(cfg: Config) -> None:
    """Before supervisord starts anything: every port the router and the engines will listen
    on must be free, or the error says which, who holds it, and which key to change."""
    from kvrouter import ports

    busy = []
    r = cfg.router
    if r.enable_router and ports.in_use(r.router_host, r.router_port):
        busy.append(f"router: {ports.describe(r.router_host, r.router_port)}; set "
                    f"router.router_port in {cfg.source} (and use that port in your URLs)")
    for inst in cfg.instances:
        host = "127.0.0.1" if inst.listen_host in ("localhost", "") else inst.listen_host
        if ports.in_use(host, inst.port):
            busy.append(f"instance {inst.name}: {ports.describe(host, inst.port)}; change "
                        f"its --port in engine_args in {cfg.source}")
    if busy:
        hint = ""
        if shutil.which("systemctl") and _systemctl("is-active", "kvrouter.service"
                                                    ).stdout.strip() == "active":
            hint = ("\nkvrouter runs under systemd here: set process_manager: systemd in "
                    f"{cfg.source}, and `make render` installs the units instead of starting "
                    "supervisord")
        raise KvrouterError("cannot start: ports in use (stop the program holding each, or "
                            "change the config):\n  " + "\n  ".join(busy) + hint)
