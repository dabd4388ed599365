"""Hugging Face datasets inputs: save_to_disk folders (Dataset, DatasetDict), the datasets cache,
and hub ids loaded through datasets.load_dataset (offline, from a local dataset repository)."""

from __future__ import annotations

import json
import os

import datasets  # the hub extra, in the test extra too
import pytest

from tidy_detect.data.hub import load_hub, read_folder
from tidy_detect.data.inputs import collect_inputs
from tidy_detect.data.layouts import read_dataset
from tidy_detect.data.sources import SourceOptions, read_item
from tidy_detect.errors import ConfigError, InputError

from tests.conftest import make_tree
from tests.data.conftest import label_of, make_saved_dataset, tree_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub") / "bench"
    make_tree(root, {"progan": 2, "dalle": 2})
    return tree_files(root)


def test_a_saved_dataset_reads_its_arrow_files_in_order_with_class_names(files, tmp_path):
    folder = make_saved_dataset(files, tmp_path / "fakes")
    arrow = sorted(p.name for p in folder.glob("*.arrow"))
    assert len(arrow) > 1  # several shards, read in the order state.json lists them
    items = collect_inputs([folder])
    assert [i.label for i in items] == [label_of(n) for n, _ in files]  # ClassLabel 0 is "fake"
    assert {i.group for i in items} == {"fakes"}  # no group column named: the dataset's name
    assert all(".arrow!/" in i.path for i in items)
    assert [read_item(i.path)[0] for i in items] == [data for _, data in files]
    grouped = collect_inputs([folder], options=SourceOptions(group_column="generator"))
    assert [i.group for i in grouped] == [n.split("/")[0] for n, _ in files]


def test_a_dataset_dict_needs_a_split_when_it_has_several(files, tmp_path):
    folder = make_saved_dataset(files, tmp_path / "dict", splits={"train": [0, 1, 2, 3, 4], "test": [5, 6, 7]})
    with pytest.raises(InputError, match="holds the splits train, test; choose one with --split"):
        collect_inputs([folder])
    items = collect_inputs([folder], split="test")
    assert [read_item(i.path)[0] for i in items] == [data for _, data in files[5:]]
    assert all(f"{os.sep}test{os.sep}data-" in i.path for i in items)
    with pytest.raises(InputError, match="no split 'validation'; splits: train, test"):
        collect_inputs([folder], split="validation")
    dataset = read_dataset(folder, split="train")
    assert (dataset.layout, dataset.split, dataset.container, len(dataset)) == ("columns", "train",
                                                                                "datasets folder", 5)
    with pytest.raises(InputError, match="--layout genimage reads folder trees"):
        read_dataset(folder, "genimage", split="train")


def test_a_named_column_that_is_absent_lists_the_columns(files, tmp_path):
    folder = make_saved_dataset(files, tmp_path / "ds")
    with pytest.raises(InputError, match=r"no column 'generater' \(--group-column\); columns: image, label, "
                                         r"generator"):
        collect_inputs([folder], options=SourceOptions(group_column="generater"))
    with pytest.raises(InputError, match=r"no image column 'picture' \(--image-column\); columns: image, label"):
        collect_inputs([folder], options=SourceOptions(image_column="picture"))


def test_damaged_datasets_folders_are_refused_before_extraction(files, tmp_path):
    folder = make_saved_dataset(files, tmp_path / "ds")
    shard = sorted(folder.glob("*.arrow"))[-1]
    shard.write_bytes(shard.read_bytes()[:-8])  # the end-of-stream marker cut off
    with pytest.raises(InputError, match="end-of-stream marker: it is truncated"):
        collect_inputs([folder])
    shard.unlink()
    with pytest.raises(InputError, match="listed in state.json but missing"):
        collect_inputs([folder])


