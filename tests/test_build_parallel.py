"""The build on several processes, its lock, and what killed builds leave behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import refer_fixture as rf

from tfds_refcoco import build_lock, builder, records, refer, tf_free_shuffle, validate, workers

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "refcoco_unc"
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> rf.ReferFixture:
    return rf.write_refer_fixture(tmp_path_factory.mktemp("raw"), datasets=("refcoco",))


def _config_dir(data_dir: Path) -> Path:
    return data_dir / records.BUILDER_NAME / CONFIG


def _record_files(data_dir: Path) -> dict[str, bytes]:
    version_dir = _config_dir(data_dir) / str(builder.RefcocoMasks.VERSION)
    return {p.name: p.read_bytes() for p in sorted(version_dir.glob("*.array_record-*"))}


# --- the pool ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [1, 2])
def test_ordered_pool_keeps_input_order(num_workers):
    items = list(range(-101, 0))  # not a multiple of the chunk size
    with workers.OrderedPool(num_workers, chunk_size=7) as pool:
        assert list(pool.map(abs, items)) == [abs(i) for i in items]
        # A consumer that stops early gets a prefix and leaves the pool usable.
        first = pool.map(abs, items)
        assert [next(first) for _ in range(3)] == [101, 100, 99]
        first.close()
        assert list(pool.map(abs, [-1, -2])) == [1, 2]
    assert multiprocessing.active_children() == []


def test_default_num_workers_is_the_affinity():
    assert workers.default_num_workers() == len(os.sched_getaffinity(0)) >= 1
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        workers.OrderedPool(0)


# --- parallel build == serial build ------------------------------------------------------


def test_parallel_build_is_byte_identical_to_serial(raw, tmp_path):
    serial = records.prepare(CONFIG, tmp_path / "serial", raw.root, num_workers=1)
    parallel = records.prepare(CONFIG, tmp_path / "parallel", raw.root, num_workers=2)
    assert serial == parallel
    files_serial, files_parallel = _record_files(tmp_path / "serial"), _record_files(
        tmp_path / "parallel")
    assert len(files_serial) == len(serial) == 4  # one file per split
    assert files_serial == files_parallel
    assert multiprocessing.active_children() == []


def test_failed_parallel_build_leaves_no_process(raw, tmp_path, monkeypatch):
    example = builder.RefcocoMasks._example

    def crash_in_testb(self, obj, *rest):
        if obj.split == "testB":
            raise OSError("No space left on device")
        return example(self, obj, *rest)

    monkeypatch.setattr(builder.RefcocoMasks, "_example", crash_in_testb)
    with pytest.raises(OSError, match="No space left"):
        records.prepare(CONFIG, tmp_path, raw.root, num_workers=2)
    assert multiprocessing.active_children() == []
    assert not list(_config_dir(tmp_path).glob("incomplete.*"))


# --- stale incomplete folders and the lock ------------------------------------------------


def _fake_killed_build(data_dir: Path, suffix: str) -> Path:
    """What TFDS leaves when a build is SIGKILLed: a half-written incomplete.* folder."""
    stale = _config_dir(data_dir) / f"incomplete.{suffix}_{builder.RefcocoMasks.VERSION}"
    stale.mkdir(parents=True)
    (stale / "refcoco_masks-train.array_record-00000-of-00001").write_bytes(b"\0" * 1000)
    return stale


def test_stale_incomplete_folders_are_removed_by_the_next_build(raw, tmp_path):
    stale = [_fake_killed_build(tmp_path, s) for s in ("ABC123", "ZZ9XY0")]
    counts = records.prepare(CONFIG, tmp_path, raw.root, num_workers=1)
    assert all(not p.exists() for p in stale)
    assert sorted(p.name for p in _config_dir(tmp_path).iterdir()) == [
        build_lock.LOCK_NAME, str(builder.RefcocoMasks.VERSION)]
    assert counts["train"]["objects"] == 3


_HOLDER = """
import sys, time
from tfds_refcoco import build_lock
with build_lock.BuildLock(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """A separate process holding the build lock of refcoco_unc under tmp_path / 'data'."""
    data_dir = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(_config_dir(data_dir))],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield data_dir, proc
    finally:
        proc.kill()
        proc.wait()


def test_concurrent_build_is_refused_with_one_line(raw, lock_holder):
    data_dir, holder = lock_holder
    running = _fake_killed_build(data_dir, "LIVE01")  # the holder's own work in progress
    with pytest.raises(build_lock.BuildLockedError) as info:
        records.prepare(CONFIG, data_dir, raw.root, num_workers=1)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"refcoco_masks/{CONFIG} in {data_dir}" in msg
    assert f"pid {holder.pid} on host {socket.gethostname()}" in msg
    assert running.exists()  # a live build's folder is not touched

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tfds_refcoco.build", "--config", CONFIG, "--manual_dir",
         str(raw.root), "--data_dir", str(data_dir), "--num_workers", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {msg}"]
    assert "Traceback" not in proc.stderr

    # Killed, the holder's lock goes with it: the next build succeeds and cleans up.
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    counts = records.prepare(CONFIG, data_dir, raw.root, num_workers=1)
    assert counts["train"]["objects"] == 3
    assert not running.exists()


# --- the benchmark's generator ------------------------------------------------------------


def test_bench_generator_writes_what_it_promises(tmp_path):
    from bench.build_dataset import generate, split_sizes

    expected = generate(tmp_path, scale=0.0005)
    sizes = split_sizes(0.0005)
    assert expected["train"] == dict(zip(("objects", "expressions", "images"), sizes["train"],
                                         strict=True))
    refs = (tmp_path / "refcoco" / "refs(unc).p").read_bytes()
    assert refs[:2] == b"\x80\x02" and b"U\x06ref_id" in refs  # Python 2 str keys
    by_split = refer.read_refer(tmp_path, "refcoco", "unc")
    got = {s: {"objects": len(objs), "images": len({o.image_id for o in objs}),
               "expressions": sum(len(o.expressions) for o in objs)}
           for s, objs in by_split.items()}
    assert got == expected
    sizes_kb = [p.stat().st_size / 1024 for p in (tmp_path / "train2014").iterdir()]
    assert 80 < sum(sizes_kb) / len(sizes_kb) < 200  # COCO-like JPEG sizes
    assert validate.find_problems(by_split) == []


# --- splits over TFDS's in-memory shuffle limit -------------------------------------------


def test_split_larger_than_the_shuffle_buffer_builds_without_tensorflow(raw, tmp_path,
                                                                        monkeypatch):
    from tensorflow_datasets.core import shuffle

    in_memory = records.prepare(CONFIG, tmp_path / "memory", raw.root, num_workers=1)
    # Real RefCOCO: ~6 GB of train examples against TFDS's 1 GB buffer. Here: 1 KB.
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
    spilled = records.prepare(CONFIG, tmp_path / "spilled", raw.root, num_workers=1)
    assert spilled == in_memory
    assert _record_files(tmp_path / "spilled") == _record_files(tmp_path / "memory")
    assert "tensorflow" not in sys.modules
    assert shuffle.tf is not tf_free_shuffle._LOCAL_GFILE  # only in place during a build
