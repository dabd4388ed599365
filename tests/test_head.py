"""The MLP head as an estimator: determinism, fitting, selection, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
    loaded, meta2 = DiscrepancyHead.load(path)
    assert meta2 == meta
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    with open(path, "rb") as handle:
        assert b"pickle" not in handle.read(200)


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
