"""NVML where it is (a stand-in pynvml module here: no GPU on these machines), nothing
where it is not."""
import os
import types

from kvrouter.control.nvml import Nvml, descendants


def fake_pynvml(procs):
    mem = types.SimpleNamespace(total=80 << 30, used=30 << 30)

    def count():
        return 2

    return types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=count,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: mem,
        nvmlDeviceGetComputeRunningProcesses=lambda h: procs.get(h, []))


def test_gpus_and_engine_processes_with_their_children():
    me = os.getpid()
    procs = {0: [types.SimpleNamespace(pid=me, usedGpuMemory=5 << 30),
                 types.SimpleNamespace(pid=999999999, usedGpuMemory=7 << 30)],
             1: [types.SimpleNamespace(pid=me, usedGpuMemory=1 << 30)]}
    nv = Nvml(fake_pynvml(procs))
    assert nv.ok
    assert nv.gpus() == {"0": {"total_bytes": 80 << 30, "used_bytes": 30 << 30},
                         "1": {"total_bytes": 80 << 30, "used_bytes": 30 << 30}}
    # the test runner's parent stands for the engine's main process: this process is a child
    assert nv.used_by([os.getppid()]) == 6 << 30


def test_without_nvml_nothing_is_made_up():
    broken = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("no driver")))
    nv = Nvml(broken)
    assert not nv.ok and nv.gpus() == {} and nv.used_by([1]) is None


def test_descendants_include_children():
    assert os.getpid() in descendants([os.getppid()])
    assert descendants([]) == set()
