"""The memory the router's owner process shares with its workers."""
import os
import tempfile

from kvrouter.control.states import State
from kvrouter.router.shared import SharedState


def test_states_numbers_and_per_worker_counts():
    path = os.path.join(tempfile.mkdtemp(), "seg")
    owner = SharedState(path, create=True)
    owner.slots = 4
    owner.register(["a", "b"])
    worker = SharedState(path)              # a worker maps the same file, reads the names
    assert worker.index == {"a": 0, "b": 1}
    assert not worker.ready("a") and worker.state("a") is State.STARTING
    owner.set_state("a", State.READY)
    assert worker.ready("a") and not worker.ready("b") and not worker.ready("unknown")
    owner.set_state("a", State.DRAINING)
    assert worker.state("a") is State.DRAINING and not worker.ready("a")
    # each worker counts in its own slot; the owner sums them
    worker.add(0, "a", 1)
    worker.add(0, "a", 1)
    worker.add(3, "a", 1)
    worker.add(1, "b", 1)
    assert owner.in_flight("a") == 3 and owner.in_flight("b") == 1
    owner.reset_slot(0)                      # that worker died
    assert owner.in_flight("a") == 1
    # a reload adds models at the end: the numbers given before stay
    owner.register(["c", "a", "b"])
    assert owner.index == {"a": 0, "b": 1, "c": 2}
    assert SharedState(path).index == {"a": 0, "b": 1, "c": 2}
    assert worker.index == {"a": 0, "b": 1}  # started before: "c" goes to the owner
    owner.close(unlink=True)
    assert not os.path.exists(path)
