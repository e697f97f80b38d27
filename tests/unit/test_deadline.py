"""The read timer the router's connections share across their reads (``sockio.Deadline``)."""
import socket
import time

import gevent
import gevent.socket
import pytest

from kvrouter.http.sockio import Deadline


def test_a_read_that_gets_nothing_times_out_and_the_next_one_still_reads():
    a, b = gevent.socket.socketpair()
    deadline = Deadline()
    start = time.monotonic()
    with pytest.raises(socket.timeout):
        deadline.recv(a, 100, 0.05)
    assert 0.04 <= time.monotonic() - start < 1.0
    gevent.spawn_later(0.1, b.sendall, b"late")   # after a whole period: not timed out
    assert deadline.recv(a, 100, 0.3) == b"late"
    b.sendall(b"now")
    gevent.sleep(0.4)            # the timer is stopped between reads: nothing fires
    assert deadline.recv(a, 100, 0.05) == b"now"
    deadline.close()
    a.close()
    b.close()


def test_a_plain_socket_is_timed_by_its_own_timeout():
    a, b = socket.socketpair()   # no hub runs to time it
    with pytest.raises(socket.timeout):
        Deadline().recv(a, 100, 0.05)
    assert a.gettimeout() == 0.05
    a.close()
    b.close()


def test_a_read_that_waits_first_gets_bytes_already_there_or_still_to_come():
    a, b = gevent.socket.socketpair()
    deadline = Deadline()
    b.sendall(b"there")
    assert deadline.recv(a, 100, 1.0, wait=True) == b"there"
    gevent.spawn_later(0.05, b.sendall, b"later")
    assert deadline.recv(a, 100, 1.0, wait=True) == b"later"
    with pytest.raises(socket.timeout):
        deadline.recv(a, 100, 0.05, wait=True)
    b.close()
    assert deadline.recv(a, 100, 1.0, wait=True) == b""   # the peer's EOF
    a.close()
    with pytest.raises(OSError):
        deadline.recv(a, 100, 1.0, wait=True)          # (not a gevent usage error)
    deadline.close()
