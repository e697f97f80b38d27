"""Config loading: every invalid case is a data file whose located message is asserted."""
import glob
import os

import pytest

from kvrouter.config import load_config, parse_config_text
from kvrouter.errors import ConfigErrors
from tests.helpers import ROOT, SEED_CONFIG

DATA = os.path.join(os.path.dirname(__file__), "data")
INVALID = sorted(glob.glob(os.path.join(DATA, "invalid", "*.yaml")))


def _expected(path):
    with open(path) as fh:
        first = fh.readline()
    assert first.startswith("# expect: "), path
    return first[len("# expect: "):].strip()


@pytest.mark.parametrize("path", INVALID, ids=[os.path.basename(p) for p in INVALID])
def test_invalid_config_gets_located_error(path):
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    messages = [str(e) for e in info.value.errors]
    expected = _expected(path)
    want = os.path.join(os.path.dirname(path), expected)
    assert any(m.startswith(want) for m in messages), (want, messages)
    # every message names the file
    assert all(m.startswith(path) for m in messages), messages


def test_invalid_cases_cover_the_issue_list():
    names = {os.path.basename(p)[:-5] for p in INVALID}
    for case in ("yaml_syntax", "unknown_key", "wrong_type_bool", "missing_model",
                 "duplicate_name", "duplicate_model", "duplicate_port", "unknown_engine",
                 "bad_keyvalue", "port_out_of_range", "no_port"):
        assert case in names


def test_seed_config_validates_unchanged():
    cfg = load_config(SEED_CONFIG)
    a, b = cfg.instances
    assert (a.name, a.engine, a.port, a.connect_host) == ("instance1", "vllm", 12346, "127.0.0.1")
    assert (b.name, b.engine, b.port) == ("instance2", "sglang", 30000)
    # "--gpu-memory-utilization 0.5" is one item holding a flag and its value
    assert a.argv_args[3:5] == ("--gpu-memory-utilization", "0.5")
    env = dict(a.env)
    assert env["KVCACHED_GPU_UTILIZATION"] == "0.95"
    assert env["KVCACHED_PAGE_PREALLOC_ENABLED"] == "true"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["KVCACHED_IPC_NAME"] == "kvcached_instance1"
    assert dict(b.env)["KVCACHED_IPC_NAME"] == "kvcached_instance2"
    assert cfg.sleep_manager.min_sleep_duration == 80
    assert cfg.router.router_port == 8080
    # the seed points at venvs this machine does not have: a warning, not an error
    assert len(cfg.warnings) == 2 and "does not exist" in cfg.warnings[0]


def test_missing_venv_is_an_error_under_strict():
    with pytest.raises(ConfigErrors) as info:
        load_config(SEED_CONFIG, strict=True)
    assert "instances[0].venv_path" in str(info.value)
    assert "does not exist on this machine" in str(info.value)


def test_relative_paths_resolve_against_config_folder():
    cfg = parse_config_text(
        "instances:\n  - {name: a, model: m, engine: vllm, using_venv: true,"
        " venv_path: ../venvs/v, engine_args: ['--port 1']}\nlog_dir: logs\n",
        source="x.yaml", base_dir="/srv/kv/etc")
    assert cfg.instances[0].venv_path == "/srv/kv/venvs/v"
    assert cfg.log_dir == "/srv/kv/etc/logs"
    assert cfg.benchmark.results_dir == "/srv/kv/etc/bench-results"


def test_aliases_and_upstream_name():
    cfg = parse_config_text(
        "instances:\n  - name: a\n    model: org/m\n    engine: vllm\n"
        "    served_model_names: [fast]\n"
        "    engine_args: ['--port=9 --served-model-name up other']\n")
    inst = cfg.instances[0]
    assert inst.route_names == ("org/m", "up", "other", "fast")
    assert inst.upstream_model == "up"
    assert inst.base_url == "http://127.0.0.1:9"  # where the router connects: loopback


def test_kvcached_ipc_name_kept_when_set_and_absent_when_disabled():
    cfg = parse_config_text(
        "instances:\n"
        "  - {name: a, model: m1, engine: vllm, engine_args: ['--port 1'],"
        " kvcached_env: ['ENABLE_KVCACHED=1', 'KVCACHED_IPC_NAME=mine']}\n"
        "  - {name: b, model: m2, engine: vllm, engine_args: ['--port 2']}\n"
        "  - {name: c.d, model: m3, engine: sglang, engine_args: ['--port 3'],"
        " kvcached_env: ['ENABLE_KVCACHED=true']}\n")
    a, b, c = cfg.instances
    assert dict(a.env)["KVCACHED_IPC_NAME"] == "mine"
    assert "KVCACHED_IPC_NAME" not in dict(b.env) and not b.kvcached_enabled
    assert dict(c.env)["KVCACHED_IPC_NAME"] == "kvcached_c_d"


