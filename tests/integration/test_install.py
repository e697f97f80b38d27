"""`pip install .` (not editable) gives a kvrouter that works outside the source tree."""
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_non_editable_install_ships_templates(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--no-compile", "--target", str(target), ROOT],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "kvrouter" / "templates" / "supervisord.conf.j2").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "k.yaml").write_text(
        "instances:\n  - {name: a, model: m, engine: sim, engine_args: ['--port 19999']}\n")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-m", "kvrouter", "render", "k.yaml", "--out", "o"],
                         cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    conf = (work / "o" / "supervisord.conf").read_text()
    assert "[program:engine-a]" in conf and "[program:kvrouter]" in conf
    probe = subprocess.run([sys.executable, "-c", "import kvrouter, sys; print(kvrouter.__file__)"],
                           cwd=work, capture_output=True, text=True, env=env)
    assert probe.stdout.startswith(str(target))
