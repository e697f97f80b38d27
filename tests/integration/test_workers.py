"""Several router worker processes (router.workers) in front of sim engines: one wake per
model whatever worker a request reaches, exact counts, a killed worker replaced while the
others' streams go on, and the admin API answering the same from every worker."""
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import requests

from tests.helpers import (
    Router,
    SimEngine,
    free_port,
    get_json,
    http,
    instance_yaml,
    run_concurrently,
    wait_until,
)

A, B = "wk/a", "wk/b"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    a = SimEngine("vllm", A, args=["--enable-sleep-mode", "--itl-ms", "10"])
    b = SimEngine("sglang", B, args=["--enable-memory-saver", "--itl-ms", "10"])
    rp = free_port()
    cfg = (f"router: {{router_port: {rp}, workers: 3, max_queue_per_model: 400}}\n"
           "sleep_manager: {min_sleep_duration: 0}\ninstances:\n"
           + instance_yaml("a", A, a.port, "vllm") + instance_yaml("b", B, b.port, "sglang"))
    router = Router(cfg, str(tmp_path_factory.mktemp("workers")))
    try:
        router.wait_models_ready()
        wait_until(lambda: len(_workers(router)) == 3, 15, what="three workers")
        yield {"router": router, "base": router.base, "a": a, "b": b}
    finally:
        router.stop()
        a.stop()
        b.stop()


def _workers(router):
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(router.proc.p.pid)],
                         capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if " worker " in line}


def _served_by(headers):
    return headers.get("X-Kvrouter-Worker") or headers.get("x-kvrouter-worker")


def _total(base, model):
    return get_json(base + f"/traffic/stats/{model}")[1]["model_stats"]["total_requests"]


def _prom(base, model, outcome="success"):
    text = requests.get(base + "/metrics", timeout=10).text
    m = re.search(r'^kvrouter_requests_total\{model="%s",outcome="%s"\} (\S+)$'
                  % (re.escape(model), outcome), text, re.M)
    return float(m.group(1)) if m else 0.0


def test_300_requests_over_three_workers_make_one_wake_and_are_counted_exactly(stack):
    base = stack["base"]
    assert http("POST", base + f"/model/sleep/{A}")[0] == 200
    before_total, before_prom = _total(base, A), _prom(base, A)
    wakes = stack["a"].stats()["wake_calls"]
    workers = set()

    def one(_):
        r = requests.post(base + "/v1/completions", json={"model": A, "prompt": "hi",
                                                          "max_tokens": 4}, timeout=60)
        workers.add(_served_by(r.headers))
        return r.status_code

    codes, errors = run_concurrently(one, 300, timeout=120)
    assert codes == [200] * 300 and not errors, errors[:3]
    assert stack["a"].stats()["wake_calls"] == wakes + 1
    assert len(workers) == 3, workers      # the connections were spread over the workers
    wait_until(lambda: _total(base, A) - before_total == 300, 5, what="exact traffic count")
    assert _prom(base, A) - before_prom == 300
    # ready now: the workers serve it themselves, and the counts stay exact
    codes, errors = run_concurrently(one, 90, timeout=60)
    assert codes == [200] * 90 and not errors, errors[:3]
    wait_until(lambda: _total(base, A) - before_total == 390, 5, what="exact traffic count")
    assert stack["a"].stats()["wake_calls"] == wakes + 1


def test_a_killed_worker_is_replaced_while_the_others_streams_finish(stack):
    base, router = stack["base"], stack["router"]
    results, starts = {}, []

    def stream(i):
        with requests.post(base + "/v1/chat/completions", stream=True, timeout=60, json={
                "model": B, "stream": True, "max_tokens": 150, "ignore_eos": True,
                "messages": [{"role": "user", "content": "go"}]}) as r:
            worker = _served_by(r.headers)
            starts.append(worker)
            text = b""
            try:
                for chunk in r.iter_content(None):
                    text += chunk
                results[i] = (worker, text.rstrip().endswith(b"data: [DONE]"))
            except requests.RequestException:
                results[i] = (worker, False)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: len(starts) == 12, 20, what="all streams started")
    by_worker = {}
    for w in starts:
        by_worker[w] = by_worker.get(w, 0) + 1
    victim = starts[0]
    os.kill(int(victim.split("/")[1]), signal.SIGKILL)
    for t in threads:
        t.join(60)
    survivors = [ok for (w, ok) in results.values() if w != victim]
    assert survivors and all(survivors), results
    assert all(not ok for (w, ok) in results.values() if w == victim)
    wait_until(lambda: len(_workers(router)) == 3 and int(victim.split("/")[1]) not in
               _workers(router), 10, what="the killed worker replaced")
    r = http("POST", base + "/v1/completions", {"model": B, "prompt": "x", "max_tokens": 2})
    assert r[0] == 200