def test_all_errors_reported_together():
    with pytest.raises(ConfigErrors) as info:
        parse_config_text("router: {router_port: 0, log_level: loud}\n"
                          "instances:\n  - {name: a, model: m, engine: vllm, engine_args: []}\n",
                          source="f.yaml")
    text = str(info.value)
    assert "router.router_port" in text and "router.log_level" in text


def test_default_config_validates():
    cfg = load_config(os.path.join(ROOT, "etc", "kvrouter.yaml"))
    assert {i.dialect for i in cfg.instances} == {"vllm", "sglang"}
    assert all(i.engine == "sim" for i in cfg.instances)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "etc", "examples", "*.yaml"))))
def test_examples_validate(path):
    load_config(path)


def test_config_reference_doc_is_current():
    from kvrouter.config.reference import markdown

    with open(os.path.join(ROOT, "docs", "config.md")) as fh:
        assert fh.read().strip() == markdown().strip(), "run: kvrouter config-reference > docs/config.md"


# sha256 of the seed project's example-config.yaml, as the seed published it
SEED_SHA256 = "69ced013b979f45ec2959a34c72659d071d8f5781a0ef2046600b28228ececc8"


def test_seed_copy_is_verbatim():
    """The seed's config is read unchanged: the copy in etc/examples is byte for byte the
    seed's (no edit may 'fix' it to suit the loader)."""
    import hashlib

    with open(SEED_CONFIG, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == SEED_SHA256


def test_monitoring_files_are_valid():
    import json

    import yaml

    with open(os.path.join(ROOT, "etc", "prometheus", "prometheus.yml")) as fh:
        prom = yaml.safe_load(fh)
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert jobs == {"kvrouter", "engines"}
    with open(os.path.join(ROOT, "etc", "grafana", "kvrouter-dashboard.json")) as fh:
        dash = json.load(fh)
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("kvrouter_requests_total", "kvrouter_time_to_first_token_seconds_bucket",
                   "kvrouter_tokens_total", "kvrouter_model_state"):
        assert metric in exprs


def test_level2_refused_for_old_vllm_in_venv(tmp_path):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "vllm-0.9.2.dist-info").mkdir(parents=True)
    text = ("instances:\n  - {name: a, model: m, engine: vllm, using_venv: true, venv_path: venv,"
            " sleep: {level: 2}, engine_args: ['--port 1']}\n")
    with pytest.raises(ConfigErrors, match=r"instances\[0\].sleep.level: level 2 needs vLLM "
                                           r">= 0.10.2.*0.9.2"):
        parse_config_text(text, source="k.yaml", base_dir=str(tmp_path))
    (site / "vllm-0.9.2.dist-info").rename(site / "vllm-0.11.0.dist-info")
    assert parse_config_text(text, source="k.yaml", base_dir=str(tmp_path)).instances[0]


def test_seed_loader_forms_are_accepted_with_located_warnings():
    cfg = parse_config_text(
        "instances:\n"
        "  - model: meta-llama/Llama-3.2-1B\n"
        "    engine: sgl\n"
        "    args: '--port 12346 --mem-fraction-static 0.5'\n",
        source="seed.yaml")
    inst = cfg.instances[0]
    assert (inst.name, inst.engine, inst.port) == ("Llama-3.2-1B", "sglang", 12346)
    assert inst.argv_args == ("--port", "12346", "--mem-fraction-static", "0.5")
    text = "\n".join(cfg.warnings)
    for expected in ("seed.yaml:4: instances[0].engine_args: read from `args`",
                     "seed.yaml:4: instances[0].engine_args: one string",
                     "seed.yaml:3: instances[0].engine: `sgl` read as `sglang`",
                     "seed.yaml:2: instances[0].name: missing: named 'Llama-3.2-1B'"):
        assert expected in text, text


def test_a_sleep_policy_may_carry_its_parameter():
    base = "instances:\n  - {name: a, model: m, engine: vllm, engine_args: ['--port 8001']}\n"
    for name in ("lru:30", "ttl:5", "slo:0.995", "slo", "static-sized"):
        cfg = parse_config_text(f"sleep_manager: {{policy: '{name}'}}\n" + base, source="f.yaml")
        assert cfg.sleep_manager.policy == name
    for name, why in (("slo:5", "must be from 0.5 to 0.9999"),
                      ("static:3", "takes no parameter"),
                      ("lru:soon", "must be from 0 to"),
                      ("lrv:30", "expected one of lru")):
        with pytest.raises(ConfigErrors) as info:
            parse_config_text(f"sleep_manager: {{policy: '{name}'}}\n" + base, source="f.yaml")
        assert "f.yaml:1: sleep_manager.policy" in str(info.value), str(info.value)
        assert why in str(info.value)
