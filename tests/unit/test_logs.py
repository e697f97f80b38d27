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
