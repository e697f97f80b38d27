"""Compile a Config into supervisord and systemd files (text only; writing is in ``files.py``)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import resource
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import jinja2

from kvrouter import __version__
from kvrouter.config.schema import BenchClient, Config
from kvrouter.errors import RenderError
from kvrouter.render.argv import Interpreters, bench_argv, engine_argv, router_argv, router_url
from kvrouter.render.quoting import (
    supervisor_command,
    supervisor_environment,
    supervisor_value,
    systemd_environment,
    systemd_exec,
)

# systemd's own default PATH for services (systemd.exec(5)): Environment= cannot extend it
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class RenderOptions:
    """Where the output goes and which interpreters run; fixed values make golden files stable."""

    out_dir: str
    interpreters: Interpreters = field(default_factory=Interpreters)
    user: Optional[str] = None  # supervisord drops privileges to this user when started as root
    # open files for supervisord (minfds) and the units (LimitNOFILE): this machine's hard
    # limit, at most 1,048,576 (a minfds above the hard limit keeps supervisord from starting)
    open_files: int = field(default_factory=lambda: hard_open_files_limit())


def hard_open_files_limit(cap: int = 1 << 20) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def bench_clients(cfg: Config) -> Tuple[BenchClient, ...]:
    """The configured benchmark clients, or (as the seed's benchmark.py) one per model. On
    several hosts, they run on the first host with a router, against that router."""
    routers = cfg.cluster.router_hosts
    if cfg.node is not None and (not routers or cfg.node != routers[0].name):
        return ()
    if cfg.benchmark.clients:
        return cfg.benchmark.clients
    return tuple(BenchClient(name=inst.name, model=inst.model) for inst in cfg.instances)


def templates_dir() -> str:
    """The templates folder: installed as ``kvrouter.templates``, else the source tree's."""
    spec = importlib.util.find_spec("kvrouter.templates")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "templates")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FILE_NAME = re.compile(r"^(systemd/)?[A-Za-z0-9][A-Za-z0-9_.@-]*$")


def _one_line(value: Any) -> Any:
    """Every value a template writes stays on its line: supervisord.conf and the units are
    line formats, and a newline in a value would start a section or a directive of its own.
    (The loader refuses such values with their location; this is the renderer's own guard.)"""
    if isinstance(value, str) and _CONTROL.search(value):
        raise RenderError(f"refusing to render a value with a control character: {value!r}")
    return value


def _templates_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False,
        finalize=_one_line)
    # supervisord expands %(name)s in values and systemd its %-specifiers: a literal % is %%
    env.filters["sv"] = lambda v: supervisor_value(str(v))
    # a program's log file name is expanded twice (supervisor/options.py: saneget, then
    # processes_from_section)
    env.filters["svlog"] = lambda v: supervisor_value(str(v)).replace("%", "%%")
    env.filters["sd"] = lambda v: str(v).replace("%", "%%")
    return env


def _checked_names(files: Dict[str, str]) -> Dict[str, str]:
    """A rendered file's name comes from a config name: it stays inside --out."""
    for rel in files:
        if not _FILE_NAME.match(rel):
            raise RenderError(f"refusing to write {rel!r}: a rendered file's name is letters, "
                              "digits, '.', '_', '@' and '-', inside the output folder")
    return files


def socket_path(out_dir: str) -> str:
    """supervisord's unix socket: in <out>/run, or a short /tmp path when that is too long."""
    path = os.path.join(out_dir, "run", "supervisor.sock")
    if len(path) < MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(out_dir.encode()).hexdigest()[:12]
    return f"/tmp/kvrouter-{digest}/supervisor.sock"


