"""The command line's client of a running router: management calls (in a cluster, to the
first router that answers) and waiting until every model is ready."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import List, Optional, Tuple
from urllib.parse import quote

from kvrouter.config.cluster import router_urls
from kvrouter.config.schema import Config
from kvrouter.errors import KvrouterError


def call(cfg: Config, method: str, path: str,
         token: Optional[str] = None) -> Tuple[int, dict]:
    """(HTTP status, JSON body) of a management call; the config's admin token by default."""
    token = token or cfg.router.admin_token
    failures = []
    for base in router_urls(cfg):   # in a cluster, the first router that answers
        url = base + path
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            try:
                return err.code, json.load(err)
            except ValueError:
                return err.code, {"error": {"message": str(err)}}
        except OSError as err:
            failures.append(f"{url}: {err}")
    raise KvrouterError("router not reachable: " + "; ".join(failures))


def model_path(prefix: str, model: str) -> str:
    """``prefix/MODEL`` with the model name URL-encoded (names contain slashes)."""
    return f"{prefix}/{quote(model, safe='')}"


def wait_ready(cfg: Config, timeout: float) -> List[str]:
    """Wait until the router answers and every model is ready; the models' names."""
    url = router_urls(cfg)[0] + "/health/all"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                models = json.load(resp)["models"]
            states = {m["model"]: m["state"] for m in models}
            if all(s == "ready" for s in states.values()):
                return list(states)
            last = ", ".join(f"{m}={s}" for m, s in states.items())
        except OSError as err:
            last = str(err)
        time.sleep(0.2)
    raise KvrouterError(f"not ready after {timeout:g}s ({url}: {last})")
