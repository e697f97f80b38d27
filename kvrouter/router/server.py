"""The router in one process: the controller, traffic monitor, proxy and admin app wired
together (``RouterContext``), and its HTTP server. ``main.serve`` runs it."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from kvrouter.config import load_config
from kvrouter.config.schema import Config
from kvrouter.control.controller import Controller
from kvrouter.control.process import ProcessControl, process_control_for
from kvrouter.control.reload import reconfigure
from kvrouter.errors import KvrouterError
from kvrouter.http.server import HTTPServer
from kvrouter.http.wsgi import wsgi_handler
from kvrouter.metrics import RouterMetrics
from kvrouter.router.api import create_app
from kvrouter.router.listening import apply_limits, router_http_server
from kvrouter.router.proxy import UPSTREAM, Proxy
from kvrouter.router.realtime import REALTIME_PATH, RealtimeRoute
from kvrouter.router.routes import RouteTable, model_route
from kvrouter.traffic import TrafficMonitor, traffic_keys

if TYPE_CHECKING:
    from kvrouter.cluster import Cluster

log = logging.getLogger("kvrouter")


class RouterContext:
    """The one owner of the router's state (one process; gevent gives the concurrency)."""

    def __init__(self, cfg: Config, process: Optional[ProcessControl] = None,
                 shape: Callable[[Config], Config] = lambda cfg: cfg):
        self.cfg = cfg
        self.shape = shape   # applied to the config a reload reads (--cluster-host, --port)
        self.started = time.time()
        self.traffic = TrafficMonitor.for_config(cfg)
        self.controller = Controller(cfg, process=process, traffic=self.traffic)
        self.metrics = RouterMetrics(self.controller, self.traffic)
        self.controller.metrics = self.metrics
        self.traffic.on_end = self.metrics.on_end
        self.routes = RouteTable(self.controller.entries.values(), cfg.routing)
        self.proxy = Proxy(cfg, self.controller, self.traffic, self.routes)
        self.cluster: Optional["Cluster"] = None
        if cfg.cluster.redis_url:
            self._join_cluster()
        self.app = create_app(self)
        self.server: Optional[HTTPServer] = None

    def _join_cluster(self) -> None:
        """Share model state with the other routers through Redis (``kvrouter.cluster``)."""
        from kvrouter.cluster import Cluster

        cluster = self.cluster = Cluster(self.cfg, self.controller, self.traffic)
        self.controller.coord = cluster
        metrics_end = self.metrics.on_end

        def on_end(*args) -> None:
            metrics_end(*args)
            cluster.on_end(*args)

        self.traffic.on_end = on_end
        self.proxy.shared_responses = cluster

    def preflight(self) -> None:
        """Before listening: what must hold for this router to join (a cluster id nobody
        else uses). Raises KvrouterError."""
        if self.cluster is not None:
            self.cluster.check_unique()

    def start(self) -> None:
        """The controller's loops (and the cluster's), once the server listens."""
        self.controller.start()
        if self.cluster is not None:
            self.cluster.start()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        self.controller.stop_loops()

    # --- reload (SIGHUP) ----------------------------------------------------------------------
    def reload(self, cfg: Config) -> dict:
        """Take a new config without dropping a request: models added or removed, sleep
        settings, aliases, keys, budgets, timeouts. Unchanged models keep their state."""
        report = reconfigure(self.controller, cfg)
        parents = traffic_keys(cfg)[1]
        for name in report["added"] + report["changed"]:
            self.traffic.add_model(name, parents.get(name))
            self.metrics.add_model(name)
        for name in report["removed"]:
            self.traffic.remove_model(name)
        self.traffic.set_slos(cfg)
        self.routes.rebuild(self.controller.entries.values(), cfg.routing)
        self.proxy.configure(cfg)
        old, self.cfg = self.cfg, cfg
        if self.server is not None:
            apply_limits(self.server.limits, cfg)
        if (old.router.router_host, old.router.router_port) != \
                (cfg.router.router_host, cfg.router.router_port):
            log.warning("reload: the listen address changed to %s:%d; restart the router to "
                        "move it", cfg.router.router_host, cfg.router.router_port)
        if old.router.workers != cfg.router.workers:
            log.warning("reload: router.workers changed from %s to %s; it takes effect when "
                        "the router restarts (supervisorctl restart kvrouter, or systemctl "
                        "--user restart kvrouter)", old.router.workers or "auto",
                        cfg.router.workers or "auto")
        if old.process_manager != cfg.process_manager:
            self.controller.process = process_control_for(cfg)
            log.info("reload: process_manager is now %s (deep sleep, restarts and logs go "
                     "through %s)", cfg.process_manager, self.controller.process.kind)
        if old.cluster != cfg.cluster:
            log.warning("reload: the cluster section changed; restart the router to apply it "
                        "(its Redis, hosts and leases stay as they were)")
        logging.getLogger().setLevel(cfg.router.log_level.upper())
        return report

    def reload_from_file(self) -> bool:
        """Read the config file again; a bad one is refused, and the old one kept."""
        try:
            cfg = self.shape(load_config(self.cfg.source))
        except KvrouterError as err:
            log.error("reload refused, still serving with the previous config:\n%s", err)
            return False
        report = self.reload(cfg)
        log.info("reloaded %s: %s", cfg.source, "; ".join(
            f"{k} {', '.join(v)}" for k, v in report.items() if v and k != "kept")
            or "no model added, removed or changed")
        return True

    def handler(self):
        proxy_handle = self.proxy.handle
        flask_handle = wsgi_handler(self.app, self.cfg.router.router_host,
                                    self.cfg.router.router_port)

        response_id = self.proxy.handle_response_id
        upstream = self.proxy.handle_upstream
        realtime = RealtimeRoute(self.proxy).handle

        def handle(req):
            path = req.path
            if path == REALTIME_PATH:
                return realtime(req)
            if path.startswith("/v1/responses/"):
                return response_id(req)
            if path.startswith(UPSTREAM):
                return upstream(req)
            if model_route(req.method, path):
                return proxy_handle(req)
            return flask_handle(req)

        return handle


def coalesced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` one run at a time: calls that come while it runs make one more run after it
    (a storm of SIGHUPs is two reloads, the last with the file as it is then)."""
    state = {"running": False, "again": False}

    def call() -> None:
        if state["running"]:
            state["again"] = True
            return
        state["running"] = True
        try:
            while True:
                state["again"] = False
                fn()
                if not state["again"]:
                    break
        finally:
            state["running"] = False

    return call


def build_server(ctx: RouterContext, listener=None) -> HTTPServer:
    r = ctx.cfg.router
    ctx.server = router_http_server(listener or (r.router_host, r.router_port), ctx.handler(),
                                    lambda: ctx.cfg)
    return ctx.server
