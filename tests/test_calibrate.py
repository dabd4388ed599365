"""The one-class head: calibration on real rows only, its head file, and detect / eval / serve using it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from tidy_detect.calibrate import calibrate_one_class
from tidy_detect.cli import app
from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import CheckpointError, ConfigError, NotFittedError, StoreError
from tidy_detect.features import discrepancy
from tidy_detect.features.store import FeatureStore
from tidy_detect.head import DiscrepancyHead, OneClassHead, load_head, read_metadata

from tests.heads_data import discrepancy_store, tiny_heads  # noqa: F401 - tiny_heads is a fixture

runner = CliRunner()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8000 real rows (global 1 - cos ~ N(0.30, 0.05)) and 2000 fake ones (~ N(0.50, 0.05)), two groups."""
    root = tmp_path_factory.mktemp("mixed")
    return discrepancy_store(root / "store", 8000, 2000, groups=("a", "b"))


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_reaches_the_target_fpr_on_held_out_real_rows(mixed, tmp_path, fpr):
    result = calibrate_one_class([mixed], tmp_path / "h.safetensors", fpr=fpr, real_only=True)
    held = result.held_out
    assert held["n"] == 2000 and result.calibration["n"] == 6000  # a quarter of the reals held out
    # 2000 held-out reals: the binomial standard error at 5% is 0.5 points
    assert abs(held["fpr"] - fpr) < 3 * np.sqrt(fpr * (1 - fpr) / held["n"]) + 1e-9
    low, high = held["fpr_ci"]
    assert low <= fpr <= high and held["false_positives"] == round(held["fpr"] * held["n"])
    # the split-conformal threshold never exceeds the target on its own rows
    assert result.calibration["fpr"] <= fpr
    # and sits at the real distribution's (1 - fpr) quantile, here N(0.30, 0.05)
    from scipy.stats import norm

    assert result.head.threshold_ == pytest.approx(norm.ppf(1 - fpr, 0.30, 0.05), abs=0.01)
    meta = result.metadata
    assert meta["metrics"]["held_out"] == held and meta["head"]["fpr"] == fpr
    assert meta["training"]["data"]["real"] == 8000 and meta["training"]["data"]["fake"] == 2000
    assert meta["training"]["data"]["groups"] == {"a": {"real": 4000, "fake": 1000}, "b": {"real": 4000, "fake": 1000}}
    assert meta["training"]["calibration"]["calibration_rows"] == 6000 and meta["training"]["real_only"] is True


def test_the_score_is_one_minus_cosine_and_p_fake_is_half_at_the_threshold(mixed, tmp_path):
    result = calibrate_one_class([mixed], tmp_path / "h.safetensors", real_only=True)
    head = result.head
    store = FeatureStore(mixed)
    rows = list(store.rows())[:200]
    gi = np.stack([r["global_image"] for r in rows])
    gt = np.stack([r["global_text"] for r in rows])
    X = store.load(RepresentationConfig("global")).X[:200]
    np.testing.assert_allclose(head.discrepancy(X), discrepancy.cosine_discrepancy(gi, gt), atol=1e-6)
    # the score is monotone, 0.5 exactly at the threshold, and the median real calibration image is at fpr
    p = head.predict_proba(X)
    assert p.shape == (200, 2) and np.allclose(p.sum(1), 1)
    s = head.discrepancy(X)
    assert np.all(np.diff(p[np.argsort(s), 1]) >= 0)
    assert np.array_equal(head.predict(X), (s > head.threshold_).astype(int))
    median = head.threshold_ - head.scale_ * np.log(0.95 / 0.05)
    assert expit((median - head.threshold_) / head.scale_) == pytest.approx(0.05)
    assert float(expit(0.0)) == 0.5 and head.decision_function(X).shape == (200,)


def test_local_and_both_representations(mixed, tmp_path):
    local = calibrate_one_class([mixed], tmp_path / "l.safetensors", representation=RepresentationConfig("local"),
                                real_only=True)
    # one object per row, its 1 - cos ~ N(0.40, 0.05): the local score is exactly that object's
    from scipy.stats import norm

    assert local.head.threshold_ == pytest.approx(norm.ppf(0.95, 0.40, 0.05), abs=0.01)
    assert local.metadata["representation"]["kind"] == "local"
    both = calibrate_one_class([mixed], tmp_path / "b.safetensors", representation=RepresentationConfig("both"),
                               real_only=True)
    assert abs(both.held_out["fpr"] - 0.05) < 0.015


