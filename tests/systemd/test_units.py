"""The design card's commands for real: `make install-units`, `systemctl --user start
kvrouter`, `journalctl --user-unit kvrouter`, engine restarts, deep sleep through
systemctl, `systemctl --user stop kvrouter`."""
import json
import os
import signal
import subprocess
import tempfile

import pytest

from tests.helpers import ROOT, free_port, get_json, http, instance_yaml, model_states, wait_until

A, DEEP = "sd/a", "sd/deep"
FAST = "itl_ms: 5, ttft_ms: 5, startup_seconds: 0.3"
UNIT_DIR = os.path.expanduser("~/.config/systemd/user")


def systemctl(*args, check=True):
    out = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                         timeout=60)
    if check:
        assert out.returncode == 0, (args, out.stdout + out.stderr)
    return out.stdout.strip()


def main_pid(unit):
    return int(systemctl("show", "-p", "MainPID", "--value", unit))


def active(unit):
    return systemctl("is-active", unit, check=False)


def install(folder, text):
    path = os.path.join(folder, "kvrouter.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    out = subprocess.run(["make", "-s", "-C", ROOT, "install-units", f"CONFIG={path}",
                          f"OUT={os.path.join(folder, 'etc')}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return sorted(os.listdir(os.path.join(folder, "etc", "systemd")))


def config(rp, pa, pd, router=True):
    return ("process_manager: systemd\n"
            "router: {router_host: 127.0.0.1, router_port: %d, enable_router: %s,"
            " ready_timeout_seconds: 30}\n"
            "sleep_manager: {check_interval_seconds: 0.3, min_sleep_duration: 0,"
            " wake_timeout_seconds: 30}\n"
            "instances:\n%s%s") % (
        rp, "true" if router else "false", instance_yaml("a", A, pa, "vllm", sim=FAST),
        instance_yaml("deep", DEEP, pd, "vllm", "    sleep: {stop_after_seconds: 0.5}\n",
                      sim=FAST))


@pytest.fixture(scope="module")
def stack(user_systemd):
    folder = tempfile.mkdtemp(prefix="kvr-sd-", dir="/tmp")
    rp, pa, pd = free_port(), free_port(), free_port()
    units = install(folder, config(rp, pa, pd))
    base = f"http://127.0.0.1:{rp}"
    try:
        yield {"base": base, "folder": folder, "ports": (rp, pa, pd), "units": units}
    finally:
        systemctl("stop", "kvrouter.target", "kvrouter.service", check=False)
        for name in units:
            path = os.path.join(UNIT_DIR, name)
            if os.path.exists(path):
                os.remove(path)
        systemctl("daemon-reload", check=False)


def _complete(base, model, timeout=60):
    return http("POST", base + "/v1/completions", {"model": model, "prompt": "x",
                                                  "max_tokens": 2}, timeout=timeout)


def test_start_serves_and_journal_shows_the_router(stack):
    base = stack["base"]
    systemctl("start", "kvrouter")
    wait_until(lambda: set(model_states(base).values()) == {"ready"}, 60, what="all ready")
    status, _, body = _complete(base, A)
    assert status == 200, body
    assert active("kvrouter-engine-a.service") == "active"

    def logged():
        out = subprocess.run(["journalctl", "--user-unit", "kvrouter", "--no-pager", "-o", "cat"],
                             capture_output=True, text=True).stdout
        return out if "kvrouter on http://127.0.0.1:" in out and "kvrouter.access" in out \
            else None

    text = wait_until(logged, 15, what="router lines in the journal")
    assert "POST /v1/completions model=sd/a status=200" in text
    # the dashboard's log panel reads the same journal
    status, body = get_json(base + "/ui/logs/router")
    assert status == 200 and body["source"] == "systemd", body
    assert "POST /v1/completions model=sd/a status=200" in body["text"]
    status, body = get_json(base + f"/ui/logs/{A}")
    assert status == 200 and body["unit"] == "kvrouter-engine-a.service", body
    # the names users see in systemctl and the config work too
    for name in ("kvrouter", "kvrouter.service"):
        status, body = get_json(base + f"/ui/logs/{name}")
        assert status == 200 and body["unit"] == "kvrouter.service", (name, body)
    for name in ("a", "kvrouter-engine-a.service"):
        status, body = get_json(base + f"/ui/logs/{name}")
        assert status == 200 and body["unit"] == "kvrouter-engine-a.service", (name, body)


def test_a_killed_engine_is_restarted_and_serves_again(stack):
    pid = main_pid("kvrouter-engine-a.service")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: main_pid("kvrouter-engine-a.service") not in (0, pid), 30,
               what="systemd restarted the engine")
    status, _, body = _complete(stack["base"], A)
    assert status == 200, body


