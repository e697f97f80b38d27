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

from kvrouter.router.worker import FLUSH_SECONDS
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


def _settled_total(base, model):
    """The total once workers have pushed what they served (they batch their records)."""
    last = _total(base, model)
    while True:
        time.sleep(3 * FLUSH_SECONDS)
        now = _total(base, model)
        if now == last:
            return now
        last = now


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


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _in_flight(base, model):
    return get_json(base + "/sleep/status")[1]["models"][model]["requests_in_flight"]


def test_a_reload_storm_leaves_exactly_the_workers_of_the_last_config(tmp_path):
    """100 SIGHUPs in a few seconds, then one that rotates the API key: two workers, both
    on the last config (the revoked key refused everywhere, the new one accepted); a client
    sending all along never had a connection refused; in-flight counts stay exact."""
    a = SimEngine("vllm", A, args=["--enable-sleep-mode", "--itl-ms", "10"])
    rp = free_port()

    def config(key):
        return (f"router: {{router_port: {rp}, workers: 2, api_keys: [{key}]}}\n"
                "sleep_manager: {min_sleep_duration: 0}\ninstances:\n"
                + instance_yaml("a", A, a.port, "vllm"))

    router = Router(config("old-key"), str(tmp_path))
    stop, refused, statuses = threading.Event(), [], []

    def client():
        while not stop.is_set():
            try:
                r = requests.get(router.base + "/health", timeout=10)
                statuses.append(r.status_code)
            except requests.ConnectionError as err:
                refused.append(str(err))
            time.sleep(0.02)

    t = threading.Thread(target=client)
    try:
        router.wait_models_ready()
        wait_until(lambda: len(_workers(router)) == 2, 15, what="two workers")
        t.start()
        # a long stream through the storm: its worker's count must survive every reload
        streamed = {}

        def stream():
            with requests.post(router.base + "/v1/completions", stream=True, timeout=90,
                               headers={"Authorization": "Bearer old-key"}, json={
                                   "model": A, "prompt": "go", "stream": True,
                                   "max_tokens": 500, "ignore_eos": True}) as r:
                streamed["ok"] = b"".join(r.iter_content(None)).rstrip().endswith(b"[DONE]")

        s = threading.Thread(target=stream)
        s.start()
        wait_until(lambda: _in_flight(router.base, A) == 1, 10, what="the stream counted")
        for _ in range(100):
            os.kill(router.proc.p.pid, signal.SIGHUP)
            time.sleep(0.04)
        assert _in_flight(router.base, A) == 1
        with open(router.path, "w") as fh:
            fh.write(config("new-key"))
        os.kill(router.proc.p.pid, signal.SIGHUP)

        def settled():
            pids = _workers(router)
            return len(pids) == 2 and all(
                "--slot" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
                for p in pids)

        def only_new_key():
            codes = {requests.get(router.base + "/v1/models", timeout=10,
                                  headers={"Authorization": "Bearer old-key"}).status_code
                     for _ in range(30)}
            return codes == {401}

        wait_until(only_new_key, 60, what="the revoked key refused by every worker")
        wait_until(settled, 60, what="two workers left")
        for _ in range(30):
            r = requests.get(router.base + "/v1/models", timeout=10,
                             headers={"Authorization": "Bearer new-key"})
            assert r.status_code == 200
        s.join(90)
        assert streamed == {"ok": True}
        wait_until(lambda: _in_flight(router.base, A) == 0, 10, what="the count back to 0")
        stop.set()
        t.join(10)
        assert refused == [] and set(statuses) == {200}, (refused[:3], set(statuses))
    finally:
        stop.set()
        router.stop()
        a.stop()


def test_a_reload_that_moves_the_port_keeps_it_until_a_restart(tmp_path):
    a = SimEngine("vllm", A, args=["--enable-sleep-mode"])
    rp, other = free_port(), free_port()
    text = (f"router: {{router_port: {rp}, workers: 2}}\ninstances:\n"
            + instance_yaml("a", A, a.port, "vllm"))
    router = Router(text, str(tmp_path))
    try:
        router.wait_models_ready()
        wait_until(lambda: len(_workers(router)) == 2, 15, what="two workers")
        old = _workers(router)
        with open(router.path, "w") as fh:
            fh.write(text.replace(f"router_port: {rp}", f"router_port: {other}"))
        os.kill(router.proc.p.pid, signal.SIGHUP)
        wait_until(lambda: not (_workers(router) & old) and len(_workers(router)) == 2, 40,
                   what="the workers replaced")
        assert http("GET", router.base + "/health")[0] == 200      # still the old port
        with pytest.raises(OSError):                                   # not the new one
            http("GET", f"http://127.0.0.1:{other}/health", timeout=1)
        assert "restart the router to move it" in router.proc.output()
    finally:
        router.stop()
        a.stop()


