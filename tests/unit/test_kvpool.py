"""kvcached's pool segment: the format and lock protocol, against files in a temp folder
written the way kvcached writes them (RwLockedShm: flock, mmap, an int64 array view)."""
import fcntl
import mmap
import os
import threading
import time

import pytest

from kvrouter import kvpool


def kvcached_write(path, total, used, prealloc):
    """What kvcached's init_kv_cache_limit / MemInfoStruct.write_to_buffer do."""
    with open(path, "w+b") as fh:
        fh.truncate(24)
        fcntl.flock(fh, fcntl.LOCK_EX)
        mm = mmap.mmap(fh.fileno(), 24, access=mmap.ACCESS_WRITE)
        view = memoryview(mm).cast("q")      # numpy int64 view: native order
        view[0], view[1], view[2] = total, used, prealloc
        view.release()
        mm.close()
        fcntl.flock(fh, fcntl.LOCK_UN)


def kvcached_read(path):
    with open(path, "r+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        mm = mmap.mmap(fh.fileno(), 24, access=mmap.ACCESS_READ)
        view = memoryview(mm).cast("q")
        out = (view[0], view[1], view[2])
        view.release()
        mm.close()
        return out


def test_paths_follow_kvcached():
    assert kvpool.segment_path("kvcached_a") == "/dev/shm/kvcached_a"
    assert kvpool.segment_path("kvcached_a", group=2) == "/dev/shm/kvcached_a_g2"
    assert kvpool.segment_path("/tmp/x") == "/tmp/x"


def test_reads_what_kvcached_wrote_and_kvcached_reads_our_limit(tmp_path):
    path = str(tmp_path / "kvcached_m")
    kvcached_write(path, 8 << 30, 3 << 30, 1 << 30)
    info = kvpool.read(path)
    assert info == kvpool.PoolInfo(8 << 30, 3 << 30, 1 << 30) and info.free == 4 << 30
    kvpool.set_limit(path, 5 << 30)                  # like `kvctl limit m 5G`
    assert kvcached_read(path) == (5 << 30, 3 << 30, 1 << 30)


def test_engine_side_keeps_the_limit_someone_else_set(tmp_path):
    path = str(tmp_path / "kvcached_m")
    kvpool.create(path, 4 << 30)
    kvpool.set_limit(path, 2 << 30)
    assert kvpool.report_usage(path, 1 << 30, 123) == kvpool.PoolInfo(2 << 30, 1 << 30, 123)
    assert kvcached_read(path) == (2 << 30, 1 << 30, 123)


def test_missing_or_short_segments(tmp_path):
    assert kvpool.read(str(tmp_path / "none")) is None
    with pytest.raises(FileNotFoundError):
        kvpool.set_limit(str(tmp_path / "none"), 1)
    (tmp_path / "short").write_bytes(b"\0" * 10)
    assert kvpool.read(str(tmp_path / "short")) is None


def test_readers_wait_for_a_writer_holding_the_lock(tmp_path):
    path = str(tmp_path / "kvcached_m")
    kvpool.create(path, 1 << 30)
    got = []
    with open(path, "r+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)               # a writer in the middle of an update
        t = threading.Thread(target=lambda: got.append(kvpool.read(path)))
        t.start()
        time.sleep(0.2)
        assert got == []                              # the reader waits (LOCK_SH)
        fcntl.flock(fh, fcntl.LOCK_UN)
    t.join(2)
    assert got == [kvpool.PoolInfo(1 << 30, 0, 0)]


@pytest.mark.parametrize("text, n", [("8G", 8 << 30), ("512MiB", 512 << 20), ("1.5gb",
                                     int(1.5 * (1 << 30))), ("1048576", 1 << 20), ("0", 0)])
def test_sizes(text, n):
    assert kvpool.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-1G", "8X", "nanG"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        kvpool.parse_size(text)


def test_format_is_24_native_bytes():
    assert kvpool.SIZE == 24 and os.path.basename(kvpool.SHM_DIR) == "shm"


def kvctl_lists(path):
    """kvctl's (and kvtop's) rule for showing a segment: 24 bytes and a positive limit."""
    return os.stat(path).st_size == 24 and kvcached_read(path)[0] > 0


def test_names_follow_kvcached_sanitize_rule():
    # kvcached/utils.py _sanitize_segment: letters and digits (Unicode's), _ and - stay,
    # anything else becomes -, 64 characters at most
    cases = {"my.model": "my-model", "org/model v2": "org-model-v2", "kvcached_a-1": "kvcached_a-1",
             "Qwën_7B": "Qwën_7B", "a" * 70: "a" * 64, "x:y@z": "x-y-z"}
    for raw, final in cases.items():
        assert kvpool.ipc_name(raw) == final
        assert kvpool.segment_path(raw) == "/dev/shm/" + final
        assert kvpool.segment_path(raw, group=1) == "/dev/shm/" + final + "_g1"


def test_the_config_the_sim_engine_and_validate_agree_on_a_sanitized_name(tmp_path):
    import subprocess

    from kvrouter.config import load_config
    from kvrouter.sim.state import KvcachedSegment
    from tests.helpers import PY

    path = tmp_path / "k.yaml"
    path.write_text("instances:\n  - {name: a, model: m/a, engine: sim, engine_args: "
                    "['--port 9001'], kvcached_env: [ENABLE_KVCACHED=true, "
                    "KVCACHED_IPC_NAME=my.model]}\n")
    inst = load_config(str(path)).instances[0]
    assert inst.kv_pool_path == "/dev/shm/my-model"
    seg = KvcachedSegment("my.model", 1 << 30, folder=str(tmp_path))
    try:
        assert seg.path == str(tmp_path / "my-model")
    finally:
        seg.close()
    out = subprocess.run([PY, "-m", "kvrouter", "validate", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "kvcached pool /dev/shm/my-model" in out.stdout
    assert "KVCACHED_IPC_NAME='my.model': kvcached names its pool 'my-model'" in out.stderr


def test_the_segment_bytes_are_kvcached_s_on_this_machine(tmp_path):
    """kvcached's Python writes an int64 numpy view and its C++ a struct of three int64s:
    both are these 24 bytes, native (little-endian) order."""
    import sys

    want = (8 << 30).to_bytes(8, sys.byteorder, signed=True) + \
        (1 << 30).to_bytes(8, sys.byteorder, signed=True) + \
        (10 << 20).to_bytes(8, sys.byteorder, signed=True)
    path = tmp_path / "seg"
    path.write_bytes(want)
    assert kvpool.read(str(path)) == kvpool.PoolInfo(8 << 30, 1 << 30, 10 << 20)
    kvpool.create(str(tmp_path / "ours"), 8 << 30)
    kvpool.report_usage(str(tmp_path / "ours"), 1 << 30, 10 << 20)
    assert (tmp_path / "ours").read_bytes() == want


def test_no_limit_kvcached_reads_as_unset_is_ever_written(tmp_path):
    path = str(tmp_path / "m")
    kvcached_write(path, 4 << 30, 0, 0)
    kvpool.set_pool_limit(path, 0)
    total = kvcached_read(path)[0]
    assert total == kvpool.MIN_LIMIT and kvctl_lists(path)
    # kvcached's engine resizes only when total // layers // 2 > 0 (up to 256 layers here)
    assert total // 256 // 2 > 0


def test_every_kv_group_is_read_and_steered(tmp_path):
    base = str(tmp_path / "sgl")
    kvcached_write(base, 6 << 30, 1 << 30, 0)
    kvcached_write(base + "_g1", 2 << 30, 1 << 29, 0)      # kvcached 0.1.6: one per KV group
    kvcached_write(base + "_g2", 0, 0, 0)
    kvcached_write(str(tmp_path / "sgl_gx"), 1, 1, 1)       # not a group
    kvcached_write(str(tmp_path / "sglang"), 1, 1, 1)       # another pool
    assert kvpool.group_paths(base) == [base, base + "_g1", base + "_g2"]
    assert kvpool.read_pool(base) == kvpool.PoolInfo(8 << 30, (1 << 30) + (1 << 29), 0)
    info = kvpool.set_pool_limit(base, 16 << 30)             # in proportion: 3 : 1 : (floor)
    assert kvcached_read(base)[0] == 12 << 30 and kvcached_read(base + "_g1")[0] == 4 << 30
    assert kvcached_read(base + "_g2")[0] == kvpool.MIN_LIMIT
    assert info.total == (16 << 30) + kvpool.MIN_LIMIT


def test_the_sim_engine_writes_one_segment_per_group(tmp_path):
    from kvrouter.sim.state import KvcachedSegment

    seg = KvcachedSegment("hyb", 8 << 30, folder=str(tmp_path), groups=3)
    try:
        assert [os.path.basename(p) for p in kvpool.group_paths(seg.path)] == \
            ["hyb", "hyb_g1", "hyb_g2"]
        seg.report(3 << 30)
        pool = kvpool.read_pool(seg.path)
        assert pool.used == 3 << 30 and pool.total == seg.limit
        kvpool.set_pool_limit(seg.path, 3 << 30)
        assert seg.refresh() == 3 << 30
    finally:
        seg.close()
    assert not os.listdir(tmp_path)


def test_sizes_past_what_a_segment_holds_are_refused():
    for bad in ("inf", "1e30", "nan", "-1G", f"{1 << 63}", "9e9G"):
        with pytest.raises(ValueError):
            kvpool.parse_size(bad)
    assert kvpool.parse_size("8G") == 8 << 30


def test_kv_limit_takes_the_names_users_see(tmp_path):
    import subprocess
    import uuid

    from tests.helpers import PY

    ipc = f"kvr_unit_cli_{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "k.yaml"
    cfg.write_text("instances:\n  - {name: llama-sim, model: demo/llama, engine: sim, "
                   "engine_args: ['--port 9001'], kvcached_env: [ENABLE_KVCACHED=true, "
                   f"KVCACHED_IPC_NAME={ipc}]}}\n")
    path = kvpool.segment_path(ipc)
    kvpool.create(path, 8 << 30)
    try:
        for name, size in (("llama-sim", "2G"), ("engine-llama-sim", "3G"),
                           ("kvrouter-engine-llama-sim.service", "4G"), ("demo/llama", "5G")):
            out = subprocess.run([PY, "-m", "kvrouter", "kv", "limit", name, size, str(cfg)],
                                 capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert kvpool.read(path).total == kvpool.parse_size(size)
        out = subprocess.run([PY, "-m", "kvrouter", "kv", "limit", "nope", "1G", str(cfg)],
                             capture_output=True, text=True)
        assert out.returncode == 2 and "kvcached-enabled: llama-sim" in out.stderr
    finally:
        os.remove(path)
