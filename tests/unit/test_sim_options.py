"""The simulated engine's options are declared once: the YAML `sim:` block, the rendered
command line and the engine's parser agree."""
import dataclasses
import tempfile

from kvrouter.config import parse_config_text
from kvrouter.config.schema import SimOptions
from kvrouter.render.argv import Interpreters, engine_argv
from kvrouter.sim.options import SimConfig, parse_sim_args


def test_rendered_sim_engine_command_line_parses_back_to_the_yaml_options():
    cfg = parse_config_text(
        "instances:\n  - {name: s, model: sim/m, engine: sim, weights_gb: 3,"
        " sim: {dialect: sglang, ttft_ms: 41.5, itl_ms: 7, startup_seconds: 0,"
        " max_concurrency: 9}, engine_args: ['--port 9100 --mem-fraction-static 0.5']}\n",
        base_dir=tempfile.mkdtemp(prefix="kvr-unit-"))
    inst = cfg.instances[0]
    argv = engine_argv(inst, Interpreters(system="python3", kvrouter="python3"))
    assert argv[:4] == ["python3", "-m", "kvrouter", "sim-engine"]
    sim = parse_sim_args(argv[4:], environ={})
    for f in dataclasses.fields(SimOptions):
        assert getattr(sim, f.name) == getattr(inst.sim, f.name), f.name
    assert (sim.model, sim.port, sim.weights_gb) == ("sim/m", 9100, 3.0)
    assert sim.ignored == ("--mem-fraction-static", "0.5")


def test_defaults_are_shared_with_the_yaml_block():
    parsed = parse_sim_args([], environ={})
    for f in dataclasses.fields(SimOptions):
        assert getattr(parsed, f.name) == f.default == getattr(SimConfig(), f.name), f.name
