"""Replicas without sockets: the config's short form and checks, the policy's min_ready and
load wakes, the model-level traffic, and the proxy choosing, retrying and ejecting among
replicas (a fake gate, mock pools)."""
import dataclasses
import json
import tempfile

import pytest

from kvrouter.config import parse_config_text
from kvrouter.control.entry import ModelEntry
from kvrouter.control.policy import Action, ModelView, Snapshot, keep_min_ready, wake_for_load
from kvrouter.control.states import State, group_state
from kvrouter.errors import ConfigErrors
from kvrouter.http.client import UpstreamError
from kvrouter.router.proxy import Proxy
from kvrouter.router.route_key import block_hashes, prompt_text, route_key
from kvrouter.router.routes import RouteTable
from kvrouter.traffic import TrafficMonitor
from tests.fakes import FakeAdapter, FakeGate, FakeResponse, MockPool

S = State


def test_the_short_form_makes_named_replicas_on_consecutive_ports_and_shares_gpus():
    cfg = parse_config_text(
        "kvcached: {enable_kvcached: true}\n"
        "instances:\n"
        "  - {name: llama, model: m, engine: vllm, replicas: 3, gpus: '0,1,2,3,4,5',"
        " engine_args: ['--port 8001 --max-num-seqs 8']}\n"
        "  - {name: small, model: s, engine: vllm, replicas: 2, gpus: '7',"
        " engine_args: ['--port=9001']}\n")
    insts = {i.name: i for i in cfg.instances}
    assert list(insts) == ["llama-1", "llama-2", "llama-3", "small-1", "small-2"]
    assert [insts[f"llama-{k}"].port for k in (1, 2, 3)] == [8001, 8002, 8003]
    assert insts["llama-2"].argv_args == ("--port", "8002", "--max-num-seqs", "8")
    assert insts["small-2"].argv_args == ("--port=9002",)
    assert [insts[f"llama-{k}"].gpus for k in (1, 2, 3)] == ["0,1", "2,3", "4,5"]
    assert dict(insts["llama-3"].env)["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert insts["small-1"].gpus == insts["small-2"].gpus == "7"   # fewer GPUs: shared
    ipc = {dict(i.env)["KVCACHED_IPC_NAME"] for i in cfg.instances}
    assert len(ipc) == 5   # one kvcached pool per engine
    assert {i.key for i in cfg.instances} == {i.name for i in cfg.instances}
    assert insts["llama-1"].replica_of == 3 and insts["llama-1"].route_names == ("m",)


def test_a_model_with_one_engine_keeps_its_model_name_as_key():
    cfg = parse_config_text("instances:\n  - {name: a, model: org/a, engine: vllm,"
                            " engine_args: ['--port 9001']}\n")
    assert cfg.instances[0].key == "org/a" and cfg.instances[0].replica_of == 1


@pytest.mark.parametrize("text,where", [
    ("  - {name: a, model: m, engine: vllm, routing_policy: session, engine_args: ['--port 1']}\n"
     "  - {name: b, model: m, engine: vllm, routing_policy: round_robin, "
     "engine_args: ['--port 2']}\n", "instances[1].routing_policy: replicas of 'm' disagree"),
    ("  - {name: a, model: m, engine: vllm, replicas: 2, engine_args: ['--port 65535']}\n",
     "instances[0].replicas: 2 replicas from port 65535 run past 65535"),
    ("  - {name: a, model: m, engine: vllm, replicas: 2, engine_args: ['--port 10']}\n"
     "  - {name: a-2, model: x, engine: vllm, engine_args: ['--port 20']}\n",
     "instances[1]: duplicate instance name 'a-2'"),
])
def test_replica_mistakes_are_located(text, where):
    with pytest.raises(ConfigErrors) as info:
        parse_config_text("instances:\n" + text, source="c.yaml")
    assert any(where in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


def view(name, state=S.READY, group="m", in_flight=0, last_used=0.0, min_ready=1):
    return ModelView(name=name, state=state, in_flight=in_flight, waiting=0,
                     idle_seconds=100.0 if not in_flight else 0.0, state_seconds=100.0,
                     pinned=False, idle_threshold=10.0, stop_after=None, level=1,
                     gpus=("0",), weights_gb=1.0, kv_cache_gb=1.0, last_used=last_used,
                     group=group, min_ready=min_ready)


def test_min_ready_keeps_the_most_recent_replicas_while_the_model_has_traffic():
    views = (view("a", last_used=1.0), view("b", last_used=5.0), view("c", in_flight=2))
    snap = Snapshot(views, True, {})
    asked = [Action("sleep", "a"), Action("sleep", "b")]
    assert keep_min_ready(snap, asked) == asked          # c still serves: one ready is enough
    two = tuple(dataclasses.replace(v, min_ready=2) for v in views)
    kept = keep_min_ready(Snapshot(two, True, {}), asked)
    assert kept == [Action("sleep", "a")]                # b, the most recent, stays awake


def test_a_model_idle_on_every_replica_sleeps_whole():
    views = (view("a"), view("b"), view("c", state=S.SLEEPING))
    asked = [Action("sleep", "a"), Action("sleep", "b")]
    assert keep_min_ready(Snapshot(views, True, {}), asked) == asked


def test_load_wakes_one_more_replica_at_a_time():
    ready, asleep = S.READY, S.SLEEPING
    assert wake_for_load([ready, asleep, asleep], [3, 0, 0], 1, 4) is None
    assert wake_for_load([ready, asleep, asleep], [4, 0, 0], 1, 4) == 1
    assert wake_for_load([ready, S.WAKING, asleep], [9, 0, 0], 1, 4) is None  # single flight
    assert wake_for_load([asleep, asleep], [0, 0], 1, 0) == 0          # below min_ready
    assert wake_for_load([ready, asleep], [100, 0], 1, 0) is None      # 0: never for load
    assert wake_for_load([ready, ready], [100, 100], 1, 1) is None     # nothing asleep


def test_a_model_shows_its_most_awake_replica():
    assert group_state([S.SLEEPING, S.READY, S.FAILED]) is S.READY
    assert group_state([S.SLEEPING, S.WAKING]) is S.WAKING
    assert group_state([S.FAILED, S.STOPPED]) is S.STOPPED


def test_traffic_counts_each_replica_and_their_model():
    t = TrafficMonitor(["r1", "r2"], parents={"r1": "m", "r2": "m"})
    a, b = t.start("r1"), t.start("r2")
    assert (t.in_flight("m"), t.in_flight("r1")) == (2, 1)
    t.move(b, "r1")
    assert (t.in_flight("r1"), t.in_flight("r2")) == (2, 0)
    t.end(a, "success", 3, 4)
    t.end(b, "upstream_error")
    assert t.models["m"].total == 2 and t.models["r1"].total == 2 and t.models["r2"].total == 0
    assert t.models_shown() == ["m"] and t.replicas("m") == ["r1", "r2"]
    t.external = {"r1": 5, "r2": 1}.get   # router workers' requests
    assert t.in_flight("m") == 6


def test_the_route_key_hashes_whole_blocks_of_the_prompt_and_equal_prefixes_match():
    a = block_hashes(b"x" * 1000, 256)
    b = block_hashes(b"x" * 600 + b"y" * 400, 256)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    body = {"messages": [{"role": "system", "content": "s"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(body) == "<system>s<user>hi"
    key = route_key({"prompt": "p" * 600, "user": "u1"}, {"x-session-id": "h"}, "x-session-id",
                    64)
    assert key.session == "h" and len(key.blocks) == 2
    assert route_key({"prompt": "p", "user": "u1"}, {}, "x-session-id", 64).session == "u1"


CONFIG = """
routing: {policy: round_robin, eject_after_failures: 2, eject_seconds: 30}
instances:
  - {name: m-1, model: org/m, engine: vllm, engine_args: ['--port 9001']}
  - {name: m-2, model: org/m, engine: vllm, engine_args: ['--port 9002']}
  - {name: m-3, model: org/m, engine: vllm, engine_args: ['--port 9003']}
"""
OK = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "hi"}],
      "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


def make(handlers):
    cfg = parse_config_text(CONFIG, base_dir=tempfile.mkdtemp(prefix="kvr-unit-"))
    entries = [ModelEntry(i, FakeAdapter(i), 0.0) for i in cfg.instances]
    pools = {e.name: MockPool(handlers.get(e.name, lambda *a: FakeResponse(
        200, json.dumps(OK).encode(), headers={"content-type": "application/json"})))
        for e in entries}
    traffic = TrafficMonitor.for_config(cfg)
    gate = FakeGate()
    proxy = Proxy(cfg, gate, traffic, RouteTable(entries, cfg.routing),
                  pool_for=lambda e: pools[e.name])
    return proxy, pools, traffic, gate


def post(proxy):
    from tests.unit.test_proxy import request

    return proxy.handle(request({"model": "org/m", "prompt": "x", "max_tokens": 2}))


def test_a_5xx_goes_to_another_replica_and_enough_of_them_eject_it():
    proxy, pools, traffic, _ = make({"m-2": lambda *a: FakeResponse(
        503, b'{"error": {"message": "busy"}}')})
    codes = [post(proxy).status for _ in range(9)]
    assert codes == [200] * 9
    assert len(pools["m-2"].requests) == 2            # two failures: ejected, never tried
    assert len(pools["m-1"].requests) + len(pools["m-3"].requests) == 9
    group = proxy.routes.get("org/m")
    assert group.ejections["m-2"].breaker.value == "open"
    assert traffic.models["org/m"].outcomes["success"] == 9   # counted once, as the model


def test_connection_refused_goes_to_another_replica_and_the_engine_is_marked():
    refused = UpstreamError("connect", "cannot connect: refused")
    proxy, pools, _, gate = make({"m-1": lambda *a: refused})
    assert post(proxy).status == 200
    assert [f[0] for f in gate.failures] == ["m-1"]
    assert len(pools["m-2"].requests) == 1


def test_a_request_written_to_a_live_engine_is_never_resent():
    broken = UpstreamError("first_byte", "engine connection failed: reset")
    proxy, pools, _, _ = make({"m-1": lambda *a: broken})
    assert post(proxy).status == 503                  # the engine still answers: it may have it
    assert len(pools["m-2"].requests) == len(pools["m-3"].requests) == 0
    pools["m-1"].dead = True                          # ... its port refuses: it died with it
    assert post(proxy).status == 200


def test_no_ready_replica_waits_on_the_one_closest_to_serving():
    proxy, pools, _, gate = make({})
    gate.down = {"m-1", "m-2", "m-3"}
    entries = {e.name: e for e in proxy.routes.entries()}
    entries["m-1"].state, entries["m-2"].state, entries["m-3"].state = \
        S.SLEEPING, S.WAKING, S.STOPPED
    assert post(proxy).status == 200
    assert gate.waited_on == ["m-2"] and gate.scaled == ["org/m"]


def test_multipart_fields_are_found_and_replaced_byte_for_byte():
    from kvrouter.http import multipart

    ctype = 'multipart/form-data; boundary="xy"'
    body = (b'--xy\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
            b'\x00\xff--x\r\n--xy\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            b'alias\r\n--xy--\r\n')
    value, span = multipart.field(body, ctype, "model")
    assert value == "alias"
    out = multipart.replace(body, span, "org/real")
    assert multipart.field(out, ctype, "model")[0] == "org/real"
    assert out.replace(b"org/real", b"alias") == body
    assert body[multipart.find(body, ctype, "file")] == b"\x00\xff--x"
    assert multipart.field(body, ctype, "language") == (None, None)
    with pytest.raises(Exception, match="closing boundary"):
        multipart.field(body[:133], ctype, "model")   # cut inside the model field
