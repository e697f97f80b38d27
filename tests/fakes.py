"""Fakes for the objects the controller and proxy talk to: engines, process managers, pools.

They are real objects with the interfaces of the real ones (the adapter subclasses
EngineAdapter, so a capability added there shows up here)."""
from gevent.event import Event

from kvrouter.control.process import ProcessControl
from kvrouter.engines.adapters import EngineAdapter, EngineError


class FakePool:
    def close_idle(self):
        pass


class FakeAdapter(EngineAdapter):
    """An engine whose answers the test sets; ``gate`` holds a wake until the test opens it,
    ``hang`` makes wake and sleep never return (an engine that stopped answering)."""

    dialect = "vllm"
    sleep_levels = frozenset({1, 2})

    def __init__(self, inst):
        super().__init__(inst, FakePool())
        self.version = (0, 32, 0)
        self.hang = False
        self.up = True
        self.asleep = False
        self.gate = Event()
        self.gate.set()
        self.sleeps = self.wakes = self.warmups = 0
        self.fail_warmup = False
        self.busy_n = 0

    def probe(self, memory_released=False):
        return self.up

    def model_info(self):
        return {"max_model_len": 128}

    def busy(self):
        return self.busy_n

    def wait_idle(self, timeout):
        return self.busy_n == 0

    def is_sleeping(self):
        return self.asleep

    def observed_level(self):
        return 1

    def sleep(self, level):
        if self.hang:
            Event().wait()
        self.sleeps += 1
        self.asleep = True

    def wake(self, level):
        if self.hang:
            Event().wait()
        self.gate.wait()
        self.wakes += 1
        self.asleep = False

    def mark_released(self):
        self.released = True

    def warm_up(self):
        self.warmups += 1
        if self.fail_warmup:
            raise EngineError("warm-up failed")


class FakeProcess(ProcessControl):
    available = True
    kind = "fake"

    def __init__(self):
        self.calls = []
        self.adapters = {}

    def start(self, inst):
        self.calls.append(("start", inst.name))
        self.adapters[inst.model].up = True

    def stop(self, inst):
        self.calls.append(("stop", inst.name))
        self.adapters[inst.model].up = False

    def restart(self, inst):
        self.calls.append(("restart", inst.name))
