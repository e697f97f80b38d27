"""Rendering: golden files, argv round-trip through supervisor's own parser, file ownership."""
import os
import shlex
import shutil

import pytest

from kvrouter.config import load_config, parse_config_text
from kvrouter.config.cluster import on_host
from kvrouter.errors import RenderError
from kvrouter.render import RenderOptions, compile_config, write_files
from kvrouter.render.argv import Interpreters, engine_argv
from kvrouter.render.quoting import supervisor_command, supervisor_environment, systemd_exec
from tests.helpers import SEED_CONFIG

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = os.path.join(DATA, "golden")
PY = Interpreters(kvrouter="/opt/kvrouter/bin/python", system="/usr/bin/python3")
UPDATE = os.environ.get("KVROUTER_UPDATE_GOLDEN") == "1"


def _fixed(path):
    with open(path) as fh:
        text = fh.read()
    return parse_config_text(text, source="/srv/kvrouter/etc/kvrouter.yaml",
                             base_dir="/srv/kvrouter/etc")


CLUSTER = os.path.join(DATA, "cluster.yaml")
# case -> (config, cluster host rendered)
CASES = {"seed": (SEED_CONFIG, None), "full": (os.path.join(DATA, "full.yaml"), None),
         "cluster-gpu-a": (CLUSTER, "gpu-a"), "cluster-gpu-b": (CLUSTER, "gpu-b"),
         "cluster-edge": (CLUSTER, "edge")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    path, host = CASES[case]
    cfg = on_host(_fixed(path), host)
    files = compile_config(cfg, RenderOptions("/srv/kvrouter/etc", PY, open_files=1048576))
    folder = os.path.join(GOLDEN, case)
    if UPDATE:
        for rel, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
            with open(os.path.join(folder, rel), "w") as fh:
                fh.write(text)
    expected = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p) as fh:
                expected[os.path.relpath(p, folder)] = fh.read()
    assert sorted(files) == sorted(expected)
    for rel in files:
        assert files[rel] == expected[rel], f"{case}/{rel} differs (KVROUTER_UPDATE_GOLDEN=1)"


def test_rendering_is_deterministic():
    cfg = _fixed(CASES["full"][0])
    assert compile_config(cfg, RenderOptions("/x", PY)) == compile_config(cfg, RenderOptions("/x", PY))


def _supervisor_programs(conf_path):
    from supervisor.options import ServerOptions

    opts = ServerOptions()
    opts.realize(args=["-c", conf_path])
    return {p.name: p for g in opts.process_group_configs for p in g.process_configs}


def test_supervisord_parses_back_the_same_argv_and_env(tmp_path):
    cfg = load_config(CASES["full"][0])
    out = tmp_path / "out"
    files = compile_config(cfg, RenderOptions(str(out), PY))
    write_files(str(out), files, extra_dirs=[str(out / "run"), cfg.log_dir])
    try:
        progs = _supervisor_programs(str(out / "supervisord.conf"))
    finally:
        os.rmdir(cfg.log_dir)
    for inst in cfg.instances:
        prog = progs[f"engine-{inst.name}"]
        argv = shlex.split(prog.command)
        if argv[0] == "/bin/sh":
            argv = argv[3:]
        assert argv == engine_argv(inst, PY)
        venv = {"VIRTUAL_ENV": inst.venv_path,
                "PATH": f"{inst.venv_path}/bin:{os.environ['PATH']}"} if inst.using_venv else {}
        assert prog.environment == {**dict(inst.env), **venv}
    assert progs["engine-llama"].environment["PROMPT_PREFIX"] == 'say "hi", then 100% done'
    # benchmark clients are not in `all` until `kvrouter bench start` loads them
    assert "kvrouter" in progs and not any(p.startswith("bench-") for p in progs)
    os.makedirs(out / "run" / "bench")
    shutil.copy(out / "supervisord-bench.conf", out / "run" / "bench" / "bench.conf")
    os.makedirs(cfg.log_dir)
    try:
        progs = _supervisor_programs(str(out / "supervisord.conf"))
    finally:
        os.rmdir(cfg.log_dir)
    assert set(progs) >= {"kvrouter", "bench-builtin-llama", "bench-guide"}
    assert progs["bench-guide"].autostart is False
    assert progs["engine-llama"].stopasgroup and progs["engine-llama"].killasgroup


def test_systemd_exec_quoting():
    argv = ["/bin/x", "a b", 'q"uote', "back\\slash", "100%", "$HOME", ""]
    assert systemd_exec(argv) == r'/bin/x "a b" "q\"uote" "back\\slash" "100%%" "$$HOME" ""'


def test_supervisor_quoting_doubles_percent():
    assert supervisor_command(["a", "50%"]) == "a 50%%"
    assert supervisor_environment([("K", "v,1")]) == 'K="v,1"'
    with pytest.raises(RenderError):
        supervisor_environment([("K", "both ' and \"")])


def test_write_files_is_idempotent_and_never_deletes_foreign_files(tmp_path):
    out = tmp_path / "etc"
    out.mkdir()
    (out / "kvrouter.yaml").write_text("mine\n")
    report = write_files(str(out), {"a.conf": "1\n", "systemd/b.service": "2\n"})
    assert report["written"] == ["a.conf", "systemd/b.service"]
    report = write_files(str(out), {"a.conf": "1\n", "systemd/b.service": "2\n"})
    assert report["written"] == [] and len(report["unchanged"]) == 2
    report = write_files(str(out), {"a.conf": "3\n"})
    assert report == {"written": ["a.conf"], "unchanged": [], "removed": ["systemd/b.service"]}
    assert (out / "kvrouter.yaml").read_text() == "mine\n"
    (out / "hand.conf").write_text("hand-written\n")
    with pytest.raises(RenderError, match="not written by kvrouter"):
        write_files(str(out), {"hand.conf": "x\n"})
    assert (out / "hand.conf").read_text() == "hand-written\n"


