"""The router's log lines: to stdout (supervisord's log file, or journald under systemd).

Under systemd (``JOURNAL_STREAM`` is set when stdout is the journal) each line starts with
its syslog priority, ``<3>`` for an error ... ``<7>`` for debug, so that
``journalctl -p warning --user-unit kvrouter`` filters by level (the unit renders
``SyslogLevelPrefix=yes``, systemd's default)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Prefix ``<priority>``; the journal keeps its own timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITY.get(record.levelno, 6)
        return f"<{priority}>" + super().format(record).replace("\n", f"\n<{priority}>")


def setup(level: str, environ: Optional[Mapping[str, str]] = None) -> None:
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stdout)
    if environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