def compile_config(cfg: Config, opts: RenderOptions) -> Dict[str, str]:
    """Return ``{relative path: text}`` for every file kvrouter renders."""
    out = os.path.abspath(opts.out_dir)
    log_dir = cfg.log_dir or os.path.join(out, "logs")
    py = opts.interpreters
    delay = cfg.launch_delay_seconds
    engines: List[Dict[str, Any]] = []
    for i, inst in enumerate(cfg.instances):
        argv = engine_argv(inst, py)
        start_delay = round(delay * i, 3)
        sup_argv = argv
        if start_delay:
            sup_argv = ["/bin/sh", "-c", f'sleep {start_delay:g} && exec "$0" "$@"', *argv]
        where = f"{cfg.source}: instances[{i}].env: "
        # an activated venv, as the seed's `source venv/bin/activate`: tools the engine
        # looks up on PATH (ninja for JIT builds, triton's compilers) come from the venv
        venv = inst.venv_path if inst.using_venv else None
        variables = list(inst.env) + ([("VIRTUAL_ENV", venv)] if venv else [])
        sup_env = supervisor_environment(variables, where) if variables else ""
        if venv:  # supervisord expands %(ENV_PATH)s to its own PATH
            path = supervisor_environment([("PATH", f"{venv}/bin:")], where)
            sup_env += "," + path[:-1] + "%(ENV_PATH)s" + path[-1]
        sd_env = variables + ([("PATH", f"{venv}/bin:{SYSTEMD_DEFAULT_PATH}")] if venv else [])
        engines.append({
            "name": inst.name,
            "program": inst.program_name,
            "unit_stem": inst.unit_stem,
            "comment": f"{inst.model}, {inst.engine}, {inst.base_url}",
            "command": supervisor_command(sup_argv),
            "environment": sup_env,
            "priority": 100 + i,
            "startsecs": int(start_delay + 5),
            "delay": f"{start_delay:g}" if start_delay else "",
            "exec": systemd_exec(argv),
            "start_timeout": int(inst.startup_timeout_seconds + start_delay),
            "env": inst.env,
            "environment_systemd": [systemd_environment(k, v) for k, v in sd_env],
        })
    router = None
    if cfg.router.enable_router:
        argv = router_argv(cfg, py)
        router = {"command": supervisor_command(argv), "exec": systemd_exec(argv),
                  "url": router_url(cfg)}
    benches: List[Dict[str, Any]] = []
    for client in bench_clients(cfg):
        argv = bench_argv(cfg, client, py)
        benches.append({"name": client.name, "program": client.program_name,
                        "unit_stem": client.unit_stem,
                        "comment": f"{client.model}, {client.tool}",
                        "command": supervisor_command(argv), "exec": systemd_exec(argv)})
    common = {"version": __version__, "source": cfg.source, "base_dir": cfg.base_dir,
              "router": router, "open_files": opts.open_files, "node": cfg.node}
    inet = None
    host = cfg.cluster.host(cfg.node)
    if host is not None and host.supervisor_port and cfg.process_manager == "supervisord":
        # other hosts' routers stop and start this host's engines through it (deep sleep)
        inet = {"port": f"{host.address}:{host.supervisor_port}",
                "username": cfg.cluster.supervisor_username,
                "password": cfg.cluster.supervisor_password}
    env = _templates_env()
    files: Dict[str, str] = {}
    try:
        files["supervisord.conf"] = env.get_template("supervisord.conf.j2").render(
            engines=engines, benches=benches, socket=socket_path(out), log_dir=log_dir, inet=inet,
            run_dir=os.path.join(out, "run"), user=opts.user, **common)
        files["supervisord-bench.conf"] = env.get_template("supervisord-bench.conf.j2").render(
            benches=benches, log_dir=log_dir, **common)
        units = []
        for p in engines:
            view = dict(p, environment=p["environment_systemd"])
            files[f"systemd/{p['unit_stem']}.service"] = env.get_template(
                "engine.service.j2").render(p=view, **common)
            units.append(f"{p['unit_stem']}.service")
        # kvrouter.service always exists: `systemctl --user start kvrouter` starts the
        # engines (and the router when there is one); stopping it stops them
        files["systemd/kvrouter.service"] = env.get_template("router.service.j2").render(
            units=units, **common)
        for p in benches:
            files[f"systemd/{p['unit_stem']}.service"] = env.get_template(
                "bench.service.j2").render(p=p, **common)
        target_units = units + ["kvrouter.service"]
        files["systemd/kvrouter.target"] = env.get_template("kvrouter.target.j2").render(
            units=target_units, **common)
    except jinja2.TemplateError as err:  # pragma: no cover - template bug
        raise RenderError(f"template error: {err}") from err
    return _checked_names(files)


def private_files(files: Dict[str, str]) -> List[str]:
    """The rendered files that hold credentials (supervisord's TCP user and password)."""
    return [rel for rel, text in files.items() if "\n[inet_http_server]\n" in text]
