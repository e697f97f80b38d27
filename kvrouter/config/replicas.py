"""Replicas in the config: instances that serve the same model are its replicas.

``expand`` turns the short form (``replicas: N`` on one instance) into N instances;
``group`` checks that a model's replicas agree (the model name the engine answers to, the
routing settings) and gives each engine its controller key: the model's name when it is
the model's only engine (every seed config), else the instance's own name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

from kvrouter import kvpool
from kvrouter.config import schema
from kvrouter.config.located import Ctx, line_of
from kvrouter.config.yamlsrc import LineList


def _replace_port(argv, port: int) -> tuple:
    out = list(argv)
    for i, tok in enumerate(out):
        if tok == "--port" and i + 1 < len(out):
            out[i + 1] = str(port)
        elif tok.startswith("--port="):
            out[i] = f"--port={port}"
    return tuple(out)


def _gpus_for(gpus, n: int, k: int, path: str, ctx: Ctx, line) -> Any:
    """Replica ``k`` of ``n``'s GPUs: an equal share of the list in order, or the whole list
    when it names fewer GPUs than replicas (they share them)."""
    if gpus is None:
        return None
    ids = gpus.split(",")
    if len(ids) < n:
        return ids[k % len(ids)]
    if len(ids) % n:
        ctx.error(path, f"{len(ids)} GPUs cannot be divided evenly among {n} replicas",
                  line)
        return gpus
    per = len(ids) // n
    return ",".join(ids[k * per:(k + 1) * per])


def expand(instances: List[schema.Instance], raw_instances,
           ctx: Ctx) -> List[Tuple[int, schema.Instance]]:
    """Each ``replicas: N`` instance (resolved: port and argv known) as N instances named
    <name>-1 .. <name>-N on consecutive ports; each with the index of its config entry."""
    out: List[Tuple[int, schema.Instance]] = []
    for i, inst in enumerate(instances):
        n = inst.replicas
        if n <= 1:
            out.append((i, inst))
            continue
        data = raw_instances[i] if isinstance(raw_instances, list) else None
        env = dict(inst.env)
        own_ipc = env.get("KVCACHED_IPC_NAME")
        for k in range(n):
            name = f"{inst.name}-{k + 1}"
            renv = dict(env)
            gpus = _gpus_for(inst.gpus, n, k, f"instances[{i}].gpus", ctx,
                             line_of(data, "gpus"))
            if gpus is not None:
                renv["CUDA_VISIBLE_DEVICES"] = gpus
            if own_ipc is not None:   # one kvcached pool per engine
                renv["KVCACHED_IPC_NAME"] = kvpool.ipc_name(f"{own_ipc}-{k + 1}")
            port = inst.port + k if inst.port else 0
            if port > 65535:
                ctx.error(f"instances[{i}].replicas", f"{n} replicas from port {inst.port} "
                          "run past 65535", line_of(data, "replicas"))
            out.append((i, dataclasses.replace(
                inst, name=name, port=port, argv_args=_replace_port(inst.argv_args, port),
                gpus=gpus, env=tuple(renv.items()), replicas=1)))
    return out


def entries_of(raw_instances, origin: List[int]):
    """The YAML entries (with their lines) of the expanded instances, for the messages."""
    if not isinstance(raw_instances, LineList):
        return None
    datas = LineList(raw_instances[i] for i in origin)
    datas.lines = [line_of(raw_instances, i) for i in origin]
    return datas


def group(cfg: schema.Config, instances: List[schema.Instance], ctx: Ctx,
          where: Dict[str, str], lines: Dict[str, Any]) -> List[schema.Instance]:
    """Check each model's replicas agree and give every engine its key. ``where`` maps an
    instance name to its key path (``instances[2]``), ``lines`` to its line, for the
    messages."""
    by_model: Dict[str, List[schema.Instance]] = {}
    for inst in instances:
        by_model.setdefault(inst.model, []).append(inst)
    route_owner: Dict[str, Tuple[str, str]] = {}
    for model, reps in by_model.items():
        first = reps[0]
        for other in reps[1:]:
            path = where.get(other.name, "instances")
            if other.upstream_model != first.upstream_model:
                ctx.error(f"{path}.engine_args", f"replicas of {model!r} disagree on the name "
                          f"their engine answers to: {other.upstream_model!r} here, "
                          f"{first.upstream_model!r} in {where.get(first.name)} "
                          "(--served-model-name)", lines.get(other.name))
            for attr in ("routing_policy", "min_ready"):
                a, b = getattr(first, attr), getattr(other, attr)
                if a is not None and b is not None and a != b:
                    ctx.error(f"{path}.{attr}", f"replicas of {model!r} disagree: {b!r} here, "
                              f"{a!r} in {where.get(first.name)}", lines.get(other.name))
        for r in reps:
            for n in r.route_names:
                if n in route_owner and route_owner[n][0] != model:
                    ctx.error(where.get(r.name, "instances"), f"duplicate model name {n!r} "
                              f"(also in {route_owner[n][1]})", lines.get(r.name))
                route_owner.setdefault(n, (model, where.get(r.name, "instances")))
    out = []
    for inst in instances:
        reps = by_model[inst.model]
        names = tuple(dict.fromkeys(n for r in reps for n in r.route_names))
        policy = next((r.routing_policy for r in reps if r.routing_policy), None)
        ready = next((r.min_ready for r in reps if r.min_ready is not None), None)
        key = inst.model if len(reps) == 1 else inst.name
        if len(reps) > 1 and key in route_owner:
            ctx.error(f"{where.get(inst.name, 'instances')}.name", f"{key!r} is also a model "
                      "name: a replica's instance name must differ from every model name "
                      "(it names the replica in /traffic/stats, /metrics and the admin API)",
                      lines.get(inst.name))
        out.append(dataclasses.replace(
            inst, key=key, replica_of=len(reps), route_names=names,
            routing_policy=policy or cfg.routing.policy,
            min_ready=ready if ready is not None else cfg.routing.min_ready))
    return out