def test_split_is_by_content_and_seeded(tmp_path):
    store = discrepancy_store(tmp_path / "s", 400)
    rows = list(FeatureStore(store).rows())
    copies = [{**r, "path": r["path"] + ".copy"} for r in rows[:100]]  # same images under another name
    FeatureStore.open_for_writing(store, FeatureStore(store).extraction, FeatureStore(store).dim).write(copies)
    a = calibrate_one_class([store], tmp_path / "a.safetensors", seed=0)
    b = calibrate_one_class([store], tmp_path / "b.safetensors", seed=0)
    c = calibrate_one_class([store], tmp_path / "c.safetensors", seed=1)
    assert a.head.threshold_ == b.head.threshold_ and a.held_out == b.held_out
    assert (a.head.threshold_, a.held_out) != (c.head.threshold_, c.held_out)
    assert a.calibration["n"] + a.held_out["n"] == 500
    # 100 held out of 400 images: a copy sits with its original, so held-out rows come in pairs or alone
    from tidy_detect.calibrate import _split

    sha = np.array([r["sha256"] for r in rows] + [r["sha256"] for r in copies], dtype=object)
    held = _split(sha, 0.25, 0)
    assert int(held[:400].sum()) == 100 and np.array_equal(held[400:], held[:100])


def test_fake_rows_need_real_only_and_are_ignored(mixed, tmp_path):
    with pytest.raises(ConfigError, match="hold 2000 fake rows; a one-class head is calibrated on real rows only. "
                                          "Pass --real-only"):
        calibrate_one_class([mixed], tmp_path / "h.safetensors")
    # the same reals without the fakes give the same head: the fakes were not read into it
    reals_only = discrepancy_store(tmp_path / "reals", 8000, 0, groups=("a", "b"))
    with_fakes = calibrate_one_class([mixed], tmp_path / "f.safetensors", real_only=True)
    without = calibrate_one_class([reals_only], tmp_path / "r.safetensors")
    assert without.head.threshold_ == with_fakes.head.threshold_ and without.held_out == with_fakes.held_out
    assert without.data.fake == 0 and with_fakes.data.fake == 2000


def test_too_few_real_rows_are_refused_with_the_numbers_needed(tmp_path):
    store = discrepancy_store(tmp_path / "s", 100, 50)
    with pytest.raises(StoreError, match="100 real rows \\(75 to calibrate, 25 held out at held-out fraction 0.25\\); "
                                         "a one-class head at fpr 0.05 needs at least 119 to calibrate \\(so that 5 "
                                         "lie above the threshold\\) and 20 held out .*about 159 real rows in all"):
        calibrate_one_class([store], tmp_path / "h.safetensors", real_only=True)
    fakes = discrepancy_store(tmp_path / "fakes", 0, 50)
    with pytest.raises(StoreError, match="0 real rows"):
        calibrate_one_class([fakes], tmp_path / "h.safetensors", real_only=True)
    assert calibrate_one_class([store], tmp_path / "h.safetensors", real_only=True, fpr=0.2).head.fpr == 0.2


@pytest.mark.parametrize("options, message", [
    ({"fpr": 0.5}, "fpr must be in \\(0, 0.5\\), got 0.5"),
    ({"fpr": 0}, "fpr must be in \\(0, 0.5\\), got 0"),
    ({"held_out": 1.0}, "held_out must be in \\(0, 1\\), got 1.0"),
    ({"representation": RepresentationConfig("image")}, "representation must be one of global, local, both, got 'image'"),
    ({"representation": RepresentationConfig("global", normalize=False)}, "normalize must be true"),
])
def test_bad_options(mixed, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        calibrate_one_class([mixed], tmp_path / "h.safetensors", real_only=True, **options)


def test_estimator_api():
    with pytest.raises(NotFittedError, match="not calibrated yet"):
        OneClassHead().predict_proba(np.zeros((1, 4)))
    with pytest.raises(ConfigError, match="real images only"):
        OneClassHead().fit(np.ones((200, 4)), np.ones(200))
    with pytest.raises(ConfigError, match="needs at least 119 real rows"):
        OneClassHead().fit(np.ones((50, 4)))
    with pytest.raises(ConfigError, match="no spread"):
        OneClassHead().fit(np.ones((200, 4)))
    X = np.random.default_rng(0).normal(size=(500, 4))
    head = OneClassHead(fpr=0.1).fit(X)
    assert head.n_features_in_ == 4 and head.n_calibration_ == 500 and list(head.classes_) == [0, 1]
    assert (head.predict(X) == 1).mean() <= 0.1
    with pytest.raises(CheckpointError, match="takes 4 features per row, got shape \\(2, 3\\)"):
        head.predict_proba(np.zeros((2, 3)))


# -- the head file ---------------------------------------------------------------------------------

def _rewrite(path, edit=None, tensors=None):
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="numpy") as handle:
        meta = json.loads(handle.metadata()["tidy_detect"])
    if edit:
        edit(meta)
    path.write_bytes(save(tensors or {}, metadata={"tidy_detect": json.dumps(meta)}))