def test_deep_sleep_stops_the_unit_and_a_request_starts_it(stack):
    base = stack["base"]
    assert http("POST", base + "/model/sleep/sd%2Fdeep")[0] == 200
    wait_until(lambda: model_states(base).get(DEEP) == "stopped", 20, what="deep sleep")
    wait_until(lambda: active("kvrouter-engine-deep.service") in ("inactive", "failed"), 20,
               what="engine unit stopped")
    status, _, body = _complete(base, DEEP)
    assert status == 200, body
    assert active("kvrouter-engine-deep.service") == "active"


def test_router_restart_never_restarts_engines(stack):
    pid = main_pid("kvrouter-engine-a.service")
    systemctl("restart", "kvrouter")
    wait_until(lambda: get_json(stack["base"] + "/health", timeout=1)[0] == 200, 30,
               what="router back")
    assert main_pid("kvrouter-engine-a.service") == pid
    status, _, body = _complete(stack["base"], A)
    assert status == 200, body


def test_reload_rereads_the_yaml(stack):
    path = os.path.join(stack["folder"], "kvrouter.yaml")
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(text.replace("check_interval_seconds: 0.3,",
                              "check_interval_seconds: 0.3, idle_threshold_seconds: 77,"))
    systemctl("reload", "kvrouter")
    wait_until(lambda: get_json(stack["base"] + "/sleep/status")[1]
               ["idle_threshold_seconds"] == 77, 15, what="reloaded")


def test_make_render_under_systemd_installs_drains_and_reloads_without_supervisord(stack):
    """`make render` is the one command for an edit under systemd too: units installed and
    reloaded, a changed engine drained then restarted, the router reloaded; no supervisord
    is started and a supervisord.conf of another stack in the folder is left alone."""
    base, folder = stack["base"], stack["folder"]
    rp, pa, pd = stack["ports"]
    etc = os.path.join(folder, "etc")
    sentinel = os.path.join(etc, "supervisord.conf")
    with open(sentinel, "w") as fh:
        fh.write("; the demo's, not ours\n")
    wait_until(lambda: model_states(base).get(A) == "ready", 30, what="a ready")
    pid = main_pid("kvrouter-engine-a.service")
    result = {}

    def slow_stream():
        result["r"] = http("POST", base + "/v1/completions", {
            "model": A, "prompt": "x", "max_tokens": 150, "ignore_eos": True}, timeout=60)

    import threading

    t = threading.Thread(target=slow_stream)
    t.start()
    wait_until(lambda: http("GET", f"http://127.0.0.1:{pa}/sim/stats")[0] == 200 and
               get_json(f"http://127.0.0.1:{pa}/sim/stats")[1]["running"] >= 1, 10,
               what="a request running")
    path = os.path.join(folder, "kvrouter.yaml")
    text = config(rp, pa, pd).replace("check_interval_seconds: 0.3,",
                                      "check_interval_seconds: 0.3, idle_threshold_seconds: 55,")
    with open(path, "w") as fh:
        fh.write(text.replace(FAST, FAST.replace("itl_ms: 5", "itl_ms: 4"), 1))
    out = subprocess.run(["make", "-s", "-C", ROOT, "render", f"CONFIG={path}", f"OUT={etc}",
                          f"BINDIR={os.path.join(folder, 'bin')}"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "a: restarted with its new command line" in out.stdout, out.stdout + out.stderr
    assert "router reloaded its config" in out.stdout
    t.join(60)
    status, _, body = result["r"]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 150
    assert main_pid("kvrouter-engine-a.service") not in (0, pid)
    with open(sentinel) as fh:
        assert fh.read() == "; the demo's, not ours\n"
    assert not os.path.exists(os.path.join(etc, "run", "supervisord.pid"))
    wait_until(lambda: get_json(base + "/sleep/status")[1]["idle_threshold_seconds"] == 55,
               15, what="reloaded")
    wait_until(lambda: model_states(base).get(A) == "ready", 30, what="a ready again")
    assert _complete(base, A)[0] == 200


def test_stop_stops_the_engines_too(stack):
    systemctl("stop", "kvrouter")
    for unit in ("kvrouter-engine-a.service", "kvrouter-engine-deep.service",
                 "kvrouter.service"):
        wait_until(lambda: active(unit) in ("inactive", "failed"), 30, what=f"{unit} stopped")


def test_without_a_router_start_kvrouter_starts_the_engines(stack):
    rp, pa, pd = stack["ports"]
    install(stack["folder"], config(rp, pa, pd, router=False))
    systemctl("start", "kvrouter")
    for port in (pa, pd):
        wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200,
                   30, what=f"engine on {port}")
    systemctl("stop", "kvrouter")
    wait_until(lambda: active("kvrouter-engine-a.service") == "inactive", 30,
               what="engines stopped with kvrouter")
