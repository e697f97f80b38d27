"""What the router remembers across its own restarts: which models it put to sleep.

vLLM answers ``/is_sleeping``; SGLang cannot be asked whether its memory is
released, and sending it a request (or a generating health check) while it is
would crash it. So the controller writes each model's state to a small JSON
file on every settled transition and reads it when it adopts engines at start.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

log = logging.getLogger("kvrouter.controller")


class StateFile:
    def __init__(self, path: Optional[str]):
        self.path = path

    def save(self, data: dict) -> None:
        if not self.path:
            return
        try:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.path)
        except OSError as err:
            log.debug("cannot write %s: %s", self.path, err)

    def get(self, name: str) -> Optional[dict]:
        if not self.path:
            return None
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh).get(name)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
