"""Resume by content, the store's writer lock, hostile files in a run, label conflicts, file modes,
and exactly-once under random kills with files replaced between runs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tidy_detect.config import load_preset
from tidy_detect.errors import StoreError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import LOCK_FILE, FeatureStore
from tidy_detect.images import RACY_NS, sha256_bytes

from tests.conftest import make_tree, random_image


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 3, "num_workers": 2})
    return Extractor(config).load()


class CountingExtractor:
    """Counts the images the models see, to prove what resume skipped without a model run."""

    def __init__(self, extractor, monkeypatch):
        self.images = 0
        original = extractor.process

        def process(items, images, local=True):
            self.images += len(items)
            return original(items, images, local=local)

        monkeypatch.setattr(extractor, "process", process)


def _age() -> None:
    """Let files just written age past RACY_NS, as those of real datasets have: a file changed
    that shortly before it is read is always hashed on resume (see FileStat.of). Its ctime, which
    only the clock moves, decides, so waiting is the only way."""
    time.sleep(RACY_NS / 1e9 + 0.2)


def _rows_by_path(store_path):
    rows = {}
    for row in FeatureStore(store_path).rows(["path", "sha256", "error", "global_image"]):
        assert row["path"] not in rows, f"{row['path']} has two rows"
        rows[row["path"]] = row
    return rows


def test_a_replaced_image_of_the_same_size_and_mtime_is_extracted_again(extractor, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 2}, suffix=".bmp")  # BMP: the same size for any pixels of the same shape
    target = root / "gen" / "0_real" / "img0.bmp"
    _age()
    extract([root], tmp_path / "store", extractor=extractor)
    before = _rows_by_path(tmp_path / "store")[str(target)]

    stat = target.stat()
    width, height = Image.open(target).size
    random_image(np.random.default_rng(99), width, height).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime put back
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns

    counter = CountingExtractor(extractor, monkeypatch)
    summary = extract([root], tmp_path / "store", extractor=extractor)
    assert (summary.changed, summary.processed, summary.skipped) == (1, 1, 3)
    assert counter.images == 1  # only the replaced image went through the models
    after = _rows_by_path(tmp_path / "store")
    assert len(after) == 4  # still one row per path
    assert after[str(target)]["sha256"] == sha256_bytes(target.read_bytes()) != before["sha256"]
    assert not np.allclose(after[str(target)]["global_image"], before["global_image"])


def test_unchanged_files_are_skipped_by_stat_and_touched_ones_by_hash(extractor, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 2})
    _age()
    extract([root], tmp_path / "store", extractor=extractor)
    counter = CountingExtractor(extractor, monkeypatch)
    same = extract([root], tmp_path / "store", extractor=extractor)
    assert (same.skipped, same.hashed, counter.images) == (4, 0, 0)  # the stat alone decided

    touched = root / "gen" / "1_fake" / "img1.png"
    touched.write_bytes(touched.read_bytes())  # rewritten with the same content
    _age()
    again = extract([root], tmp_path / "store", extractor=extractor)
    assert (again.skipped, again.hashed, again.changed, counter.images) == (4, 1, 0, 0)
    third = extract([root], tmp_path / "store", extractor=extractor)
    assert third.hashed == 0  # the row's stat was updated, so the hash is not needed again


def test_a_file_that_failed_is_retried_once_it_appears(extractor, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 1})
    late = root / "gen" / "1_fake" / "late.png"
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "\n".join(f"{p},{p.parent.name[0]}" for p in sorted(root.rglob("*.png")))
                        + f"\n{late},1\n")
    first = extract([manifest], tmp_path / "store", extractor=extractor)
    assert first.error_kinds == {"not-found": 1}
    rerun = extract([manifest], tmp_path / "store", extractor=extractor)
    assert (rerun.kept_errors, rerun.processed) == (1, 0)  # still missing: its error row is kept
    random_image(np.random.default_rng(4), 30, 30).save(late)
    fixed = extract([manifest], tmp_path / "store", extractor=extractor)
    assert (fixed.processed, fixed.changed, fixed.kept_errors) == (1, 1, 0)
    assert _rows_by_path(tmp_path / "store")[str(late)]["error"] is None


def test_devices_and_fifos_in_a_manifest_are_error_rows_and_the_rest_is_kept(extractor, tmp_path):
    make_tree(tmp_path / "tree", {"gen": 1})
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    images = sorted((tmp_path / "tree").rglob("*.png"))
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n/dev/zero\n" + f"{fifo}\n" + "".join(f"{p}\n" for p in images))
    started = time.monotonic()
    summary = extract([manifest], tmp_path / "store", extractor=extractor)
    assert time.monotonic() - started < 60  # neither read forever nor blocked
    assert summary.processed == 2 and summary.error_kinds == {"not-a-file": 2}
    rows = _rows_by_path(tmp_path / "store")
    assert "character device" in rows["/dev/zero"]["error"] and "FIFO" in rows[str(fifo)]["error"]


def test_same_content_with_another_label_is_warned_about(extractor, tmp_path, caplog):
    make_tree(tmp_path / "tree", {"gen": 1})
    real = sorted((tmp_path / "tree").rglob("0_real/*.png"))[0]
    copy = tmp_path / "copy.png"
    copy.write_bytes(real.read_bytes())
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label\n{real},real\n{copy},fake\n")
    summary = extract([manifest], tmp_path / "store", extractor=extractor)
    assert summary.label_conflicts == 1 and summary.label_conflict_examples == [(str(copy), str(real))]
    assert "same content as" in caplog.text


def test_a_label_conflict_with_an_earlier_runs_row_names_that_row(extractor, tmp_path, caplog):
    make_tree(tmp_path / "tree", {"gen": 1})
    real = sorted((tmp_path / "tree").rglob("0_real/*.png"))[0]
    first = tmp_path / "first.csv"
    first.write_text(f"path,label\n{real},real\n")
    extract([first], tmp_path / "store", extractor=extractor)
    copies = []
    for n in range(3):
        copies.append(tmp_path / f"copy{n}.png")
        copies[-1].write_bytes(real.read_bytes())
    later = tmp_path / "later.csv"
    later.write_text("path,label\n" + "".join(f"{c},{'real' if n == 1 else 'fake'}\n" for n, c in enumerate(copies)))
    summary = extract([later], tmp_path / "store", extractor=extractor)
    assert (summary.copied, summary.label_conflicts) == (3, 2)  # the resumed store's label, not this run's first
    # each example names another image of that content with the other label (any of them)
    assert [path for path, _ in summary.label_conflict_examples] == [str(copies[0]), str(copies[2])]
    assert {other for _, other in summary.label_conflict_examples} <= {str(real), str(copies[1])}
    assert f"{copies[2]} has the same content as an image labelled 0, but label 1" in caplog.text


def test_files_are_written_with_the_users_umask(extractor, tmp_path):
    make_tree(tmp_path / "tree", {"gen": 1})
    previous = os.umask(0o022)
    try:
        extract([tmp_path / "tree"], tmp_path / "store", extractor=extractor)
    finally:
        os.umask(previous)
    store = FeatureStore(tmp_path / "store")
    for path in [store.path / "config.json", *store.shards()]:
        assert path.stat().st_mode & 0o777 == 0o644, path


HOLDER = textwrap.dedent("""
    import sys, time
    from tidy_detect.features.store import FeatureStore
    store = FeatureStore(sys.argv[1])
    store.lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(extractor, tmp_path):
    make_tree(tmp_path / "tree", {"gen": 1})
    extract([tmp_path / "tree"], tmp_path / "store", extractor=extractor)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "store")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreError, match=rf"another process is writing to this store \(pid {holder.pid} on "):
            extract([tmp_path / "tree"], tmp_path / "store", extractor=extractor)
        with pytest.raises(StoreError, match="another process"):
            FeatureStore(tmp_path / "store").compact()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert (tmp_path / "store" / LOCK_FILE).read_text().strip()  # the dead holder's record is still there
    summary = extract([tmp_path / "tree"], tmp_path / "store", extractor=extractor)
    assert summary.status == "completed"  # the stale lock was taken over
    assert not (tmp_path / "store" / LOCK_FILE).read_text().strip()  # and released