def test_head_file_loads_like_any_head_and_is_checked(mixed, tmp_path):
    result = calibrate_one_class([mixed], tmp_path / "h.safetensors", real_only=True)
    path = result.path
    assert path.with_suffix(".json").is_file()
    head, meta = load_head(path)
    assert isinstance(head, OneClassHead) and meta == json.loads(path.with_suffix(".json").read_text())
    X = FeatureStore(mixed).load(RepresentationConfig("global")).X[:50]
    np.testing.assert_array_equal(head.predict_proba(X), result.head.predict_proba(X))
    assert meta["format_version"] == 2 and meta["head"]["kind"] == "one-class"
    assert meta["extraction"] == FeatureStore(mixed).extraction and meta["fingerprint"] == FeatureStore(mixed).fingerprint
    with pytest.raises(CheckpointError, match="a one-class head, not an MLP head; load it with "
                                              "tidy_detect.head.load_head"):
        DiscrepancyHead.load(path)
    assert OneClassHead.load(path)[0].threshold_ == head.threshold_

    def expect(message, edit=None, tensors=None):
        target = tmp_path / "edited.safetensors"
        target.write_bytes(path.read_bytes())
        _rewrite(target, edit, tensors)
        with pytest.raises(CheckpointError, match=message):
            load_head(target)

    def field(*keys, value=None, delete=False):
        def edit(m):
            for key in keys[:-1]:
                m = m[key]
            if delete:
                del m[keys[-1]]
            else:
                m[keys[-1]] = value
        return edit

    expect("metadata field head.fpr must be a number in \\(0, 0.5\\), got 0.7", field("head", "fpr", value=0.7))
    expect("metadata field head.scale must be a number > 0, got 0", field("head", "scale", value=0))
    expect("metadata field head.threshold is missing", field("head", "threshold", delete=True))
    expect("metadata field head.score must be one of half-squared-norm", field("head", "score", value="cosine"))
    expect("metadata field head.kind must be one of mlp, one-class, got 'svm'", field("head", "kind", value="svm"))
    expect("metadata field format_version must be >= 2 for a one-class head, got 1", field("format_version", value=1))
    expect("metadata field representation.kind must be one of global, local, both, got 'image'",
           field("representation", "kind", value="image"))
    expect("representation.normalize must be true for a one-class head", field("representation", "normalize", value=False))
    expect("metadata field representation is missing", field("representation", delete=True))
    expect("a one-class head holds no tensors .*this file has w", tensors={"w": np.zeros(2, np.float32)})
    expect("head format version 3 is newer than this tidy-detect reads \\(up to 2\\)", field("format_version", value=3))


