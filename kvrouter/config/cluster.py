"""One YAML for a deployment on several hosts: what runs on one host, and a router's view.

``on_host`` gives what ``kvrouter render --host NAME`` renders (that host's engines, and its
router when it runs one); ``as_router`` gives what the router of a host serves (every
engine, on every host, listening where that host's entry says).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from kvrouter.config.schema import _ANY_ADDRESS, ClusterHost, Config, host_url
from kvrouter.errors import ConfigError, ConfigErrors


def _host(cfg: Config, name: str, option: str) -> ClusterHost:
    h = cfg.cluster.host(name)
    if h is None:
        known = ", ".join(x.name for x in cfg.cluster.hosts)
        raise ConfigErrors([ConfigError(
            f"{option} {name}: no such host in cluster.hosts" +
            (f" (known hosts: {known})" if known else " (the config has no cluster.hosts)"),
            path="cluster.hosts", source=cfg.source)])
    return h


def _listening(cfg: Config, h: ClusterHost) -> Config:
    r = cfg.router
    return dataclasses.replace(cfg, node=h.name, router=dataclasses.replace(
        r, enable_router=r.enable_router and h.router,
        router_host=h.router_host or r.router_host,
        router_port=h.router_port or r.router_port))


def on_host(cfg: Config, name: Optional[str]) -> Config:
    """What runs on host ``name``: its engines and its router (the benchmark clients run on
    the first router host). Without cluster.hosts, the config as it is (``name`` None)."""
    if name is None:
        if cfg.cluster.hosts:
            raise ConfigErrors([ConfigError(
                "this config describes several hosts: render each with --host NAME (one of "
                f"{', '.join(h.name for h in cfg.cluster.hosts)})", path="cluster.hosts",
                source=cfg.source)])
        return cfg
    h = _host(cfg, name, "--host")
    return dataclasses.replace(_listening(cfg, h),
                               instances=tuple(i for i in cfg.instances if i.host == name))


def router_host_name(cfg: Config, name: Optional[str]) -> Optional[str]:
    """The host whose router this process is: ``name``, or the only router host."""
    if name is not None or not cfg.cluster.hosts:
        return name
    routers = cfg.cluster.router_hosts
    if len(routers) == 1:
        return routers[0].name
    raise ConfigErrors([ConfigError(
        "several hosts run a router: say which one this is with --cluster-host NAME (one of "
        f"{', '.join(h.name for h in routers)})", path="cluster.hosts", source=cfg.source)])


def as_router(cfg: Config, name: Optional[str]) -> Config:
    """The router of host ``name`` (every engine of every host, its own listen address)."""
    name = router_host_name(cfg, name)
    if name is None:
        return cfg
    h = _host(cfg, name, "--cluster-host")
    if not h.router:
        raise ConfigErrors([ConfigError(
            f"--cluster-host {name}: that host does not run a router (router: false)",
            path=f"cluster.hosts[{cfg.cluster.hosts.index(h)}].router", source=cfg.source)])
    return _listening(cfg, h)


def router_urls(cfg: Config) -> List[str]:
    """Where the routers answer, as another machine reaches them (the only one, or one per
    router host: any of them answers for the whole cluster)."""
    r = cfg.router
    if not cfg.cluster.router_hosts:
        return [host_url(r.router_host, r.router_port)]
    out = []
    for h in cfg.cluster.router_hosts:
        listen = h.router_host or r.router_host
        reach = h.address if listen in _ANY_ADDRESS or listen == "localhost" else listen
        out.append(host_url(reach, h.router_port or r.router_port))
    return out


def redacted(url: str) -> str:
    """A Redis URL fit for logs and /health: its password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
