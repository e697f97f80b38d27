"""A YAML edit reaches the running router (SIGHUP, sent by `kvrouter render --apply`)
without dropping a request; a bad edit is refused and the old config kept."""
import os
import subprocess
import tempfile
import threading

import openai

from tests.helpers import (
    PY,
    free_port,
    get_json,
    http,
    instance_yaml,
    run_concurrently,
    supervised_stack,
    wait_until,
)

A, B = "reload/a", "reload/b"


def _config(rp, pa, pb, idle, with_b):
    return ("router: {router_host: 127.0.0.1, router_port: %d}\n"
            "sleep_manager: {idle_threshold_seconds: %d, check_interval_seconds: 0.5}\n"
            "instances:\n%s%s") % (
        rp, idle, instance_yaml("a", A, pa, "vllm", sim="itl_ms: 25, ttft_ms: 5"),
        instance_yaml("b", B, pb, "vllm", sim="itl_ms: 5, ttft_ms: 5") if with_b else "")


def _streamer(base, max_tokens):
    """stream(i): one streamed completion of ``max_tokens`` for A, through the openai SDK;
    (tokens received, finish reason)."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)

    def stream(i):
        tokens, reason = 0, None
        for chunk in client.completions.create(model=A, prompt=f"s{i}", max_tokens=max_tokens,
                                               stream=True, extra_body={"ignore_eos": True}):
            tokens += 1
            reason = chunk.choices[0].finish_reason or reason
        return tokens, reason

    return stream


def test_yaml_edit_reaches_the_router_without_losing_a_request():
    folder = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")
    rp, pa, pb = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{rp}"
    path = os.path.join(folder, "kvrouter.yaml")
    with supervised_stack(_config(rp, pa, pb, 300, False), base, folder=folder) as sup:
        stream = _streamer(base, 80)

        results = {}
        pid = sup.process_info("engine-a")["pid"]

        def run_streams():
            results["out"] = run_concurrently(stream, 50)

        t = threading.Thread(target=run_streams)
        t.start()
        wait_until(lambda: get_json(f"http://127.0.0.1:{pa}/sim/stats")[1]["running"] >= 40,
                   10, what="streams running")
        with open(path, "w") as fh:
            fh.write(_config(rp, pa, pb, 123, True))
        r = subprocess.run([PY, "-m", "kvrouter", "render", path, "--out",
                            os.path.join(folder, "etc"), "--apply"], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "router reloaded its config" in r.stdout
        t.join(60)
        done, errors = results["out"]
        assert errors == [] and len(done) == 50
        assert all(n >= 80 and reason == "length" for n, reason in done), done[:3]
        # the new settings and the new model, with nothing restarted
        _, st = get_json(base + "/sleep/status")
        assert st["idle_threshold_seconds"] == 123
        wait_until(lambda: get_json(base + "/health/reload%2Fb")[0] == 200, 30,
                   what="the added model ready")
        status, _, body = http("POST", base + "/v1/completions",
                               {"model": B, "prompt": "x", "max_tokens": 2})
        assert status == 200, body
        assert sup.process_info("engine-a")["pid"] == pid  # an unchanged engine: untouched

        # a bad edit: render refuses it; a HUP anyway keeps the router on the old config
        with open(path, "w") as fh:
            fh.write(_config(rp, pa, pb, 123, True) + "bogus_key: 1\n")
        bad = subprocess.run([PY, "-m", "kvrouter", "render", path, "--out",
                              os.path.join(folder, "etc"), "--apply"], capture_output=True,
                             text=True)
        assert bad.returncode != 0 and "bogus_key" in bad.stderr
        sup.rpc.signalProcess("kvrouter", "HUP")
        log = os.path.join(folder, "etc", "logs", "kvrouter.log")
        wait_until(lambda: "reload refused" in open(log).read(), 10, what="refusal logged")
        text = open(log).read()
        assert f"{path}:" in text and "bogus_key" in text
        assert http("POST", base + "/v1/completions",
                    {"model": B, "prompt": "x", "max_tokens": 2})[0] == 200


def test_a_changed_engine_command_line_restarts_it_only_after_its_streams_finish():
    folder = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")
    rp, pa, pb = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{rp}"
    path = os.path.join(folder, "kvrouter.yaml")
    with supervised_stack(_config(rp, pa, pb, 300, False), base, folder=folder) as sup:
        stream = _streamer(base, 60)

        pid = sup.process_info("engine-a")["pid"]
        results = {}
        t = threading.Thread(target=lambda: results.update(out=run_concurrently(stream, 40)))
        t.start()
        wait_until(lambda: get_json(f"http://127.0.0.1:{pa}/sim/stats")[1]["running"] >= 30,
                   10, what="streams running")
        with open(path, "w") as fh:   # engine a's command line changes (its ITL)
            fh.write(_config(rp, pa, pb, 300, False).replace("itl_ms: 25", "itl_ms: 20"))
        r = subprocess.run([PY, "-m", "kvrouter", "render", path, "--out",
                            os.path.join(folder, "etc"), "--apply"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "a: restarted with its new command line" in r.stdout, r.stdout + r.stderr
        # requests sent while it restarts wait for the new engine and are served
        late = run_concurrently(lambda i: http("POST", base + "/v1/completions", {
            "model": A, "prompt": "late", "max_tokens": 2}, timeout=60)[0], 5)
        t.join(60)
        done, errors = results["out"]
        assert errors == [] and len(done) == 40, errors[:3]
        assert all(n >= 60 and reason == "length" for n, reason in done), done[:3]
        assert late[1] == [] and set(late[0]) == {200}, late
        assert sup.process_info("engine-a")["pid"] != pid
