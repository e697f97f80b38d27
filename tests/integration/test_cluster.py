"""Several routers sharing state through a real Redis (cluster.redis_url), on loopback:
three routers (hosts gpu-a 127.0.0.2, gpu-b 127.0.0.3, edge 127.0.0.4) in front of four
simulated engines, two on each GPU host.

redis-server comes from Debian (installed with apt when missing; CI runs as root); without
it these tests skip and say why, unless KVROUTER_REQUIRE_REDIS is set (`make test` sets
it), where they fail."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter

import openai
import pytest

from tests.helpers import (
    PY,
    Router,
    SimEngine,
    free_port,
    get_json,
    http,
    model_states,
    run_concurrently,
    wait_until,
)

HOSTS = (("gpu-a", "127.0.0.2"), ("gpu-b", "127.0.0.3"), ("edge", "127.0.0.4"))
MODELS = ("m0", "m1", "m2", "m3")   # m0, m1 on gpu-a; m2, m3 on gpu-b


def redis_server_or_skip() -> str:
    if not shutil.which("redis-server") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], env=env,
                       capture_output=True)
    path = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                            if os.path.exists("/usr/bin/redis-server") else None)
    if path is None:
        why = "no redis-server for the cluster tests (apt-get install redis-server)"
        if os.environ.get("KVROUTER_REQUIRE_REDIS"):
            pytest.fail(why)
        pytest.skip(why)
    return path


class RedisServer:
    """A real redis-server on a free loopback port, with no persistence (a restart loses
    everything, the hard case)."""

    def __init__(self, binary: str, tls_dir=None, user=None, password=None):
        self.binary = binary
        self.port = free_port()
        self.tls_dir, self.user, self.password = tls_dir, user, password
        auth = f"{user}:{password}@" if user else ""
        if tls_dir:   # TLS only (no plain port), the CA checked by the client
            ca = os.path.join(tls_dir, "cert.pem")
            self.url = (f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                        f"&ssl_ca_certs={ca}")
        else:
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def _argv(self):
        argv = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.tls_dir:
            d = self.tls_dir
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                     f"{d}/cert.pem", "--tls-key-file", f"{d}/key.pem", "--tls-ca-cert-file",
                     f"{d}/cert.pem", "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.user:   # an ACL user of its own; the default user is off
            argv += ["--user", "default", "off", "--user", self.user, "on",
                     f">{self.password}", "~*", "&*", "+@all"]
        return argv

    def start(self):
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        wait_until(lambda: client.ping(), 10, what="redis-server")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def redis_binary():
    return redis_server_or_skip()


@pytest.fixture
def redis_server(redis_binary):
    server = RedisServer(redis_binary)
    yield server
    server.stop()


def _instance(i, port, sleep=""):
    host, addr = HOSTS[0] if i < 2 else HOSTS[1]
    return (f"  - name: m{i}\n    model: m{i}\n    engine: sim\n    host: {host}\n"
            f"    engine_env: ['VLLM_SERVER_DEV_MODE=1']\n"
            f"    engine_args: ['--host {addr}', '--port {port}', '--enable-sleep-mode']\n"
            + (f"    sleep: {{{sleep}}}\n" if sleep else ""))


def cluster_yaml(redis_url, engine_ports, router_ports, sleep_manager="", sleeps=None,
                 lease=1.0, supervisor=None, routers=tuple(h for h, _ in HOSTS), router=""):
    hosts = []
    for (name, addr), port in zip(HOSTS, router_ports):
        extra = f", supervisor_port: {supervisor[name]}" if supervisor and name in supervisor \
            else ""
        hosts.append(f"    - {{name: {name}, address: {addr}, router: {str(name in routers).lower()},"
                     f" router_host: {addr}, router_port: {port}{extra}}}\n")
    creds = "  supervisor_username: kvrouter\n  supervisor_password: s3cret-pw\n" \
        if supervisor else ""
    sleeps = sleeps or {}
    return ((f"router: {{{router}}}\n" if router else "") +
            f"cluster:\n  redis_url: {redis_url}\n  leader_lease_seconds: {lease}\n"
            f"  wake_lease_seconds: {lease}\n{creds}  hosts:\n" + "".join(hosts) +
            "sleep_manager: {check_interval_seconds: 0.2, min_sleep_duration: 0"
            f"{', ' + sleep_manager if sleep_manager else ''}}}\n"
            "instances:\n" + "".join(_instance(i, p, sleeps.get(f"m{i}", ""))
                                     for i, p in enumerate(engine_ports)))


class Stack:
    """Four sim engines, three routers (one per host), all sharing one Redis."""

    def __init__(self, redis, sleep_manager="", sleeps=None, engine_args=(), lease=1.0,
                 router=""):
        self.redis = redis
        ports = [free_port() for _ in MODELS]
        self.engines = {}
        for i, port in enumerate(ports):
            addr = HOSTS[0][1] if i < 2 else HOSTS[1][1]
            self.engines[f"m{i}"] = SimEngine(model=f"m{i}", port=port, host=addr,
                                              args=["--enable-sleep-mode", *engine_args])
        self.router_ports = []
        while len(self.router_ports) < len(HOSTS):   # free on 127.0.0.1 is not free on
            port = free_port()                         # 127.0.0.2/3: never an engine's port
            if port not in ports and port not in self.router_ports:
                self.router_ports.append(port)
        self.config = cluster_yaml(redis.url, ports, self.router_ports, sleep_manager, sleeps,
                                   lease, router=router)
        self.routers = {}
        self.dirs = []
        try:
            for name, _ in HOSTS:   # started in order: gpu-a is the first leader
                self.start_router(name)
                if name == "gpu-a":
                    wait_until(lambda: self.health("gpu-a")["cluster"]["this_router_leads"], 10,
                               what="gpu-a leads")
            for name in self.routers:   # ready, or asleep already (short idle thresholds)
                wait_until(lambda: set(model_states(self.base(name)).values()) <=
                           {"ready", "sleeping"} and len(model_states(self.base(name))) == 4,
                           15, what=f"router {name}: every model settled")
        except BaseException:
            self.stop()
            raise

    def start_router(self, name):
        d = tempfile.mkdtemp(prefix="kvr-cl-")   # a host of its own (state file, config)
        self.dirs.append(d)
        self.routers[name] = Router(self.config, d, cluster_host=name)
        return self.routers[name]

    def base(self, name):
        return self.routers[name].base

    def health(self, name):
        return get_json(self.base(name) + "/health", timeout=5)[1]

    def complete(self, router, model, max_tokens=3, timeout=60):
        return http("POST", self.base(router) + "/v1/completions",
                    {"model": model, "prompt": "hello", "max_tokens": max_tokens},
                    timeout=timeout)

    def stop(self):
        for name, r in self.routers.items():
            out = r.proc.output() if not r.proc.log.closed else ""
            r.stop()
            print(f"--- router {name}\n{out[-3000:]}")
        for e in self.engines.values():
            e.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stack_factory(redis_server):
    made = []

    def make(**kw):
        s = Stack(redis_server, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def test_one_wake_at_the_engine_for_300_requests_over_three_routers(stack_factory):
    """A sleeping model, 300 concurrent requests spread over the 3 routers: every request is
    served and the engine gets exactly one wake call (the wake's lease is the cluster's)."""
    stack = stack_factory(engine_args=["--wake-overhead-seconds", "0.5"])
    status, _, body = http("POST", stack.base("gpu-b") + "/model/sleep/m0")
    assert status == 200, body
    # every router learns it from the one that did it
    wait_until(lambda: all(model_states(stack.base(h)).get("m0") == "sleeping"
                           for h, _ in HOSTS), 5, what="all routers see m0 sleeping")
    assert stack.engines["m0"].stats()["sleep_calls"] == 1
    names = [h for h, _ in HOSTS]
    results, errors = run_concurrently(
        lambda i: stack.complete(names[i % 3], "m0")[0], 300, timeout=90)
    assert errors == []
    assert Counter(results) == {200: 300}
    stats = stack.engines["m0"].stats()
    assert stats["wake_calls"] == 1, stats
    for h in names:
        assert model_states(stack.base(h))["m0"] == "ready"


def test_routers_with_worker_processes_share_one_wake(stack_factory):
    """router.workers: 2 on each of the 3 routers: the owner process of each is the cluster
    member; its workers serve ready models and hand the rest to it."""
    stack = stack_factory(engine_args=["--wake-overhead-seconds", "0.5"], router="workers: 2")
    assert http("POST", stack.base("edge") + "/model/sleep/m3")[0] == 200
    wait_until(lambda: all(model_states(stack.base(h)).get("m3") == "sleeping"
                           for h, _ in HOSTS), 5, what="all routers see m3 sleeping")
    names = [h for h, _ in HOSTS]
    results, errors = run_concurrently(
        lambda i: stack.complete(names[i % 3], "m3"), 90, timeout=90)
    assert errors == [] and Counter(r[0] for r in results) == {200: 90}
    assert all("X-Kvrouter-Worker" in r[1] for r in results)
    assert stack.engines["m3"].stats()["wake_calls"] == 1
    # the workers read the state the cluster set: a ready model is served by them directly
    assert len({r[1]["X-Kvrouter-Worker"] for r in results}) > 3


def test_leader_killed_another_router_takes_over_sleep_decisions(stack_factory):
    """The leader dies (SIGKILL: no goodbye): another router holds the lease within the lease
    time and makes the sleep decisions from then on."""
    lease = 1.0
    stack = stack_factory(sleep_manager="auto_sleep_enabled: true, idle_threshold_seconds: 600",
                          sleeps={"m3": "idle_threshold_seconds: 4"}, lease=lease)
    assert stack.health("gpu-b")["cluster"]["leader"] == "gpu-a"
    os.killpg(stack.routers["gpu-a"].proc.p.pid, signal.SIGKILL)
    sleeps = stack.engines["m3"].stats()["sleep_calls"]   # by gpu-a, if the start was slow
    killed = time.monotonic()

    def new_leader():
        for h in ("gpu-b", "edge"):
            c = stack.health(h)["cluster"]
            if c["this_router_leads"]:
                return h
        return None

    leader = wait_until(new_leader, lease + 3, interval=0.02, what="a new leader")
    took = time.monotonic() - killed
    print(f"leader failover: {leader} leads {took:.2f}s after the kill")
    other = "edge" if leader == "gpu-b" else "gpu-b"
    wait_until(lambda: stack.health(other)["cluster"]["leader"] == leader, 2,
               what=f"{other} knows the new leader")
    # the new leader decides: m3 (idle threshold 4 s), used now, sleeps; the others stay up
    assert stack.complete(other, "m3")[0] == 200
    wait_until(lambda: model_states(stack.base(other)).get("m3") == "sleeping", 15,
               what="the new leader puts m3 to sleep")
    assert stack.engines["m3"].stats()["sleep_calls"] == sleeps + 1
    assert {m: s for m, s in model_states(stack.base(leader)).items() if m != "m3"} == \
        {"m0": "ready", "m1": "ready", "m2": "ready"}


def test_a_model_busy_on_one_router_is_never_slept_by_the_leader(stack_factory):
    """gpu-a leads; m1 (idle threshold 1 s) is busy only through gpu-b and edge: a long stream
    on gpu-b, then requests every 0.4 s on edge. It stays up while they run, and sleeps once
    the cluster's traffic stops."""
    stack = stack_factory(sleep_manager="auto_sleep_enabled: true, idle_threshold_seconds: 600",
                          sleeps={"m1": "idle_threshold_seconds: 1"},
                          engine_args=["--itl-ms", "50"])
    assert stack.health("gpu-a")["cluster"]["this_router_leads"]
    assert stack.complete("gpu-b", "m1")[0] == 200   # (asleep already if the start was slow)
    seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(model_states(stack.base("gpu-a")).get("m1"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        client = openai.OpenAI(base_url=stack.base("gpu-b") + "/v1", api_key="none",
                               max_retries=0)
        chunks = 0
        for _ in client.completions.create(model="m1", prompt="a long answer", max_tokens=60,
                                           stream=True):
            chunks += 1       # 60 tokens at 50 ms: 3 s, three idle thresholds
        assert chunks >= 60
        for _ in range(8):    # gaps of 0.4 s, shorter than the threshold, on another router
            assert stack.complete("edge", "m1")[0] == 200
            time.sleep(0.4)
    finally:
        stop.set()
        watcher.join()
    assert seen == {"ready"}, seen
    sleeps = stack.engines["m1"].stats()["sleep_calls"]
    # the test can fail: with the traffic gone, the leader puts it to sleep
    wait_until(lambda: model_states(stack.base("gpu-b")).get("m1") == "sleeping", 10,
               what="m1 sleeps once idle everywhere")
    assert stack.engines["m1"].stats()["sleep_calls"] == sleeps + 1


def test_redis_restart_during_traffic_loses_no_request(stack_factory):
    """Redis stops and comes back (empty) while the three routers serve: no request fails,
    /health says degraded meanwhile (and no router leads), and the cluster works again
    after: a leader, and a sleep seen everywhere."""
    stack = stack_factory()
    redis = stack.redis
    names = [h for h, _ in HOSTS]
    results = Counter()
    failures = []
    stop = threading.Event()

    def load(k):
        i = 0
        while not stop.is_set():
            router, model = names[(k + i) % 3], MODELS[(k + i) % 4]
            status, _, body = stack.complete(router, model, timeout=30)
            results[status] += 1
            if status != 200:
                failures.append((router, model, status, body[:200]))
            i += 1

    threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        redis.stop()
        wait_until(lambda: all(stack.health(h)["status"] == "degraded" for h in names), 10,
                   what="every router says degraded")
        for h in names:
            body = stack.health(h)
            assert "Redis" in body["message"]
            assert body["cluster"]["this_router_leads"] is False
        during = sum(results.values())
        time.sleep(1.5)
        assert sum(results.values()) > during     # still serving
        redis.start()
        wait_until(lambda: all(stack.health(h)["status"] == "healthy" for h in names), 15,
                   what="every router back on Redis")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert results[200] > 50, results
    wait_until(lambda: any(stack.health(h)["cluster"]["this_router_leads"] for h in names), 5,
               what="a leader again")
    status, _, body = http("POST", stack.base("edge") + "/model/sleep/m2")
    assert status == 200, body
    wait_until(lambda: all(model_states(stack.base(h)).get("m2") == "sleeping" for h in names),
               5, what="the sleep seen by every router")
    assert stack.complete("gpu-a", "m2")[0] == 200
    assert stack.engines["m2"].stats()["wake_calls"] == 1


def test_responses_ids_and_traffic_statistics_are_shared(stack_factory):
    """A response created through one router is found through another; traffic through one
    router shows in every router's statistics."""
    stack = stack_factory()
    client = openai.OpenAI(base_url=stack.base("gpu-a") + "/v1", api_key="none", max_retries=0)
    created = client.responses.create(model="m2", input="hello", max_output_tokens=4)
    other = openai.OpenAI(base_url=stack.base("edge") + "/v1", api_key="none", max_retries=0)
    got = wait_until(lambda: other.responses.retrieve(created.id), 5, what="the response id")
    assert got.id == created.id
    for _ in range(5):
        assert stack.complete("gpu-b", "m3")[0] == 200

    def counted(router):
        return get_json(stack.base(router) + "/traffic/stats/m3")[1]["total_requests"]

    wait_until(lambda: counted("gpu-a") == 5 and counted("edge") == 5, 5,
               what="every router counts gpu-b's requests")
    # each router's Prometheus metrics stay its own (summed across routers by Prometheus)
    _, _, metrics = http("GET", stack.base("gpu-a") + "/metrics")
    assert b'model="m3",status="success"} 5' not in metrics
    # the dashboard and `kvrouter top` say which router this is and who leads
    cluster = get_json(stack.base("edge") + "/ui/state")[1]["cluster"]
    assert cluster["router_id"] == "edge" and cluster["leader"] == "gpu-a"
    assert cluster["routers"] == ["edge", "gpu-a", "gpu-b"]
    # the command line finds a router of the cluster from the config alone
    out = subprocess.run([PY, "-m", "kvrouter", "top", stack.routers["edge"].path, "--once"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "router gpu-a (leader)  routers edge, gpu-a, gpu-b  Redis ok" in out.stdout
    out = subprocess.run([PY, "-m", "kvrouter", "status", stack.routers["edge"].path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and all(m in out.stdout for m in MODELS), out.stderr


def test_remote_deep_sleep_through_supervisord_tcp(redis_server, tmp_path):
    """Host gpu-b's engines run under its own supervisord (rendered with `--host gpu-b`, its
    XML-RPC on 127.0.0.3 over TCP with credentials); the router, on host edge, stops an idle
    engine there (deep sleep) and starts it again for a request."""
    from kvrouter.control.supervisor import Supervisor

    ports = [free_port() for _ in MODELS]
    router_ports = [free_port() for _ in HOSTS]
    sup_port = free_port()
    text = cluster_yaml(redis_server.url, ports, router_ports,
                        "auto_sleep_enabled: true, idle_threshold_seconds: 600",
                        sleeps={"m2": "idle_threshold_seconds: 1, stop_after_seconds: 1"},
                        supervisor={"gpu-b": sup_port}, routers=("edge",))
    folder = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")
    path = os.path.join(folder, "kvrouter.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    out = os.path.join(folder, "gpu-b")
    r = subprocess.run([PY, "-m", "kvrouter", "render", path, "--host", "gpu-b", "--out", out,
                        "--apply"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    conf = open(os.path.join(out, "supervisord.conf")).read()
    assert f"port=127.0.0.3:{sup_port}" in conf
    assert "[program:engine-m2]" in conf and "[program:engine-m0]" not in conf
    assert "[program:kvrouter]" not in conf   # gpu-b runs no router
    local = Supervisor(os.path.join(out, "run", "supervisor.sock"))
    router = None
    try:
        remote = Supervisor(f"http://127.0.0.3:{sup_port}", username="kvrouter",
                            password="s3cret-pw")
        wait_until(lambda: remote.process_info("engine-m2")["statename"] == "RUNNING", 20,
                   what="engine-m2 under gpu-b's supervisord")
        wrong = Supervisor(f"http://127.0.0.3:{sup_port}", username="kvrouter",
                           password="wrong")
        with pytest.raises(Exception, match="401"):
            wrong.process_info("engine-m2")
        router = Router(text, str(tmp_path), cluster_host="edge", wait=True)
        wait_until(lambda: model_states(router.base).get("m2") == "ready", 20,
                   what="m2 ready on the edge router")
        # idle 1 s -> sleep; asleep 1 s -> stopped through gpu-b's supervisord over TCP
        wait_until(lambda: local.process_info("engine-m2")["statename"] == "STOPPED", 20,
                   what="gpu-b's supervisord stopped engine-m2")
        wait_until(lambda: model_states(router.base).get("m2") == "stopped", 5,
                   what="the router reports m2 stopped")
        status, _, body = http("POST", router.base + "/v1/completions",
                               {"model": "m2", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert status == 200, body
        assert json.loads(body)["choices"]
        assert local.process_info("engine-m2")["statename"] in ("STARTING", "RUNNING")
    finally:
        if router is not None:
            print(router.proc.output()[-3000:])
            router.stop()
        local.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def test_render_per_host_keeps_credentials_private(tmp_path):
    """`kvrouter render --host NAME`: that host's part only; a file holding supervisord's
    password is readable by its owner only; a host that is not in the file is an error that
    names the known ones."""
    from tests.unit.test_render import CLUSTER

    out = tmp_path / "gpu-a"
    r = subprocess.run([PY, "-m", "kvrouter", "render", CLUSTER, "--host", "gpu-a", "--out",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(out / "supervisord.conf").st_mode & 0o777) == "0o600"
    assert oct(os.stat(out / "systemd" / "kvrouter.service").st_mode & 0o777) != "0o600"
    r = subprocess.run([PY, "-m", "kvrouter", "render", CLUSTER, "--host", "gpu-c", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0
    assert "--host gpu-c: no such host in cluster.hosts (known hosts: gpu-a, gpu-b, edge)" \
        in r.stderr
    r = subprocess.run([PY, "-m", "kvrouter", "render", CLUSTER, "--out", str(tmp_path / "y")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "render each with --host NAME" in r.stderr


def test_redis_with_an_acl_user_over_tls(redis_binary, tmp_path):
    """rediss:// with an ACL user (the default user off) and the server's CA checked: the
    routers share state as over plain Redis, and /health never shows the password."""
    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.skip("no openssl to make a certificate")
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(tmp_path / "key.pem"), "-out",
                           str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True)
    assert made.returncode == 0, made.stderr
    server = RedisServer(redis_binary, tls_dir=str(tmp_path), user="kvr", password="s3cret-pw")
    stack = None
    try:
        stack = Stack(server)
        health = stack.health("gpu-b")
        assert health["cluster"]["redis"] == "ok" and health["cluster"]["leader"] == "gpu-a"
        assert "s3cret-pw" not in json.dumps(health)
        assert http("POST", stack.base("gpu-b") + "/model/sleep/m1")[0] == 200
        wait_until(lambda: model_states(stack.base("edge")).get("m1") == "sleeping", 5,
                   what="the sleep seen over TLS")
        assert stack.complete("edge", "m1")[0] == 200
    finally:
        if stack is not None:
            stack.stop()
        server.stop()


def test_a_second_router_with_a_live_router_s_id_is_refused(stack_factory):
    stack = stack_factory()
    d = tempfile.mkdtemp(prefix="kvr-cl-")
    stack.dirs.append(d)
    twin = Router(stack.config, d, wait=False, cluster_host="gpu-a")
    try:
        code = twin.proc.p.wait(30)
        text = twin.proc.output()
    finally:
        twin.stop()
    assert code == 2, text[-2000:]
    assert "another live router uses the id 'gpu-a'" in text and "--cluster-host" in text
    assert stack.health("gpu-a")["cluster"]["this_router_leads"]   # the first one carries on


def test_replicas_in_a_cluster_one_wake_per_replica_across_routers(redis_server):
    """Two routers, one model with two replicas: what one router does to a replica the
    other sees, and a burst through both routers wakes each replica once."""
    addr = HOSTS[0][1]
    engines = [SimEngine(model="cl/rep", port=free_port(), host=addr,
                         args=["--enable-sleep-mode", "--itl-ms", "10"]) for _ in range(2)]
    rports = {}
    while len(rports) < 2:
        p = free_port()
        if p not in [e.port for e in engines] and p not in rports.values():
            rports[("gpu-a", "edge")[len(rports)]] = p
    cfg = (f"cluster:\n  redis_url: {redis_server.url}\n  leader_lease_seconds: 1\n"
           "  wake_lease_seconds: 1\n  hosts:\n"
           f"    - {{name: gpu-a, address: {addr}, router: true, router_host: {addr},"
           f" router_port: {rports['gpu-a']}}}\n"
           f"    - {{name: edge, address: 127.0.0.4, router: true, router_host: 127.0.0.4,"
           f" router_port: {rports['edge']}}}\n"
           "sleep_manager: {check_interval_seconds: 0.2, min_sleep_duration: 0}\n"
           "routing: {policy: least_outstanding, wake_at_in_flight: 1}\n"
           "instances:\n" + "".join(
               f"  - {{name: rep-{i}, model: cl/rep, engine: sim, host: gpu-a,"
               f" engine_env: ['VLLM_SERVER_DEV_MODE=1'],"
               f" engine_args: ['--host {addr}', '--port {e.port}', '--enable-sleep-mode']}}\n"
               for i, e in enumerate(engines)))
    routers = {}
    try:
        for name in ("gpu-a", "edge"):
            d = tempfile.mkdtemp(prefix="kvr-cl-")
            routers[name] = Router(cfg, d, cluster_host=name)
        bases = {n: r.base for n, r in routers.items()}

        def replicas(name):
            return {r["model"]: r["state"] for r in
                    get_json(bases[name] + "/health/cl/rep")[1]["replicas"]}

        for name in bases:
            wait_until(lambda: set(replicas(name).values()) == {"ready"}, 15,
                       what=f"{name}: replicas ready")
        assert http("POST", bases["gpu-a"] + "/model/sleep/rep-1")[0] == 200
        wait_until(lambda: replicas("edge") == {"rep-0": "ready", "rep-1": "sleeping"}, 10,
                   what="edge sees rep-1 asleep")
        assert http("POST", bases["edge"] + "/model/sleep/cl/rep")[0] == 200
        wait_until(lambda: set(replicas("gpu-a").values()) == {"sleeping"}, 10,
                   what="gpu-a sees the model asleep")
        wakes = [e.stats()["wake_calls"] for e in engines]

        def one(i):
            base = bases[("gpu-a", "edge")[i % 2]]
            return http("POST", base + "/v1/completions",
                        {"model": "cl/rep", "prompt": "hi", "max_tokens": 30}, timeout=60)[0]

        codes, errors = run_concurrently(one, 40)
        assert not errors and codes == [200] * 40, (codes, errors)
        wait_until(lambda: [e.stats()["wake_calls"] - w for e, w in zip(engines, wakes)]
                   == [1, 1], 10, what="each replica woken once, by one router")
        time.sleep(0.5)
        assert [e.stats()["wake_calls"] - w for e, w in zip(engines, wakes)] == [1, 1]
    finally:
        for name, r in routers.items():
            out = r.proc.output()
            r.stop()
            print(f"--- router {name}\n" + "\n".join(
                line for line in out.splitlines() if "kvrouter.access" not in line)[-3000:])
        for e in engines:
            e.stop()
