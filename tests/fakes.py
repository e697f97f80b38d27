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
        self.levels = []
        self.fail_warmup = False
        self.busy_n = 0
        self.probes = []

    def probe(self, memory_released=False):
        self.probes.append(memory_released)
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
        self.levels.append(level)
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
        self.running = {}   # instance name -> what is_running answers (None: cannot say)

    def start(self, inst):
        self.calls.append(("start", inst.name))
        self.adapters[inst.model].up = True

    def stop(self, inst):
        self.calls.append(("stop", inst.name))
        self.adapters[inst.model].up = False

    def restart(self, inst):
        self.calls.append(("restart", inst.name))

    def is_running(self, inst):
        return self.running.get(inst.name)


# --- the proxy's collaborators (httpx's MockTransport is the model) ----------------------------

class FakeResponse:
    """An engine's answer as the upstream client hands it on: status, headers, body chunks."""

    def __init__(self, status=200, body=b"", chunks=None, headers=None, fail_after=None):
        self.status = status
        self._chunks = list(chunks) if chunks is not None else [body]
        self.headers = list((headers or {}).items())
        if chunks is None:
            self.headers.append(("content-length", str(len(body))))
        self.fail_after = fail_after   # an UpstreamError raised after these chunks
        self.closed = False

    def header(self, name, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def at_hand(self):
        return False

    def complete(self):
        return False

    def chunks(self):
        yield from self._chunks
        if self.fail_after is not None:
            raise self.fail_after

    def read(self):
        return b"".join(self.chunks())

    def close(self):
        self.closed = True


class MockPool:
    """An upstream pool that answers with ``handler(method, path, headers, body)`` (a
    FakeResponse, or an UpstreamError to raise) and records every request it gets."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        self.whole = []      # per request: its answer is not streamed (asked of the pool)
        self.dead = False    # its engine's port refuses connections

    def refuses(self, timeout=0.5):
        return self.dead

    def request(self, method, path, headers, body=b"", connect_timeout=5.0,
                first_byte_timeout=600.0, idle_timeout=300.0, whole=False):
        self.requests.append((method, path, dict(headers), body))
        self.whole.append(whole)
        out = self.handler(method, path, headers, body)
        if isinstance(out, BaseException):
            raise out
        return out

    def close_idle(self):
        pass


class FakeGate:
    """The controller as the proxy sees it: ``ensure_ready`` and ``upstream_failed``."""

    def __init__(self):
        self.ready_calls = 0
        self.failures = []
        self.down = set()      # engines (keys) not ready
        self.loads = {}        # key -> requests in flight, as the policy sees them
        self.scaled = []       # models the proxy asked to wake another replica of
        self.waited_on = []    # engines a request waited for

    def ensure_ready(self, entry):
        self.ready_calls += 1
        if entry.name in self.down:
            self.waited_on.append(entry.name)
        return 0.0

    def is_ready(self, entry):
        return entry.name not in self.down

    def load(self, entry):
        return self.loads.get(entry.name, 0)

    def scale(self, group, chooser=None):
        self.scaled.append(group.model)

    def upstream_failed(self, entry, reason):
        self.failures.append((entry.name, reason))
