"""The MLP head as an estimator: determinism, fitting, selection, checkpoints."""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tidy_detect.errors import CheckpointError, ConfigError, NotFittedError
from tidy_detect.evaluate.metrics import detection_metrics
from tidy_detect.head import DiscrepancyHead


def _data(n=200, d=16, seed=0, shift=0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d)).astype(np.float32) + shift * y[:, None]
    return X, y


def _weights(head):
    return {k: v.clone() for k, v in head.model_.state_dict().items()}


def test_fit_returns_self_and_learns():
    X, y = _data()
    head = DiscrepancyHead(hidden=32, epochs=30, batch_size=32)
    assert head.fit(X, y) is head
    proba = head.predict_proba(X)
    assert proba.shape == (200, 2) and np.allclose(proba.sum(1), 1)
    assert (head.predict(X) == y).mean() > 0.9
    assert list(head.classes_) == [0, 1] and head.n_features_in_ == 16
    assert len(head.history_) == 30 and head.chosen_epoch_ == 30
    assert head.history_[-1]["loss"] < head.history_[0]["loss"]


def test_same_seed_same_weights_bit_for_bit_other_seed_differs():
    X, y = _data()
    a = _weights(DiscrepancyHead(hidden=32, epochs=3, seed=7).fit(X, y))
    b = _weights(DiscrepancyHead(hidden=32, epochs=3, seed=7).fit(X, y))
    c = _weights(DiscrepancyHead(hidden=32, epochs=3, seed=8).fit(X, y))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_leaves_the_global_rng_alone():
    X, y = _data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DiscrepancyHead(hidden=8, epochs=2).fit(X, y)
    assert torch.equal(torch.rand(3), expected)  # init and shuffling drew from private generators


def test_not_fitted_error():
    with pytest.raises(NotFittedError, match="not fitted yet"):
        DiscrepancyHead().predict_proba(np.zeros((1, 4)))


def test_parameter_validation():
    X, y = _data(20)
    with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):
        DiscrepancyHead(epochs=0).fit(X, y)
    with pytest.raises(ConfigError, match="select must be one of last, best-val"):
        DiscrepancyHead(select="best").fit(X, y)
    with pytest.raises(ConfigError, match="needs validation data"):
        DiscrepancyHead(select="best-val").fit(X, y)
    with pytest.raises(ConfigError, match="labels must be 0 \\(real\\) or 1 \\(fake\\)"):
        DiscrepancyHead().fit(X, y + 1)
    with pytest.raises(ConfigError, match="no training examples"):
        DiscrepancyHead().fit(np.zeros((0, 4)), np.zeros(0))
    # the bounds a checkpoint must satisfy to load again
    with pytest.raises(ConfigError, match="hidden must be <= 65536, got 65537"):
        DiscrepancyHead(hidden=65537).fit(X, y)
    with pytest.raises(ConfigError, match="X must have at most 65536 features per row, got 65537"):
        DiscrepancyHead().fit(np.zeros((2, 65537), np.float32), np.array([0, 1]))


def test_validation_history_and_best_val_selection():
    X, y = _data(seed=1)
    Xv, yv = _data(seed=2)
    head = DiscrepancyHead(hidden=16, epochs=8, select="best-val").fit(X, y, Xv, yv)
    aps = [r["val_ap"] for r in head.history_]
    assert all("val_loss" in r for r in head.history_)
    assert aps[head.chosen_epoch_ - 1] == max(aps)
    chosen_ap = detection_metrics(yv, head.predict_proba(Xv)[:, 1])["ap"]
    assert chosen_ap == pytest.approx(max(aps))


