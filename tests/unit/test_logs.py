"""Log lines carry their syslog priority when stdout is the journal."""
import io
import logging

from kvrouter import logs


def _emit(environ, level, msg):
    logs.setup("debug", environ)
    buf = io.StringIO()
    root = logging.getLogger()
    root.handlers[0].setStream(buf)
    logging.getLogger("kvrouter.test").log(level, msg)
    return buf.getvalue()


def test_journal_lines_start_with_their_priority():
    env = {"JOURNAL_STREAM": "8:1234"}
    assert _emit(env, logging.ERROR, "boom").startswith("<3>ERROR kvrouter.test: boom")
    assert _emit(env, logging.WARNING, "hm").startswith("<4>")
    assert _emit(env, logging.INFO, "a\nb") == "<6>INFO kvrouter.test: a\n<6>b\n"


def test_plain_lines_elsewhere():
    line = _emit({}, logging.INFO, "hello")
    assert not line.startswith("<") and line.rstrip().endswith("INFO kvrouter.test: hello")


def test_access_lines_look_like_the_other_lines_and_carry_the_journal_priority():
    buf = io.StringIO()
    access = logs.AccessLog(buf)
    access.write("POST /v1/completions model=m status=200")
    access.flush()
    line = buf.getvalue()
    assert line.endswith(" INFO kvrouter.access: POST /v1/completions model=m status=200\n")
    assert line[:4].isdigit() and line[4] == "-"          # a timestamp as logging writes it
    buf = io.StringIO()
    access = logs.AccessLog(buf, journal=True)
    access.write("GET /x")
    access.flush()
    assert buf.getvalue() == "<6>INFO kvrouter.access: GET /x\n"


class Counting(io.StringIO):
    """A stream like an unbuffered stdout (PYTHONUNBUFFERED=1): each write a syscall."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_access_lines_are_written_in_batches_not_one_write_each():
    out = Counting()
    access = logs.AccessLog(out)
    for i in range(40):
        access.write(f"POST /v1/completions model=m status=200 rid={i}")
    assert out.writes == 0 and out.getvalue() == ""    # gathered: under 8 KB
    access.flush()
    assert out.writes == 1 and out.getvalue().count("\n") == 40
    for i in range(400):                                # by size: about 45 lines a write
        access.write(f"POST /v1/completions model=m status=200 rid={i:032d}")
    assert 4 <= out.writes - 1 <= 12, out.writes
    access.flush()
    assert out.getvalue().count("\n") == 440


def test_another_log_line_writes_the_access_lines_before_it(monkeypatch):
    out = Counting()
    monkeypatch.setattr(logs.ACCESS, "stream", out)
    monkeypatch.setattr(logs.ACCESS, "journal", False)
    handler = logs.OrderedHandler(out)
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    log = logging.getLogger("kvrouter.test.order")
    log.addHandler(handler)
    log.propagate = False
    try:
        logs.ACCESS.write("GET /first")
        log.warning("then this")
        logs.ACCESS.write("GET /second")
        logs.ACCESS.flush()
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert text.index("GET /first") < text.index("then this") < text.index("GET /second")


def test_access_lines_gathered_at_exit_are_written_out():
    """A request that ends while the router shuts down still gets its line."""
    import subprocess
    import sys

    code = ("from kvrouter import logs; import sys; logs.setup('info', {}); "
            "logs.ACCESS.write('GET /last-line'); sys.exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}, timeout=30,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0 and out.stdout.endswith("INFO kvrouter.access: GET /last-line\n")
