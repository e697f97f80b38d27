"""What someone who clones the project meets: the repository alone, in an empty folder
with nothing beside it, must hold everything its test tiers need."""
import os
import shutil
import subprocess
import sys

from tests.helpers import ROOT


def _copy_of_the_checkout(dest):
    """The files a commit of this working tree would hold (tracked and not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def test_every_tier_is_collected_from_a_lone_clone(tmp_path):
    clone = tmp_path / "alone" / "kvrouter"
    _copy_of_the_checkout(str(clone))
    assert not (tmp_path / "alone" / "shared").exists()
    env = dict(os.environ, KVROUTER_REQUIRE_SYSTEMD="1", KVROUTER_REQUIRE_REDIS="1",
               KVROUTER_REQUIRE_BROWSER="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("KVROUTER_REQUIRE_ENGINE", None)   # the clone has no .venv-engine built yet
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", "tests/unit", "tests/integration",
                          "tests/systemd"], cwd=clone, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tests/systemd/test_units.py::" in out.stdout