def test_mlp_heads_are_still_written_as_version_1(mixed, tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    path = DiscrepancyHead(hidden=4, epochs=1).fit(X, np.arange(40) % 2).save(tmp_path / "m")
    meta = read_metadata(path, pipeline=False)
    assert meta["format_version"] == 1 and meta["head"]["kind"] == "mlp"
    assert isinstance(load_head(path, pipeline=False)[0], DiscrepancyHead)


# -- the command line -----------------------------------------------------------------------------

def test_cli_calibrate(mixed, tmp_path):
    out = tmp_path / "one-class.safetensors"
    result = runner.invoke(app, ["calibrate", str(mixed), "--real-only", "--fpr", "0.05", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "one-class head saved" in text and "held-out n=2000 FPR=" in text and "target 5.00%" in text
    assert load_head(out)[1]["training"]["data"]["fake"] == 2000
    refused = runner.invoke(app, ["calibrate", str(mixed), "--out", str(out)])
    assert refused.exit_code == 2 and "Pass --real-only" in " ".join(refused.output.split())
    local = runner.invoke(app, ["calibrate", str(mixed), "--real-only", "--local", "--out", str(tmp_path / "l")])
    assert local.exit_code == 0 and load_head(tmp_path / "l.safetensors")[1]["representation"]["kind"] == "local"
    clash = runner.invoke(app, ["calibrate", str(mixed), "--local", "--representation", "both", "--out", str(out)])
    assert clash.exit_code == 2 and "--local means --representation local" in " ".join(clash.output.split())
    few = discrepancy_store(tmp_path / "few", 50)
    small = runner.invoke(app, ["calibrate", str(few), "--out", str(out)])
    assert small.exit_code == 6 and "needs at least 119 to calibrate" in " ".join(small.output.split())


# -- detect, eval and serve on the tiny models ----------------------------------------------------

def test_detect_uses_a_one_class_head(tiny_heads):
    from tidy_detect.detect import Detector

    images = [*sorted((tiny_heads["tree"] / "gen" / "0_real").iterdir())[:4],
              *sorted((tiny_heads["tree"] / "gen" / "1_fake").iterdir())[:2]]
    result = runner.invoke(app, ["detect", *map(str, images), "--head", str(tiny_heads["one_class"]),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert len(records) == 6 and all(r["error"] is None for r in records)
    head, meta = load_head(tiny_heads["one_class"])
    store = FeatureStore(tiny_heads["store"])
    by_path = dict(zip(*(lambda a: (a.path, head.predict_proba(a.X)[:, 1]))(store.load(RepresentationConfig("global")))))
    for record in records:
        assert 0.0 <= record["p_fake"] <= 1.0
        assert record["label"] == ("fake" if record["p_fake"] > 0.5 else "real")
        assert record["p_fake"] == pytest.approx(by_path[record["path"]], abs=1e-4)
        # the global score is the record's own 1 - cos(I0, T0)
        assert record["p_fake"] == pytest.approx(
            expit((record["global_discrepancy"] - head.threshold_) / head.scale_), abs=5e-4 / head.scale_)
    detector = Detector.load(tiny_heads["one_class"], device="cpu")
    assert detector.info()["head"]["kind"] == "one-class" and detector.info()["random_weights"] is True


def test_eval_reports_the_one_class_head_beside_trained_heads_and_imports(tiny_heads, tmp_path):
    from tidy_detect.training import train_head

    second = train_head([tiny_heads["store"]], tmp_path / "mlp-2.safetensors", epochs=3, hidden=8, seed=1).path
    store = FeatureStore(tiny_heads["store"])
    scores_csv = tmp_path / "unifd.csv"
    with scores_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score"])
        for i, path in enumerate(sorted(r["path"] for r in store.rows(["path"]))):
            writer.writerow([path, (i % 7) / 7])
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(tiny_heads["store"]), "--head", str(tiny_heads["mlp"]), "--head", str(second),
                                 "--head", str(tiny_heads["one_class"]), "--import", f"UniFD={scores_csv}",
                                 "--no-plots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["groups"]) == {"mlp", "mlp-2", "one-class", "UniFD"}
    info = payload["info"]
    assert info["head_kinds"] == {"mlp": "mlp", "mlp-2": "mlp", "one-class": "one-class"}
    summary = info["one_class"]["one-class"]
    assert summary["fpr_target"] == 0.4 and summary["held_out"]["n"] == 6 and summary["representation"] == "global"
    # mean ± std is over the two trained heads only
    means = [payload["mean"][n]["ap"] for n in ("mlp", "mlp-2")]
    assert payload["across_heads"]["__mean__"]["ap"]["mean"] == pytest.approx(np.mean(means))
    # the one-class head's AP is that of its raw score, 1 - cos(I0, T0), on the evaluated rows
    arrays = store.load(RepresentationConfig("global"), labeled_only=True)
    expected = average_precision_score(arrays.label, OneClassHead.discrepancy(arrays.X))
    assert payload["groups"]["one-class"]["gen"]["ap"] == pytest.approx(expected)
    table = (out / "table.md").read_text()
    assert "| one-class |" in table and "| UniFD |" in table and "mean ± std (2 heads)" in table
    assert "one-class is a one-class head (no fake image seen): the global image-caption discrepancy, thresholded " \
           "at a 40.00% false-positive rate on 18 real images; held-out FPR" in table
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report.html")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "report.html").read_text()
    assert "one-class is a one-class head" in html and "Per group: one-class" in html


def test_a_one_class_head_as_the_cascade_s_global_head(tiny_heads):
    from tidy_detect.detect import Detector

    detector = Detector.load(tiny_heads["mlp"], device="cpu", cascade_head=tiny_heads["one_class"], band=(0.3, 0.7))
    records = detector.predict(sorted((tiny_heads["tree"] / "gen" / "1_fake").iterdir()))
    assert len(records) == 8 and {r["stage"] for r in records} <= {"global", "full"}
    assert detector.cascade.images == 8


def test_serve_uses_a_one_class_head(tiny_heads):
    pytest.importorskip("fastapi", reason="the web service needs the serve extra")
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
    from fastapi.testclient import TestClient

    from tidy_detect.detect import Detector
    from tidy_detect.serve import ServeSettings, create_app

    from tests.serve.conftest import files, image_bytes

    detector = Detector.load(tiny_heads["one_class"], device="cpu")
    with TestClient(create_app(detector, ServeSettings(max_wait_ms=5))) as client:
        info = client.get("/v1/info").json()
        assert info["head"]["hyperparameters"]["kind"] == "one-class"
        assert info["head"]["representation"]["kind"] == "global"
        data = image_bytes(seed=2)
        response = client.post("/v1/detect", files=files(("photo.png", data)))
        assert response.status_code == 200, response.text
        [record] = response.json()["records"]
    assert record == detector.predict([data], names=["photo.png"])[0]
    assert record["label"] == ("fake" if record["p_fake"] > 0.5 else "real")
