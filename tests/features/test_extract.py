"""Extraction end to end on the tiny bundle: store contents, resume, manifests, bad inputs."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tidy_detect.config import RepresentationConfig, load_preset
from tidy_detect.errors import StoreError
from tidy_detect.features import extractor as extractor_module
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree, random_image


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml")
    config = config.updated(runtime={"batch_size": 3, "num_workers": 2})
    return Extractor(config).load()


def _paths(store):
    return sorted(r["path"] for r in store.rows(["path"]))


def test_extract_tree_writes_every_field(extractor, image_tree, tmp_path):
    summary = extract([image_tree], tmp_path / "store", extractor=extractor)
    assert (summary.total, summary.processed, summary.errors, summary.skipped) == (10, 10, 0, 0)
    store = FeatureStore(tmp_path / "store")
    assert store.dim == extractor.dim
    rows = list(store.rows())
    assert len(rows) == 10
    for row in rows:
        assert row["error"] is None and len(row["sha256"]) == 64
        assert row["label"] == (1 if "/1_fake/" in row["path"] else 0)
        assert row["group"] in ("progan", "dalle")
        assert row["caption"] and isinstance(row["phrases"], list)
        assert len(row["global_image"]) == len(row["global_text"]) == store.dim
        n = len(row["object_phrases"])
        assert len(row["boxes"]) == len(row["box_scores"]) == len(row["local_images"]) == len(row["local_texts"]) == n
        assert row["local_fallback"] == (n == 0)
        assert set(row["object_phrases"]) <= set(row["phrases"])
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 <= x1 <= row["width"] and 0 <= y0 <= y1 <= row["height"]
    assert any(len(r["object_phrases"]) for r in rows)  # thresholds are 0: objects are grounded
    config = store.config
    assert config["extraction"]["captioner"]["name"] == "blip2"
    assert config["extraction"]["clip"]["global_view"] == "center-crop"
    assert config["runs"][-1]["status"] == "completed" and config["runs"][-1]["processed"] == 10
    assert config["runs"][-1]["device"] == "cpu"
    X = store.load(RepresentationConfig()).X
    assert X.shape == (10, store.dim) and np.isfinite(X).all()


def test_rerun_does_nothing(extractor, image_tree, tmp_path):
    extract([image_tree], tmp_path / "store", extractor=extractor)
    shards = sorted(p.name for p in (tmp_path / "store" / "shards").glob("*.parquet"))
    again = extract([image_tree], tmp_path / "store", extractor=extractor)
    assert (again.processed, again.skipped, again.copied, again.errors) == (0, 10, 0, 0)
    assert sorted(p.name for p in (tmp_path / "store" / "shards").glob("*.parquet")) == shards


def test_interrupted_run_completed_by_rerun_has_every_image_once(extractor, image_tree, tmp_path):
    calls = []

    def interrupt_after_first_batch(done, total, summary):
        calls.append(done)
        if len(calls) == 2:  # the first call reports the start, the second the first batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract([image_tree], tmp_path / "store", extractor=extractor, progress=interrupt_after_first_batch)
    store = FeatureStore(tmp_path / "store")
    assert len(store) == 3  # the finished batch was kept
    assert store.config["runs"][-1]["status"] == "interrupted"
    summary = extract([image_tree], tmp_path / "store", extractor=extractor)
    assert (summary.skipped, summary.processed) == (3, 7)
    paths = [r["path"] for r in store.rows(["path"])]
    assert len(paths) == len(set(paths)) == 10
    # also as plain Parquet, without the store's de-duplication
    table = pq.read_table(list(store.shards()))
    assert table.num_rows == 10


def test_manifest_with_provided_captions(tiny_bundle, tmp_path):
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        random_image(rng, 40, 30).save(tmp_path / f"{name}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,group,caption\n"
                        "a.png,1,gen,a brown dog sitting on a red sofa\n"
                        "b.png,real,photos,two cats on a bed\n"
                        "c.png,0,photos,\n")
    config = load_preset(tiny_bundle / "tiny.toml").updated(models={"captioner": "provided"})
    config = dataclasses.replace(config, models=dataclasses.replace(config.models, captioner_model=None))
    summary = extract([manifest], tmp_path / "store", config)
    assert (summary.processed, summary.errors) == (2, 1)
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in FeatureStore(tmp_path / "store").rows()}
    assert rows["a.png"]["caption"] == "a brown dog sitting on a red sofa"
    assert rows["a.png"]["phrases"] == ["brown dog", "red sofa"]
    assert (rows["a.png"]["label"], rows["a.png"]["group"]) == (1, "gen")
    assert rows["b.png"]["label"] == 0 and rows["b.png"]["phrases"] == ["cats", "bed"]
    assert rows["c.png"]["error_kind"] == "input" and "no caption given" in rows["c.png"]["error"]


def test_bad_files_are_recorded_and_the_rest_processed(extractor, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 2})
    bad = root / "gen" / "1_fake"
    good_bytes = io.BytesIO()
    random_image(np.random.default_rng(0), 64, 64).save(good_bytes, format="JPEG")
    (bad / "truncated.jpg").write_bytes(good_bytes.getvalue()[:300])
    (bad / "text.png").write_text("not an image")
    (bad / "empty.webp").write_bytes(b"")
    Image.new("L", (600, 600)).save(bad / "huge.png")
    small_limit = dataclasses.replace(extractor.config,
                                      runtime=dataclasses.replace(extractor.config.runtime, max_pixels=200_000))
    limited = Extractor(small_limit)
    limited.__dict__.update({k: v for k, v in extractor.__dict__.items() if k != "config"})
    summary = extract([root], tmp_path / "store", extractor=limited)
    assert summary.processed == 4
    assert summary.error_kinds == {"corrupt": 2, "unsupported": 1, "too-large": 1}
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in FeatureStore(tmp_path / "store").rows()}
    assert "truncated" in rows["truncated.jpg"]["error"] and rows["truncated.jpg"]["sha256"]
    assert rows["huge.png"]["error_kind"] == "too-large" and "360,000 pixels" in rows["huge.png"]["error"]
    assert rows["text.png"]["error_kind"] == "unsupported"
    assert rows["empty.webp"]["error_kind"] == "corrupt"
    assert rows["img0.png"]["error"] is None


def test_a_fixed_file_is_retried_and_retry_errors_redoes_unchanged_errors(extractor, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 1})
    broken = root / "gen" / "1_fake" / "later.png"
    broken.write_text("not yet")
    still_broken = root / "gen" / "1_fake" / "never.png"
    still_broken.write_text("never an image")
    first = extract([root], tmp_path / "store", extractor=extractor)
    assert (first.processed, first.errors) == (2, 2)
    random_image(np.random.default_rng(9), 30, 30).save(broken)
    again = extract([root], tmp_path / "store", extractor=extractor)
    assert (again.processed, again.changed) == (1, 1)  # the fixed file, retried because it changed
    assert (again.kept_errors, again.errors) == (1, 0) and again.failed == 1  # the other error row is kept
    fixed = extract([root], tmp_path / "store", extractor=extractor, retry_errors=True)
    assert (fixed.processed, fixed.errors) == (0, 1)  # redone on request, and still broken
    rows = [r for r in FeatureStore(tmp_path / "store").rows(["path", "error"]) if r["path"] == str(broken)]
    assert len(rows) == 1 and rows[0]["error"] is None


def test_identical_content_is_extracted_once(extractor, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 2})
    shutil.copy(root / "gen" / "0_real" / "img0.png", root / "gen" / "1_fake" / "copy.png")
    summary = extract([root], tmp_path / "store", extractor=extractor)
    assert (summary.processed, summary.copied) == (4, 1)
    rows = {r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1]: r
            for r in FeatureStore(tmp_path / "store").rows()}
    original, copy = rows["0_real/img0.png"], rows["1_fake/copy.png"]
    assert copy["label"] == 1 and original["label"] == 0
    assert copy["global_image"] == original["global_image"] and copy["caption"] == original["caption"]


def test_a_copy_whose_original_failed_is_decoded_again_and_extracted_itself(extractor, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 2})
    original_path = root / "gen" / "0_real" / "img0.png"
    shutil.copy(original_path, root / "gen" / "1_fake" / "zcopy.png")  # listed after its original
    process = extractor.process

    def fails_on_the_original(items, images, local=True, **kwargs):
        if any(item.path == str(original_path) for item in items):
            raise RuntimeError("the model fails on this file")
        return process(items, images, local=local, **kwargs)

    decoded = []
    real_decode = extractor_module._decode

    def counting_decode(item, *args, **kwargs):
        decoded.append(item.path.rsplit("/", 1)[-1])
        return real_decode(item, *args, **kwargs)

    monkeypatch.setattr(extractor, "process", fails_on_the_original)
    monkeypatch.setattr(extractor_module, "_decode", counting_decode)
    summary = extract([root], tmp_path / "store", extractor=extractor)
    rows = {Path(r["path"]).name + ":" + Path(r["path"]).parent.name: r
            for r in FeatureStore(tmp_path / "store").rows(["path", "error", "error_kind", "label"])}
    assert rows["img0.png:0_real"]["error_kind"] == "model"
    assert rows["zcopy.png:1_fake"]["error"] is None and rows["zcopy.png:1_fake"]["label"] == 1
    assert summary.copied == 0 and decoded.count("zcopy.png") == 2  # put aside without pixels, then decoded again


def test_store_of_another_config_is_refused(extractor, image_tree, tiny_bundle, tmp_path):
    extract([image_tree], tmp_path / "store", extractor=extractor, limit=2)
    other = load_preset(tiny_bundle / "tiny.toml").updated(models={"grounder": "none"})
    other = dataclasses.replace(other, models=dataclasses.replace(other.models, grounder_model=None))
    with pytest.raises(StoreError, match="different extraction config.*grounder"):
        extract([image_tree], tmp_path / "store", other)


def test_a_failing_image_does_not_sink_its_batch(extractor, image_tree, tmp_path, monkeypatch):
    original = extractor.grounder.ground

    def fragile(images, phrases):
        if any(im.width == images[0].width and len(images) == 1 and im.width % 2 for im in images):
            raise RuntimeError("odd width")
        if any(im.width % 2 for im in images):
            raise RuntimeError("odd width in batch")
        return original(images, phrases)

    monkeypatch.setattr(extractor.grounder, "ground", fragile)
    summary = extract([image_tree], tmp_path / "store", extractor=extractor)
    rows = list(FeatureStore(tmp_path / "store").rows(["width", "error", "error_kind"]))
    odd = [r for r in rows if r["width"] % 2]
    assert odd and all(r["error_kind"] == "model" and "odd width" in r["error"] for r in odd)
    assert all(r["error"] is None for r in rows if r["width"] % 2 == 0)
    assert summary.processed + summary.errors == 10


def test_limit(extractor, image_tree, tmp_path):
    assert extract([image_tree], tmp_path / "store", extractor=extractor, limit=4).processed == 4
