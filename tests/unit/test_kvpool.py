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
