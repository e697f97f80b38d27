"""The rendered supervisord config runs for real: engines and router start, answer, stop."""
import os
import shutil
import socket
import subprocess

import pytest

from kvrouter.control.supervisor import Supervisor, ensure_supervisord, supervisorctl
from tests.helpers import PY, free_port, get_json, http, instance_yaml, wait_until


def _config(short_tmp, router_port, p1, p2):
    return ("router: {router_host: 127.0.0.1, router_port: %d}\n"
            "launch_delay_seconds: 0.5\n"
            "instances:\n%s%s"
            "benchmark:\n  clients:\n    - {name: smoke, model: sim/one, num_prompts: 5, "
            "concurrency: 2, output_tokens: 4, prompt_tokens: 8}\n") % (
        router_port, instance_yaml("one", "sim/one", p1, "vllm"),
        instance_yaml("two", "sim/two", p2, "sglang"))


def test_render_start_reach_stop_logs(short_tmp):
    rp, p1, p2 = free_port(), free_port(), free_port()
    cfg_path = os.path.join(short_tmp, "kvrouter.yaml")
    with open(cfg_path, "w") as fh:
        fh.write(_config(short_tmp, rp, p1, p2))
    out = os.path.join(short_tmp, "etc")
    r = subprocess.run([PY, "-m", "kvrouter", "render", cfg_path, "--out", out, "--apply"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "supervisord started" in r.stdout
    sock = os.path.join(out, "run", "supervisor.sock")
    sup = Supervisor(sock)
    try:
        # the user's command, from the folder holding etc/supervisord.conf
        started = subprocess.run([PY, "-m", "supervisor.supervisorctl", "start", "all"],
                                 cwd=short_tmp, capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr

        def running():
            states = {p["name"]: p["statename"] for p in sup.all_processes()}
            return states if all(states[n] == "RUNNING"
                                 for n in ("engine-one", "engine-two", "kvrouter")) else None

        states = wait_until(running, 30, what="programs RUNNING")
        # `start all` never starts a benchmark client: they are not even loaded
        assert set(states) == {"engine-one", "engine-two", "kvrouter"}
        base = f"http://127.0.0.1:{rp}"
        wait_until(lambda: get_json(base + "/health/all")[1]["models"][1]["state"] == "ready",
                   20, what="router sees engines ready")
        status, _, body = http("POST", base + "/v1/completions",
                               {"model": "sim/two", "prompt": "hi", "max_tokens": 3})
        assert status == 200, body
        assert http("GET", f"http://127.0.0.1:{p1}/health")[0] == 200

        # the benchmark client runs on demand (one explicit command) and writes its results
        bench = subprocess.run([PY, "-m", "kvrouter", "bench", "start", "smoke", "--out", out],
                               capture_output=True, text=True)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        wait_until(lambda: sup.process_info("bench:bench-smoke")["statename"] == "EXITED", 60,
                   what="bench client finished")
        assert sup.process_info("bench:bench-smoke")["exitstatus"] == 0
        assert os.path.exists(os.path.join(short_tmp, "bench-results", "smoke.json"))
        assert os.path.exists(os.path.join(out, "logs", "bench-smoke.log"))
        stop = subprocess.run([PY, "-m", "kvrouter", "bench", "stop", "--out", out],
                              capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not any(p["group"] == "bench" for p in sup.all_processes())

        # re-render with the same config: nothing changes, supervisord is updated in place
        again = subprocess.run([PY, "-m", "kvrouter", "render", cfg_path, "--out", out,
                                "--apply"], capture_output=True, text=True)
        assert again.returncode == 0 and "supervisord updated" in again.stdout
        assert sup.process_info("engine-one")["statename"] == "RUNNING"

        sup.stop("engine-one")
        assert sup.process_info("engine-one")["statename"] == "STOPPED"
        def port_closed():
            try:
                socket.create_connection(("127.0.0.1", p1), timeout=1).close()
                return False
            except OSError:
                return True

        wait_until(port_closed, 5, what="engine port closed")
    finally:
        sup.shutdown()
    logs = os.listdir(os.path.join(out, "logs"))
    assert {"engine-one.log", "engine-two.log", "kvrouter.log", "supervisord.log"} <= set(logs)
    with open(os.path.join(out, "logs", "engine-two.log")) as fh:
        assert "Application startup complete" in fh.read()


def test_systemd_units_verify(short_tmp):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    cfg_path = os.path.join(short_tmp, "kvrouter.yaml")
    with open(cfg_path, "w") as fh:
        fh.write(_config(short_tmp, free_port(), free_port(), free_port()))
    out = os.path.join(short_tmp, "etc")
    r = subprocess.run([PY, "-m", "kvrouter", "render", cfg_path, "--out", out],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    units = sorted(os.path.join(out, "systemd", f) for f in os.listdir(os.path.join(out, "systemd")))
    assert len(units) == 5  # 2 engines, router, bench client, target
    env = dict(os.environ, XDG_RUNTIME_DIR=short_tmp)
    v = subprocess.run([analyze, "--user", "verify", *units], capture_output=True, text=True,
                       env=env)
    text = v.stdout + v.stderr
    assert v.returncode == 0, text
    assert "Unknown key" not in text and "Unknown section" not in text, text


def test_ensure_supervisord_reports_bad_config(short_tmp):
    conf = os.path.join(short_tmp, "supervisord.conf")
    with open(conf, "w") as fh:
        fh.write("[supervisord]\nlogfile=/nonexistent/dir/x.log\n[unix_http_server]\n"
                 f"file={short_tmp}/s.sock\n")
    from kvrouter.errors import KvrouterError

    with pytest.raises(KvrouterError, match="supervisord failed to start"):
        ensure_supervisord(conf, os.path.join(short_tmp, "s.sock"), timeout=5)
    assert supervisorctl  # imported helper stays usable
