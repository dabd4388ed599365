import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import StoreError
from tidy_detect.features.store import COMPACT_JOURNAL, FeatureStore, config_fingerprint

DIM = 4
EXTRACTION = {"clip": {"source": "/a/clip", "weights": "w1", "dim": DIM}, "captioner": {"name": "blip2", "weights": "c"},
              "grounder": {"name": "none"}, "phrases": {"max_objects": 6, "spacy_version": "3.8"}}


def _row(i, n_objects=1, label=0, error=None, rng=np.random.default_rng(0)):
    if error:
        return {"sha256": f"sha{i}", "path": f"/img/{i}.png", "label": label, "group": "g", "error": error,
                "error_kind": "corrupt"}
    return {
        "sha256": f"sha{i}", "path": f"/img/{i}.png", "label": label, "group": "g", "width": 10, "height": 8,
        "format": "PNG", "num_bytes": 100, "caption": f"caption {i}", "phrases": ["dog", "cat"],
        "object_phrases": ["dog"] * n_objects, "boxes": [[0, 0, 5, 5]] * n_objects, "box_scores": [0.5] * n_objects,
        "global_image": rng.random(DIM).astype(np.float32), "global_text": rng.random(DIM).astype(np.float32),
        "local_images": rng.random((n_objects, DIM)).astype(np.float32),
        "local_texts": rng.random((n_objects, DIM)).astype(np.float32),
        "local_fallback": n_objects == 0, "error": None, "error_kind": None,
    }


