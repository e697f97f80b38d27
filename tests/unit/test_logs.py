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
    logs.AccessLog(buf).write("POST /v1/completions model=m status=200")
    line = buf.getvalue()
    assert line.endswith(" INFO kvrouter.access: POST /v1/completions model=m status=200\n")
    assert line[:4].isdigit() and line[4] == "-"          # a timestamp as logging writes it
    buf = io.StringIO()
    logs.AccessLog(buf, journal=True).write("GET /x")
    assert buf.getvalue() == "<6>INFO kvrouter.access: GET /x\n"
