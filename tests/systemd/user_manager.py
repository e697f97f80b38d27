"""A real ``systemd --user`` and journald for the systemd tier, on machines where systemd is
not PID 1 (containers, CI runners). The repository carries it so that a bare clone runs
the tier; nothing outside the checkout is needed but Debian's systemd package.

    python -m tests.systemd.user_manager start   # prints: export XDG_RUNTIME_DIR=...
    python -m tests.systemd.user_manager stop    # ends only what `start` started

Root only: it puts the manager in the cgroup systemd expects for user 0
(``user.slice/user-0.slice/user@0.service``) and binds journald's sockets under /run.
Units go in ``~/.config/systemd/user`` as usual; as root, read a unit's lines with
``journalctl --user-unit NAME`` (root has no per-user journal file for ``--user -u``).

When a journald or a user manager already answers, it is used and left alone.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

STATE = os.environ.get("KVROUTER_SYSTEMD_DIR", "/tmp/kvrouter-user-systemd")
RUNTIME = os.path.join(STATE, "xdg")
CGROUP = "user.slice/user-0.slice/user@0.service"
JOURNAL = "/run/systemd/journal"
SYSTEMD = "/lib/systemd/systemd"
JOURNALD = "/lib/systemd/systemd-journald"


def why_not() -> Optional[str]:
    """Why this machine cannot run the tier, or None."""
    if os.geteuid() != 0:
        return "systemd tier: needs root (the user manager is started in user 0's cgroup)"
    for path in (SYSTEMD, JOURNALD):
        if not os.path.exists(path):
            return f"systemd tier: {path} is missing (apt-get install systemd)"
    if shutil.which("systemctl") is None or shutil.which("journalctl") is None:
        return "systemd tier: systemctl/journalctl not on PATH (apt-get install systemd)"
    return None


def _wait(cond: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def _journal_answers() -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(os.path.join(JOURNAL, "socket"))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _manager_answers(env: dict) -> bool:
    return subprocess.run(["systemctl", "--user", "show-environment"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=10).returncode == 0


def _spawn(argv, log_name: str, pid_name: str, env: dict, cgroup: bool = False) -> None:
    """Start a daemon in its own session, its output in STATE/log_name, its pid kept."""
    def into_cgroup():
        os.setsid()
        if cgroup:
            for hierarchy in ("unified", "systemd", ""):
                procs = os.path.join("/sys/fs/cgroup", hierarchy, CGROUP, "cgroup.procs")
                try:
                    with open(procs, "w") as fh:
                        fh.write(str(os.getpid()))
                except OSError:
                    pass

    with open(os.path.join(STATE, log_name), "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, preexec_fn=into_cgroup, close_fds=True)
    with open(os.path.join(STATE, pid_name), "w") as fh:
        fh.write(str(proc.pid))


def start() -> str:
    """Bring up journald and the user manager (or find them running); the runtime dir."""
    why = why_not()
    if why:
        raise RuntimeError(why)
    os.makedirs(RUNTIME, mode=0o700, exist_ok=True)
    os.chmod(RUNTIME, 0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=RUNTIME)
    if not _journal_answers():
        for name in ("socket", "stdout", "dev-log"):
            try:
                os.unlink(os.path.join(JOURNAL, name))
            except OSError:
                pass
        _spawn([JOURNALD], "journald.log", "journald.pid", env)
        if not _wait(lambda: os.path.exists(os.path.join(JOURNAL, "stdout")), 10):
            raise RuntimeError(f"journald did not start (see {STATE}/journald.log)")
    if not _manager_answers(env):
        shutil.rmtree(os.path.join(RUNTIME, "systemd"), ignore_errors=True)
        # systemd --user refuses to run unless the machine looks booted with systemd; the
        # marker is removed again at once, or apt and others would believe it too
        marker = "/run/systemd/system"
        made = not os.path.isdir(marker)
        os.makedirs(marker, exist_ok=True)
        for hierarchy in ("unified", "systemd", ""):
            base = os.path.join("/sys/fs/cgroup", hierarchy)
            if hierarchy == "" and os.path.exists("/sys/fs/cgroup/unified"):
                continue
            if os.path.isdir(base):
                try:
                    os.makedirs(os.path.join(base, CGROUP), exist_ok=True)
                except OSError:
                    pass
        try:
            _spawn([SYSTEMD, "--user"], "systemd.log", "systemd.pid", env, cgroup=True)
            _wait(lambda: os.path.exists(os.path.join(RUNTIME, "systemd", "private")), 10)
            time.sleep(0.5)
        finally:
            if made:
                try:
                    os.rmdir(marker)
                except OSError:
                    pass
        if not _wait(lambda: _manager_answers(env), 5):
            raise RuntimeError(f"systemd --user did not start (see {STATE}/systemd.log)")
    return RUNTIME


def stop() -> None:
    """End what start() started: the user manager (it stops its units), then journald."""
    env = dict(os.environ, XDG_RUNTIME_DIR=RUNTIME)
    subprocess.run(["systemctl", "--user", "exit"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    for name in ("systemd", "journald"):
        path = os.path.join(STATE, f"{name}.pid")
        try:
            with open(path) as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        os.unlink(path)

        def gone(pid=pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            try:  # a child of ours that exited: reap it
                return os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                return False

        if not _wait(gone, 3):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            _wait(gone, 5)


def main(argv) -> int:
    if argv[1:] == ["start"]:
        try:
            print(f"export XDG_RUNTIME_DIR={start()}")
        except RuntimeError as err:
            print(f"user_manager: {err}", file=sys.stderr)
            return 1
        return 0
    if argv[1:] == ["stop"]:
        stop()
        return 0
    print("usage: python -m tests.systemd.user_manager start|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
