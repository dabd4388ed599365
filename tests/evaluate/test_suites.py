"""Suites name the dataset of every column: GenImage's ADM is not DiffusionForensics' ADM, the
Deepfakes column is an explicit choice, and the table says where each column came from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tidy_detect.errors import ConfigError, InputError, StoreError
from tidy_detect.evaluate.evaluation import evaluate, load_suite, write_results
from tidy_detect.features.extractor import extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree, random_image


def _images(folder, n, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        random_image(rng, 40 + 3 * i, 36).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def datasets(bench, tmp_path_factory):
    """Stores of GenImage (ADM, glide), DiffusionForensics (lsun_bedroom: adm, sdv2) and
    CNNDetection (deepfake, whichfaceisreal), each extracted with its layout."""
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(21)
    for gen in ("ADM", "glide"):
        for label in ("ai", "nature"):
            _images(root / "genimage" / gen / "val" / label, 2, rng)
    for folder in ("real", "adm", "sdv2"):
        _images(root / "df" / "test" / "lsun_bedroom" / folder, 2, rng)
    make_tree(root / "cnn", {"deepfake": 2, "whichfaceisreal": 2}, seed=22)
    make_tree(root / "plain", {"adm": 2}, seed=23)  # no layout: the store cannot say which dataset
    stores = {}
    for name, layout in (("genimage", "genimage"), ("df", "diffusionforensics"), ("cnn", "cnndetection"),
                         ("plain", None)):
        stores[name] = root / "stores" / name
        extract([root / name], stores[name], extractor=bench["extractor"], layout=layout)
    return {"root": root, "stores": stores, "head": bench["heads"][0], "extractor": bench["extractor"]}


def _notes(table: str) -> str:
    return " ".join(line for line in table.splitlines() if line.startswith("_"))


def test_stores_record_the_layout_of_each_group(datasets):
    assert FeatureStore(datasets["stores"]["genimage"]).datasets == {"ADM": "genimage", "glide": "genimage"}
    assert FeatureStore(datasets["stores"]["df"]).datasets == {
        "lsun_bedroom/adm": "diffusionforensics", "lsun_bedroom/real": "diffusionforensics",
        "lsun_bedroom/sdv2": "diffusionforensics"}
    assert FeatureStore(datasets["stores"]["plain"]).datasets == {}


def test_table3_takes_adm_from_genimage_and_names_every_source(datasets, tmp_path):
    stores = datasets["stores"]
    # DiffusionForensics first: order must not matter, and its lsun_bedroom/adm is not Table 3's ADM
    result = evaluate([datasets["head"]], [stores["df"], stores["genimage"]], suite="table3")
    columns = result.info["suite_columns"]
    assert columns["ADM"] == {"group": "ADM", "source": "genimage:ADM", "datasets": ["genimage"]}
    assert columns["Glide"]["group"] == "glide" and columns["SD-v2"]["group"] == "lsun_bedroom/sdv2"
    assert columns["VQDM"]["group"] is None
    table = write_results(result, tmp_path)["table.md"].read_text()
    notes = _notes(table)
    assert "ADM = ADM (genimage)" in notes and "SD-v2 = lsun_bedroom/sdv2 (diffusionforensics)" in notes
    assert "groups evaluated but not in this suite: lsun_bedroom/adm" in notes
    header, row = [line for line in table.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    acc = result.groups[result.info["head_names"][0]]
    assert cells["ADM"] == f"{acc['ADM']['acc'] * 100:.2f}" and cells["VQDM"] == "missing"


def test_a_recorded_layout_must_agree_with_the_suite(datasets):
    suite = load_suite("table3")
    assert dict(suite.match(["ADM"], {"ADM": ["genimage"]}))["ADM"] == "ADM"
    assert dict(suite.match(["ADM"], {"ADM": ["cnndetection"]}))["ADM"] is None
    # no tail matching: "adm" never stands for lsun_bedroom/adm or imagenet/adm
    assert dict(suite.match(["lsun_bedroom/adm", "imagenet/adm"]))["ADM"] is None


def test_a_store_without_layouts_is_matched_by_name_and_says_so(datasets, tmp_path):
    stores = datasets["stores"]
    result = evaluate([datasets["head"]], [stores["plain"], stores["df"]], suite="table3")
    assert result.info["suite_columns"]["ADM"] == {"group": "adm", "source": "genimage:ADM", "datasets": []}
    notes = _notes(write_results(result, tmp_path)["table.md"].read_text())
    assert "ADM = adm (genimage by the suite; the store does not record its dataset)" in notes


def test_deepfakes_is_cnndetections_folder_unless_chosen_otherwise(datasets, tmp_path):
    store = datasets["stores"]["cnn"]
    default = evaluate([datasets["head"]], [store], suite="table1")
    assert default.info["suite_columns"]["Deepfakes"]["group"] == "deepfake"
    assert "Deepfakes = deepfake (cnndetection)" in _notes(write_results(default, tmp_path / "a")["table.md"].read_text())
    chosen = evaluate([datasets["head"]], [store], suite="table1", columns={"deepfakes": "whichfaceisreal"})
    assert chosen.info["suite_columns"]["Deepfakes"] == {"group": "whichfaceisreal", "source": "whichfaceisreal",
                                                         "datasets": ["cnndetection"]}
    assert chosen.info["suite_choices"] == {"deepfakes": "whichfaceisreal"}
    notes = _notes(write_results(chosen, tmp_path / "b")["table.md"].read_text())
    assert "Deepfakes = whichfaceisreal (cnndetection)" in notes
    assert "columns given another source than the suite's: Deepfakes (chosen: whichfaceisreal)" in notes
    head = chosen.info["head_names"][0]
    assert chosen.groups[head]["whichfaceisreal"]["acc"] == default.groups[head]["whichfaceisreal"]["acc"]
    with_layout = evaluate([datasets["head"]], [store], suite="table1",
                           columns={"Deepfakes": "cnndetection:whichfaceisreal"})
    assert with_layout.info["suite_columns"]["Deepfakes"]["group"] == "whichfaceisreal"


def test_column_choices_are_checked(datasets):
    with pytest.raises(ConfigError, match="suite table1 has no column 'Deepfake'; its columns: ProGAN, CycleGAN"):
        load_suite("table1", {"Deepfake": "whichfaceisreal"})
    with pytest.raises(ConfigError, match="the source of column 'Deepfakes' must be GROUP or LAYOUT:GROUP, got ':x'"):
        load_suite("table1", {"Deepfakes": ":x"})
    with pytest.raises(ConfigError, match="no suite has them"):
        evaluate([datasets["head"]], [datasets["stores"]["cnn"]], columns={"Deepfakes": "whichfaceisreal"})


def test_eval_cli_column_option(datasets, tmp_path):
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", str(datasets["stores"]["cnn"]), "--head", str(datasets["head"]),
                                      "--suite", "table1", "--column", "Deepfakes=whichfaceisreal", "--out", str(out),
                                      "--no-plots"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["suite_columns"]["Deepfakes"]["group"] == "whichfaceisreal"
    report = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "report.html")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "report.html").read_text()
    assert "Deepfakes: whichfaceisreal" in html  # the report shows the column as evaluation chose it
    bad = CliRunner().invoke(app, ["eval", str(datasets["stores"]["cnn"]), "--head", str(datasets["head"]),
                                   "--suite", "table1", "--column", "Deepfakes", "--out", str(out), "--no-plots"])
    assert bad.exit_code != 0 and "--column takes LABEL=GROUP or LABEL=LAYOUT:GROUP" in bad.output


def test_one_store_refuses_one_group_name_from_two_datasets(datasets, tmp_path):
    from tidy_detect.data.selection import select_inputs

    rng = np.random.default_rng(31)
    for label in ("ai", "nature"):
        _images(tmp_path / "gi" / "biggan" / "val" / label, 1, rng)  # GenImage has a BigGAN too
    make_tree(tmp_path / "cn", {"biggan": 1}, seed=30)  # CNNDetection's BigGAN
    store = tmp_path / "mixed"
    extract([tmp_path / "gi"], store, extractor=datasets["extractor"], layout="genimage")
    with pytest.raises(StoreError, match="group 'biggan' holds genimage images in this store, not cnndetection ones"):
        extract([tmp_path / "cn"], store, extractor=datasets["extractor"], layout="cnndetection")
    with pytest.raises(InputError, match="group 'biggan' is read both as genimage and as cnndetection"):
        select_inputs([tmp_path / "gi", tmp_path / "cn"], layout="auto")
