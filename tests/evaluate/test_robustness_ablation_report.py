"""robustness, ablate and report end to end on the tiny bundle."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.data.inputs import collect_inputs
from tidy_detect.data.perturb import Perturbation
from tidy_detect.detect import Detector
from tidy_detect.evaluate.ablation import run_ablation
from tidy_detect.evaluate.report import build_report
from tidy_detect.evaluate.robustness import run_robustness
from tidy_detect.features.store import FeatureStore
from tidy_detect.head import DiscrepancyHead

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def test_robustness_sweep_and_resume(bench, tmp_path):
    head = bench["heads"][0]
    detector = Detector(*DiscrepancyHead.load(head), bench["extractor"])
    items = collect_inputs([bench["root"] / "cnn"])
    levels = [Perturbation("jpeg", 75), Perturbation("jpeg", 25), Perturbation("blur", 2)]
    result = run_robustness(head, items, tmp_path / "rob", levels, detector=detector)
    assert set(result["stores"]) == {"clean", "jpeg-75", "jpeg-25", "blur-2"}
    assert [p["level"] for p in result["perturbations"]["jpeg"]] == [75, 25]
    assert 0 <= result["clean"]["ap"] <= 1
    store = FeatureStore(tmp_path / "rob" / "stores" / "jpeg-25")
    assert store.config["perturbation"] == {"kind": "jpeg", "level": 25.0} and len(store) == len(items)
    for name in ("robustness_ap.png", "robustness_acc.png"):
        assert (tmp_path / "rob" / name).read_bytes()[:8] == PNG
    assert (tmp_path / "rob" / "evaluated.csv").is_file()
    # perturbed features differ from clean ones for the same image
    clean = FeatureStore(tmp_path / "rob" / "stores" / "clean").rows_for_paths([items[0].path])[items[0].path]
    jpeg = store.rows_for_paths([items[0].path])[items[0].path]
    assert (clean["global_image"] != jpeg["global_image"]).any()
    again = run_robustness(head, items, tmp_path / "rob", levels, detector=detector)
    assert again["clean"]["ap"] == result["clean"]["ap"]
    runs = FeatureStore(tmp_path / "rob" / "stores" / "blur-2").config["runs"]
    assert [r["processed"] for r in runs] == [len(items), 0]  # resumable: nothing extracted twice


def test_robustness_cli(bench, tmp_path):
    result = runner.invoke(app, ["robustness", str(bench["root"] / "unifd"), "--head", str(bench["heads"][0]),
                                 "--out", str(tmp_path / "r"), "--noise", "0.01", "--only", "noise,webp",
                                 "--webp", "50", "--max-per-class", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "robustness.json").read_text())
    assert set(data["perturbations"]) == {"noise", "webp"} and data["images"] == 8  # 2 groups x 2 classes x 2


def test_ablation_studies_baselines_and_compare(bench, tmp_path):
    stores = bench["stores"]
    payload = run_ablation([stores["train"]], [stores["cnn"], stores["unifd"]], tmp_path / "abl",
                           compare={"other-train": ([str(stores["val"])], [str(stores["cnn"])])},
                           epochs=3, hidden=8, batch_size=8)
    assert set(payload["studies"]) == {"modality", "distance", "weights"}
    assert set(payload["studies"]["modality"]) == {"image (I0)", "text (T0)", "both (D)"}
    assert len(payload["studies"]["weights"]) == 5
    assert {"UniFD linear probe", "UniFD nearest neighbour", "TIDY (both)"} <= set(payload["baselines"])
    for block in (*payload["studies"].values(), payload["baselines"], payload["compare"]):
        for result in block.values():
            assert set(result["groups"]) <= {"progan", "stylegan", "dalle", "ldm_200"}
            assert 0 <= result["mean"]["ap"] <= 1
    for name in ("modality", "distance", "weights", "baselines", "compare"):
        assert (tmp_path / "abl" / f"ablation_{name}.png").read_bytes()[:8] == PNG
    assert "| variant |" in (tmp_path / "abl" / "ablation.md").read_text()


def test_ablate_cli_and_html_report(bench, tmp_path):
    stores = bench["stores"]
    result = runner.invoke(app, ["ablate", str(stores["train"]), "--test", str(stores["cnn"]), "--out",
                                 str(tmp_path / "abl"), "--studies", "distance", "--no-baselines", "--epochs", "2",
                                 "--hidden", "8"])
    assert result.exit_code == 0, result.output
    ev = runner.invoke(app, ["eval", str(stores["cnn"]), "--head", str(bench["heads"][0]), "--suite", "table1",
                             "--out", str(tmp_path / "ev")])
    assert ev.exit_code == 0, ev.output
    detector = Detector(*DiscrepancyHead.load(bench["heads"][0]), bench["extractor"])
    run_robustness(bench["heads"][0], collect_inputs([bench["root"] / "unifd"]), tmp_path / "rob",
                   [Perturbation("jpeg", 50)], detector=detector)
    report = runner.invoke(app, ["report", str(tmp_path / "ev"), str(tmp_path / "rob"), str(tmp_path / "abl"),
                                 "--out", str(tmp_path / "report.html")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") >= 5
    for text in ("Evaluation", "Robustness", "Ablation", "ProGAN", "missing", "jpeg", "local (D_l)", "extraction"):
        assert text in page
    assert "http://" not in page and "https://" not in page  # self-contained
    # made on the tiny bundle: said at the top, and every figure says how to read it
    assert "Random weights: these numbers mean nothing." in page
    assert page.index("Random weights") < page.index("<h2>")
    assert page.count("How to read this:") >= page.count("<figure>") >= 5


def test_report_rejects_a_folder_without_results(tmp_path):
    import pytest

    from tidy_detect.errors import InputError

    with pytest.raises(InputError, match="not a results folder"):
        build_report([tmp_path], tmp_path / "r.html")
