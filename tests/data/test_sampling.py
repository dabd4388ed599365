"""The sampling protocol: capped per (group, label), seeded, independent of listing order, saved exactly."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tidy_detect.data.inputs import ImageItem, read_manifest
from tidy_detect.data.layouts import read_dataset
from tidy_detect.data.sampling import (
    load_list,
    load_list_params,
    sample_per_class,
    save_list,
    stratified_per_class,
    stratum_quotas,
)
from tidy_detect.errors import ConfigError, InputError


def _items(group: str, label: int, n: int, folder: str | None = None, subgroup: str | None = None) -> list[ImageItem]:
    folder = folder or f"{group}/{label}"
    return [ImageItem(f"/data/{folder}/{i:03d}.png", label, group, None, subgroup) for i in range(n)]


@pytest.fixture
def items() -> list[ImageItem]:
    laion = [ImageItem(f"/data/laion/{i:03d}.jpg", 0) for i in range(30)]
    return [
        *_items("ldm_200", 1, 20), *(ImageItem(i.path, 0, "ldm_200") for i in laion),
        *_items("dalle", 1, 4), *(ImageItem(i.path, 0, "dalle") for i in laion),
    ]


def _cells(sample: list[ImageItem]) -> Counter:
    return Counter((i.group, i.label) for i in sample)


def test_at_most_n_per_group_and_label(items):
    sample = sample_per_class(items, 10, seed=0)
    assert _cells(sample) == {("dalle", 0): 10, ("dalle", 1): 4, ("ldm_200", 0): 10, ("ldm_200", 1): 10}
    assert [(i.group, i.label) for i in sample] == sorted((i.group, i.label) for i in sample)
    assert len(set((i.path, i.group) for i in sample)) == len(sample)
    everything = sample_per_class(items, None)
    assert sorted(everything, key=repr) == sorted(items, key=repr)
    assert everything == sample_per_class(items, 10_000)


def test_reproducible_and_seeded(items):
    first = sample_per_class(items, 10, seed=0)
    assert sample_per_class(items, 10, seed=0) == first
    assert sample_per_class(items, 10, seed=1) != first
    shuffled = list(items)
    random.Random(5).shuffle(shuffled)
    assert sample_per_class(shuffled, 10, seed=0) == first  # not the listing order


def test_shared_reals_get_the_same_sample_and_smaller_n_is_a_prefix(items):
    sample = sample_per_class(items, 10, seed=3)
    reals = {g: [i.path for i in sample if i.group == g and i.label == 0] for g in ("dalle", "ldm_200")}
    assert reals["dalle"] == reals["ldm_200"]
    smaller = sample_per_class(items, 4, seed=3)
    assert [i.path for i in smaller if i.group == "dalle" and i.label == 0] == reals["dalle"][:4]


def test_sampling_parameter_errors(items):
    with pytest.raises(ConfigError, match="max_per_class must be an integer >= 1, got 0"):
        sample_per_class(items, 0)
    with pytest.raises(ConfigError, match="seed must be an integer, got '0'"):
        sample_per_class(items, 3, seed="0")
    with pytest.raises(ConfigError, match="per_class must be an integer >= 1, got 2.5"):
        stratified_per_class(items, 2.5)


def test_stratum_quotas_even_with_small_strata_and_remainders():
    assert stratum_quotas({"a": 10, "b": 10, "c": 10}, 10) == {"a": 4, "b": 3, "c": 3}
    assert stratum_quotas({"a": 10, "b": 10, "c": 2}, 12) == {"a": 5, "b": 5, "c": 2}
    assert stratum_quotas({"a": 1, "b": 1, "c": 9}, 11) == {"a": 1, "b": 1, "c": 9}


def test_stratified_over_classes():
    items = [*_items("progan", 0, 10, "airplane/0", "airplane"), *_items("progan", 1, 10, "airplane/1", "airplane"),
             *_items("progan", 0, 10, "cat/0", "cat"), *_items("progan", 1, 10, "cat/1", "cat"),
             *_items("progan", 0, 2, "cow/0", "cow"), *_items("progan", 1, 3, "cow/1", "cow")]
    sample = stratified_per_class(items, 12, seed=0)
    counts = Counter((i.label, i.subgroup) for i in sample)
    assert counts == {(0, "airplane"): 5, (0, "cat"): 5, (0, "cow"): 2,
                      (1, "airplane"): 5, (1, "cat"): 4, (1, "cow"): 3}
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    assert stratified_per_class(shuffled, 12, seed=0) == sample
    assert stratified_per_class(items, 12, seed=1) != sample
    with pytest.raises(InputError, match="--per-label 23 asks for 23 real images, but the dataset has 22"):
        stratified_per_class(items, 23)
    with pytest.raises(InputError, match="stratified sampling needs labelled images"):
        stratified_per_class([ImageItem("/x.png")], 1)


def test_saved_list_round_trips_as_a_manifest(tmp_path, items):
    sample = sample_per_class(items, 3, seed=0)
    sample.append(ImageItem("/data/odd, \"name\".png", None, None, "a caption, with \"quotes\"\nand a line"))
    path = save_list(sample, tmp_path / "lists" / "eval.csv",
                     {"method": "max_per_class", "max_per_class": 3, "seed": 0, "layout": "unifd"})
    assert read_manifest(path) == sample
    assert load_list(path) == sample
    record = load_list_params(path)
    assert record["params"] == {"method": "max_per_class", "max_per_class": 3, "seed": 0, "layout": "unifd"}
    assert record["items"] == len(sample)
    assert record["counts"]["dalle"] == {"real": 3, "fake": 3, "unlabelled": 0}
    assert record["csv_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "lists" / "eval.json").read_text()) == record


def test_sampled_dataset_saved_and_read_back_with_subgroups(tmp_path):
    root = tmp_path / "progan_train"
    for cls in ("airplane", "cat"):
        for label in ("0_real", "1_fake"):
            for i in range(4):
                path = root / cls / label / f"{cls}.{i}.PNG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(path)
    dataset = read_dataset(root)
    sample = stratified_per_class(dataset.items, 6, seed=0)
    assert Counter((i.label, i.subgroup) for i in sample) == {(0, "airplane"): 3, (0, "cat"): 3,
                                                               (1, "airplane"): 3, (1, "cat"): 3}
    path = save_list(sample, tmp_path / "train.csv", {"method": "stratified_per_class", "per_class": 6, "seed": 0})
    again = read_dataset(path)
    assert again.layout == "manifest" and list(again.items) == sample
    assert all(Path(i.path).is_file() for i in again.items)
