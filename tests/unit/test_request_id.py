"""Request ids: unique, 32 hex digits, a forked worker's differ from its parent's."""
import os

from kvrouter.router import request_id


def test_ids_are_unique_hex_and_a_forked_child_draws_its_own():
    ids = [request_id.new() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: a router worker forked from the owner
        os.write(w, request_id.new().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    assert len(child) == 32 and child[:16] != ids[0][:16] and child not in ids
