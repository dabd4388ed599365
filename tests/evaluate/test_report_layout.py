"""The HTML report read at a glance: wide tables in their own scrolling box, configs as key/value
tables, a "how to read this" line under every figure, the mean bar set apart, and a banner when
the numbers come from random-weight models.

The results folders here are written by hand (no models run): a Table 1 evaluation (16 generators + Avg.)
over a store and a head whose recorded extraction configs say whether the models had random
weights. ``test_report_browser.py`` loads the same report in headless Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tidy_detect.evaluate import plots
from tidy_detect.evaluate.evaluation import load_suite
from tidy_detect.evaluate.report import STYLE, build_report, random_weight_sources

PNG = b"\x89PNG\r\n\x1a\n"


def _extraction(random: bool) -> dict:
    return {
        "clip": {"source": "openai/clip-vit-large-patch14", "model_type": "clip", "weights": "abc123",
                 "random_weights": random, "dim": 768, "mean": [0.48, 0.46, 0.41], "dtype": "float32"},
        "captioner": {"name": "blip2", "source": "Salesforce/blip2-opt-2.7b", "weights": "def456",
                      "random_weights": random, "prompt": None, "max_tokens": 30},
        "grounder": {"name": "grounding-dino", "source": "IDEA-Research/grounding-dino-base", "weights": "0a1b",
                     "random_weights": False, "box_threshold": 0.35},
        "phrases": {"max_objects": 8, "stoplist": ["a close", "front"], "spacy_version": "3.8"},
    }


def write_results(root: Path, *, random: bool) -> Path:
    """An evaluation folder (Table 1, one detector) with its store and head on disk; returns the folder."""
    store = root / "store"
    store.mkdir(parents=True)
    (store / "config.json").write_text(json.dumps({"format": "tidy-detect-store", "extraction": _extraction(random)}))
    head = root / "heads" / "tidy.safetensors"
    head.parent.mkdir()
    head.write_bytes(b"")
    meta = {"representation": {"kind": "both", "w1": 1.0, "w2": 1.0, "normalize": True},
            "head": {"hidden": 512, "epochs": 50, "lr": 0.001},
            "training": {"data": {"stores": [str(store)], "rows": 80000}, "seed": 0},
            "metrics": {"train_acc": 0.97}, "extraction": _extraction(random), "package_version": "0.1.0"}
    head.with_suffix(".json").write_text(json.dumps(meta))
    suite = load_suite("table1")
    labels = [c.label for c in suite.columns]
    groups = {f"gen{k}": {"acc": 0.5 + k / 100, "real_acc": 0.6, "fake_acc": 0.4, "ap": 0.7, "auc": 0.7,
                          "n_real": 1000, "n_fake": 1000} for k in range(len(labels))}
    folder = root / "ev"
    folder.mkdir()
    data = {"kind": "evaluation", "threshold": 0.5,
            "info": {"heads": [str(head)], "head_names": ["TIDY"], "stores": [str(store)], "suite": "table1",
                     "suite_columns": {label: {"group": f"gen{k}", "datasets": ["cnndetection"]}
                                       for k, label in enumerate(labels)},
                     "sampling": {"max_per_class": 1000, "seed": 0, "seed_reset": "per store"}},
            "groups": {"TIDY": groups}, "mean": {"TIDY": {"acc": 0.58, "ap": 0.7}}}
    (folder / "metrics.json").write_text(json.dumps(data))
    plots.grouped_bars({"TIDY": {"gen0": 0.7, "gen1": 0.6, "mean": 0.65}}, folder / "ablation_demo.png")
    return folder


def test_table1_columns_and_every_table_scrolls_in_its_own_box(tmp_path):
    columns = len(load_suite("table1").columns)
    assert columns == 16  # the paper's Table 1: 16 generators, then the mean
    page = build_report([write_results(tmp_path, random=False)], tmp_path / "report.html").read_text()
    assert re.search(r"\.table-wrap\{[^}]*overflow-x:auto", STYLE)
    assert re.search(r"\.table-wrap\{[^}]*max-width:100%", STYLE)
    # every data table sits in a wrapper; config tables sit in one per block
    assert page.count("<table>") == page.count("<div class='table-wrap'><table>")
    for details in re.findall(r"<details>.*?</details>", page, flags=re.S):
        assert "<div class='table-wrap'><table class='kv'>" in details
    table1 = re.search(r"ACC \(%\)</h3>\s*<div class='table-wrap'><table><thead><tr>(.*?)</tr>", page)
    assert table1 and table1.group(1).count("<th>") == columns + 2  # detector, the generators, Avg.


def test_configs_are_key_value_tables_not_python_dicts(tmp_path):
    page = build_report([write_results(tmp_path, random=False)], tmp_path / "report.html").read_text()
    assert "{&#x27;" not in page and "{'" not in page and '{"' not in page  # no dict reprs, no JSON dumps
    # nested dicts nest: the head's extraction -> clip -> source
    assert re.search(r"<th>extraction</th><td><table class='kv'><tbody><tr><th>clip</th><td><table class='kv'>"
                     r"<tbody><tr><th>source</th><td>openai/clip-vit-large-patch14</td>", page)
    assert "<th>stoplist</th><td>a close, front</td>" in page
    assert "<th>prompt</th><td><span class=\"missing\">–</span></td>" in page


def test_every_figure_says_how_to_read_it_and_the_mean_bar_comes_last(tmp_path):
    page = build_report([write_results(tmp_path, random=False)], tmp_path / "report.html").read_text()
    figures = re.findall(r"<figure>.*?</figure>", page, flags=re.S)
    assert figures and all("<p class='how'>How to read this:" in f for f in figures)
    for name in ("pr.png", "roc.png", "cosine.png", "tsne.png", "robustness_ap.png", "robustness_acc.png",
                 "ablation_modality.png"):
        assert plots.how_to_read(name), name
    assert plots.how_to_read("my-own.png") is None
    assert list(plots.bar_positions(["a", "b", "mean"])) == [0.0, 1.0, 2.6]  # last, after a gap
    assert list(plots.bar_positions(["a", "b"])) == [0.0, 1.0]


def test_grouped_bars_draws_the_mean_last_hatched(tmp_path, monkeypatch):
    drawn = []
    plt = plots._pyplot()
    real_bar = plt.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        drawn.append((list(x), kwargs.get("hatch")))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "bar", spy)
    # "mean" sorts before "progan": it must still come last
    out = plots.grouped_bars({"A": {"progan": 0.8, "dalle": 0.6, "mean": 0.7},
                              "B": {"progan": 0.7, "dalle": 0.5, "mean": 0.6}}, tmp_path / "ablation_x.png")
    assert out.read_bytes()[:8] == PNG
    plain = [x for x, hatch in drawn if hatch is None]
    hatched = [x for x, hatch in drawn if hatch]
    assert len(plain) == 2 and len(hatched) == 2
    assert min(min(x) for x in hatched) > max(max(x) for x in plain) + 0.5  # set apart by a gap


def test_random_weight_banner_only_for_random_weight_models(tmp_path):
    random_folder = write_results(tmp_path / "tiny", random=True)
    found = random_weight_sources("evaluation", random_folder, json.loads((random_folder / "metrics.json").read_text()))
    assert [roles for _, roles in found] == [["clip", "captioner"], ["clip", "captioner"]]
    assert {what.split()[0] for what, _ in found} == {"head", "store"}
    page = build_report([random_folder], tmp_path / "tiny.html").read_text()
    assert "Random weights: these numbers mean nothing." in page and "role='alert'" in page
    assert "make-tiny" in page

    real_folder = write_results(tmp_path / "real", random=False)
    page = build_report([real_folder], tmp_path / "real.html").read_text()
    assert "Random weights" not in page and "random-weight models" not in page

    # results whose store and head have gone (moved elsewhere) still make a report, without a banner
    for path in (tmp_path / "real" / "store" / "config.json", tmp_path / "real" / "heads" / "tidy.json"):
        path.unlink()
    assert "Random weights" not in build_report([real_folder], tmp_path / "gone.html").read_text()