# -- exactly once under random kills ----------------------------------------------------------------

@pytest.mark.slow
def test_random_kills_with_files_replaced_between_runs_leave_each_image_once_and_current(tiny_preset, tmp_path):
    rng = random.Random(12)
    root = tmp_path / "tree"
    paths = make_tree(root, {"a": 12, "b": 12}, seed=1)  # 48 images
    store = tmp_path / "store"
    command = [sys.executable, "-m", "tidy_detect.cli", "extract", str(root), "--out", str(store),
               "--preset", str(tiny_preset), "--batch-size", "2", "--workers", "1"]
    log = tmp_path / "extract.log"
    for attempt in range(4):
        with log.open("ab") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        time.sleep(rng.uniform(2.0, 7.0))  # model loading takes a few seconds: kills land anywhere
        process.send_signal(signal.SIGKILL)
        process.wait()
        for path in rng.sample(paths, 3):  # replaced between runs, some of them already extracted
            w, h = Image.open(path).size
            random_image(np.random.default_rng(rng.randrange(10**6)), w, h).save(path)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rows = _rows_by_path(store)
    assert sorted(rows) == sorted(str(p) for p in paths)  # each image exactly once
    for path in paths:
        row = rows[str(path)]
        assert row["error"] is None and row["sha256"] == sha256_bytes(path.read_bytes()), path