def test_admin_api_answers_the_same_from_every_worker(stack):
    base = stack["base"]
    seen = set()
    for _ in range(12):   # a new connection each time: the kernel picks the worker
        r = requests.post(base + f"/model/sleep/{B}", timeout=30,
                          headers={"Connection": "close"})
        assert r.status_code == 200, r.text
        seen.add(_served_by(r.headers))
        state = requests.get(base + "/model/sleep/status", timeout=10,
                             headers={"Connection": "close"})
        assert state.json()["models"][B]["state"] == "sleeping"
        r = requests.post(base + f"/model/wake/{B}", timeout=30, headers={"Connection": "close"})
        assert r.status_code == 200, r.text
        assert json.loads(requests.get(base + f"/health/{B}", timeout=10).text)
    assert len(seen) >= 2, seen
    time.sleep(0.1)


def test_reload_replaces_the_workers_without_dropping_a_stream_and_sigterm_drains(tmp_path):
    a = SimEngine("vllm", A, args=["--enable-sleep-mode", "--itl-ms", "10"])
    b = SimEngine("sglang", B, args=["--enable-memory-saver"])
    rp = free_port()
    head = (f"router: {{router_port: {rp}, workers: 2}}\n"
            "sleep_manager: {min_sleep_duration: 0}\ninstances:\n")
    router = Router(head + instance_yaml("a", A, a.port, "vllm"), str(tmp_path))
    try:
        router.wait_models_ready()
        wait_until(lambda: len(_workers(router)) == 2, 15, what="two workers")
        old = _workers(router)
        done = {}

        def stream(key):
            with requests.post(router.base + "/v1/completions", stream=True, timeout=60, json={
                    "model": A, "prompt": "go", "stream": True, "max_tokens": 200,
                    "ignore_eos": True}) as r:
                body = b"".join(r.iter_content(None))
                done[key] = body.rstrip().endswith(b"data: [DONE]")

        t = threading.Thread(target=stream, args=("reload",))
        t.start()
        time.sleep(0.3)
        with open(router.path, "w") as fh:   # a model added: the new workers route it
            fh.write(head + instance_yaml("a", A, a.port, "vllm")
                     + instance_yaml("b", B, b.port, "sglang"))
        os.kill(router.proc.p.pid, signal.SIGHUP)
        wait_until(lambda: len(_workers(router) - old) == 2, 15, what="new workers")
        wait_until(lambda: http("POST", router.base + "/v1/completions",
                                {"model": B, "prompt": "x", "max_tokens": 2})[0] == 200,
                   15, what="the added model served")
        t.join(30)
        assert done == {"reload": True}
        wait_until(lambda: not (_workers(router) & old), 40, what="the old workers gone")
        # SIGTERM: the workers stop accepting and finish what they serve
        t = threading.Thread(target=stream, args=("term",))
        t.start()
        time.sleep(0.3)
        os.kill(router.proc.p.pid, signal.SIGTERM)
        t.join(30)
        assert done["term"] is True
        router.proc.p.wait(40)
    finally:
        router.stop()
        a.stop()
        b.stop()


def test_responses_made_on_any_worker_are_found_from_any_worker(stack):
    import openai

    made = []
    for _ in range(6):   # new clients, new connections: spread over the workers
        c = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="x", max_retries=0)
        r = c.responses.with_raw_response.create(model=A, input="hello", max_output_tokens=4)
        made.append((r.headers.get("x-kvrouter-worker"), r.parse()))
        c.close()
    assert len({w for w, _ in made}) >= 2, made
    for _, resp in made:
        c = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="x", max_retries=0)
        again = c.responses.retrieve(resp.id)
        assert again.id == resp.id and again.output_text == resp.output_text
        c.close()


def test_workers_stop_when_their_owner_is_killed(tmp_path):
    a = SimEngine("vllm", A, args=["--enable-sleep-mode"])
    rp = free_port()
    router = Router(f"router: {{router_port: {rp}, workers: 2}}\ninstances:\n"
                    + instance_yaml("a", A, a.port, "vllm"), str(tmp_path))
    try:
        wait_until(lambda: len(_workers(router)) == 2, 15, what="two workers")
        pids = _workers(router)
        os.kill(router.proc.p.pid, signal.SIGKILL)

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    return fh.read().split(")")[-1].split()[0] != "Z"
            except OSError:
                return False

        wait_until(lambda: not any(alive(p) for p in pids), 40, what="the workers gone")
    finally:
        router.stop()
        a.stop()
