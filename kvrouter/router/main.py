"""``kvrouter serve``: the router in one process, or an owner and its worker processes
(``router.workers`` > 1, ``owner.py``)."""
from __future__ import annotations

import logging
import signal
import sys
from typing import Callable

import gevent

from kvrouter import logs
from kvrouter.config.schema import Config
from kvrouter.control.process import process_control_for
from kvrouter.errors import KvrouterError
from kvrouter.http.sockio import raise_open_files_limit
from kvrouter.ports import EXIT_NO_PORT, cannot_listen
from kvrouter.router.owner import serve_with_workers
from kvrouter.router.server import RouterContext, build_server, coalesced

log = logging.getLogger("kvrouter")


def serve(cfg: Config, shape: Callable[[Config], Config] = lambda cfg: cfg) -> None:
    """``shape``: the command line's view of a config (a reload reads the file again)."""
    if cfg.router.workers != 1:
        serve_with_workers(cfg, shape)
        return
    logs.setup(cfg.router.log_level)
    nofile = raise_open_files_limit()
    ctx = RouterContext(cfg, process_control_for(cfg), shape)
    try:
        ctx.preflight()
    except KvrouterError as err:
        log.error("%s", err)
        sys.exit(EXIT_NO_PORT)
    server = build_server(ctx)
    log.info("open files limit %d: up to %d client connections at once", nofile,
             server.limits.max_connections)
    try:
        server.start()
    except OSError as err:
        log.error("%s", cannot_listen(cfg.router.router_host, cfg.router.router_port, err,
                                      cfg.source))
        sys.exit(EXIT_NO_PORT)
    ctx.start()
    log.info("kvrouter on http://%s:%d routing %s (config %s)", cfg.router.router_host,
             server.address[1], ", ".join(ctx.routes.names()), cfg.source)

    def _stop(*_):
        log.info("shutting down")
        ctx.stop()
        server.stop(timeout=5)
        sys.exit(0)

    gevent.signal_handler(signal.SIGTERM, _stop)
    gevent.signal_handler(signal.SIGINT, _stop)
    reload = coalesced(ctx.reload_from_file)
    gevent.signal_handler(signal.SIGHUP, logs.flushed(lambda: gevent.spawn(reload)))

    gevent.spawn(logs.flush_forever)
    server.serve_forever()
