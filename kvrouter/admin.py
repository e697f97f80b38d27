"""The command line's client of a running router: management calls (in a cluster, to the
first router that answers) and waiting until every model is ready."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Callable, List, Optional, Tuple
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


def wait_ready(cfg: Config, timeout: float, program_state: Callable[[], Optional[str]]
               = lambda: None) -> List[str]:
    """Wait until the router answers and every model is ready; the models' names. On time
    out, the error says what answered (or what did not) and, from ``program_state``, what
    the process manager says of the router (FATAL, and the end of its log)."""
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
        except urllib.error.HTTPError as err:
            last = (f"HTTP {err.code} from something that is not this kvrouter (another "
                    f"program on port {cfg.router.router_port}?)")
        except (OSError, ValueError, KeyError, TypeError) as err:
            last = str(err)
        time.sleep(0.2)
    state = program_state()
    raise KvrouterError(f"not ready after {timeout:g}s ({url}: {last})" +
                        (f"\n{state}" if state else ""))


def supervised_router_state(cfg: Config, out_dir: str) -> Optional[str]:
    """What supervisord (rendered into ``out_dir``) or systemd says of the router program,
    with the last lines of its log; None when neither knows it."""
    if cfg.process_manager == "systemd":
        import subprocess

        try:
            out = subprocess.run(["systemctl", "--user", "status", "--no-pager", "-n", "8",
                                  "kvrouter.service"], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return f"systemctl --user status kvrouter:\n{out.stdout.strip()}" if out.stdout \
            else None
    import xmlrpc.client

    from kvrouter.control.supervisor import Supervisor
    from kvrouter.render import socket_path

    sup = Supervisor(socket_path(os.path.abspath(out_dir)), timeout=5)
    try:
        info = sup.process_info("kvrouter")
        tail = sup.rpc.tailProcessStdoutLog("kvrouter", 0, 4000)[0]
    except (OSError, xmlrpc.client.Error):
        return None
    lines = [ln for ln in tail.splitlines() if ln.strip()][-8:]
    return (f"supervisord: the router program is {info['statename']}"
            f"{' (' + info['spawnerr'] + ')' if info.get('spawnerr') else ''}; the end of its "
            "log:\n  " + "\n  ".join(lines))
