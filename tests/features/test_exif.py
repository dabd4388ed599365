"""EXIF orientation: benchmark layouts read pixels as stored (as the peers' code does), folders and
detection turn them as the tag says; the choice is recorded and a store is read one way only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tidy_detect.config import load_preset
from tidy_detect.errors import StoreError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore
from tidy_detect.images import load_image

from tests.conftest import random_image


def _rotated_jpeg(path, size=(60, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    random_image(np.random.default_rng(1), *size).save(path, exif=exif.tobytes())


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    return Extractor(load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4})).load()


def _sizes(store):
    return {r["path"].rsplit("/", 1)[-1]: (r["width"], r["height"]) for r in FeatureStore(store).rows(["path", "width", "height"])}


def test_a_benchmark_layout_reads_pixels_as_stored_and_a_folder_turns_them(extractor, tmp_path):
    root = tmp_path / "CNN_synth_testset"
    _rotated_jpeg(root / "biggan" / "1_fake" / "r.jpg")
    random_image(np.random.default_rng(2), 30, 30).save(root / "biggan" / "1_fake" / "plain.png")
    (root / "biggan" / "0_real").mkdir()
    random_image(np.random.default_rng(3), 30, 30).save(root / "biggan" / "0_real" / "a.png")
    extract([root], tmp_path / "bench", extractor=extractor, layout="cnndetection")
    assert _sizes(tmp_path / "bench")["r.jpg"] == (60, 40)  # as stored, like Image.open(p).convert("RGB")
    assert FeatureStore(tmp_path / "bench").config["exif_orientation"] == "ignore"
    assert FeatureStore(tmp_path / "bench").config["runs"][-1]["exif_orientation"] == "ignore"
    extract([root], tmp_path / "folder", extractor=extractor)
    assert _sizes(tmp_path / "folder")["r.jpg"] == (40, 60)  # as a viewer shows it
    with pytest.raises(StoreError, match="EXIF orientation ignored.*--exif ignore"):
        extract([root], tmp_path / "bench", extractor=extractor)  # the same store, read the other way
    assert extract([root], tmp_path / "bench", extractor=extractor, exif="ignore").status == "completed"


def test_load_image_can_keep_the_stored_orientation(tmp_path):
    path = tmp_path / "r.jpg"
    _rotated_jpeg(path)
    assert load_image(path).image.size == (40, 60)
    kept = load_image(path, exif_transpose=False).image
    assert kept.size == (60, 40)
    reference = Image.open(path).convert("RGB")  # how UniFD and CNNDetection read their images
    assert np.array_equal(np.asarray(kept), np.asarray(reference))