def test_long_output_folder_moves_socket_to_short_path():
    from kvrouter.render import socket_path

    deep = "/tmp/" + "d" * 120
    assert len(socket_path(deep)) < 100 and socket_path(deep) == socket_path(deep)
    assert socket_path("/srv/etc") == "/srv/etc/run/supervisor.sock"


HOSTILE = "[program:evil]\ncommand=/bin/sh -c 'touch /tmp/pwned'"


@pytest.mark.parametrize("where, yaml_line", [
    ("instances[0].model", '    model: "m/a\\n[program:evil]"\n'),
    ("instances[0].served_model_names[0]", '    served_model_names: ["x\\ny"]\n'),
    ("instances[0].engine_env[0]", '    engine_env: ["A=1\\nB=2"]\n'),
    ("instances[0].engine_args[1]", '    engine_args: ["--port 9001", "--x\\r"]\n'),
    ("instances[0].kvcached_env[0]", '    kvcached_env: ["K=\\tv"]\n'),
])
def test_control_characters_are_refused_where_they_are(where, yaml_line):
    base = {"model": "    model: m/a\n", "engine_args": '    engine_args: ["--port 9001"]\n'}
    key = yaml_line.strip().split(":")[0]
    lines = dict(base, **{key: yaml_line})
    text = "instances:\n  - name: a\n    engine: vllm\n" + "".join(lines.values())
    from kvrouter.errors import ConfigErrors

    with pytest.raises(ConfigErrors) as err:
        parse_config_text(text, source="k.yaml")
    msg = str(err.value.errors[0])
    assert "k.yaml:" in msg and where in msg and "control character" in msg, msg


def test_a_benchmark_client_name_cannot_leave_the_output_folder():
    from kvrouter.errors import ConfigErrors

    text = ("instances:\n  - {name: a, model: m/a, engine: vllm, engine_args: ['--port 9001']}\n"
            "benchmark:\n  clients:\n    - {name: ../../etc/evil, model: m/a}\n")
    with pytest.raises(ConfigErrors, match=r"benchmark.clients\[0\].name: expected letters"):
        parse_config_text(text, source="k.yaml")


def test_the_renderer_refuses_what_the_loader_would_have(tmp_path):
    """Its own guard, for a Config built in code: no value with a newline reaches a file,
    and no file name leaves --out."""
    import dataclasses

    cfg = parse_config_text("instances:\n  - {name: a, model: m/a, engine: vllm, "
                            "engine_args: ['--port 9001']}\n", base_dir=str(tmp_path))
    inst = cfg.instances[0]
    evil = dataclasses.replace(cfg, instances=(dataclasses.replace(inst, model="m\n" +
                                                                   HOSTILE),))
    with pytest.raises(RenderError, match="control character"):
        compile_config(evil, RenderOptions(str(tmp_path / "out"), PY))
    escape = dataclasses.replace(cfg, instances=(dataclasses.replace(inst, name="../../x"),))
    with pytest.raises(RenderError, match="refusing to write"):
        compile_config(escape, RenderOptions(str(tmp_path / "out"), PY))


def test_odd_but_legal_values_come_back_exactly_and_start_nothing(tmp_path):
    """Brackets, semicolons, quotes, % and $ in names, values, arguments and the folder:
    supervisord's own parser reads back exactly what the config says and no other program;
    each unit keeps its sections and one Description."""
    folder = tmp_path / "we%ird (dir)"
    folder.mkdir()
    odd = "org/m [program:evil] ; %(here)s $HOME"
    cfg = parse_config_text(
        "instances:\n  - name: a\n    model: '%s'\n    engine: vllm\n"
        "    engine_env: ['NOTE=a,b %%(ENV_HOME)s \"q\" y', 'DOLLAR=$HOME']\n"
        "    engine_args: ['--port 9001', \"--chat-template '{%% if x %%}[a]; b{%% endif %%}'\"]\n"
        % odd, source=str(folder / "k.yaml"), base_dir=str(folder))
    out = folder / "etc"
    files = compile_config(cfg, RenderOptions(str(out), PY))
    write_files(str(out), files, extra_dirs=[str(out / "run"), str(out / "logs")])
    progs = _supervisor_programs(str(out / "supervisord.conf"))
    assert set(progs) == {"engine-a", "kvrouter"}
    inst = cfg.instances[0]
    assert shlex.split(progs["engine-a"].command) == engine_argv(inst, PY)
    assert progs["engine-a"].environment == dict(inst.env)
    assert progs["engine-a"].directory == str(folder)
    for name, text in files.items():
        if name.endswith(".service"):
            heads = [ln for ln in text.splitlines() if ln.startswith("[")]
            assert heads[:2] == ["[Unit]", "[Service]"] and heads[2:] in ([], ["[Install]"]), \
                (name, heads)
            assert sum(ln.startswith("Description=") for ln in text.splitlines()) == 1
    unit = files["systemd/kvrouter-engine-a.service"]
    assert "%%(here)s" in unit and f"WorkingDirectory={folder}".replace("%", "%%") in unit
