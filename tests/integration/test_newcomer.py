"""What someone who clones the project meets: the repository alone, in an empty folder
with nothing beside it, must hold everything its test tiers need."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers import PY, ROOT, Proc, free_port, http, instance_yaml, wait_until


def _copy_of_the_checkout(dest):
    """The files a commit of this working tree would hold (tracked and not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def test_every_tier_is_collected_from_a_lone_clone(tmp_path):
    clone = tmp_path / "alone" / "kvrouter"
    _copy_of_the_checkout(str(clone))
    assert not (tmp_path / "alone" / "shared").exists()
    env = dict(os.environ, KVROUTER_REQUIRE_SYSTEMD="1", KVROUTER_REQUIRE_REDIS="1",
               KVROUTER_REQUIRE_BROWSER="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("KVROUTER_REQUIRE_ENGINE", None)   # the clone has no .venv-engine built yet
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", "tests/unit", "tests/integration",
                          "tests/systemd"], cwd=clone, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tests/systemd/test_units.py::" in out.stdout


def _listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_a_busy_port_is_named_before_anything_starts(tmp_path):
    taken = _listening_socket()
    port = taken.getsockname()[1]
    eng_port = free_port()
    cfg = tmp_path / "kvrouter.yaml"
    cfg.write_text("router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s"
                   % (port, instance_yaml("a", "m/a", eng_port)))
    try:
        out = subprocess.run([PY, "-m", "kvrouter", "render", str(cfg), "--out",
                              str(tmp_path / "etc"), "--apply"], capture_output=True,
                             text=True, timeout=60)
    finally:
        taken.close()
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"router: 127.0.0.1:{port} is in use by pid {os.getpid()}" in out.stderr
    assert f"set router.router_port in {cfg}" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "etc" / "run" / "supervisord.pid").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_router_that_cannot_listen_says_why_and_exits_instead_of_looping(tmp_path, workers):
    taken = _listening_socket()
    port = taken.getsockname()[1]
    cfg = tmp_path / "kvrouter.yaml"
    cfg.write_text("router: {router_host: 127.0.0.1, router_port: %d, workers: %d}\n"
                   "instances:\n%s" % (port, workers, instance_yaml("a", "m/a", free_port())))
    try:
        proc = Proc([PY, "-m", "kvrouter", "serve", str(cfg)])
        try:
            code = proc.p.wait(30)
            text = proc.output()
        finally:
            proc.stop()
    finally:
        taken.close()
    assert code == 2, text
    assert f"cannot listen on 127.0.0.1:{port}: 127.0.0.1:{port} is in use by pid " \
        f"{os.getpid()}" in text and "router.router_port" in text
    assert "Traceback" not in text and "starting another" not in text


def test_wait_ready_shows_what_supervisord_says_of_a_router_that_cannot_start(short_tmp):
    from tests.helpers import supervised

    port = free_port()
    cfg_text = "router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s" % (
        port, instance_yaml("a", "m/a", free_port()))
    from kvrouter.control.supervisor import Supervisor

    sup, out = supervised(cfg_text, short_tmp)
    sup = Supervisor(sup.socket_path, timeout=60)
    try:
        wait_until(lambda: sup.process_info("kvrouter")["statename"] == "RUNNING", 30)
        sup.stop("kvrouter")
        taken = socket.socket()
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen(8)
        try:
            sup.start("kvrouter", wait=False)
            res = subprocess.run([PY, "-m", "kvrouter", "wait-ready",
                                  os.path.join(short_tmp, "kvrouter.yaml"), "--timeout", "4",
                                  "--out", out], capture_output=True, text=True, timeout=60)
        finally:
            taken.close()
        assert res.returncode == 2, res.stdout + res.stderr
        assert "supervisord: the router program is" in res.stderr, res.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    finally:
        sup.shutdown()


