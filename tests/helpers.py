"""Test helpers: paths, HTTP without raising, processes on loopback (simulated engines, the
router, supervisord). Fixtures stay in the conftest modules; everything else is here."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The seed project's example-config.yaml, kept verbatim in the repository (its digest is
# checked by test_seed_copy_is_verbatim): the tests read only what the repository carries.
SEED_CONFIG = os.path.join(ROOT, "etc", "examples", "kvcached-vllm-sglang.yaml")
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A first port with the ``n - 1`` after it free too (``replicas: N`` takes consecutive
    ports)."""
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def wait_until(fn, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as err:  # noqa: BLE001
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def run_concurrently(fn, n, timeout=60.0):
    """Call ``fn(i)`` for i in range(n) on n threads at once; return (results, errors)."""
    import threading

    results, errors = [], []

    def one(i):
        try:
            results.append(fn(i))
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors.append(repr(err))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results, errors


def http(method, url, body=None, headers=None, timeout=10.0):
    """(status, headers, body bytes) without raising on HTTP errors."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(url, timeout=10.0):
    status, _, body = http("GET", url, timeout=timeout)
    return status, (json.loads(body) if body else None)


class Proc:
    """A child in its own process group, ended by group: SIGTERM, wait, SIGKILL."""

    def __init__(self, argv, env=None, log_path=None):
        self.argv = argv
        self.log_path = log_path or tempfile.mktemp(prefix="kvr-proc-", suffix=".log")
        self.log = open(self.log_path, "wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  env=full_env, cwd=ROOT, start_new_session=True)

    def alive(self):
        return self.p.poll() is None

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as fh:
            return fh.read().decode(errors="replace")

    def stop(self, timeout=5.0):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self.log.close()


class SimEngine:
    def __init__(self, dialect="vllm", model="sim/model", port=None, args=(), env=None,
                 wait=True, host="127.0.0.1"):
        self.dialect = dialect
        self.model = model
        self.port = port or free_port()
        self.base = f"http://{host}:{self.port}"
        e = {"VLLM_SERVER_DEV_MODE": "1"} if dialect == "vllm" else {}
        e.update(env or {})
        argv = [PY, "-m", "kvrouter", "sim-engine", "--dialect", dialect, "--model", model,
                "--host", host, "--port", str(self.port), "--startup-seconds", "0", *args]
        self.proc = Proc(argv, env=e)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=15.0):
        path = "/health" if self.dialect == "vllm" else "/model_info"
        wait_until(lambda: http("GET", self.base + path, timeout=1)[0] == 200, timeout,
                   what=f"sim engine on {self.port}: {self.proc.output()[-500:]}")

    def stats(self):
        return get_json(self.base + "/sim/stats")[1]

    def stop(self):
        self.proc.stop()


class Router:
    """``kvrouter serve`` on a config; ``open_files`` runs it under a lowered descriptor limit
    (soft and hard, so the router cannot raise it)."""

    def __init__(self, config_text, tmpdir, wait=True, open_files=None, cluster_host=None):
        self.port = None
        self.path = os.path.join(tmpdir, "kvrouter.yaml")
        with open(self.path, "w") as fh:
            fh.write(config_text)
        from kvrouter.config import load_config
        from kvrouter.config.cluster import as_router
        from kvrouter.config.schema import connect_host

        cfg = as_router(load_config(self.path), cluster_host)
        self.port = cfg.router.router_port
        self.base = f"http://{connect_host(cfg.router.router_host)}:{self.port}"
        argv = [PY, "-m", "kvrouter", "serve", self.path]
        if cluster_host:
            argv += ["--cluster-host", cluster_host]
        if open_files:
            argv = ["sh", "-c", f'ulimit -n {int(open_files)} && exec "$0" "$@"', *argv]
        self.proc = Proc(argv)
        if wait:
            wait_until(lambda: http("GET", self.base + "/health", timeout=1)[0] == 200, 15,
                       what=f"router: {self.proc.output()[-800:]}")

    def wait_models_ready(self, timeout=15.0):
        def ready():
            _, body = get_json(self.base + "/health/all")
            return all(m["state"] == "ready" for m in body["models"])

        wait_until(ready, timeout, what="all models ready")

    def rss_mb(self):
        with open(f"/proc/{self.proc.p.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.stop()


@contextlib.contextmanager
def router_over(tmpdir, head, instances, engines):
    """A router (``head``: its config up to ``instances:``, the instances' YAML items) in
    front of running sim ``engines``, ready; it and the engines are stopped after."""
    router = Router(head + "instances:\n" + "".join(instances), str(tmpdir))
    try:
        router.wait_models_ready()
        yield router
    finally:
        router.stop()
        for engine in engines:
            engine.stop()


def instance_yaml(name, model, port, dialect="vllm", extra="", sim=""):
    """One `engine: sim` instance; ``sim`` adds options to its sim: block ("itl_ms: 5")."""
    flag = "--enable-sleep-mode" if dialect == "vllm" else "--enable-memory-saver"
    env = '["VLLM_SERVER_DEV_MODE=1"]' if dialect == "vllm" else "[]"
    sim = f", {sim}" if sim else ""
    return (f"  - name: {name}\n    model: {model}\n    engine: sim\n"
            f"    sim: {{dialect: {dialect}{sim}}}\n    engine_env: {env}\n"
            f"    engine_args: ['--host 127.0.0.1', '--port {port}', '{flag}']\n{extra}")


def supervised(config_text, folder):
    """Write the config, `kvrouter render --apply` it (supervisord starts); return the
    Supervisor client and the render folder."""
    from kvrouter.control.supervisor import Supervisor

    path = os.path.join(folder, "kvrouter.yaml")
    with open(path, "w") as fh:
        fh.write(config_text)
    out = os.path.join(folder, "etc")
    r = subprocess.run([PY, "-m", "kvrouter", "render", path, "--out", out, "--apply"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return Supervisor(os.path.join(out, "run", "supervisor.sock")), out


def model_states(base):
    """{model: state} from the router's /model/sleep/status ({} while it does not answer)."""
    status, body = get_json(base + "/model/sleep/status", timeout=5)
    return {m: s["state"] for m, s in body["models"].items()} if status == 200 else {}


@contextlib.contextmanager
def supervised_stack(config_text, base, ready_timeout=30.0, folder=None, up=("ready",)):
    """Render and start the config under supervisord (``folder``/kvrouter.yaml rendered to
    ``folder``/etc), wait until every model of the router at ``base`` is in a state of
    ``up`` (ready; under a GPU budget the router puts one to sleep as soon as all are up,
    so a test with one passes the sleep states too); yield the Supervisor client; shut down
    and print the router's log tail at the end."""
    folder = folder or tempfile.mkdtemp(prefix="kvr-", dir="/tmp")  # short: socket path
    sup, out = supervised(config_text, folder)
    try:
        wait_until(lambda: (lambda st: st and set(st.values()) <= set(up))(model_states(base)),
                   ready_timeout, what=f"all models {' or '.join(up)}")
        yield sup
    finally:
        sup.shutdown()
        log = os.path.join(out, "logs", "kvrouter.log")
        if os.path.exists(log):
            with open(log) as fh:
                print(fh.read()[-4000:])

