"""What a new user gets from `pip install .`: the sdist and wheel built once, the wheel
installed into a brand-new venv (no editable-install finder anywhere on its path), and
every command working from another directory."""
import os
import re
import site
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder, work folder) of a fresh venv holding only the built wheel.

    The dependencies come from the development venv through a .pth *line* (a plain path
    entry, not a site dir: the editable install's own .pth files there are not run), so
    the test stays offline and kvrouter itself can only come from the wheel."""
    tmp = tmp_path_factory.mktemp("install")
    dist = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                            str(dist), ROOT], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    sdist = next(dist.glob("kvrouter-*.tar.gz"))
    wheel = next(dist.glob("kvrouter-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with open(os.path.join(purelib, "dev-deps.pth"), "w") as fh:
        fh.write("\n".join(site.getsitepackages()) + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    work = tmp / "elsewhere"
    work.mkdir()
    return {"bin": venv / "bin", "work": work, "sdist": sdist, "wheel": wheel,
            "purelib": purelib}


def run(installed, *argv):
    return subprocess.run([str(installed["bin"] / "kvrouter"), *argv], cwd=installed["work"],
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH="", PYTHONSAFEPATH="1"))


def test_every_package_and_template_is_in_the_sdist_and_the_wheel(installed):
    packages = sorted({os.path.dirname(os.path.relpath(os.path.join(d, f), ROOT))
                       for d, _, files in os.walk(os.path.join(ROOT, "kvrouter"))
                       for f in files if f.endswith(".py")})
    with zipfile.ZipFile(installed["wheel"]) as zf:
        names = set(zf.namelist())
    with tarfile.open(installed["sdist"]) as tf:
        sdist_names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, f"{pkg} is not a package in the wheel"
        assert f"{pkg}/__init__.py" in sdist_names, f"{pkg} is missing from the sdist"
    assert "kvrouter/templates/supervisord.conf.j2" in names
    assert "templates/supervisord.conf.j2" in sdist_names
    for asset in ("index.html", "app.js", "app.css"):   # the dashboard works offline
        assert f"kvrouter/ui/{asset}" in names and f"kvrouter/ui/{asset}" in sdist_names


def test_kvrouter_comes_from_the_wheel_not_the_source_tree(installed):
    probe = subprocess.run([str(installed["bin"] / "python"), "-c",
                            "import kvrouter; print(kvrouter.__file__)"],
                           cwd=installed["work"], capture_output=True, text=True)
    assert probe.stdout.startswith(installed["purelib"]), probe.stdout + probe.stderr


def _commands(help_text):
    return re.findall(r"^  ([a-z][a-z-]+)  ", help_text.split("Commands:", 1)[1], re.M)


def test_every_command_answers_help_from_another_directory(installed):
    top = run(installed, "--help")
    assert top.returncode == 0, top.stderr
    commands = _commands(top.stdout)
    assert {"render", "serve", "sim-engine", "bench", "status", "validate"} <= set(commands)
    for cmd in commands:
        out = run(installed, cmd, "--help")
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (cmd, out.stderr)
        if cmd == "bench":
            for sub in _commands(out.stdout):
                got = run(installed, "bench", sub, "--help")
                assert got.returncode == 0, (sub, got.stderr)


def test_render_works_with_the_installed_templates(installed):
    (installed["work"] / "k.yaml").write_text(
        "instances:\n  - {name: a, model: m, engine: sim, engine_args: ['--port 19999']}\n")
    out = run(installed, "render", "k.yaml", "--out", "o")
    assert out.returncode == 0, out.stderr
    conf = (installed["work"] / "o" / "supervisord.conf").read_text()
    assert "[program:engine-a]" in conf and "[program:kvrouter]" in conf