def test_balance_changes_the_loss():
    X, y = _data()
    y[:150] = 0
    a = _weights(DiscrepancyHead(hidden=8, epochs=2).fit(X, y))
    b = _weights(DiscrepancyHead(hidden=8, epochs=2, balance=True).fit(X, y))
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_roundtrip(tmp_path):
    X, y = _data()
    head = DiscrepancyHead(hidden=16, epochs=2).fit(X, y)
    path = head.save(tmp_path / "h", {"note": "x", "score": float("nan")})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["score"] is None and meta["head"]["hidden"] == 16 and meta["note"] == "x"
    loaded, meta2 = DiscrepancyHead.load(path, pipeline=False)
    assert meta2 == meta
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    with open(path, "rb") as handle:
        assert b"pickle" not in handle.read(200)
    # detection needs the records `tidy-detect train` writes, so a bare head is refused by default
    with pytest.raises(CheckpointError, match="metadata field representation is missing; detection needs it"):
        DiscrepancyHead.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such head checkpoint"):
        DiscrepancyHead.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        DiscrepancyHead.load(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="without tidy-detect metadata"):
        DiscrepancyHead.load(tmp_path / "other.safetensors")


def test_wrong_feature_width_is_a_clear_error():
    X, y = _data(d=8)
    head = DiscrepancyHead(hidden=4, epochs=1).fit(X, y)
    with pytest.raises(CheckpointError, match="takes 8 features per row, got shape \\(2, 5\\)"):
        head.predict_proba(np.zeros((2, 5)))


def test_detection_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, average_precision_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    p = rng.random(100)
    m = detection_metrics(y, p)
    assert m["acc"] == pytest.approx(accuracy_score(y, p > 0.5))
    assert m["ap"] == pytest.approx(average_precision_score(y, p))
    assert m["real_acc"] == pytest.approx(((p <= 0.5) & (y == 0)).sum() / (y == 0).sum())


# -- damaged and hand-edited checkpoints ---------------------------------------------------------

PIPELINE = {
    "representation": {"kind": "both", "w1": 1.0, "w2": 1.0, "normalize": True},
    "extraction": {"clip": {"source": "clip-dir", "dim": 4, "global_view": "center-crop", "view_size": 32},
                   "captioner": {"name": "provided", "source": None, "prompt": None, "max_tokens": 30},
                   "grounder": {"name": "none", "source": None, "box_threshold": None},
                   "phrases": {"max_objects": 6, "stoplist": ["image"]}},
    "dim": 4,
    "training": {"data": {"real": 20, "fake": 20}, "seconds": 0.1},
}


@pytest.fixture
def saved(tmp_path):
    """A valid pipeline head (4 features, hidden 8) and a way to rewrite its metadata or tensors."""
    from safetensors.torch import load_file, save_file

    path = DiscrepancyHead(hidden=8, epochs=1).fit(*_data(40, d=4)).save(tmp_path / "h", PIPELINE)

    def rewrite(edit=None, raw=None, tensors=None):
        meta = json.loads(path.with_suffix(".json").read_text())
        if edit:
            edit(meta)
        weights = load_file(str(path)) if tensors is None else tensors
        save_file(weights, str(path), metadata={"tidy_detect": json.dumps(meta) if raw is None else raw})
        return path

    return path, rewrite


def test_a_valid_pipeline_head_loads(saved):
    path, _ = saved
    head, meta = DiscrepancyHead.load(path)
    assert head.hidden == 8 and head.n_features_in_ == 4 and meta["extraction"] == PIPELINE["extraction"]


def test_metadata_that_is_not_json(saved):
    path, rewrite = saved
    rewrite(raw='{"format": "tidy-detect-head", ')
    with pytest.raises(CheckpointError, match=r"h\.safetensors: the tidy-detect metadata is not valid JSON"):
        DiscrepancyHead.load(path)
    rewrite(raw="[1, 2]")
    with pytest.raises(CheckpointError, match="metadata must be a JSON object, got list"):
        DiscrepancyHead.load(path)


@pytest.mark.parametrize("field, value", [("hidden", 8.5), ("hidden", "8"), ("n_features", 4.0), ("hidden", True)])
def test_a_non_integer_size(saved, field, value):
    path, rewrite = saved
    rewrite(lambda m: m["head"].update({field: value}))
    with pytest.raises(CheckpointError, match=rf"h\.safetensors: metadata field head\.{field} must be an integer in "
                                              rf"1\.\.65536, got {value!r}"):
        DiscrepancyHead.load(path)


