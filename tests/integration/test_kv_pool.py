"""The simulated engine follows its kvcached pool's limit while it runs: requests whose KV
does not fit wait (TTFT rises), and `kvrouter kv limit` changes it as kvctl would."""
import os
import subprocess
import threading
import time
import uuid

from kvrouter import kvpool
from tests.helpers import (
    PY,
    SimEngine,
    free_port,
    get_json,
    http,
    instance_yaml,
    run_concurrently,
    wait_until,
)

# 4,096 context x 8 sequences fit kv_cache_gb; one request here needs ~2 + 100 tokens
ARGS = ["--kv-cache-gb", "8", "--max-model-len", "4096", "--itl-ms", "5", "--ttft-ms", "1"]


def _burst(eng, n=4):
    def one(i):
        t0 = time.monotonic()
        status, _, _ = http("POST", eng.base + "/v1/completions",
                            {"model": eng.model, "prompt": "hi", "max_tokens": 100,
                             "ignore_eos": True}, timeout=30)
        assert status == 200
        return time.monotonic() - t0

    start = time.monotonic()
    times, errors = run_concurrently(one, n)
    assert errors == []
    return time.monotonic() - start


def test_the_engine_follows_its_pool_limit():
    ipc = f"kvr_test_{uuid.uuid4().hex[:8]}"
    eng = SimEngine("vllm", model="kv/m", args=ARGS,
                    env={"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": ipc})
    path = kvpool.segment_path(ipc)
    try:
        stats = eng.stats()
        per_token = stats["kv_limit_bytes"] // stats["kv_capacity_tokens"]
        assert kvpool.read(path).total == 8 << 30
        free = _burst(eng)                                   # room for all: in parallel
        kvpool.set_limit(path, 150 * per_token)              # room for one request at a time
        peak = {"n": 0}
        over = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                s = eng.stats()
                peak["n"] = max(peak["n"], s["running"] - s["waiting"])
                info = kvpool.read(path)
                if info.used > info.total:
                    over.append(info)
                time.sleep(0.01)

        w = threading.Thread(target=watch)
        w.start()
        tight = _burst(eng)
        stop.set()
        w.join()
        assert tight > 2.5 * free, (free, tight)             # queued one after another
        assert peak["n"] <= 1 and over == []                 # never over the limit
        kvpool.set_limit(path, 8 << 30)                      # raised again: parallel again
        assert _burst(eng) < 0.6 * tight
        assert kvpool.read(path).used == 0                   # the engine wrote its usage
    finally:
        eng.stop()
    assert not os.path.exists(path)                          # removed when the engine ends


