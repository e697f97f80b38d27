"""Replicas: three simulated engines serving one model behind a real router, each routing
policy's defining behaviour (the policy changed by a reload), ejection of a replica that
answers 5xx and its return, a replica killed under load, manual sleep of the model and of
one replica, and the views showing each replica under its model."""
import os
import signal
import subprocess
import threading
import time

import pytest
import requests
from openai import OpenAI

from tests.helpers import (
    PY,
    Router,
    SimEngine,
    free_port,
    free_port_run,
    get_json,
    http,
    run_concurrently,
    supervised_stack,
    wait_until,
)

MODEL = "rep/m"
NAMES = ("m-1", "m-2", "m-3")


def _config(rp, ports, policy, extra=""):
    inst = "".join(
        f"  - {{name: {n}, model: {MODEL}, engine: vllm, routing_policy: {policy}, "
        f"engine_args: ['--host 127.0.0.1 --port {p}']}}\n" for n, p in zip(NAMES, ports))
    return (f"router: {{router_port: {rp}, max_queue_per_model: 400}}\n"
            "routing: {eject_after_failures: 3, eject_seconds: 1, wake_at_in_flight: 0}\n"
            "sleep_manager: {min_sleep_duration: 0}\n" + extra + "instances:\n" + inst)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    engines = [SimEngine("vllm", MODEL, args=["--enable-sleep-mode", "--itl-ms", "5",
                                              "--enable-prompt-tokens-details"])
               for _ in NAMES]
    rp = free_port()
    folder = str(tmp_path_factory.mktemp("replicas"))
    router = Router(_config(rp, [e.port for e in engines], "least_outstanding"), folder)
    try:
        router.wait_models_ready()
        yield {"router": router, "base": router.base, "engines": engines, "rp": rp}
    finally:
        print(router.proc.output()[-6000:])
        router.stop()
        for e in engines:
            e.stop()


def _policy(stack, policy):
    """Rewrite the config with ``policy`` and reload (SIGHUP); wait until it serves."""
    router = stack["router"]
    with open(router.path, "w") as fh:
        fh.write(_config(stack["rp"], [e.port for e in stack["engines"]], policy))
    os.kill(router.proc.p.pid, signal.SIGHUP)
    wait_until(lambda: get_json(stack["base"] + "/models")[1]["models"][MODEL].get(
        "routing_policy") == policy, 10, what=f"policy {policy}")
    def all_ready():   # waking any replica still asleep (a sleep may still be finishing)
        http("POST", stack["base"] + f"/model/wake/{MODEL}")
        return all(r["state"] == "ready" for r in get_json(
            stack["base"] + "/health/" + MODEL)[1]["replicas"])

    wait_until(all_ready, 15, interval=0.3, what="replicas ready")


def _served(stack):
    return [e.stats()["requests"] for e in stack["engines"]]


def _delta(before, after):
    return [b - a for a, b in zip(before, after)]


def _complete(base, prompt="hi", headers=None, tokens=4, user=None):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens}
    if user:
        body["user"] = user
    return requests.post(base + "/v1/completions", json=body, headers=headers or {},
                         timeout=30)


