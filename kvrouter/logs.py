"""The router's log lines: to stdout (supervisord's log file, or journald under systemd).

Under systemd (``JOURNAL_STREAM`` is set when stdout is the journal) each line starts with
its syslog priority, ``<3>`` for an error ... ``<7>`` for debug, so that
``journalctl -p warning --user-unit kvrouter`` filters by level (the unit renders
``SyslogLevelPrefix=yes``, systemd's default)."""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from typing import Callable, List, Mapping, Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Prefix ``<priority>``; the journal keeps its own timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITY.get(record.levelno, 6)
        return f"<{priority}>" + super().format(record).replace("\n", f"\n<{priority}>")


class AccessLog:
    """Access lines, written without the logging machinery (a LogRecord, a lock and a
    timestamp per line cost ~10 µs, over 10% of a request), with the same look as the other
    lines (``... INFO kvrouter.access: ...``). They are kept here and written out in one
    write when 8 KB (some 45 lines) have gathered, by ``flush()`` (the router calls it every
    0.1 s, on SIGHUP and at exit) and before any other log line (``OrderedHandler``), so
    order is kept: like nginx's buffered access_log, no syscall per request, even where
    stdout is unbuffered (``PYTHONUNBUFFERED=1``, common in containers, wrote one per
    line)."""

    LIMIT = 8192

    def __init__(self, stream=None, journal: bool = False):
        self.stream = stream
        self.journal = journal
        self._second = -1
        self._stamp = ""
        self._lines: List[str] = []
        self._size = 0

    def write(self, message: str) -> None:
        if self.journal:
            line = f"<6>INFO kvrouter.access: {message}\n"
        else:
            now = time.time()
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = f"{self._stamp},{int((now - second) * 1000):03d} INFO kvrouter.access: " \
                f"{message}\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        stream = self.stream or sys.stdout
        try:
            if lines:
                stream.write("".join(lines))
            stream.flush()
        except (OSError, ValueError):
            pass


ACCESS = AccessLog()


class OrderedHandler(logging.StreamHandler):
    """The router's log handler: the access lines gathered so far go out first."""

    def emit(self, record: logging.LogRecord) -> None:
        ACCESS.flush()
        super().emit(record)


def setup(level: str, environ: Optional[Mapping[str, str]] = None) -> None:
    environ = os.environ if environ is None else environ
    handler = OrderedHandler(sys.stdout)
    journal = bool(environ.get("JOURNAL_STREAM"))
    if journal:
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    ACCESS.stream, ACCESS.journal = None, journal
    atexit.unregister(ACCESS.flush)
    atexit.register(ACCESS.flush)   # the lines of requests that ended while shutting down


def flushed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` after the access lines so far are written out (a signal's handler: SIGHUP)."""
    def call() -> None:
        ACCESS.flush()
        fn()
    return call


def flush_forever(every: float = 0.1) -> None:
    """Write the buffered access-log lines out every ``every`` seconds (a greenlet)."""
    import gevent

    while True:
        gevent.sleep(every)
        ACCESS.flush()
