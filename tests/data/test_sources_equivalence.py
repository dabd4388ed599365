"""Every input kind, built from one image tree, extracts to the rows the tree gives as a folder:
the same content (sha256), labels, groups and embeddings (tiny random-weight models)."""

from __future__ import annotations

import numpy as np
import pytest

from tidy_detect.config import load_preset
from tidy_detect.data.layouts import read_dataset
from tidy_detect.data.sources import SourceOptions
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree
from tests.data.conftest import make_parquet, make_saved_dataset, make_shards, make_tar, make_zip, tree_files


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4, "num_workers": 2})
    return Extractor(config).load()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("eq") / "bench"
    make_tree(root, {"progan": 2, "dalle": 1})
    return root


@pytest.fixture(scope="module")
def folder_rows(extractor, tree, tmp_path_factory):
    store = tmp_path_factory.mktemp("eq-folder") / "store"
    extract([tree], store, extractor=extractor)
    return _rows(store)


def _rows(store):
    return {r["sha256"]: r for r in FeatureStore(store).rows() if r["error"] is None}


def assert_same_rows(got, want, prefix=None):
    assert set(got) == set(want) and len(got) == len(want)
    for sha, row in got.items():
        if prefix is not None:
            assert row["path"].startswith(prefix)
        assert (row["label"], row["group"]) == (want[sha]["label"], want[sha]["group"]), row["path"]
        for column in ("global_image", "global_text"):
            assert np.allclose(row[column], want[sha][column], atol=1e-5)
        assert len(row["local_images"]) == len(want[sha]["local_images"])


def _build(kind, tree, tmp_path):
    files = tree_files(tree)
    if kind == "parquet":
        return [str(make_parquet(files, tmp_path / "bench.parquet"))], None, ".parquet!/"
    if kind == "datasets":
        options = SourceOptions(group_column="generator")
        return [str(make_saved_dataset(files, tmp_path / "bench"))], options, ".arrow!/"
    if kind == "webdataset":
        return [make_shards(files, tmp_path / "shards")], None, ".tar!/"
    if kind == "zip":
        return [str(make_zip(files, tmp_path / "bench.zip"))], None, "bench.zip!/"
    if kind == "tar.gz":
        return [str(make_tar(files, tmp_path / "bench.tar.gz", prefix="bench/"))], None, "bench.tar.gz!/bench/"
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "datasets", "webdataset", "zip", "tar.gz"])
def test_each_kind_extracts_the_rows_of_the_folder(extractor, tree, folder_rows, tmp_path, kind):
    inputs, options, marker = _build(kind, tree, tmp_path)
    summary = extract(inputs, tmp_path / "store", extractor=extractor, source_options=options)
    assert (summary.total, summary.processed, summary.errors) == (6, 6, 0)
    got = _rows(tmp_path / "store")
    assert all(marker in row["path"] for row in got.values())
    assert_same_rows(got, folder_rows)
    again = extract(inputs, tmp_path / "store", extractor=extractor, source_options=options)
    assert (again.skipped, again.processed) == (6, 0)


# ---------------------------------------------------------------------------------------------
# Layouts inside archives: CNNDetection (train and test) and GenImage, in zip and tar

@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    cnn = base / "CNNDetection"
    make_tree(cnn / "train" / "airplane", {"": 1}, seed=1)  # train/<class>/{0_real,1_fake}
    make_tree(cnn / "train" / "cat", {"": 1}, seed=2)
    make_tree(cnn / "test" / "progan" / "bird", {"": 1}, seed=3)  # test/<gen>/<class>/{0_real,1_fake}
    make_tree(cnn / "test" / "biggan", {"": 1}, seed=4)  # test/<gen>/{0_real,1_fake}
    gen = base / "GenImage"
    for g, sub in (("sdv4", "imagenet_ai_0419_sdv4"), ("midjourney", "imagenet_midjourney")):
        for split in ("train", "val"):
            for folder, seed in (("ai", 5), ("nature", 6)):
                make_tree(gen / g / sub / split / folder, {"": 1}, seed=seed + len(g) + len(split))
    for path in list(gen.rglob("0_real")) + list(gen.rglob("1_fake")):  # make_tree's label folders: flatten
        for image in path.iterdir():
            image.rename(path.parent / f"{path.name}-{image.name}")
        path.rmdir()
    return {"cnndetection": cnn, "genimage": gen}


def _relative(dataset):
    """(path inside the tree, label, group, subgroup) of every item: what a layout decided."""
    root = dataset.root.rstrip("/")
    out = []
    for item in dataset.items:
        inside = item.path.split("!/", 1)[1] if "!/" in item.path else item.path[len(root) + 1:]
        for top in ("CNNDetection/", "GenImage/"):
            inside = inside[len(top):] if inside.startswith(top) else inside
        out.append((inside, item.label, item.group, item.subgroup))
    return sorted(out)


@pytest.mark.parametrize("layout,split", [("cnndetection", "train"), ("cnndetection", "test"),
                                          ("genimage", "train"), ("genimage", "val")])
@pytest.mark.parametrize("container", ["zip", "tar", "tar.gz", "zip-of-folder"])
def test_a_layout_reads_an_archive_as_the_folder(benchmarks, tmp_path, layout, container, split):
    root = benchmarks[layout]
    files = tree_files(root)
    name = root.name
    archive = {"zip": lambda: make_zip(files, tmp_path / f"{name}.zip"),
               "tar": lambda: make_tar(files, tmp_path / f"{name}.tar", "w"),
               "tar.gz": lambda: make_tar(files, tmp_path / f"{name}.tar.gz"),
               "zip-of-folder": lambda: make_zip(files, tmp_path / f"{name}.zip", prefix=f"{name}/")}[container]()
    want = read_dataset(root, layout, split=split)
    for chosen in (layout, "auto"):
        got = read_dataset(archive, chosen, split=split)
        assert got.layout == layout and got.split == want.split == split
        assert _relative(got) == _relative(want)
        assert got.pairing == want.pairing and got.name == want.name
        assert all(item.path.startswith(f"{archive}!/") for item in got.items)
        assert got.container == ("zip" if container == "zip-of-folder" else container)


@pytest.mark.slow
def test_extraction_with_a_layout_in_an_archive_gives_the_rows_of_the_folder(extractor, benchmarks, tmp_path):
    root = benchmarks["cnndetection"]
    archive = make_tar(tree_files(root), tmp_path / "CNNDetection.tar", "w")
    extract([root], tmp_path / "folder", extractor=extractor, layout="cnndetection", split="test")
    summary = extract([archive], tmp_path / "archive", extractor=extractor, layout="auto", split="test")
    assert summary.errors == 0 and summary.processed == 4
    assert_same_rows(_rows(tmp_path / "archive"), _rows(tmp_path / "folder"), prefix=f"{archive}!/")


def test_an_exclude_list_works_inside_an_archive(benchmarks, tmp_path):
    root = benchmarks["genimage"]
    archive = make_zip(tree_files(root), tmp_path / "GenImage.zip")
    excluded = tmp_path / "exclude.txt"
    excluded.write_text("imagenet_ai_0419_sdv4/val/ai/1_fake-img0.png\n")
    want = read_dataset(root, "genimage", split="val", exclude=[excluded])
    got = read_dataset(archive, "genimage", split="val", exclude=[excluded])
    assert _relative(got) == _relative(want) and got.skipped == want.skipped == {"excluded": 1}