def test_the_views_show_each_replica_under_its_model(stack):
    base = stack["base"]
    _, models = get_json(base + "/models")
    assert set(models["models"]) == {MODEL}
    assert set(models["models"][MODEL]["replicas"]) == set(NAMES)
    _, health = get_json(base + "/health/all")
    assert set(health["health"]) == {MODEL}
    assert len(health["health"][MODEL]) == 3          # one URL per replica
    assert [r["model"] for r in health["models"][0]["replicas"]] == list(NAMES)
    client = OpenAI(base_url=base + "/v1", api_key="x")
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
    assert out.choices[0].text
    _, stats = get_json(base + "/traffic/stats")
    assert set(stats["models"]) == {MODEL}
    rep = stats["models"][MODEL]["replicas"]
    assert set(rep) == set(NAMES)
    assert stats["models"][MODEL]["total_requests"] == sum(r["total_requests"]
                                                           for r in rep.values())
    _, one = get_json(base + "/traffic/stats/m-2")   # one replica by its instance name
    assert one["model_stats"]["model_name"] == "m-2"
    _, ui = get_json(base + "/ui/state")
    assert [(m["replica_of"], m["model"]) for m in ui["models"]] == [(MODEL, n) for n in NAMES]
    from kvrouter.top import render

    screen = render(ui)
    assert f"{MODEL} [m-1]" in screen and f"{MODEL} [m-3]" in screen
    out = subprocess.run([PY, "-m", "kvrouter", "status", stack["router"].path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and f"{MODEL} [m-2]" in out.stdout, out.stdout + out.stderr
    metrics = requests.get(base + "/metrics", timeout=5).text
    assert f'kvrouter_replica_requests_in_flight{{model="{MODEL}",replica="m-1"}}' in metrics
    assert f'kvrouter_requests_total{{model="{MODEL}",outcome="success"}}' in metrics


def test_least_outstanding_spreads_concurrent_requests(stack):
    _policy(stack, "least_outstanding")
    before = _served(stack)
    codes, errors = run_concurrently(lambda _: _complete(stack["base"], tokens=40).status_code, 30)
    assert not errors, errors
    assert codes == [200] * 30
    got = _delta(before, _served(stack))
    assert sum(got) == 30 and min(got) >= 6, got   # each took a share, none all of them


def test_least_outstanding_packs_sequential_requests_on_the_first(stack):
    """Idle replicas stay idle at low load (so the sleep policy can put them away)."""
    _policy(stack, "least_outstanding")
    before = _served(stack)
    for _ in range(6):
        assert _complete(stack["base"]).status_code == 200
    assert _delta(before, _served(stack)) == [6, 0, 0]


def test_round_robin_takes_turns(stack):
    _policy(stack, "round_robin")
    before = _served(stack)
    for _ in range(6):
        assert _complete(stack["base"]).status_code == 200
    assert _delta(before, _served(stack)) == [2, 2, 2]


def test_power_of_two_uses_every_replica(stack):
    _policy(stack, "power_of_two")
    before = _served(stack)
    codes, errors = run_concurrently(lambda _: _complete(stack["base"], tokens=20).status_code, 30)
    assert not errors, errors
    assert codes == [200] * 30
    got = _delta(before, _served(stack))
    assert sum(got) == 30 and min(got) >= 3, got


def test_session_keeps_a_session_on_one_replica(stack):
    _policy(stack, "session")
    seen = {}
    for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
        for _ in range(3):
            before = _served(stack)
            assert _complete(stack["base"], headers={"x-session-id": session}).status_code == 200
            got = _delta(before, _served(stack))
            seen.setdefault(session, set()).add(got.index(1))
    assert all(len(v) == 1 for v in seen.values()), seen        # sticky
    assert len({next(iter(v)) for v in seen.values()}) >= 2, seen   # spread over replicas
    before = _served(stack)   # the body's `user` is a session too
    for _ in range(3):
        assert _complete(stack["base"], user="zoe").status_code == 200
    assert sorted(_delta(before, _served(stack))) == [0, 0, 3]


def test_cache_aware_sends_a_shared_prefix_where_it_is_cached(stack):
    """Concurrent requests sharing a long prefix: least_outstanding spreads them (each
    replica computes the prefix), cache_aware keeps each prefix on one replica, whose
    prefix cache serves it (reported as vLLM does)."""
    prefixes = [f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(400))
                for i in range(3)]

    def burst(policy):
        _policy(stack, policy)
        client = OpenAI(base_url=stack["base"] + "/v1", api_key="x")
        where, cached = {}, []

        def one(k):
            i = k % 3
            out = client.chat.completions.create(
                model=MODEL, max_tokens=20,
                messages=[{"role": "system", "content": prefixes[i]},
                          {"role": "user", "content": f"question {k}"}])
            cached.append(out.usage.prompt_tokens_details.cached_tokens)
            return i

        for k in range(3):   # the first of each prefix, alone
            one(k)
        before = _served(stack)
        _, errors = run_concurrently(one, 18)
        assert not errors, errors
        where = _delta(before, _served(stack))
        return where, sum(cached)

    spread, cached_lo = burst("least_outstanding")
    assert sum(1 for n in spread if n) >= 2, spread
    kept, cached_ca = burst("cache_aware")
    group = get_json(stack["base"] + f"/health/{MODEL}")[1]
    assert group["routing_policy"] == "cache_aware"
    assert cached_ca > cached_lo, (cached_ca, cached_lo)   # more of the prompts were cached
    assert max(kept) >= 6, kept   # a prefix's requests together


def test_a_replica_answering_5xx_is_ejected_and_comes_back(stack):
    _policy(stack, "round_robin")
    base, bad = stack["base"], stack["engines"][1]
    assert http("POST", bad.base + "/sim/fail?status=503")[0] == 200
    try:
        for _ in range(12):   # every one served (by another replica), none failed
            assert _complete(base).status_code == 200
        _, health = get_json(base + f"/health/{MODEL}")
        rep = {r["model"]: r for r in health["replicas"]}
        assert rep["m-2"]["breaker"] == "open", rep
        assert rep["m-2"]["state"] == "ready"   # its health check passes: trust, not state
        before = _served(stack)
        for _ in range(6):
            assert _complete(base).status_code == 200
        assert _delta(before, _served(stack))[1] == 0   # ejected: not even tried
    finally:
        http("POST", bad.base + "/sim/fail?status=0")
    time.sleep(2.5)   # past its ejection (1 s, up to 2 s on a second ejection): tried again

    def back():
        _complete(base)
        return get_json(base + f"/health/{MODEL}")[1]["replicas"][1]["breaker"] == "closed"

    wait_until(back, 15, what="m-2 back in rotation")
    before = _served(stack)
    for _ in range(6):
        assert _complete(base).status_code == 200
    assert _delta(before, _served(stack))[1] == 2


def test_all_replicas_refusing_is_a_503_that_says_why(stack):
    _policy(stack, "least_outstanding")
    base = stack["base"]
    for e in stack["engines"]:
        http("POST", e.base + "/sim/fail?status=429")
    try:
        codes = [_complete(base).status_code for _ in range(12)]
        assert set(codes) <= {429, 503}, codes
        r = _complete(base)
        assert r.status_code == 503
        assert "ejected" in r.json()["error"]["message"]
    finally:
        for e in stack["engines"]:
            http("POST", e.base + "/sim/fail?status=0")
    _policy(stack, "round_robin")   # a reload starts the model's breakers afresh


def test_manual_sleep_of_the_model_sleeps_every_replica_and_one_by_name(stack):
    base = stack["base"]
    status, _, body = http("POST", base + "/model/sleep/m-3")
    assert status == 200, body
    _, health = get_json(base + f"/health/{MODEL}")
    assert [r["state"] for r in health["replicas"]] == ["ready", "ready", "sleeping"]
    status, _, body = http("POST", base + f"/model/sleep/{MODEL}")
    assert status == 200, body
    _, health = get_json(base + f"/health/{MODEL}")
    assert {r["state"] for r in health["replicas"]} == {"sleeping"}
    assert health["state"] == "sleeping"
    # a request wakes one replica, not all of them
    assert _complete(base).status_code == 200
    states = [r["state"] for r in get_json(base + f"/health/{MODEL}")[1]["replicas"]]
    assert states.count("ready") == 1, states
    status, _, body = http("POST", base + f"/model/wake/{MODEL}")
    assert status == 200, body
    assert {r["state"] for r in get_json(base + f"/health/{MODEL}")[1]["replicas"]} == \
        {"ready"}


def test_elastic_a_burst_wakes_another_replica_and_the_surplus_sleeps(stack):
    _policy(stack, "least_outstanding")
    router = stack["router"]
    with open(router.path, "w") as fh:
        fh.write(_config(stack["rp"], [e.port for e in stack["engines"]], "least_outstanding")
                 .replace("wake_at_in_flight: 0", "wake_at_in_flight: 2")
                 .replace("sleep_manager: {min_sleep_duration: 0}",
                          "sleep_manager: {min_sleep_duration: 0, auto_sleep_enabled: true, "
                          "idle_threshold_seconds: 1.5, check_interval_seconds: 0.2}"))
    os.kill(router.proc.p.pid, signal.SIGHUP)
    base = stack["base"]

    def states():
        return [r["state"] for r in get_json(base + f"/health/{MODEL}")[1]["replicas"]]

    # idle: everything sleeps; one request wakes one replica
    wait_until(lambda: set(states()) == {"sleeping"}, 20, what="all asleep when idle")
    assert _complete(base).status_code == 200
    assert states().count("ready") == 1
    # a burst: more replicas are woken while the first serves
    codes, errors = run_concurrently(lambda _: _complete(base, tokens=60).status_code, 24)
    assert not errors, errors
    assert codes == [200] * 24
    wait_until(lambda: states().count("ready") >= 2, 10, what="a second replica woken")
    _, events = get_json(base + "/ui/state")
    assert any("load:" in e["reason"] for e in events["events"]), events["events"][-10:]
    # a trickle: one replica serves, the surplus goes back to sleep
    deadline = time.time() + 8

    def trickle():
        if time.time() > deadline:
            return None
        assert _complete(base).status_code == 200
        return states().count("ready") == 1 or None

    wait_until(trickle, 12, what="surplus replicas asleep while one serves")
    _policy(stack, "least_outstanding")   # back to the module's config (no auto sleep)


def test_a_replica_killed_under_load_is_ejected_at_once_and_back_after_its_restart(stack):
    """Requests keep coming while one replica is SIGKILLed: none fails (one written to it as
    it died goes to another replica once its port refuses connections: the engine and what
    it did with the request are gone); the replica is out at once and back after its
    restart."""
    _policy(stack, "round_robin")
    base, victim = stack["base"], stack["engines"][2]
    for _ in range(6):
        assert _complete(base).status_code == 200
    os.killpg(victim.proc.p.pid, signal.SIGKILL)
    killed = time.monotonic()
    results = [_complete(base).status_code for _ in range(30)]
    assert results == [200] * 30, results

    def failed():
        rep = {r["model"]: r["state"] for r in
               get_json(base + f"/health/{MODEL}")[1]["replicas"]}
        return rep["m-3"] == "failed"

    wait_until(failed, 5, what="m-3 marked failed")
    assert time.monotonic() - killed < 5
    port = victim.port
    stack["engines"][2] = SimEngine("vllm", MODEL, port=port,
                                    args=["--enable-sleep-mode", "--itl-ms", "5",
                                          "--enable-prompt-tokens-details"])
    wait_until(lambda: get_json(base + f"/health/{MODEL}")[1]["replicas"][2]["state"] ==
               "ready", 15, what="m-3 back after its restart")
    before = _served(stack)
    for _ in range(6):
        assert _complete(base).status_code == 200
    assert _delta(before, _served(stack))[2] == 2


def test_workers_balance_replicas_on_shared_counts_and_wake_each_once(tmp_path):
    """Three router workers, two replicas: concurrent requests spread over both replicas
    and are counted exactly once; the replicas asleep, a burst makes one wake per replica
    whatever worker each request reached."""
    engines = [SimEngine("vllm", MODEL, args=["--enable-sleep-mode", "--itl-ms", "10"])
               for _ in range(2)]
    rp = free_port()
    cfg = (f"router: {{router_port: {rp}, workers: 3, max_queue_per_model: 400}}\n"
           "routing: {policy: least_outstanding, wake_at_in_flight: 1}\n"
           "sleep_manager: {min_sleep_duration: 0}\ninstances:\n" + "".join(
               f"  - {{name: w-{i}, model: {MODEL}, engine: vllm, "
               f"engine_args: ['--host 127.0.0.1 --port {e.port}']}}\n"
               for i, e in enumerate(engines)))
    router = Router(cfg, str(tmp_path))
    try:
        router.wait_models_ready()
        base = router.base
        wait_until(lambda: get_json(base + "/health")[1]["status"] == "healthy", 10)
        before = [e.stats()["requests"] for e in engines]
        codes, errors = run_concurrently(lambda _: _complete(base, tokens=30).status_code, 60)
        assert not errors and codes == [200] * 60, (codes, errors)
        got = [e.stats()["requests"] - b for e, b in zip(engines, before)]
        assert sum(got) == 60 and min(got) >= 15, got

        def counted():
            s = get_json(base + f"/traffic/stats/{MODEL}")[1]
            return s["total_requests"] == 60 and sum(
                r["total_requests"] for r in s["replicas"].values()) == 60

        wait_until(counted, 10, what="every request counted once, by model and replica")
        assert http("POST", base + f"/model/sleep/{MODEL}")[0] == 200
        wakes = [e.stats()["wake_calls"] for e in engines]
        codes, errors = run_concurrently(lambda _: _complete(base, tokens=30).status_code, 40)
        assert not errors and codes == [200] * 40, (codes, errors)
        wait_until(lambda: [e.stats()["wake_calls"] - w for e, w in zip(engines, wakes)]
                   == [1, 1], 10, what="one wake per replica")
    finally:
        print("\n".join(line for line in router.proc.output().splitlines()
                        if "kvrouter.access" not in line)[-4000:])
        router.stop()
        for e in engines:
            e.stop()


def test_under_supervisord_a_killed_replica_is_restarted_and_rejoins(tmp_path):
    """`replicas: 3` rendered for supervisord: three engine programs; one SIGKILLed while
    clients stream: no request fails before its first byte, supervisord restarts the
    engine and the router sends it traffic again."""
    rp, first = free_port(), free_port_run(3)
    cfg = (f"router: {{router_host: 127.0.0.1, router_port: {rp}}}\n"
           "routing: {policy: round_robin}\n"
           "instances:\n"
           "  - name: sv\n    model: sv/m\n    engine: sim\n    replicas: 3\n"
           "    sim: {dialect: vllm, itl_ms: 10, startup_seconds: 0}\n"
           "    engine_env: ['VLLM_SERVER_DEV_MODE=1']\n"
           f"    engine_args: ['--host 127.0.0.1', '--port {first}', '--enable-sleep-mode']\n")
    base = f"http://127.0.0.1:{rp}"
    with supervised_stack(cfg, base, folder=str(tmp_path)) as sup:
        names = {p["name"] for p in sup.all_processes()}
        assert {"engine-sv-1", "engine-sv-2", "engine-sv-3"} <= names, names
        pid = sup.process_info("engine-sv-2")["pid"]
        results, refused = [], []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    r = requests.post(base + "/v1/completions", stream=True, timeout=30,
                                      json={"model": "sv/m", "prompt": "hi", "max_tokens": 30,
                                            "stream": True})
                    first_chunk = next(r.iter_content(chunk_size=None), b"")
                    results.append(r.status_code if first_chunk else 0)
                    if r.status_code != 200:
                        refused.append(first_chunk[:300])
                    for _ in r.iter_content(chunk_size=None):
                        pass
                except requests.RequestException:
                    results.append(-1)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: sup.process_info("engine-sv-2")["pid"] not in (0, pid) and
                   sup.process_info("engine-sv-2")["statename"] == "RUNNING", 20,
                   what="supervisord restarted engine-sv-2")
        wait_until(lambda: get_json(base + "/health/sv/m")[1]["replicas"][1]["state"] ==
                   "ready", 20, what="sv-2 back in the router")
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        if set(results) != {200}:   # what the router said of it
            with open(tmp_path / "etc" / "logs" / "kvrouter.log") as fh:
                print("".join(line for line in fh if "kvrouter.access" not in line)[-6000:])
        assert results and set(results) == {200}, refused   # none failed before a byte
        _, stats = get_json(base + "/traffic/stats/sv-2")
        before = stats["total_requests"]
        for _ in range(6):
            assert _complete_model(base, "sv/m") == 200
        assert get_json(base + "/traffic/stats/sv-2")[1]["total_requests"] == before + 2


def _complete_model(base, model):
    return requests.post(base + "/v1/completions", timeout=30,
                         json={"model": model, "prompt": "hi", "max_tokens": 2}).status_code