def test_an_owner_killed_while_its_workers_start_leaves_no_worker_and_no_memory(tmp_path):
    a = SimEngine("vllm", A, args=["--enable-sleep-mode"])
    rp = free_port()
    text = (f"router: {{router_port: {rp}, workers: 2}}\ninstances:\n"
            + instance_yaml("a", A, a.port, "vllm"))
    router = Router(text, str(tmp_path), wait=False)
    try:
        wait_until(lambda: len(_workers(router)) == 2, 15, what="workers spawned")
        pids = _workers(router)   # still importing: the owner dies under them
        owner = router.proc.p.pid
        os.kill(owner, signal.SIGKILL)
        wait_until(lambda: not any(_alive(p) for p in pids), 40, what="the workers gone")
        segment = f"/dev/shm/kvrouter-{rp}-{owner}"
        assert os.path.exists(segment)                  # nobody could clean it up
        router.stop()
        again = Router(text, str(tmp_path))               # the next start does
        try:
            wait_until(lambda: not os.path.exists(segment), 10, what="the stale segment gone")
            assert http("GET", again.base + "/health")[0] == 200
        finally:
            again.stop()
    finally:
        router.stop()
        a.stop()


def test_a_second_router_with_workers_on_the_same_port_is_refused(tmp_path):
    """SO_REUSEPORT would let a second router's workers share the port and take some of its
    connections; the second one is refused instead."""
    a = SimEngine("vllm", A, args=["--enable-sleep-mode"])
    rp = free_port()
    text = (f"router: {{router_port: {rp}, workers: 2}}\ninstances:\n"
            + instance_yaml("a", A, a.port, "vllm"))
    os.makedirs(tmp_path / "one")
    os.makedirs(tmp_path / "two")
    first = Router(text, str(tmp_path / "one"))
    second = Router(text, str(tmp_path / "two"), wait=False)
    try:
        assert second.proc.p.wait(30) == 2
        assert f"cannot listen on 127.0.0.1:{rp}" in second.proc.output() or \
            f"cannot listen on 0.0.0.0:{rp}" in second.proc.output()
        assert http("GET", first.base + "/health")[0] == 200
    finally:
        second.stop()
        first.stop()
        a.stop()


def test_engine_native_routes_and_the_passthrough_through_workers(stack):
    base = stack["base"]
    status, headers, raw = http("POST", base + "/tokenize", {"model": A, "prompt": "one two"})
    assert status == 200 and json.loads(raw)["count"] == 2
    status, _, raw = http("GET", base + f"/upstream/{B}/get_model_info")
    assert status == 200 and "model_path" in json.loads(raw)


def test_uploads_and_websockets_through_workers(stack):
    """Each reaches the owner through whichever worker took it, streamed, and is counted."""
    import websocket
    from openai import OpenAI

    base = stack["base"]
    before = _settled_total(base, A)
    client = OpenAI(base_url=base + "/v1", api_key="x")
    audio = bytes(range(256)) * 1000
    for _ in range(4):
        out = client.audio.transcriptions.create(model=A, file=("a.wav", audio, "audio/wav"))
        assert out.text.startswith(f"transcribed {len(audio)} bytes")
    sessions = [websocket.create_connection(f"ws://127.0.0.1:{stack['router'].port}"
                                            f"/v1/realtime?model={A}", timeout=10)
                for _ in range(4)]
    for ws in sessions:
        assert json.loads(ws.recv())["type"] == "session.created"
    in_flight = get_json(base + f"/traffic/stats/{A}")[1]["requests_in_flight"]
    for ws in sessions:
        ws.close()
    assert in_flight == 4
    deadline = time.monotonic() + 10
    while _total(base, A) - before < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _settled_total(base, A) - before == 8
