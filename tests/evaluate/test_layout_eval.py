"""Benchmark layouts through extraction to evaluation: shared reals count for every generator."""

from __future__ import annotations

import csv
import json

import numpy as np
from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.evaluate.evaluation import evaluate
from tidy_detect.features.extractor import extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import random_image

runner = CliRunner()


def _unifd_tree(root, n=3):
    rng = np.random.default_rng(7)
    for folder in ("guided/1_fake", "ldm_200/1_fake", "dalle/1_fake", "imagenet/0_real", "laion/0_real"):
        (root / folder).mkdir(parents=True)
        for i in range(n + (2 if "real" in folder else 0)):
            random_image(rng, 40, 32).save(root / folder / f"{i}.png")


def test_unifd_shared_reals_are_extracted_once_and_evaluated_per_generator(bench, tmp_path):
    _unifd_tree(tmp_path / "unifd")
    summary = extract([tmp_path / "unifd"], tmp_path / "store", extractor=bench["extractor"], layout="auto",
                      max_per_class=3, seed=0)
    store = FeatureStore(tmp_path / "store")
    assert store.pairing == {"dalle": "laion", "guided": "imagenet", "ldm_200": "laion"}
    # 3 fakes x 3 generators + 3 imagenet reals + 3 laion reals, each file once
    assert summary.processed == 15 and len(store) == 15
    listed = list(csv.DictReader((tmp_path / "store" / "inputs.csv").open()))
    assert len(listed) == 15
    assert json.loads((tmp_path / "store" / "inputs.json").read_text())["params"]["max_per_class"] == 3
    result = evaluate([bench["heads"][0]], [tmp_path / "store"])
    groups = next(iter(result.groups.values()))
    assert set(groups) == {"guided", "ldm_200", "dalle"}
    for group in groups.values():
        assert (group["n_real"], group["n_fake"]) == (3, 3)
    laion_reals = {p for p, g, y in zip(result.scores[0].path, result.scores[0].group, result.scores[0].label)
                   if g == "dalle" and y == 0}
    ldm_reals = {p for p, g, y in zip(result.scores[0].path, result.scores[0].group, result.scores[0].label)
                 if g == "ldm_200" and y == 0}
    assert laion_reals == ldm_reals and all("/laion/" in p for p in laion_reals)


def test_extract_cli_with_layout_and_training_subset(bench, tiny_preset, tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("airplane", "cat"):
        for label in ("0_real", "1_fake"):
            folder = tmp_path / "CNNDetection" / "train" / cls / label
            folder.mkdir(parents=True)
            for i in range(4):
                random_image(rng, 30, 30).save(folder / f"{cls}.{i}.v2.PNG")
    result = runner.invoke(app, ["extract", str(tmp_path / "CNNDetection"), "--layout", "cnndetection", "--split",
                                 "train", "--per-class", "4", "--out", str(tmp_path / "s"), "--preset", str(tiny_preset)])
    assert result.exit_code == 0, result.output
    info = FeatureStore(tmp_path / "s").summary()
    assert info["labels"] == {"real": 4, "fake": 4, "none": 0} and info["groups"] == {"progan": 8}
    listed = list(csv.DictReader((tmp_path / "s" / "inputs.csv").open()))
    assert sorted({r["subgroup"] for r in listed}) == ["airplane", "cat"]  # stratified over classes
    both = runner.invoke(app, ["extract", str(tmp_path / "CNNDetection"), "--layout", "cnndetection", "--split",
                               "train", "--per-class", "4", "--max-per-class", "2", "--out", str(tmp_path / "t"),
                               "--preset", str(tiny_preset)])
    assert both.exit_code == 2 and "either --max-per-class" in both.output


def test_datasets_inspect_cli(tmp_path):
    _unifd_tree(tmp_path / "unifd")
    result = runner.invoke(app, ["datasets", "inspect", str(tmp_path / "unifd")])
    assert result.exit_code == 0, result.output
    assert "unifd" in result.output and "ldm_200" in result.output