@pytest.mark.parametrize("hidden", [1e9, 10**9])
def test_a_huge_size_is_refused_before_any_network_is_built(saved, monkeypatch, hidden):
    path, rewrite = saved
    rewrite(lambda m: m["head"].update(hidden=hidden))

    def no_linear(*args, **kwargs):
        raise AssertionError("a layer was built before the metadata was checked")

    monkeypatch.setattr(torch.nn, "Linear", no_linear)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"metadata field head\.hidden must be an integer in 1\.\.65536, "
                                              rf"got {hidden!r}"):
        DiscrepancyHead.load(path)
    assert time.perf_counter() - started < 2.0


def test_tensor_shapes_that_disagree_with_the_metadata(saved):
    path, rewrite = saved
    rewrite(lambda m: m["head"].update(hidden=16))
    with pytest.raises(CheckpointError, match=r"tensor 0\.weight must have shape \(16, 4\) for metadata "
                                              r"head\.hidden=16 and head\.n_features=4, got \(8, 4\)"):
        DiscrepancyHead.load(path)

    def six_features(meta):
        meta["head"]["n_features"] = meta["dim"] = meta["extraction"]["clip"]["dim"] = 6

    rewrite(six_features)
    with pytest.raises(CheckpointError, match=r"tensor 0\.weight must have shape \(8, 6\)"):
        DiscrepancyHead.load(path)


def test_an_extra_or_missing_tensor(saved):
    from safetensors.torch import load_file

    path, rewrite = saved
    tensors = load_file(str(path))
    rewrite(tensors={**tensors, "3.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="exactly the tensors 0.weight, 0.bias, 2.weight, 2.bias; "
                                              "this file has unexpected 3.weight"):
        DiscrepancyHead.load(path)
    rewrite(tensors={k: v for k, v in tensors.items() if k != "2.bias"})
    with pytest.raises(CheckpointError, match="this file has missing 2.bias"):
        DiscrepancyHead.load(path)
    rewrite(tensors={**tensors, "2.bias": torch.tensor([1, 2], dtype=torch.int64)})
    with pytest.raises(CheckpointError, match="tensor 2.bias must be floating point .*, got I64"):
        DiscrepancyHead.load(path)
    rewrite(tensors={**tensors, "2.bias": torch.tensor([0.0, float("nan")])})
    with pytest.raises(CheckpointError, match="tensor 2.bias holds NaN or infinite values"):
        DiscrepancyHead.load(path)


def test_a_huge_header_is_refused_before_it_is_read(tmp_path):
    claims = tmp_path / "claims.safetensors"
    claims.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file \\(its header claims 1099511627776 "
                                              "bytes, over the 16 MiB limit"):
        DiscrepancyHead.load(claims)
    # safetensors itself accepts headers up to 100 MB; ours stops at 16 MiB, before parsing
    from safetensors.torch import save_file

    padded = tmp_path / "padded.safetensors"
    save_file({"w": torch.zeros(1)}, str(padded), metadata={"tidy_detect": "x" * (17 * 2**20)})
    with pytest.raises(CheckpointError, match="over the 16 MiB limit for a head checkpoint"):
        DiscrepancyHead.load(padded)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a readable safetensors file \\(it is 3 bytes long"):
        DiscrepancyHead.load(tmp_path / "short.safetensors")


def _set(*keys, value=None, delete=False):
    def edit(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        if delete:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("format", value="other-head"), "metadata field format must be one of tidy-detect-head, got 'other-head'"),
    (_set("format_version", value=3), "head format version 3 is newer than this tidy-detect reads \\(up to 2\\)"),
    (_set("format_version", value="1"), "metadata field format_version must be a positive integer, got '1'"),
    (_set("head", value=[8, 4]), "metadata field head must be a JSON object, got \\[8, 4\\]"),
    (_set("head", "hidden", delete=True), "metadata field head.hidden is missing; it must be an integer in 1..65536"),
    (_set("head", "epochs", value=0), "metadata field head.epochs must be an integer in 1..1000000, got 0"),
    (_set("head", "batch_size", value=2.5), "head.batch_size must be an integer in 1..16777216, got 2.5"),
    (_set("head", "seed", value="7"), "metadata field head.seed must be an integer in"),
    (_set("head", "lr", value=-1), "metadata field head.lr must be a number > 0, got -1"),
    (_set("head", "weight_decay", value="0"), "metadata field head.weight_decay must be a number >= 0, got '0'"),
    (_set("head", "balance", value="yes"), "metadata field head.balance must be true or false, got 'yes'"),
    (_set("head", "select", value="best"), "metadata field head.select must be one of last, best-val, got 'best'"),
    (_set("head", "chosen_epoch", value=5), "metadata field head.chosen_epoch must be an integer in 1..1, got 5"),
    (_set("dim", value=5), "metadata field dim must be equal to head.n_features \\(4\\), got 5"),
    (_set("history", value="none"), "metadata field history must be a list of JSON objects, got 'none'"),
    (_set("training", value=[]), "metadata field training must be a JSON object, got \\[\\]"),
    (_set("representation", delete=True), "metadata field representation is missing; detection needs it"),
    (_set("representation", "kind", value="diff"), "metadata field representation: representation must be one of"),
    (_set("representation", "w1", value="1"), "metadata field representation.w1 must be a number >= 0, got '1'"),
    (_set("representation", "normalize", value=1), "metadata field representation.normalize must be true or false"),
    (_set("representation", "scale", value=2), "metadata field representation has unknown key 'scale'"),
    (_set("extraction", delete=True), "metadata field extraction is missing; detection needs it"),
    (_set("extraction", "clip", delete=True), "metadata field extraction.clip is missing; it must be a JSON object"),
    (_set("extraction", "captioner", value="blip"), "metadata field extraction.captioner must be a JSON object"),
    (_set("extraction", "clip", "source", value=5), "metadata field extraction.clip.source must be a non-empty string "
                                                    "or null, got 5"),
    (_set("extraction", "clip", "dim", value=8), "metadata field extraction.clip.dim must be equal to head.n_features"),
    (_set("extraction", "clip", "view_size", value=4), "metadata field extraction.clip.view_size must be an integer"),
    (_set("extraction", "captioner", "max_tokens", value=0), "extraction.captioner.max_tokens must be an integer "
                                                             "in 1..512, got 0"),
    (_set("extraction", "grounder", "name", value=""), "extraction.grounder.name must be a non-empty string, got ''"),
    (_set("extraction", "grounder", "box_threshold", value=2), "extraction.grounder.box_threshold must be a number "
                                                               "in \\[0, 1\\] or null, got 2"),
    (_set("extraction", "phrases", "max_objects", value=-1), "extraction.phrases.max_objects must be an integer in "
                                                             "0..64, got -1"),
    (_set("extraction", "phrases", "stoplist", value="a,b"), "extraction.phrases.stoplist must be a list of strings"),
])
def test_every_metadata_rule_names_the_file_field_and_value(saved, edit, message):
    path, rewrite = saved
    rewrite(edit)
    with pytest.raises(CheckpointError, match=r"h\.safetensors: ") as info:
        DiscrepancyHead.load(path)
    assert info.match(message)


