"""The resume index's columns in mapped files: the same answers as in memory, nothing left behind."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pytest

from tidy_detect.errors import StoreError
from tidy_detect.features import spill as spill_module
from tidy_detect.features.extractor import ContentIndex
from tidy_detect.features.spill import SPILL_ENV, Spill, is_mapped
from tidy_detect.features.store import FeatureStore, StoreIndex

from .test_store import DIM, EXTRACTION, _row


@pytest.fixture
def spill_dir(tmp_path, monkeypatch):
    folder = tmp_path / "spill"
    monkeypatch.setenv(SPILL_ENV, str(folder))
    return folder


def _files(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def test_put_maps_a_large_array_and_leaves_no_file(spill_dir):
    values = np.arange(1000, dtype=np.int64) * 3
    spill = Spill(min_bytes=1024)
    mapped = spill.put(values)
    assert is_mapped(mapped) and np.array_equal(mapped, values) and not mapped.flags.writeable
    assert _files(spill_dir) == []  # unlinked as soon as mapped; the map still reads
    small = spill.put(np.arange(10))
    assert not is_mapped(small)  # small arrays stay in memory
    del spill
    assert np.array_equal(mapped, values)


def test_a_builder_moves_to_its_file_when_it_grows(spill_dir):
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 255, (int(rng.integers(0, 50)), 32), dtype=np.uint8) for _ in range(40)]
    built = Spill(min_bytes=2000).builder(np.uint8, (32,))
    for chunk in chunks:
        built.append(chunk)
    column = built.finish()
    assert is_mapped(column) and np.array_equal(column, np.concatenate(chunks))
    kept = Spill(min_bytes=10 ** 9).builder(np.int64)
    kept.append(np.arange(5))
    assert not is_mapped(kept.finish())
    assert Spill(min_bytes=0).builder(np.int64).finish().shape == (0,)


def test_off_keeps_everything_in_memory_and_a_bad_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(SPILL_ENV, "off")
    assert not is_mapped(Spill(min_bytes=0).put(np.arange(100)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(SPILL_ENV, str(blocker / "sub"))
    with pytest.raises(StoreError, match=rf"cannot write the resume index's files there .* {SPILL_ENV}=off"):
        Spill(min_bytes=0).put(np.arange(100))


def _store(tmp_path, rows: int):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    rng = random.Random(2)
    batch = []
    for i in range(rows):
        row = _row(i, error="bad" if i % 17 == 0 else None, label=rng.choice([0, 1, None]))
        row["sha256"] = hashlib.sha256(str(i % 150).encode()).hexdigest()  # repeated contents
        batch.append(row)
        if len(batch) == 64:
            store.write(batch)
            batch = []
    store.write(batch + [{**_row(3), "sha256": "ee" * 32}])  # a second row of a path: the first wins
    return store


def test_a_spilled_index_answers_as_the_one_in_memory(tmp_path, spill_dir, monkeypatch):
    store = _store(tmp_path, 500)
    monkeypatch.setenv(SPILL_ENV, "off")
    plain = store.index()
    monkeypatch.setenv(SPILL_ENV, str(spill_dir))
    monkeypatch.setattr(spill_module, "MIN_BYTES", 256)
    spilled = store.index()
    assert isinstance(spilled, StoreIndex) and is_mapped(spilled._hashes) and is_mapped(spilled._order)
    assert all(is_mapped(getattr(spilled._c, name)) for name in ("data", "offsets", "sha", "stat", "label"))
    assert not is_mapped(plain._hashes) and not is_mapped(plain._c.data)
    assert _files(spill_dir) == []
    assert len(spilled) == len(plain) == 500 and list(spilled) == list(plain)
    for i in range(-3, 503):
        path = f"/img/{i}.png"
        assert spilled.get(path) == plain.get(path) and (path in spilled) == (path in plain)
    assert spilled.error_paths() == plain.error_paths()
    for one, other in zip(spilled.contents(), plain.contents()):
        assert np.array_equal(one, other)
    assert spilled.pop("/img/5.png") == plain.pop("/img/5.png") and "/img/5.png" not in spilled
    assert len(spilled) == 499 and list(spilled) == list(plain)
    for one, other in zip(spilled.contents(), plain.contents()):
        assert np.array_equal(one, other)
    assert ContentIndex(spilled.iter_contents(step=7), Spill(min_bytes=0)) == ContentIndex(plain.contents())
    stored = ContentIndex(spilled.iter_contents(), Spill(min_bytes=0))
    assert stored._stored and all(is_mapped(column) for run in stored._stored for column in run)
    sha = hashlib.sha256(b"7").hexdigest()
    assert sha in stored and stored.add(sha, 1) == ContentIndex(plain.contents()).add(sha, 1)


def test_resume_with_a_spilled_index_skips_what_is_done(tmp_path, spill_dir, monkeypatch):
    from tidy_detect.data.inputs import ImageItem
    from tidy_detect.features.extractor import pending_items

    store = _store(tmp_path, 300)
    monkeypatch.setattr(spill_module, "MIN_BYTES", 64)
    items = [ImageItem(f"/img/{i}.png") for i in range(0, 320, 3)]
    plan = pending_items(items, store)
    assert [item.path for item in plan.todo] == [f"/img/{i}.png" for i in range(300, 320, 3)]
    assert _files(spill_dir) == []


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_the_bucketed_argsort_is_numpys_stable_argsort(spill_dir, chunk):
    rng = np.random.default_rng(chunk)
    keys = np.concatenate([rng.integers(-2 ** 63, 2 ** 63 - 1, 3000, dtype=np.int64, endpoint=True),
                           rng.integers(-3, 3, 500).astype(np.int64),  # ties, and both sides of zero
                           np.array([-2 ** 63, 2 ** 63 - 1, 0, -1] * 5, np.int64)])
    rng.shuffle(keys)
    order = Spill(min_bytes=0).argsort(keys, chunk=chunk)
    assert is_mapped(order) and np.array_equal(order, np.argsort(keys, kind="stable"))
    assert not is_mapped(Spill(min_bytes=10 ** 9).argsort(keys))
    assert _files(spill_dir) == []
    empty = Spill(min_bytes=0).argsort(np.zeros(0, np.int64))
    assert len(empty) == 0


@pytest.mark.parametrize("buffer,max_run", [(4, 16), (7, 10_000), (1 << 16, 1 << 21)])
def test_a_key_set_answers_as_a_set(spill_dir, monkeypatch, buffer, max_run):
    from tidy_detect.features.spill import KeySet

    monkeypatch.setattr(KeySet, "BUFFER", buffer)
    monkeypatch.setattr(KeySet, "MAX_RUN", max_run)
    keys = KeySet(Spill(min_bytes=64))  # runs of 8 keys and more are mapped
    plain: set[str] = set()
    rng = random.Random(buffer)
    for _ in range(3000):
        key = f"/data/{rng.randrange(1500)}.png\0{rng.choice(['a', 'b', 'None'])}"
        assert keys.add(key) == (key not in plain)
        plain.add(key)
    assert len(keys) == len(plain)
    assert all(key in keys for key in plain)
    assert not any(f"/other/{i}.png\0a" in keys for i in range(500))
    assert 3 not in keys
    if buffer < 100:
        assert len(keys._runs) > 1 and any(is_mapped(hi) for hi, _ in keys._runs)
        assert all(len(hi) <= max(max_run, buffer) for hi, _ in keys._runs)


@pytest.mark.parametrize("buffer,batch", [(4, 1), (4, 7), (16, 100), (1 << 16, 500)])
def test_adding_keys_in_batches_is_adding_them_one_by_one(spill_dir, monkeypatch, buffer, batch):
    from tidy_detect.features.spill import KeySet

    monkeypatch.setattr(KeySet, "BUFFER", buffer)
    monkeypatch.setattr(KeySet, "MAX_RUN", 64)
    one, many = KeySet(Spill(min_bytes=64)), KeySet(Spill(min_bytes=64))
    rng = random.Random(batch)
    keys = [f"{rng.randrange(800)}.png\0{rng.randrange(3)}" for _ in range(3000)]
    expected = [one.add(key) for key in keys]
    got = [new for start in range(0, len(keys), batch) for new in many.add_many(keys[start:start + batch])]
    assert got == expected and len(many) == len(one) == len(set(keys))
    assert many.add_many([]) == []


def test_a_batch_finds_a_key_behind_another_with_the_same_high_half(monkeypatch):
    from tidy_detect.features.spill import KeySet

    monkeypatch.setattr(KeySet, "BUFFER", 2)
    made = {"a": b"\1" * 8 + b"\1" * 8, "b": b"\1" * 8 + b"\2" * 8, "c": b"\1" * 8 + b"\3" * 8}
    monkeypatch.setattr(KeySet, "_digest", staticmethod(lambda key: made[key]))
    keys = KeySet(Spill(min_bytes=1 << 30))
    assert keys.add_many(["a", "b"]) == [True, True]  # one run: a, b (the same high half)
    assert keys.add_many(["b", "c", "a", "c"]) == [False, True, False, False]
