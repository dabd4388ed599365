import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from tidy_detect.evaluate.metrics import (
    bootstrap_interval,
    calibrate_threshold,
    detection_metrics,
    expected_calibration_error,
)


def test_metrics_equal_scikit_learn_on_fixed_arrays():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.55, 0.2])
    m = detection_metrics(y, p)
    assert m["acc"] == pytest.approx(accuracy_score(y, p > 0.5))
    assert m["ap"] == pytest.approx(average_precision_score(y, p))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["real_acc"] == pytest.approx(3 / 4) and m["fake_acc"] == pytest.approx(3 / 4)
    assert (m["n_real"], m["n_fake"]) == (4, 4)


def test_threshold_is_strictly_greater():
    m = detection_metrics(np.array([0, 1]), np.array([0.5, 0.5]))
    assert m["real_acc"] == 1.0 and m["fake_acc"] == 0.0  # 0.5 is not > 0.5


def test_one_class_gives_undefined_ap_not_zero():
    m = detection_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert np.isnan(m["ap"]) and np.isnan(m["auc"]) and np.isnan(m["real_acc"]) and m["fake_acc"] == 0.5


def test_ece_hand_computed():
    # two bins used: p=0.2 (2 items, 1 fake -> |0.5 - 0.2|), p=0.9 (2 items, 2 fakes -> |1 - 0.9|)
    y = np.array([0, 1, 1, 1])
    p = np.array([0.2, 0.2, 0.9, 0.9])
    assert expected_calibration_error(y, p, bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)


def test_calibrated_threshold_separates_when_possible():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    t = calibrate_threshold(y, p)
    assert 0.2 < t < 0.3
    assert detection_metrics(y, p, t)["acc"] == 1.0


def test_bootstrap_interval_contains_point_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    ap = average_precision_score(y, p)
    lo, hi = bootstrap_interval(y, p, average_precision_score, n=200, seed=1)
    assert lo <= ap <= hi and hi - lo < 0.3
    assert bootstrap_interval(y, p, average_precision_score, n=200, seed=1) == (lo, hi)