def test_write_read_roundtrip_and_representations(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    rows = [_row(0, 2, 0), _row(1, 0, 1), _row(2, 1, None), _row(3, error="bad file")]
    store.write(rows[:2])
    store.write(rows[2:])
    assert len(store) == 4
    arrays = store.load(RepresentationConfig("both", normalize=False))
    assert arrays.X.shape == (3, DIM)  # the error row has no features
    assert arrays.label.tolist() == [0, 1, -1]
    assert arrays.local_fallback.tolist() == [False, True, False]
    dg = np.abs(rows[0]["global_image"] - rows[0]["global_text"])
    dl = np.abs(rows[0]["local_images"] - rows[0]["local_texts"]).mean(0)
    np.testing.assert_allclose(arrays.X[0], dg + dl, rtol=1e-6)
    dg1 = np.abs(rows[1]["global_image"] - rows[1]["global_text"])
    np.testing.assert_allclose(arrays.X[1], 2 * dg1, rtol=1e-6)  # D_l falls back to D_g
    assert store.load(RepresentationConfig("image"), labeled_only=True).X.shape == (2, DIM)
    summary = store.summary()
    assert summary["rows"] == 4 and summary["errors"] == 1 and summary["labels"] == {"real": 1, "fake": 1, "none": 1}


def test_readable_as_plain_parquet(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    store.write([_row(0, 2)])
    table = pq.read_table(store.shards()[0])
    assert table.num_rows == 1
    assert table.column("global_image").type.list_size == DIM
    assert len(table.column("local_images")[0]) == 2


def test_retried_batch_replaces_its_shard_and_readers_dedupe(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    batch = [_row(0), _row(1)]
    first = store.write(batch)
    second = store.write(batch)
    assert first == second and len(store.shards()) == 1
    store.write([_row(1), _row(2)])  # overlapping key in another shard
    assert len(store) == 3 and len(list(store.rows(["path"]))) == 3


def test_config_mismatch_is_refused_with_the_difference(tmp_path):
    FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    other = json.loads(json.dumps(EXTRACTION))
    other["captioner"]["weights"] = "different"
    with pytest.raises(StoreError, match="captioner.weights: store has \"c\", now \"different\""):
        FeatureStore.open_for_writing(tmp_path / "s", other, DIM)
    moved = json.loads(json.dumps(EXTRACTION))
    moved["clip"]["source"] = "/moved/clip"  # same weights elsewhere: compatible
    assert config_fingerprint(moved) == config_fingerprint(EXTRACTION)
    FeatureStore.open_for_writing(tmp_path / "s", moved, DIM)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="exists and is not an empty folder"):
        FeatureStore.open_for_writing(tmp_path, EXTRACTION, DIM)


def test_compaction_merges_and_survives_a_crash(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    for i in range(6):
        store.write([_row(i)])
    assert len(store.shards()) == 6
    assert store.compact(target_rows=100) == 6
    assert len(store.shards()) == 1 and len(store) == 6
    # a crash after the journal but before the merged shard: the old shards stay, nothing lost
    for i in range(6, 8):
        store.write([_row(i)])
    (store.path / COMPACT_JOURNAL).write_text(json.dumps({"merged": "part-missing.parquet",
                                                           "replaced": [s.name for s in store.shards()]}))
    reopened = FeatureStore(store.path)
    assert len(reopened) == 8 and not (store.path / COMPACT_JOURNAL).exists()


def test_remove_paths_and_index(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    store.write([_row(0), _row(1, error="boom")])
    index = store.index()
    assert index["/img/1.png"].has_error is True
    assert (index["/img/0.png"].sha256, index["/img/0.png"].has_error) == ("sha0", False)
    assert store.remove_paths(["/img/1.png"]) == 1
    assert set(store.index()) == {"/img/0.png"}


def test_lookup_by_content(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    rows = [_row(0, 2), _row(1)]
    store.write(rows)
    found = store.lookup({"sha0", "nope"})
    assert set(found) == {"sha0"}
    np.testing.assert_array_equal(found["sha0"]["local_images"], rows[0]["local_images"])


def test_shards_read_as_one_dataset_in_pandas_polars_and_duckdb(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    store.write([_row(0, 2), _row(1, 0)])
    store.write([_row(2, 1), _row(3, error="bad")])
    frame = pd.read_parquet(store.shard_dir)
    assert len(frame) == 4 and set(frame["path"]) == {f"/img/{i}.png" for i in range(4)}
    assert len(frame.loc[frame["path"] == "/img/0.png", "local_images"].iloc[0]) == 2
    assert pl.read_parquet(str(store.shard_dir / "*.parquet")).height == 4
    count = duckdb.sql(f"select count(*) from read_parquet('{store.shard_dir}/*.parquet') where error is null")
    assert count.fetchall() == [(3,)]


@pytest.mark.parametrize("content, message", [
    ("[]", "must hold a JSON object"),
    ("{not json", "cannot be read"),
    ('{"format": "tidy-detect-store", "format_version": 1, "fingerprint": "x", "dim": "768", "extraction": {}}',
     "field dim must be an integer"),
    ('{"format": "tidy-detect-store", "format_version": "1"}', "format_version must be an integer"),
])
def test_a_bad_config_json_is_a_store_error(tmp_path, content, message):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    (store.path / "config.json").write_text(content)
    with pytest.raises(StoreError, match=message):
        FeatureStore(store.path)


def test_a_truncated_shard_is_a_clear_error_for_compact_and_readers(tmp_path):
    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    for i in range(3):
        store.write([_row(i)])
    shard = store.shards()[0]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(StoreError, match=f"{shard.name}: unreadable shard .*move it out of the store folder"):
        store.compact(target_rows=100)
    with pytest.raises(StoreError, match="unreadable shard"):
        len(store)
    assert len(store.shards()) == 3  # nothing removed


def test_shards_without_the_file_stat_columns_still_read_and_compact(tmp_path):
    """Stores written before the stat columns existed: the columns read as nulls."""
    import pyarrow as pa

    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    store.write([_row(0)])
    store.write([_row(1)])
    for shard in store.shards():
        table = pq.read_table(shard)
        pq.write_table(table.drop_columns(["mtime_ns", "ctime_ns", "inode"]), shard)
    assert store.index()["/img/0.png"].stat is None
    assert store.compact(target_rows=100) == 2
    table = pq.read_table(store.shards()[0])
    assert table.num_rows == 2 and table["mtime_ns"].null_count == 2 and table.schema.field("inode").type == pa.int64()


def test_store_cli_errors_are_one_line_not_internal(tmp_path):
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    store.write([_row(0)])
    store.write([_row(1)])
    store.shards()[0].write_bytes(b"PAR1 garbage")
    result = CliRunner().invoke(app, ["store", "compact", str(store.path)])
    assert result.exit_code == 6 and "unreadable shard" in result.output
    (store.path / "config.json").write_text("[]")
    result = CliRunner().invoke(app, ["store", "info", str(store.path)])
    assert result.exit_code == 6 and "must hold a JSON object" in result.output


def test_the_index_holds_columns_and_answers_like_a_dict(tmp_path):
    from tidy_detect.features.store import StoreIndex

    store = FeatureStore.open_for_writing(tmp_path / "s", EXTRACTION, DIM)
    real = "ab" * 31 + "00"  # a hash ending in a zero byte, which fixed-width NumPy bytes would drop
    store.write([{**_row(0), "sha256": real, "label": 1}, _row(1, error="boom"), {**_row(2), "sha256": "AB" * 32},
                 {**_row(3), "stat": None}])
    store.write([{**_row(0), "sha256": "cd" * 32, "label": 0}])  # a second row of a path: one of them is the path's
    index = store.index()
    assert isinstance(index, StoreIndex) and len(index) == 4 and set(index) == {f"/img/{i}.png" for i in range(4)}
    assert (index["/img/0.png"].sha256, index["/img/0.png"].label) in [(real, 1), ("cd" * 32, 0)]
    assert index["/img/2.png"].sha256 == "AB" * 32  # as written, not as re-encoded
    assert index["/img/1.png"].has_error and index["/img/1.png"].error_kind == "corrupt"
    assert index["/img/3.png"].stat is None and index["/img/3.png"].sha256 == "sha3"
    assert "/img/9.png" not in index and index.get("/img/9.png") is None and 7 not in index
    assert index.error_paths() == ["/img/1.png"]
    assert index.pop("/img/0.png").sha256 in (real, "cd" * 32) and "/img/0.png" not in index and len(index) == 3
    assert index.pop("/img/0.png", None) is None
    sha, labels = index.contents()  # the rows with features, hashes as raw bytes
    assert sorted(bytes(row) for row in sha) == sorted([bytes.fromhex("ab" * 32), hashlib.sha256(b"sha3").digest()])
    assert list(labels) == [0, 0]


def test_content_index_keeps_the_first_label_of_stored_and_new_contents():
    import numpy as np

    from tidy_detect.features.extractor import ContentIndex

    a, b, c = ("11" * 32), ("22" * 32), ("33" * 32)
    stored = np.frombuffer(bytes.fromhex(a + b + b), np.uint8).reshape(3, 32), np.array([-1, 0, 1], np.int8)
    content = ContentIndex(stored)
    assert a in content and b in content and c not in content and "x" * 64 not in content
    assert content.add(b, 1) == 0  # the store's first labelled row of b said 0
    assert content.add(a, 1) == 1 and content.add(a, 0) == 1  # a was stored without a label: this run's first
    assert content.add(c) is None and c in content and content.add(c, 0) == 0
    assert len(content) == 3


@pytest.mark.parametrize("max_run, spilled", [(10 ** 9, False), (8, False), (8, True)])
def test_content_index_answers_the_same_when_its_run_keys_are_merged_into_columns(monkeypatch, tmp_path, max_run,
                                                                                spilled):
    """The run's keys move from a small dict into sorted runs as it fills, and runs merge: with a
    buffer of 3 (a run every few adds), runs capped at 8 keys or not, in mapped files or not, the
    answers equal those of an index that never leaves its dict."""
    import hashlib
    import random

    import numpy as np

    from tidy_detect.features.extractor import ContentIndex
    from tidy_detect.features.spill import SPILL_ENV, Spill, is_mapped

    monkeypatch.setenv(SPILL_ENV, str(tmp_path / "spill"))
    rng = random.Random(4)
    shas = [hashlib.sha256(bytes([k])).hexdigest() for k in range(120)]
    stored = (np.frombuffer(bytes.fromhex("".join(shas[:10])), np.uint8).reshape(10, 32),
              np.array([-1, 0, 1] * 3 + [-1], np.int8))
    merged, plain = ContentIndex(stored, Spill(min_bytes=0 if spilled else None)), ContentIndex(stored)
    monkeypatch.setattr(merged, "BUFFER", 3)
    monkeypatch.setattr(merged, "MAX_RUN", max_run)
    plain.BUFFER = 10 ** 9
    relabelled = 0
    for _ in range(600):
        sha, label = rng.choice(shas), rng.choice([None, None, 0, 1])
        assert merged.add(sha, label) == plain.add(sha, label), sha
        probe = rng.choice(shas)
        assert (probe in merged) == (probe in plain)
        relabelled = max(relabelled, len(merged._relabel))
    assert relabelled  # some run keys got their first label after their run was made
    assert merged._runs and merged.labels() == plain.labels() and merged == plain
    assert all(sha in merged for sha in shas) and "ab" * 32 not in merged
    sizes = [len(run[0]) for run in merged._runs]
    assert all(size <= max(max_run, 3) for size in sizes) and sizes == sorted(sizes, reverse=True)
    assert all(is_mapped(run[0]) == spilled for run in merged._runs)


def test_content_index_sorts_the_store_a_chunk_at_a_time_with_the_same_answers(monkeypatch):
    """The store's keys become sorted runs of at most MAX_RUN rows (merged while they stay under
    it), never one sort of the whole store: with runs of 4 rows, a key repeated across runs with
    and without labels still answers with its first labelled row in store order."""
    import hashlib
    import random

    import numpy as np

    from tidy_detect.features.extractor import ContentIndex

    rng = random.Random(9)
    shas = [hashlib.sha256(bytes([k])).hexdigest() for k in range(25)]
    rows = [rng.choice(shas) for _ in range(90)]
    labels = np.array([rng.choice([-1, -1, 0, 1]) for _ in rows], np.int8)
    sha = np.frombuffer(bytes.fromhex("".join(rows)), np.uint8).reshape(len(rows), 32)
    slices = [(sha[i:i + 7], labels[i:i + 7]) for i in range(0, len(rows), 7)]
    whole = ContentIndex((sha, labels))
    monkeypatch.setattr(ContentIndex, "MAX_RUN", 4)
    chunked = ContentIndex(iter(slices))
    assert len(chunked._stored) > 1 and all(len(run[0]) <= 4 for run in chunked._stored)
    assert chunked.labels() == whole.labels()
    for key in shas:
        expected = next((int(b) for s, b in zip(rows, labels) if s == key and b >= 0), None)
        assert (key in chunked) == (key in rows)
        if key in rows:
            assert chunked.add(key, 1) == whole.add(key, 1) == (expected if expected is not None else 1)


def test_the_keys_a_read_has_seen_are_each_let_through_once_across_merges(monkeypatch):
    """iter_batches' de-duplication keeps 64-bit key hashes in sorted runs, merged as they pile up
    (every 2 batches here): it lets each key through once, like a set, whatever the merges."""
    import numpy as np

    from tidy_detect.features.store import _SeenKeys

    rng = np.random.default_rng(0)
    seen, reference = _SeenKeys(), set()
    monkeypatch.setattr(seen, "RUNS", 2)
    for _ in range(300):
        hashes = rng.integers(-3000, 3000, rng.integers(1, 60)).astype(np.int64)
        want = []
        for h in hashes.tolist():
            want.append(h not in reference)
            reference.add(h)
        assert seen.first_time(hashes).tolist() == want
    assert len(seen) == len(reference) and len(seen._main) > 0
