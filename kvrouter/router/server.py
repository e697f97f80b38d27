"""``kvrouter serve``: wire the controller, traffic monitor, proxy and admin app; serve."""
from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Optional

import gevent

from kvrouter.config.schema import Config
from kvrouter.control.controller import Controller
from kvrouter.control.process import ProcessControl, process_control_for
from kvrouter.http.server import HTTPServer, ServerLimits, wsgi_handler
from kvrouter.http.sockio import raise_open_files_limit
from kvrouter.metrics import RouterMetrics
from kvrouter.router.api import create_app
from kvrouter.router.auth import require_api_key
from kvrouter.router.proxy import Proxy
from kvrouter.router.routes import RouteTable
from kvrouter.traffic import TrafficMonitor

log = logging.getLogger("kvrouter")


class RouterContext:
    """The one owner of the router's state (one process; gevent gives the concurrency)."""

    def __init__(self, cfg: Config, process: Optional[ProcessControl] = None):
        self.cfg = cfg
        self.started = time.time()
        self.traffic = TrafficMonitor([i.model for i in cfg.instances])
        self.controller = Controller(cfg, process=process, traffic=self.traffic)
        self.metrics = RouterMetrics(self.controller, self.traffic)
        self.controller.metrics = self.metrics
        self.traffic.on_end = self.metrics.on_end
        self.routes = RouteTable(self.controller.entries.values())
        self.proxy = Proxy(cfg, self.controller, self.traffic, self.routes)
        self.app = create_app(self)

    def handler(self):
        proxy_handle = self.proxy.handle
        flask_handle = wsgi_handler(self.app, self.cfg.router.router_host,
                                    self.cfg.router.router_port)

        response_id = self.proxy.handle_response_id

        def handle(req):
            path = req.path
            if path.startswith("/v1/responses/"):
                return response_id(req)
            if req.method == "POST" and path.startswith("/v1/"):
                return proxy_handle(req)
            return flask_handle(req)

        return handle


def build_server(ctx: RouterContext, listener=None) -> HTTPServer:
    r = ctx.cfg.router
    limits = ServerLimits(max_body_bytes=int(r.max_body_mb * 1024 * 1024),
                          write_timeout=r.stream_idle_timeout_seconds,
                          header_timeout=r.header_timeout_seconds,
                          keepalive_timeout=r.keepalive_timeout_seconds,
                          max_connections=r.max_connections)
    keys = r.api_keys

    def precheck(req) -> None:
        """The API key is checked on the headers: an unauthenticated body is never read."""
        if keys and req.path.startswith("/v1/"):
            require_api_key(req.headers.get("authorization"), keys)

    return HTTPServer(listener or (r.router_host, r.router_port), ctx.handler(), limits,
                      precheck=precheck)


def serve(cfg: Config) -> None:
    logging.basicConfig(level=cfg.router.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nofile = raise_open_files_limit()
    ctx = RouterContext(cfg, process_control_for(cfg))
    server = build_server(ctx)
    log.info("open files limit %d: up to %d client connections at once", nofile,
             server.limits.max_connections)
    server.start()
    ctx.controller.start()
    log.info("kvrouter on http://%s:%d routing %s (config %s)", cfg.router.router_host,
             server.address[1], ", ".join(ctx.routes.names()), cfg.source)

    def _stop(*_):
        log.info("shutting down")
        ctx.controller.stop_loops()
        server.stop(timeout=5)
        sys.exit(0)

    gevent.signal_handler(signal.SIGTERM, _stop)
    gevent.signal_handler(signal.SIGINT, _stop)
    server.serve_forever()