def test_kv_cli_lists_and_limits_pools(tmp_path):
    ipc = f"kvr_test_{uuid.uuid4().hex[:8]}"
    port = free_port()
    eng = SimEngine("vllm", model="kv/cli", port=port, args=ARGS,
                    env={"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": ipc})
    cfg = tmp_path / "k.yaml"
    cfg.write_text("instances:\n" + instance_yaml("cli", "kv/cli", port, "vllm").replace(
        "engine_env: [", f"kvcached_env: [ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipc}]\n"
        "    engine_env: ["))
    try:
        out = subprocess.run([PY, "-m", "kvrouter", "kv", "limit", "kv/cli", "2G", str(cfg)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "KV limit 2.00 GiB" in out.stdout
        assert http("POST", eng.base + "/v1/completions",
                    {"model": "kv/cli", "prompt": "x", "max_tokens": 2})[0] == 200
        assert get_json(eng.base + "/sim/stats")[1]["kv_limit_bytes"] == 2 << 30
        listed = subprocess.run([PY, "-m", "kvrouter", "kv", "list", "--config", str(cfg)],
                                capture_output=True, text=True)
        assert listed.returncode == 0, listed.stderr
        assert "kv/cli" in listed.stdout and "2.00 GiB" in listed.stdout
        bad = subprocess.run([PY, "-m", "kvrouter", "kv", "limit", "kv/cli", "lots", str(cfg)],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "not a size" in bad.stderr
    finally:
        eng.stop()


def test_router_shows_pools_and_sets_limits(tmp_path):
    """/sleep/status, /models, /metrics and `kvrouter status` show the measured pool; the
    admin endpoint sets a limit (with the admin token) and the engine follows it."""
    from tests.helpers import Router

    ipc = f"kvr_test_{uuid.uuid4().hex[:8]}"
    port = free_port()
    eng = SimEngine("vllm", model="kv/r", port=port, args=ARGS,
                    env={"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": ipc})
    rp = free_port()
    text = ("router: {router_host: 127.0.0.1, router_port: %d, admin_token: tok}\n"
            "instances:\n" % rp) + instance_yaml("r", "kv/r", port, "vllm").replace(
        "engine_env: [", f"kvcached_env: [ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipc}]\n"
        "    engine_env: [")
    r = Router(text, str(tmp_path))
    try:
        r.wait_models_ready()
        _, st = get_json(r.base + "/sleep/status")
        pool = st["models"]["kv/r"]["kv_pool"]
        assert pool["limit_bytes"] == 8 << 30 and pool["source"] == "kvcached"
        assert get_json(r.base + "/models")[1]["models"]["kv/r"]["kv_pool"]["limit_bytes"] \
            == 8 << 30
        assert http("POST", r.base + "/model/kv/kv%2Fr?limit=1G")[0] == 401
        status, _, body = http("POST", r.base + "/model/kv/kv%2Fr?limit=1G",
                               headers={"Authorization": "Bearer tok"})
        assert status == 200, body
        assert kvpool.read(kvpool.segment_path(ipc)).total == 1 << 30
        metrics = http("GET", r.base + "/metrics")[2].decode()
        assert 'kvrouter_kv_pool_bytes{kind="limit",model="kv/r"} 1.073741824e+09' in metrics
        cfg = os.path.join(str(tmp_path), "kvrouter.yaml")
        out = subprocess.run([PY, "-m", "kvrouter", "status", cfg], capture_output=True,
                             text=True)
        assert out.returncode == 0 and "0.00/1.00 GiB" in out.stdout, out.stdout + out.stderr
        assert http("POST", r.base + "/model/kv/kv%2Fr?limit=lots",
                    headers={"Authorization": "Bearer tok"})[0] == 400
        for huge in ("inf", "1e30", "nan", str(1 << 64)):   # a located 400, never a 500
            status, _, body = http("POST", r.base + f"/model/kv/kv%2Fr?limit={huge}",
                                   headers={"Authorization": "Bearer tok"})
            assert status == 400 and b"limit" in body, (huge, status, body)
        status, _, body = http("POST", r.base + "/model/kv/kv%2Fr?limit=auto",
                               headers={"Authorization": "Bearer tok"})
        assert status == 200 and b"back to the arbiter" in body, body
    finally:
        r.stop()
        eng.stop()


def test_the_router_moves_kv_memory_to_where_the_demand_is(tmp_path):
    """Two kvcached sims on one GPU with 10 GB for KV (12 GB budget, 1 GB weights each,
    8 GB ceilings): traffic on A grows A's pool and shrinks B's; moved to B, the reverse;
    the limits never add up to more than 10 GB; a sleeping model gives its memory back."""
    from tests.helpers import Router

    ipcs = {m: f"kvr_test_{uuid.uuid4().hex[:8]}" for m in ("a", "b")}
    ports = {m: free_port() for m in ipcs}
    engines = {m: SimEngine("vllm", model=f"kv/{m}", port=ports[m],
                            args=ARGS + ["--enable-sleep-mode", "--weights-gb", "1"],
                            env={"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": ipcs[m]})
               for m in ipcs}
    rp = free_port()
    text = ("router: {router_host: 127.0.0.1, router_port: %d}\n"
            "sleep_manager: {gpu_memory_gb: {\"0\": 12}, kv_rebalance_seconds: 0.3,"
            " min_sleep_duration: 0}\ninstances:\n" % rp) + "".join(
        instance_yaml(m, f"kv/{m}", ports[m], "vllm",
                      "    weights_gb: 1\n    kv_cache_gb: 8\n    gpus: 0\n").replace(
            "engine_env: [", f"kvcached_env: [ENABLE_KVCACHED=true, KVCACHED_IPC_NAME={ipcs[m]}]"
            "\n    engine_env: [") for m in ipcs)
    r = Router(text, str(tmp_path))
    paths = {m: kvpool.segment_path(ipc) for m, ipc in ipcs.items()}

    def limits():
        return {m: kvpool.read(p).total for m, p in paths.items()}

    over, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            got = limits()
            if sum(got.values()) > 10 << 30:
                over.append(got)
            time.sleep(0.02)

    def load(model, n=40, seconds=6.0):
        def one(i):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                http("POST", r.base + "/v1/completions",
                     {"model": f"kv/{model}", "prompt": f"{i}", "max_tokens": 800,
                      "ignore_eos": True}, timeout=60)
        t = threading.Thread(target=run_concurrently, args=(one, n, 90))
        t.start()
        return t

    watcher = threading.Thread(target=sample)
    try:
        r.wait_models_ready()
        # the engines start with 8 GB each (16 > 10): the first rebalance fixes that
        wait_until(lambda: sum(limits().values()) <= 10 << 30, 10, what="first rebalance")
        watcher.start()
        t = load("a")
        wait_until(lambda: limits()["a"] >= 7 << 30 and limits()["b"] <= 3 << 30, 10,
                   what="A's pool grown, B's shrunk")
        t.join(90)
        t = load("b")
        wait_until(lambda: limits()["b"] >= 7 << 30 and limits()["a"] <= 3 << 30, 10,
                   what="B's pool grown, A's shrunk")
        t.join(90)
        assert http("POST", r.base + "/model/sleep/kv%2Fa")[0] == 200
        # to the smallest limit kvcached still applies (0 would read as "unset")
        wait_until(lambda: limits()["a"] == kvpool.MIN_LIMIT, 5,
                   what="the sleeping model's limit dropped")
        wait_until(lambda: limits()["b"] >= 7 << 30, 5, what="its memory went to the other")
        stop.set()
        watcher.join()
        assert over == [], over[:3]
    finally:
        stop.set()
        r.stop()
        for e in engines.values():
            e.stop()
