"""eval end to end on the tiny bundle: tables, suites, sampling, calibration, seeds, imports, plots."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.errors import CheckpointError, UnknownNameError
from tidy_detect.evaluate.evaluation import evaluate, load_suite, write_plots, write_results
from tidy_detect.features.extractor import extract

from tests.conftest import make_tree

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def test_per_group_metrics_and_mean(bench):
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"], bench["stores"]["unifd"]])
    (name,) = result.groups
    groups = result.groups[name]
    assert set(groups) == {"progan", "stylegan", "dalle", "ldm_200"}
    assert (groups["progan"]["n_real"], groups["progan"]["n_fake"]) == (5, 5)
    for m in groups.values():
        assert 0 <= m["acc"] <= 1 and 0 <= m["ap"] <= 1 and 0 <= m["auc"] <= 1
    assert result.means[name]["ap"] == pytest.approx(np.mean([m["ap"] for m in groups.values()]))
    assert result.means[name]["ap_groups"] == 4


def test_sampling_is_per_class_and_saved(bench, tmp_path):
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], max_per_class=2, seed=3)
    groups = next(iter(result.groups.values()))
    assert all((m["n_real"], m["n_fake"]) == (2, 2) for m in groups.values())
    again = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], max_per_class=2, seed=3)
    assert sorted(again.scores[0].path) == sorted(result.scores[0].path)
    other = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], max_per_class=2, seed=4)
    assert sorted(other.scores[0].path) != sorted(result.scores[0].path)
    files = write_results(result, tmp_path)
    with files["scores.csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["path"] for r in rows) == sorted(result.scores[0].path)  # the exact list evaluated
    info = json.loads(files["metrics.json"].read_text())["info"]
    assert info["sampling"]["max_per_class"] == 2 and info["sampling"]["seed"] == 3


def test_suite_table_shows_missing_generators(bench, tmp_path):
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"], bench["stores"]["unifd"]], suite="table2")
    files = write_results(result, tmp_path)
    table = files["table.md"].read_text()
    assert "| detector | ProGAN | CycleGAN |" in table
    header, row = [line for line in table.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["CycleGAN"] == "missing" and cells["BigGAN"] == "missing"
    assert cells["ProGAN"] != "missing" and cells["DALL-E"] != "missing"
    assert cells["Avg."].endswith("(4/16)")
    assert "ldm_200" not in table.split("## Per group")[0] or "LDM 200" in table


def test_suites_are_data():
    suite = load_suite("table3")
    assert suite.metrics == ("acc", "ap") and suite.columns[0][0] == "ADM"
    assert dict(suite.match(["lsun_bedroom/adm", "imagenet/sdv1"]))["SD-v1"] == "imagenet/sdv1"
    with pytest.raises(UnknownNameError, match="Unknown suite 'table9'. Known: table1, table2, table3"):
        load_suite("table9")


def test_calibrated_threshold_in_its_own_columns(bench, tmp_path):
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], calibrate_on=[bench["stores"]["val"]])
    assert result.calibrated_threshold is not None
    m = next(iter(result.groups.values()))["progan"]
    assert {"acc_cal", "real_acc_cal", "fake_acc_cal", "acc"} <= set(m)
    assert "ACC (cal.)" in write_results(result, tmp_path)["table.md"].read_text()


def test_bootstrap_intervals(bench):
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], bootstrap=50)
    m = next(iter(result.groups.values()))["progan"]
    assert m["ap_ci"][0] <= m["ap"] <= m["ap_ci"][1]


def test_several_heads_give_mean_and_std(bench, tmp_path):
    result = evaluate([bench["heads"][0], bench["heads"][1]], [bench["stores"]["cnn"]])
    agg = result.aggregate(result.info["head_names"])
    mean, std = agg["progan"]["ap"]
    aps = [result.groups[n]["progan"]["ap"] for n in result.info["head_names"]]
    assert mean == pytest.approx(np.mean(aps)) and std == pytest.approx(np.std(aps))
    assert "mean ± std (2 heads)" in write_results(result, tmp_path)["table.md"].read_text()


def test_imported_scores_join_the_tables(bench, tmp_path):
    first = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]])
    csv_path = tmp_path / "other.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score"])
        for path, label in list(zip(first.scores[0].path, first.scores[0].label))[:-1]:
            writer.writerow([path, 0.9 if label == 1 else 0.1])
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], imports={"perfect": csv_path})
    assert result.groups["perfect"]["progan"]["ap"] == 1.0 and result.groups["perfect"]["progan"]["acc"] == 1.0
    assert result.info["imports_missing_rows"] == {"perfect": 1}


def test_head_refuses_a_store_of_another_extraction_config(bench, tiny_bundle, tmp_path):
    from tidy_detect.config import load_preset

    config = load_preset(tiny_bundle / "tiny.toml").updated(models={"clip": str(tiny_bundle / "clip-b")})
    make_tree(tmp_path / "t", {"progan": 1})
    extract([tmp_path / "t"], tmp_path / "other", config)
    with pytest.raises(CheckpointError, match="trained on features from other models.*clip"):
        evaluate([bench["heads"][0]], [tmp_path / "other"])


def test_plots_are_png(bench, tmp_path):
    result = evaluate([bench["heads"][0]], [bench["stores"]["cnn"], bench["stores"]["unifd"]])
    files = write_plots(result, tmp_path)
    for key in ("cosine", "tsne", f"pr:{result.info['head_names'][0]}", f"roc:{result.info['head_names'][0]}"):
        assert files[key].read_bytes()[:8] == PNG


def test_eval_cli_with_seeds(bench, tmp_path):
    pattern = str(bench["root"] / "heads" / "h-seed{seed}.safetensors")
    result = runner.invoke(app, ["eval", str(bench["stores"]["cnn"]), str(bench["stores"]["unifd"]), "--head", pattern,
                                 "--seeds", "0,1", "--suite", "table1", "--out", str(tmp_path / "r"), "--no-plots"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(data["groups"]) == {"h-seed0", "h-seed1"} and "across_heads" in data
    assert (tmp_path / "r" / "table.md").is_file() and (tmp_path / "r" / "scores.csv").is_file()


def test_cascade_simulated_on_stores(bench, tmp_path):
    from tidy_detect.config import RepresentationConfig
    from tidy_detect.training import train_head

    global_head = train_head([bench["stores"]["train"]], tmp_path / "g.safetensors", epochs=3, hidden=8,
                             representation=RepresentationConfig("global")).path
    everything = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], cascade_head=global_head, band=(0.0, 1.0))
    name = everything.info["head_names"][0]
    assert everything.info["cascade"][f"{name}+cascade"]["fraction_escalated"] == 1.0
    np.testing.assert_allclose(everything.scores[1].p_fake, everything.scores[0].p_fake)
    none = evaluate([bench["heads"][0]], [bench["stores"]["cnn"]], cascade_head=global_head, band=(2.0, 3.0))
    assert none.info["cascade"][f"{name}+cascade"]["fraction_escalated"] == 0.0
    alone = evaluate([global_head], [bench["stores"]["cnn"]])
    np.testing.assert_allclose(none.scores[1].p_fake, alone.scores[0].p_fake)
    assert "escalated to the full head" in write_results(none, tmp_path)["table.md"].read_text()
