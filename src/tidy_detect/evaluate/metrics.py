"""Detection metrics, as the benchmark papers report them.

ACC is measured at ``p_fake > threshold`` (0.5 unless a threshold calibrated on validation data is
given), separately on reals and fakes too; AP is scikit-learn's ``average_precision_score`` with
fake as the positive class; ROC-AUC likewise. Optional: bootstrap 95% intervals and the expected
calibration error.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _nan() -> float:
    return float("nan")


def detection_metrics(y: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ACC (all, real, fake) at ``p_fake > threshold``, AP, ROC-AUC, log-loss and counts.

    AP and AUC are NaN when only one class is present (they are undefined there).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y).astype(int)
    p = np.asarray(p_fake, dtype=np.float64)
    pred = (p > threshold).astype(int)
    both = len(np.unique(y)) == 2
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    return {
        "n": int(len(y)),
        "n_real": int((y == 0).sum()),
        "n_fake": int((y == 1).sum()),
        "acc": float((pred == y).mean()) if len(y) else _nan(),
        "real_acc": float((pred[y == 0] == 0).mean()) if (y == 0).any() else _nan(),
        "fake_acc": float((pred[y == 1] == 1).mean()) if (y == 1).any() else _nan(),
        "ap": float(average_precision_score(y, p)) if both else _nan(),
        "auc": float(roc_auc_score(y, p)) if both else _nan(),
        "loss": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))) if len(y) else _nan(),
    }


def expected_calibration_error(y: np.ndarray, p_fake: np.ndarray, bins: int = 15) -> float:
    """ECE of p_fake: the bin-weighted mean |accuracy - confidence| over equal-width bins of p_fake."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p_fake, dtype=np.float64)
    if len(y) == 0:
        return _nan()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(ece)


def calibrate_threshold(y: np.ndarray, p_fake: np.ndarray) -> float:
    """The threshold that maximises accuracy on (validation) data; ties go to the one nearest 0.5.

    Candidates are midpoints between consecutive distinct scores, so the result never sits on a
    score and ``p > t`` is unambiguous.
    """
    y = np.asarray(y).astype(int)
    p = np.sort(np.unique(np.asarray(p_fake, dtype=np.float64)))
    if len(p) == 0:
        return 0.5
    candidates = np.concatenate([[p[0] - 1e-9], (p[:-1] + p[1:]) / 2, [p[-1] + 1e-9]]).clip(0.0, 1.0)
    scores = np.asarray(p_fake, dtype=np.float64)
    accs = np.array([((scores > t).astype(int) == y).mean() for t in candidates])
    best = np.flatnonzero(accs == accs.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def bootstrap_interval(y: np.ndarray, p_fake: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                       n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric(y, p)``, resampling within each class
    so every resample keeps both classes (AP needs them)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p_fake, dtype=np.float64)
    if len(y) == 0 or n <= 0:
        return _nan(), _nan()
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in (0, 1) if (y == c).any()]
    values = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(members, size=len(members), replace=True) for members in by_class])
        values.append(metric(y[idx], p[idx]))
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return _nan(), _nan()
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))
