"""The checks of ``cluster.hosts``: each instance on a named host, credentials for the
supervisord other hosts call, one router without Redis."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

from kvrouter.config import schema
from kvrouter.config.located import NAME_RE, Ctx, check_unique, line_of


def place_on_hosts(cfg: schema.Config, instances: list, raw: dict, ctx: Ctx,
                   origin: Optional[list] = None) -> list:
    """The cluster: each instance on a named host (routers connect to its address), host
    names unique, credentials for the supervisord that other hosts call, one router without
    Redis. Returns the instances with their ``address``."""
    cl = cfg.cluster
    raw_cl = raw.get("cluster") if isinstance(raw.get("cluster"), dict) else {}
    raw_hosts = raw_cl.get("hosts") if isinstance(raw_cl, dict) else None
    raw_instances = raw.get("instances")
    hosts = {h.name: h for h in cl.hosts}
    check_unique(ctx, cl.hosts, "host name", lambda h: [h.name],
                  lambda i: f"cluster.hosts[{i}]", raw_hosts)
    for i, h in enumerate(cl.hosts):
        data = raw_hosts[i] if isinstance(raw_hosts, list) else None
        if not NAME_RE.match(h.name):
            ctx.error(f"cluster.hosts[{i}].name", "expected letters, digits, '.', '_' or '-', "
                      f"found {h.name!r}", line_of(data, "name"))
        if h.supervisor_port and not (cl.supervisor_username and cl.supervisor_password):
            ctx.error(f"cluster.hosts[{i}].supervisor_port", "needs cluster.supervisor_username "
                      "and cluster.supervisor_password: supervisord's TCP port must not be open "
                      "without credentials", line_of(data, "supervisor_port"))
    if cl.hosts and cfg.router.enable_router and not cl.router_hosts:
        ctx.error("cluster.hosts", "no host runs the router: set `router: true` on the hosts "
                  "that run one (or router.enable_router: false)", line_of(raw_cl, "hosts"))
    if len(cl.router_hosts) > 1 and not cl.redis_url:
        ctx.error("cluster.redis_url", f"{len(cl.router_hosts)} hosts run a router "
                  f"({', '.join(h.name for h in cl.router_hosts)}): routers share their state "
                  "through Redis; set cluster.redis_url", line_of(raw_cl, "hosts"))
    if cl.redis_url and not cl.redis_url.startswith(("redis://", "rediss://", "unix://")):
        ctx.error("cluster.redis_url", f"expected redis://HOST:PORT/DB, rediss://... or "
                  f"unix://PATH, found {cl.redis_url!r}", line_of(raw_cl, "redis_url"))
    out = []
    for j, inst in enumerate(instances):
        i = origin[j] if origin else j   # its entry in the file (replicas: N makes several)
        data = raw_instances[i] if isinstance(raw_instances, list) else None
        path = f"instances[{i}].host"
        if inst.host is None:
            if cl.hosts:
                ctx.error(path, f"is required when cluster.hosts is set (one of "
                          f"{', '.join(hosts)})", line_of(data, "name"))
            out.append(inst)
            continue
        place = hosts.get(inst.host)
        if place is None:
            close = difflib.get_close_matches(inst.host, list(hosts), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ctx.error(path, f"no host {inst.host!r} in cluster.hosts{hint}; known hosts: "
                      f"{', '.join(hosts) or 'none'}", line_of(data, "host"))
            out.append(inst)
            continue
        if inst.listen_host not in ("0.0.0.0", "::", place.address):
            ctx.error(f"instances[{i}].engine_args", f"the engine listens on "
                      f"{inst.listen_host}, but host {place.name!r} is reached at "
                      f"{place.address}: give --host {place.address} (or 0.0.0.0)",
                      line_of(data, "engine_args"))
        out.append(dataclasses.replace(inst, address=place.address))
    deep = cfg.sleep_manager.stop_after_seconds is not None or any(
        i.sleep.stop_after_seconds is not None for i in instances)
    if deep and cfg.process_manager == "supervisord":
        routers = {h.name for h in cl.router_hosts}
        for h in cl.hosts:
            if any(i.host == h.name for i in instances) and not h.supervisor_port and \
                    routers - {h.name}:
                ctx.warnings.append(
                    f"{ctx.source}: cluster.hosts: host {h.name!r} has no supervisor_port: "
                    "routers on other hosts can neither stop its engines (deep sleep) nor "
                    "start them again for a request")
    if cfg.process_manager == "systemd" and any(h.supervisor_port for h in cl.hosts):
        ctx.warnings.append(f"{ctx.source}: cluster.hosts: supervisor_port is ignored with "
                            "process_manager: systemd (engines on other hosts cannot be "
                            "stopped or restarted by a router: no deep sleep for them)")
    return out
