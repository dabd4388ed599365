"""Calibrate a one-class head: a detector that needs no fake images.

The score is the image-caption discrepancy of :class:`~tidy_detect.head.OneClassHead` (for the
default ``global`` representation, ``1 - cos(I0, T0)``, the quantity of the paper's Fig. 1b). Only
real rows (label 0) of the stores are read. They are split by content hash into a calibration part,
which sets the threshold at the target false-positive rate, and a held-out part, on which the
false-positive rate actually reached is measured (with its exact binomial 95% interval) and
recorded in the head. The head file is used by ``detect``, ``eval``, ``serve`` and
``Detector.load`` exactly like a trained one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import ConfigError, StoreError
from tidy_detect.head import ONE_CLASS_REPRESENTATIONS, OneClassHead
from tidy_detect.training import DataSummary, open_stores, pipeline_metadata

DEFAULT_FPR = 0.05
DEFAULT_HELD_OUT = 0.25


@dataclass
class CalibrationResult:
    """What :func:`calibrate_one_class` wrote and measured."""

    head: OneClassHead
    path: Path
    metadata: dict[str, Any]
    data: DataSummary
    calibration: dict[str, Any]  # n, false_positives, fpr, fpr_ci on the rows that set the threshold
    held_out: dict[str, Any]  # the same on the held-out real rows
    seconds: float


def false_positive_rate(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Real rows scoring above ``threshold``: ``n``, ``false_positives``, ``fpr`` and ``fpr_ci``,
    the exact (Clopper-Pearson) 95% interval of the rate."""
    from scipy.stats import binomtest

    n = int(len(scores))
    k = int((np.asarray(scores) > threshold).sum())
    if n == 0:
        return {"n": 0, "false_positives": 0, "fpr": None, "fpr_ci": None}
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"n": n, "false_positives": k, "fpr": k / n, "fpr_ci": [float(ci.low), float(ci.high)]}


def min_held_out_rows(fpr: float) -> int:
    """Fewest held-out real rows accepted: enough to expect one false positive at the target."""
    return math.ceil(round(1 / fpr, 9))