def test_head_files_are_written_with_the_umask(tmp_path):
    X, y = _data(20, d=4)
    head = DiscrepancyHead(hidden=4, epochs=1).fit(X, y)
    old = os.umask(0o022)
    try:
        path = head.save(tmp_path / "a")
        modes = {p.name: os.stat(p).st_mode & 0o777 for p in (path, path.with_suffix(".json"))}
        assert modes == {"a.safetensors": 0o644, "a.json": 0o644}
        os.umask(0o077)
        path = head.save(tmp_path / "b")
        assert os.stat(path).st_mode & 0o777 == 0o600 == os.stat(path.with_suffix(".json")).st_mode & 0o777
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors", "b.json", "b.safetensors"]


@pytest.mark.parametrize("edit, raw, message", [
    (None, "{not json", "the tidy-detect metadata is not valid JSON"),
    (_set("head", "hidden", value=1e9), None, "head.hidden must be an integer in 1..65536, got 1000000000.0"),
])
def test_cli_reports_a_bad_head_in_one_line_with_exit_code_7(saved, tmp_path, edit, raw, message):
    from PIL import Image

    from tidy_detect.cli import app

    path, rewrite = saved
    rewrite(edit, raw)
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "a.png"), "--head", str(path), "--device", "cpu"])
    assert result.exit_code == 7, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0] and message in lines[0]
    assert "Traceback" not in result.output and "internal error" not in result.output
