"""A real `systemd --user` and journald (../shared/scripts/user-systemd, as root; systemd
is not PID 1 on these machines). Without the script a bare `pytest` skips this tier and
says why; `make test` sets KVROUTER_REQUIRE_SYSTEMD, so there it fails instead."""
import os
import subprocess

import pytest

from tests.helpers import ROOT

SCRIPT = os.environ.get("KVROUTER_USER_SYSTEMD",
                        os.path.join(os.path.dirname(ROOT), "shared", "scripts", "user-systemd"))


def _why_not():
    if not os.path.exists(SCRIPT):
        return f"systemd tier: no {SCRIPT} (it runs a real systemd --user and journald)"
    if os.geteuid() != 0:
        return "systemd tier: needs root (user-systemd starts systemd --user in a cgroup)"
    if not os.path.exists("/lib/systemd/systemd"):
        return "systemd tier: systemd is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    why = _why_not()
    if why is None:
        return
    if os.environ.get("KVROUTER_REQUIRE_SYSTEMD"):
        raise pytest.UsageError(why)
    for item in items:
        if "systemd" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def user_systemd():
    """Start the user manager; export XDG_RUNTIME_DIR to this process (and its children)."""
    out = subprocess.run(["bash", SCRIPT, "start"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in out.stdout.splitlines():
        if line.startswith("export XDG_RUNTIME_DIR="):
            os.environ["XDG_RUNTIME_DIR"] = line.split("=", 1)[1]
    yield os.environ["XDG_RUNTIME_DIR"]
    subprocess.run(["bash", SCRIPT, "stop"], capture_output=True, text=True)