@pytest.fixture
def hub_repo(files, tmp_path, monkeypatch):
    """A dataset repository as the hub serves it (Parquet files per split under data/), and an
    empty datasets cache for this test."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["fake", "real"]),
                                  "generator": datasets.Value("string")})
    rows = {"image": [{"bytes": data, "path": name.rsplit("/", 1)[-1]} for name, data in files],
            "label": [0 if label_of(name) else 1 for name, _ in files],
            "generator": [name.split("/")[0] for name, _ in files]}
    whole = datasets.Dataset.from_dict(rows, features=features)
    repo = tmp_path / "org" / "fakes"
    (repo / "data").mkdir(parents=True)
    whole.select(range(6)).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    whole.select(range(6, 8)).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return repo


def test_a_hub_id_is_loaded_through_datasets_and_its_cache_files_read(files, hub_repo, tmp_path):
    with pytest.raises(InputError, match="holds the splits train, test; choose one with --split"):
        collect_inputs([f"hf-dataset:{hub_repo}"])
    found = load_hub(f"hf-dataset:{hub_repo}", "train")
    assert (found.kind, found.split, found.rows, found.name) == ("hub dataset", "train", 6, "fakes")
    assert found.class_names == {"label": ["fake", "real"]}
    assert all(str(tmp_path / "cache") in f for f in found.files)
    items = collect_inputs([f"hf-dataset:{hub_repo}"], split="train",
                           options=SourceOptions(group_column="generator"))
    assert [(i.label, i.group) for i in items] == [(label_of(n), n.split("/")[0]) for n, _ in files[:6]]
    assert [read_item(i.path)[0] for i in items] == [data for _, data in files[:6]]
    # the cache folder itself is an input too (the hub cache layout), with the same rows
    cache_folder = os.path.dirname(found.files[0])
    assert read_folder(cache_folder, "train").kind == "datasets cache"
    again = collect_inputs([cache_folder], split="train", options=SourceOptions(group_column="generator"))
    assert again == items
    info = json.loads((open(os.path.join(cache_folder, "dataset_info.json"), encoding="utf-8")).read())
    info["splits"]["train"]["num_examples"] = 7  # as if a shard of the split were missing
    with open(os.path.join(cache_folder, "dataset_info.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    with pytest.raises(InputError, match="has 6 rows in its files but the dataset's info records 7"):
        collect_inputs([cache_folder], split="train")


def test_a_hub_id_without_network_or_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as caught:
        collect_inputs(["hf-dataset:tidy-detect-nobody/no-such-fakes"])
    message = str(caught.value)
    assert message.startswith("hf-dataset:tidy-detect-nobody/no-such-fakes: datasets cannot load")
    assert "the hub is not reachable (offline mode is on)" in message and "datasets cache" in message


def test_split_needs_a_dataset_with_splits(files, tmp_path):
    one_file = sorted(make_saved_dataset(files, tmp_path / "ds").glob("*.arrow"))[0]
    assert collect_inputs([one_file])  # an Arrow file of the folder is a table of its own
    with pytest.raises(ConfigError, match="splits need a dataset layout"):
        collect_inputs([one_file], split="train")


@pytest.mark.slow
def test_the_command_line_takes_the_split_and_column_options(files, tiny_preset, tmp_path):
    from typer.testing import CliRunner

    from tidy_detect.cli import app
    from tidy_detect.features.store import FeatureStore

    folder = make_saved_dataset(files, tmp_path / "dict", splits={"train": [0, 1, 2, 3, 4], "test": [5, 6, 7]})
    for command in ("extract", "detect", "robustness"):
        shown = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert all(flag in shown for flag in ("--image-column", "--label-column", "--group-column",
                                              "--caption-column")), command
    result = CliRunner().invoke(app, ["extract", str(folder), "--split", "test", "--group-column", "generator",
                                      "--out", str(tmp_path / "s"), "--preset", str(tiny_preset)])
    assert result.exit_code == 0, result.output
    rows = list(FeatureStore(tmp_path / "s").rows(["path", "label", "group", "error"]))
    want = sorted((label_of(n), n.split("/")[0]) for n, _ in files[5:])
    assert sorted((r["label"], r["group"]) for r in rows) == want
    result = CliRunner().invoke(app, ["extract", str(folder), "--split", "test", "--label-column", "is_fake",
                                      "--out", str(tmp_path / "s2"), "--preset", str(tiny_preset)])
    assert result.exit_code == 3 and "no column 'is_fake' (--label-column); columns: image, label" in result.output