def _split(sha256: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for held-out rows. Rows are split by content hash, so copies of one image never sit on
    both sides; the hashes are sorted before the seeded shuffle, so the split does not depend on
    the order of the store's shards."""
    unique = np.array(sorted(set(sha256.tolist())), dtype=object)
    order = np.random.default_rng(seed).permutation(len(unique))
    held = set(unique[order[:int(round(fraction * len(unique)))]].tolist())
    return np.array([h in held for h in sha256.tolist()], dtype=bool)


def calibrate_one_class(store_paths: Sequence[str | Path], out: str | Path, *, fpr: float = DEFAULT_FPR,
                        representation: RepresentationConfig | None = None, held_out: float = DEFAULT_HELD_OUT,
                        seed: int = 0, real_only: bool = False) -> CalibrationResult:
    """Calibrate a :class:`OneClassHead` on the real rows of stores and save it to ``out``.

    Args:
        store_paths: stores of one extraction config; only their real (label 0) rows are used.
        out: head file to write (``.safetensors``, with a ``.json`` copy of its metadata).
        fpr: target false-positive rate on real images, in (0, 0.5).
        representation: ``global`` (default: ``1 - cos(I0, T0)``), ``local`` or ``both``; L2-normalised.
        held_out: fraction of the real images (by content hash) kept out of calibration to
            measure the false-positive rate reached, in (0, 1).
        seed: seeds the split.
        real_only: accept stores that also hold fake rows (label 1): they are ignored, and counted
            in the head's metadata. Without it such stores are refused, so that nobody believes
            their fakes were used.

    Raises:
        ConfigError: a bad fpr, held_out or representation; fake rows without ``real_only``.
        StoreError: unreadable stores, mixed extraction configs, or too few real rows for the
            target (the message gives the numbers needed).
    """
    started = time.perf_counter()
    if not (isinstance(fpr, (int, float)) and 0 < fpr < 0.5):
        raise ConfigError(f"fpr must be in (0, 0.5), got {fpr!r}")
    if not (isinstance(held_out, (int, float)) and 0 < held_out < 1):
        raise ConfigError(f"held_out must be in (0, 1), got {held_out!r}")
    representation = representation or RepresentationConfig("global")
    if representation.kind not in ONE_CLASS_REPRESENTATIONS:
        raise ConfigError(f"a one-class head scores an image-caption discrepancy: representation must be one of "
                          f"{', '.join(ONE_CLASS_REPRESENTATIONS)}, got {representation.kind!r}")
    if not representation.normalize:
        raise ConfigError("a one-class head scores 1 - cos on L2-normalised embeddings; normalize must be true")
    stores = open_stores(store_paths, role="calibration")
    summary = DataSummary([s.uri for s in stores])
    for store in stores:
        counts = store.summary()
        summary.skipped_errors += counts["errors"]
        summary.skipped_unlabeled += counts["labels"]["none"]
        summary.fake += counts["labels"]["fake"]
    where = ", ".join(s.uri for s in stores)
    if summary.fake and not real_only:
        raise ConfigError(f"{where} hold {summary.fake} fake rows; a one-class head is calibrated on real rows only. "
                          f"Pass --real-only (real_only=True) to ignore them (they are counted in the head's "
                          f"metadata), or give stores of real images only")
    scores, hashes = [], []
    for store in stores:
        for arrays in store.iter_arrays(representation, labeled_only=True):
            real = arrays.label == 0
            scores.append(OneClassHead.discrepancy(arrays.X[real]))
            hashes.append(arrays.sha256[real])
            summary.without_objects += int(arrays.local_fallback[real].sum())
            for group, label in zip(arrays.group, arrays.label):
                entry = summary.groups.setdefault(str(group), {"real": 0, "fake": 0})
                entry["fake" if label == 1 else "real"] += 1
    score = np.concatenate(scores) if scores else np.zeros(0)
    sha = np.concatenate(hashes) if hashes else np.zeros(0, dtype=object)
    summary.real = summary.rows = int(len(score))
    held = _split(sha, held_out, seed)
    n_cal, n_held = int((~held).sum()), int(held.sum())
    need_cal, need_held = OneClassHead.min_rows(fpr), min_held_out_rows(fpr)
    if n_cal < need_cal or n_held < need_held:
        total = max(math.ceil(need_cal / (1 - held_out)), math.ceil(need_held / held_out))
        raise StoreError(
            f"{where}: {summary.real} real rows ({n_cal} to calibrate, {n_held} held out at held-out fraction "
            f"{held_out:g}); a one-class head at fpr {fpr:g} needs at least {need_cal} to calibrate (so that "
            f"{OneClassHead.MIN_ABOVE} lie above the threshold) and {need_held} held out (one expected false "
            f"positive), about {total} real rows in all. Extract more real images, raise --fpr, or change --held-out")
    head = OneClassHead(fpr=fpr).fit_scores(score[~held], stores[0].dim)
    calibration = false_positive_rate(score[~held], head.threshold_)
    measured = false_positive_rate(score[held], head.threshold_)
    quantiles = dict(zip(("q05", "q25", "q50", "q75", "q95"),
                         (float(v) for v in np.quantile(score[~held], [0.05, 0.25, 0.5, 0.75, 0.95]))))
    seconds = time.perf_counter() - started
    metadata = {
        **pipeline_metadata(stores, representation),
        "training": {"data": summary.to_dict(), "real_only": real_only,
                     "calibration": {"fpr": fpr, "held_out": held_out, "seed": seed, "split": "by sha256",
                                     "rule": "split-conformal: the ceil((1 - fpr)(n + 1))-th smallest real score",
                                     "calibration_rows": n_cal, "held_out_rows": n_held,
                                     "real_score_quantiles": quantiles},
                     "seconds": round(seconds, 3)},
        "metrics": {"calibration": calibration, "held_out": measured},
    }
    path = head.save(out, metadata)
    saved = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return CalibrationResult(head, path, saved, summary, calibration, measured, seconds)
