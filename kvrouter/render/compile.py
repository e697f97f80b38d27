"""Compile a Config into supervisord and systemd files (text only; writing is in ``files.py``)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import jinja2

from kvrouter import __version__
from kvrouter.config.schema import Config
from kvrouter.errors import RenderError
from kvrouter.render.argv import Interpreters, bench_argv, engine_argv, router_argv, router_url
from kvrouter.render.quoting import (
    supervisor_command,
    supervisor_environment,
    systemd_environment,
    systemd_exec,
)

MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class RenderOptions:
    """Where the output goes and which interpreters run; fixed values make golden files stable."""

    out_dir: str
    interpreters: Interpreters = field(default_factory=Interpreters)
    user: Optional[str] = None  # supervisord drops privileges to this user when started as root


def templates_dir() -> str:
    """The templates folder: installed as ``kvrouter.templates``, else the source tree's."""
    spec = importlib.util.find_spec("kvrouter.templates")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "templates")


def _templates_env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)


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
        engines.append({
            "name": inst.name,
            "program": inst.program_name,
            "unit_stem": inst.unit_stem,
            "comment": f"{inst.model}, {inst.engine}, {inst.base_url}",
            "command": supervisor_command(sup_argv),
            "environment": supervisor_environment(inst.env, where) if inst.env else "",
            "priority": 100 + i,
            "startsecs": int(start_delay + 5),
            "delay": f"{start_delay:g}" if start_delay else "",
            "exec": systemd_exec(argv),
            "start_timeout": int(inst.startup_timeout_seconds + start_delay),
            "env": inst.env,
        })
        engines[-1]["environment_systemd"] = [systemd_environment(k, v) for k, v in inst.env]
    router = None
    if cfg.router.enable_router:
        argv = router_argv(cfg, py)
        router = {"command": supervisor_command(argv), "exec": systemd_exec(argv),
                  "url": router_url(cfg)}
    benches: List[Dict[str, Any]] = []
    for client in cfg.benchmark.clients:
        argv = bench_argv(cfg, client, py)
        benches.append({"name": client.name, "program": client.program_name,
                        "unit_stem": client.unit_stem,
                        "comment": f"{client.model}, {client.tool}",
                        "command": supervisor_command(argv), "exec": systemd_exec(argv)})
    common = {"version": __version__, "source": cfg.source, "base_dir": cfg.base_dir,
              "router": router}
    env = _templates_env()
    files: Dict[str, str] = {}
    try:
        files["supervisord.conf"] = env.get_template("supervisord.conf.j2").render(
            engines=engines, benches=benches, socket=socket_path(out), log_dir=log_dir,
            run_dir=os.path.join(out, "run"), user=opts.user, **common)
        units = []
        for p in engines:
            view = dict(p, environment=p["environment_systemd"])
            files[f"systemd/{p['unit_stem']}.service"] = env.get_template(
                "engine.service.j2").render(p=view, **common)
            units.append(f"{p['unit_stem']}.service")
        if router:
            files["systemd/kvrouter.service"] = env.get_template("router.service.j2").render(
                units=units, **common)
        for p in benches:
            files[f"systemd/{p['unit_stem']}.service"] = env.get_template(
                "bench.service.j2").render(p=p, **common)
        target_units = units + (["kvrouter.service"] if router else [])
        files["systemd/kvrouter.target"] = env.get_template("kvrouter.target.j2").render(
            units=target_units, **common)
    except jinja2.TemplateError as err:  # pragma: no cover - template bug
        raise RenderError(f"template error: {err}") from err
    return files
