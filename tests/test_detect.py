"""Training from stores, detection with explanations, and the offline demo, on the tiny bundle."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.config import REPRESENTATIONS, RepresentationConfig, load_preset
from tidy_detect.detect import Detector, config_from_extraction
from tidy_detect.errors import CheckpointError, StoreError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore
from tidy_detect.head import DiscrepancyHead
from tidy_detect.training import train_head

from tests.conftest import make_tree, random_image

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tiny_bundle, tmp_path_factory):
    """A store of a small labelled tree and a head trained on it."""
    root = tmp_path_factory.mktemp("detect")
    make_tree(root / "tree", {"gen": 6}, seed=1)
    extractor = Extractor(load_preset(tiny_bundle / "tiny.toml")).load()
    extract([root / "tree"], root / "store", extractor=extractor)
    result = train_head([root / "store"], root / "head.safetensors", epochs=5, hidden=16, batch_size=8)
    return {"root": root, "store": root / "store", "head": result.path, "result": result, "extractor": extractor}


def test_checkpoint_records_everything(trained):
    meta = json.loads(trained["head"].with_suffix(".json").read_text())
    store = FeatureStore(trained["store"])
    assert meta["fingerprint"] == store.fingerprint and meta["extraction"] == store.extraction
    assert meta["representation"] == {"kind": "both", "w1": 1.0, "w2": 1.0, "normalize": True}
    assert meta["head"]["epochs"] == 5 and meta["head"]["n_features"] == store.dim
    assert meta["training"]["data"]["real"] == 6 and meta["training"]["data"]["fake"] == 6
    assert meta["training"]["data"]["groups"] == {"gen": {"real": 6, "fake": 6}}
    assert set(meta["metrics"]["train"]) >= {"acc", "ap", "loss", "real_acc", "fake_acc"}
    assert len(meta["history"]) == 5 and meta["package_version"]


@pytest.mark.parametrize("kind", REPRESENTATIONS)
def test_every_representation_trains(trained, kind, tmp_path):
    rep = RepresentationConfig(kind=kind, w1=1.0, w2=0.5)
    result = train_head([trained["store"]], tmp_path / f"{kind}.safetensors", representation=rep, epochs=2, hidden=8)
    assert result.metadata["representation"]["kind"] == kind
    X = FeatureStore(trained["store"]).load(rep).X
    assert result.head.predict_proba(X).shape == (12, 2)


def test_training_refuses_mixed_stores(trained, tiny_bundle, tmp_path):
    config = load_preset(tiny_bundle / "tiny.toml").updated(models={"clip": str(tiny_bundle / "clip-b")})
    make_tree(tmp_path / "t", {"x": 1})
    extract([tmp_path / "t"], tmp_path / "other", config)
    with pytest.raises(StoreError, match="different extraction configs and cannot be mixed.*clip"):
        train_head([trained["store"], tmp_path / "other"], tmp_path / "h.safetensors", epochs=1)
    with pytest.raises(StoreError, match="validation store .* another extraction config"):
        train_head([trained["store"]], tmp_path / "h.safetensors", epochs=1, val_paths=[tmp_path / "other"])


def test_training_needs_both_classes(tiny_bundle, trained, tmp_path):
    folder = tmp_path / "only" / "0_real"
    folder.mkdir(parents=True)
    random_image(np.random.default_rng(0), 30, 30).save(folder / "a.png")
    extract([tmp_path / "only"], tmp_path / "s", extractor=trained["extractor"])
    with pytest.raises(StoreError, match="needs both real and fake images; the stores give 1 real and 0 fake"):
        train_head([tmp_path / "s"], tmp_path / "h.safetensors", epochs=1)


def test_detector_predict_paths_bytes_and_pil(trained):
    detector = Detector(*DiscrepancyHead.load(trained["head"]), trained["extractor"])
    path = next((trained["root"] / "tree").rglob("*.png"))
    records = detector.predict([path, path.read_bytes(), Image.open(path), b"not an image"])
    assert [r["error"] is None for r in records] == [True, True, True, False]
    assert "not an image" in records[3]["error"] and records[3]["p_fake"] is None
    first = records[0]
    assert set(first) == {"path", "sha256", "width", "height", "p_fake", "label", "caption", "objects",
                          "global_discrepancy", "error", "stage", "random_weights", "provenance"}
    assert first["stage"] == "full"
    assert 0.0 <= first["p_fake"] <= 1.0 and first["label"] in ("fake", "real")
    assert first["p_fake"] == pytest.approx(records[1]["p_fake"]) == pytest.approx(records[2]["p_fake"])
    assert records[1]["path"] == "<image 1>" and first["sha256"] == records[1]["sha256"]
    for obj in first["objects"]:
        assert set(obj) == {"phrase", "box", "box_score", "discrepancy"} and 0 <= obj["discrepancy"] <= 2
    # the store's rows score the same as fresh extraction
    stored = FeatureStore(trained["store"]).rows_for_paths([str(path)])
    assert detector.score_rows([stored[str(path)]])[0]["p_fake"] == pytest.approx(first["p_fake"], abs=1e-5)


def test_records_and_info_say_the_tiny_models_have_random_weights(trained):
    detector = Detector(*DiscrepancyHead.load(trained["head"]), trained["extractor"])
    path = next((trained["root"] / "tree").rglob("*.png"))
    records = detector.predict([path, b"not an image"])
    assert [r["random_weights"] for r in records] == [True, True]  # an error record too: same models
    info = detector.info()
    assert info["random_weights"] is True and info["random_weight_models"] == ["clip", "captioner", "grounder"]
    _, meta = DiscrepancyHead.load(trained["head"])
    assert all(meta["extraction"][kind]["random_weights"] is True for kind in ("clip", "captioner", "grounder"))


def test_records_of_models_without_the_mark_say_no_random_weights(trained):
    """A stand-in for real models: the head's and the loaded models' configs record no random weights
    (False, or nothing at all as in a head from before the mark)."""
    import copy
    from types import SimpleNamespace

    path = str(next((trained["root"] / "tree").rglob("*.png")))
    row = FeatureStore(trained["store"]).rows_for_paths([path])[path]
    head, meta = DiscrepancyHead.load(trained["head"])
    for recorded in (False, None):
        real = copy.deepcopy(meta)
        for kind in ("clip", "captioner", "grounder"):
            if recorded is None:
                del real["extraction"][kind]["random_weights"]
            else:
                real["extraction"][kind]["random_weights"] = recorded
        detector = Detector(head, real, SimpleNamespace(extraction=real["extraction"], device="cpu", dtype="float32"))
        assert detector.score_rows([row])[0]["random_weights"] is False
        assert detector.info()["random_weights"] is False and detector.info()["random_weight_models"] == []
    # a head recorded before the mark, run on the tiny models today: the loaded models tell
    old = copy.deepcopy(meta)
    for kind in ("clip", "captioner", "grounder"):
        del old["extraction"][kind]["random_weights"]
    assert Detector(head, old, trained["extractor"]).score_rows([row])[0]["random_weights"] is True


def test_detector_load_checks_model_overrides(trained, tiny_bundle, tmp_path):
    copy = tmp_path / "clip-copy"
    shutil.copytree(tiny_bundle / "clip", copy)
    detector = Detector.load(trained["head"], clip=str(copy), device="cpu")
    assert detector.extractor.clip.source == str(copy)
    with pytest.raises(CheckpointError, match="trained on features from other models.*clip"):
        Detector.load(trained["head"], clip=str(tiny_bundle / "clip-b"), device="cpu")


def test_config_roundtrip_from_extraction(trained):
    extraction = FeatureStore(trained["store"]).extraction
    config = config_from_extraction(extraction)
    assert config.models.captioner == "blip2" and config.features.box_threshold == 0.0
    assert Extractor(config).load().extraction == extraction


def _invoke_detect(trained, *args):
    return runner.invoke(app, ["detect", str(trained["root"] / "tree"), "--head", str(trained["head"]), *args])


def test_detect_cli_all_formats(trained, tmp_path):
    table = _invoke_detect(trained)
    assert table.exit_code == 0, table.output
    assert "telling" in table.output and "12 images:" in table.output
    result = _invoke_detect(trained, "--format", "json")
    records = json.loads(result.stdout)
    assert len(records) == 12 and all(r["error"] is None for r in records)
    csv_out = tmp_path / "r.csv"
    assert _invoke_detect(trained, "--out", str(csv_out)).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    assert len(rows) == 12 and set(rows[0]) >= {"path", "p_fake", "label", "caption", "top_object", "objects"}
    lines = _invoke_detect(trained, "--format", "jsonl").stdout.strip().splitlines()
    assert [json.loads(line)["path"] for line in lines] == [r["path"] for r in records]
    assert _invoke_detect(trained, "--format", "xml").exit_code == 2


def test_detect_threshold(trained):
    zero = json.loads(_invoke_detect(trained, "--format", "json", "--threshold", "0").stdout)
    assert all(r["label"] == "fake" for r in zero)


def test_detect_folder_with_a_bad_file(trained, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(trained["root"] / "tree" / "gen" / "0_real", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = runner.invoke(app, ["detect", str(folder), "--head", str(trained["head"]), "--format", "json"])
    assert result.exit_code == 0
    records = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(result.stdout)}
    assert len(records) == 7 and records["broken.jpg"]["error"] and records["broken.jpg"]["p_fake"] is None
    assert all(r["p_fake"] is not None for name, r in records.items() if name != "broken.jpg")


def test_detect_save_store_is_reused(trained, tmp_path):
    store = tmp_path / "saved"
    first = _invoke_detect(trained, "--format", "json", "--save-store", str(store))
    assert first.exit_code == 0, first.output
    assert FeatureStore(store).config["runs"][-1]["processed"] == 12
    second = _invoke_detect(trained, "--format", "json", "--save-store", str(store))
    assert FeatureStore(store).config["runs"][-1]["processed"] == 0
    a = {r["path"]: r["p_fake"] for r in json.loads(first.stdout)}
    b = {r["path"]: r["p_fake"] for r in json.loads(second.stdout)}
    assert a == b


def test_train_cli(trained, tmp_path):
    out = tmp_path / "cli-head.safetensors"
    result = runner.invoke(app, ["train", str(trained["store"]), "--out", str(out), "--epochs", "3", "--hidden", "8",
                                 "--val", str(trained["store"]), "--select", "best-val", "--representation", "global"])
    assert result.exit_code == 0, result.output
    assert "head saved" in result.output and "AP=" in result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["head"]["select"] == "best-val" and meta["representation"]["kind"] == "global"
    bad = runner.invoke(app, ["train", str(trained["store"]), "--out", str(out), "--representation", "pixels"])
    assert bad.exit_code == 2 and "representation must be one of" in bad.output


def test_demo_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--per-class", "4", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output and "where everything is" in result.output
    assert (tmp_path / "demo" / "heads" / "demo.safetensors").is_file()
    records = json.loads((tmp_path / "demo" / "detections.json").read_text())
    assert records and all(r["error"] is None for r in records)
    assert len(FeatureStore(tmp_path / "demo" / "stores" / "test")) == 16


def test_repeated_names_keep_their_own_records(trained):
    detector = Detector(*DiscrepancyHead.load(trained["head"]), trained["extractor"])
    paths = sorted((trained["root"] / "tree").rglob("*.png"))[:2]
    records = detector.predict([p.read_bytes() for p in paths], names=["same.png", "same.png"])
    assert [r["sha256"] for r in records] != [records[0]["sha256"]] * 2


def test_cascade_escalates_only_the_uncertain_band(trained, tmp_path):
    global_head = train_head([trained["store"]], tmp_path / "global.safetensors", epochs=3, hidden=8,
                             representation=RepresentationConfig("global")).path
    head, meta = DiscrepancyHead.load(trained["head"])
    from tidy_detect.detect import Cascade

    items = sorted((trained["root"] / "tree").rglob("*.png"))
    everything = Detector(head, meta, trained["extractor"], cascade=Cascade(*DiscrepancyHead.load(global_head),
                                                                           band=(0.0, 1.0)))
    nothing = Detector(head, meta, trained["extractor"], cascade=Cascade(*DiscrepancyHead.load(global_head),
                                                                        band=(0.5, 0.5)))
    plain = Detector(head, meta, trained["extractor"])
    full = everything.predict(items)
    assert everything.cascade.fraction_escalated == 1.0 and all(r["stage"] == "full" for r in full)
    expected = plain.predict(items)
    assert [r["p_fake"] for r in full] == pytest.approx([r["p_fake"] for r in expected], abs=1e-4)
    quick = nothing.predict(items)
    global_only = DiscrepancyHead.load(global_head)[0].predict_proba(
        FeatureStore(trained["store"]).load(RepresentationConfig("global")).X)[:, 1]
    assert all(r["stage"] == "global" and r["objects"] == [] for r in quick if r["stage"] == "global")
    assert nothing.cascade.escalated == sum(r["stage"] == "full" for r in quick) < len(items)
    assert len(global_only) == len(items)


def test_cascade_refuses_a_head_that_needs_objects(trained):
    from tidy_detect.detect import Cascade
    from tidy_detect.errors import ConfigError

    head, meta = DiscrepancyHead.load(trained["head"])
    with pytest.raises(ConfigError, match="representation without objects"):
        Detector(head, meta, trained["extractor"], cascade=Cascade(head, meta))


def test_detect_cli_cascade(trained, tmp_path):
    global_head = train_head([trained["store"]], tmp_path / "g.safetensors", epochs=2, hidden=8,
                             representation=RepresentationConfig("global")).path
    result = _invoke_detect(trained, "--format", "json", "--cascade-head", str(global_head), "--band", "0.4,0.6")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert {r["stage"] for r in records} <= {"global", "full"} and "cascade:" in result.stderr


def test_detect_streams_records_so_a_run_stopped_half_way_keeps_what_it_scored(trained, tmp_path, monkeypatch):
    """Records go out batch by batch: when the run fails at its third batch, the first two
    batches' records are in the file already (jsonl line by line, json as a closed array), and
    detect never asked for its inputs as a list."""
    import tidy_detect.data.inputs as inputs_module

    real = Detector.score_batch
    calls = {"n": 0}

    def failing(self, batch, summary=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the GPU fell off the bus")
        return real(self, batch, summary)

    monkeypatch.setattr(Detector, "score_batch", failing)
    monkeypatch.setattr(inputs_module, "collect_inputs", lambda *a, **k: pytest.fail("detect listed its inputs whole"))
    for fmt in ("jsonl", "json", "csv"):
        calls["n"] = 0
        out = tmp_path / f"partial.{fmt}"
        result = _invoke_detect(trained, "--out", str(out), "--batch-size", "2")
        assert result.exit_code == 70 and "fell off the bus" in result.output, result.output  # internal error
        text = out.read_text()
        if fmt == "jsonl":
            paths = [json.loads(line)["path"] for line in text.splitlines()]
        elif fmt == "json":
            paths = [r["path"] for r in json.loads(text)]
        else:
            paths = [row["path"] for row in csv.DictReader(io.StringIO(text))]
        assert len(paths) == 4 and len(set(paths)) == 4, (fmt, text[:500])


def test_detect_save_store_scores_only_its_inputs_each_once(trained, tmp_path):
    """With --save-store the records are read back from the store in one pass, batch by batch:
    the store's other rows are not reported, and each input path has one record, scored as
    without a store."""
    store = tmp_path / "shared"
    other = tmp_path / "other"
    make_tree(other, {"else": 2}, seed=9)
    assert runner.invoke(app, ["detect", str(other), "--head", str(trained["head"]), "-f", "json",
                               "--save-store", str(store)]).exit_code == 0
    folder = trained["root"] / "tree" / "gen" / "1_fake"
    saved = runner.invoke(app, ["detect", str(folder), "--head", str(trained["head"]), "-f", "jsonl",
                                "--save-store", str(store), "--batch-size", "2"])
    assert saved.exit_code == 0, saved.output
    plain = runner.invoke(app, ["detect", str(folder), "--head", str(trained["head"]), "-f", "jsonl"])
    got = [json.loads(line) for line in saved.stdout.splitlines()]
    want = {r["path"]: r["p_fake"] for r in map(json.loads, plain.stdout.splitlines())}
    assert len(got) == 6 and {r["path"]: r["p_fake"] for r in got} == pytest.approx(want)
    assert len(FeatureStore(store)) == 6 + len(list(other.rglob("*.png")))
    batches = list(FeatureStore(store).iter_rows_among(want, batch_size=4))
    assert [len(b) for b in batches] and all(len(b) <= 4 for b in batches)
    assert sorted(r["path"] for b in batches for r in b) == sorted(want)


def test_detect_exit_codes_say_when_nothing_was_scored(trained, tmp_path):
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["detect", str(empty), "--head", str(trained["head"])])
    assert result.exit_code == 8 and "no images found" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_text("not an image")
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["detect", str(broken), "--head", str(trained["head"]), "--out", str(out)])
    assert result.exit_code == 8 and "none of the 1 images could be scored" in result.output
    assert json.loads(out.read_text())[0]["error"]  # the records were still written
    mixed = trained["root"] / "tree" / "gen" / "0_real"
    ok = runner.invoke(app, ["detect", str(mixed), str(broken), "--head", str(trained["head"]), "-f", "json"])
    assert ok.exit_code == 0
    strict = runner.invoke(app, ["detect", str(mixed), str(broken), "--head", str(trained["head"]), "-f", "json",
                                 "--fail-on-error"])
    assert strict.exit_code == 9 and "1 of the 7 images could not be scored" in strict.output


def test_the_detect_table_says_when_the_models_have_random_weights(trained):
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    folder = trained["root"] / "tree" / "gen" / "0_real"
    result = CliRunner().invoke(app, ["detect", str(folder), "--head", str(trained["head"])])
    assert result.exit_code == 0, result.output
    assert "RANDOM-WEIGHT MODELS" in result.output and "the verdicts above mean nothing" in " ".join(result.output.split())