def test_the_card_line_make_render_then_supervisorctl_start_all_in_a_fresh_shell(short_tmp):
    """`make render && supervisorctl start all`, typed in a new shell with no venv active."""
    from kvrouter.control.supervisor import Supervisor

    rp = free_port()
    path = os.path.join(short_tmp, "kvrouter.yaml")
    with open(path, "w") as fh:
        fh.write("router: {router_host: 127.0.0.1, router_port: %d}\ninstances:\n%s"
                 % (rp, instance_yaml("a", "m/a", free_port())))
    out, bindir = os.path.join(short_tmp, "etc"), os.path.join(short_tmp, "bin")
    fresh = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ["HOME"]}
    cmd = f"make -s -C {ROOT} render CONFIG={path} OUT={out} BINDIR={bindir} " \
          "&& supervisorctl start all && supervisorctl status"
    try:
        res = subprocess.run(["sh", "-c", cmd], cwd=short_tmp, env=fresh, capture_output=True,
                             text=True, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "supervisord started" in res.stdout and "supervisorctl start all" in res.stdout
        assert re.search(r"engine-a\s+(RUNNING|STARTING)", res.stdout), res.stdout
        assert re.search(r"kvrouter\s+(RUNNING|STARTING)", res.stdout), res.stdout
        wait_until(lambda: http("GET", f"http://127.0.0.1:{rp}/health", timeout=1)[0] == 200,
                   30, what="router answers")
    finally:
        Supervisor(os.path.join(out, "run", "supervisor.sock")).shutdown()


def test_the_readme_sleep_and_wake_lines_and_reloads_that_need_a_restart(tmp_path):
    """`kvrouter sleep llama --level 2` then `kvrouter wake llama` on a config with
    min_sleep_duration, as the README shows them; then reloads of settings that need a
    restart (workers) and one that applies at once (process_manager)."""
    from tests.helpers import Router, SimEngine

    eng = SimEngine("vllm", model="demo/llama", args=["--enable-sleep-mode"])
    text = ("router: {router_host: 127.0.0.1, router_port: %d}\n"
            "sleep_manager: {min_sleep_duration: 10}\ninstances:\n%s"
            % (free_port(), instance_yaml("llama-sim", "demo/llama", eng.port).replace(
                "    engine: sim\n", "    engine: sim\n    served_model_names: [llama]\n")))
    r = Router(text, str(tmp_path))
    try:
        r.wait_models_ready()

        def cli(*args):
            return subprocess.run([PY, "-m", "kvrouter", *args, r.path], capture_output=True,
                                  text=True, timeout=60)

        out = cli("sleep", "llama", "--level", "2")
        assert out.returncode == 0 and "level 2" in out.stdout, out.stderr
        out = cli("wake", "llama-sim")                        # the instance name works too
        assert out.returncode == 2
        assert "allowed in" in out.stderr and "a request to the model wakes it now" in out.stderr
        status = http("GET", r.base + "/sleep/status")[2]
        assert b'"configured_level": 1' in status.replace(b'":1', b'": 1')
        assert http("POST", r.base + "/v1/completions", {"model": "llama", "prompt": "x",
                                                         "max_tokens": 2})[0] == 200
        wait_until(lambda: "refused" in r.proc.output(), 5, what="the refusal logged")
        assert "Traceback" not in r.proc.output()
        # a reload: workers need a restart (said), process_manager applies at once
        with open(r.path) as fh:
            text = fh.read()
        with open(r.path, "w") as fh:
            fh.write("process_manager: systemd\n" + text.replace(
                "router: {", "router: {workers: 2, "))
        os.kill(r.proc.p.pid, signal.SIGHUP)
        wait_until(lambda: "router.workers changed from 1 to 2" in r.proc.output(), 10,
                   what="the workers warning")
        assert "takes effect when the router restarts" in r.proc.output()
        wait_until(lambda: b'"process_manager": "systemd"' in http(
            "GET", r.base + "/ui/state")[2].replace(b'":"', b'": "'), 10,
            what="process_manager applied")
    finally:
        r.stop()
        eng.stop()
