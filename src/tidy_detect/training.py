"""Train a head from feature stores and save it with everything needed to use it correctly.

The checkpoint remembers the stores' extraction config (and its fingerprint), so a head can never
be applied to features from other models without an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import StoreError
from tidy_detect.features.store import FeatureArrays, FeatureStore, config_differences
from tidy_detect.evaluate.metrics import detection_metrics
from tidy_detect.head import DiscrepancyHead, EpochFn


def open_stores(paths: Sequence[str | Path], role: str = "training") -> list[FeatureStore]:
    """Open stores that must share one extraction config.

    Raises:
        StoreError: a path is not a store, or two stores were made with different configs.
    """
    if not paths:
        raise StoreError(f"no {role} store given")
    stores = [FeatureStore(p) for p in paths]
    first = stores[0]
    for other in stores[1:]:
        if other.fingerprint != first.fingerprint:
            diffs = config_differences(first.extraction, other.extraction)
            raise StoreError(f"{role} stores {first.uri} and {other.uri} were made with different extraction "
                             f"configs and cannot be mixed: {'; '.join(diffs[:5])}")
    return stores


@dataclass
class DataSummary:
    """What went into training: usable rows per class and group, and what was skipped."""

    stores: list[str]
    rows: int = 0
    real: int = 0
    fake: int = 0
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped_errors: int = 0
    skipped_unlabeled: int = 0
    without_objects: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_labeled(stores: Sequence[FeatureStore], representation: RepresentationConfig
                 ) -> tuple[FeatureArrays, DataSummary]:
    """Labelled, error-free rows of all stores as one representation matrix, with a summary."""
    parts, summary = [], DataSummary([s.uri for s in stores])
    for store in stores:
        counts = store.summary()
        summary.skipped_errors += counts["errors"]
        summary.skipped_unlabeled += counts["labels"]["none"]
        parts.append(store.load(representation, labeled_only=True))
    data = FeatureArrays(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("X", "label", "group", "path", "sha256", "local_fallback")))
    summary.rows = len(data)
    summary.real = int((data.label == 0).sum())
    summary.fake = int((data.label == 1).sum())
    summary.without_objects = int(data.local_fallback.sum())
    for group, label in zip(data.group, data.label):
        entry = summary.groups.setdefault(str(group), {"real": 0, "fake": 0})
        entry["fake" if label == 1 else "real"] += 1
    return data, summary


def pipeline_metadata(stores: Sequence[FeatureStore], representation: RepresentationConfig) -> dict[str, Any]:
    """What a head file records so that detection can rebuild its input: the representation, and
    the stores' extraction config (with its fingerprint and dimension), which loading checks
    against the models."""
    return {
        "representation": {"kind": representation.kind, "w1": representation.w1, "w2": representation.w2,
                           "normalize": representation.normalize},
        "extraction": stores[0].extraction,
        "fingerprint": stores[0].fingerprint,
        "dim": stores[0].dim,
    }


@dataclass
class TrainResult:
    head: DiscrepancyHead
    path: Path
    metadata: dict[str, Any]
    data: DataSummary
    seconds: float


def train_head(store_paths: Sequence[str | Path], out: str | Path, *,
               representation: RepresentationConfig | None = None, val_paths: Sequence[str | Path] = (),
               on_epoch: EpochFn | None = None, **head_params: Any) -> TrainResult:
    """Train a :class:`DiscrepancyHead` on stores and save it to ``out``.

    Args:
        store_paths: training stores (one extraction config).
        out: checkpoint path (``.safetensors``; a ``.json`` copy of the metadata is written beside it).
        representation: which vector the head sees (default: both distances, w1 = w2 = 1).
        val_paths: optional validation stores (same config), scored every epoch.
        head_params: DiscrepancyHead options (hidden, epochs, lr, weight_decay, batch_size, seed,
            select, balance, precision, device). ``precision="auto"`` (the default) trains in float32
            on float32 CLIP features, else as the head's own ``auto``.

    Raises:
        StoreError: unreadable stores or mixed configs; ConfigError: bad options or no usable rows.
    """
    representation = representation or RepresentationConfig()
    started = time.perf_counter()
    stores = open_stores(store_paths)
    train, summary = load_labeled(stores, representation)
    if summary.real == 0 or summary.fake == 0:
        raise StoreError(f"training needs both real and fake images; the stores give {summary.real} real and "
                         f"{summary.fake} fake labelled rows (labels come from 0_real/1_fake folders or a "
                         f"manifest's label column)")
    val = val_summary = None
    if val_paths:
        val_stores = open_stores(val_paths, role="validation")
        if val_stores[0].fingerprint != stores[0].fingerprint:
            diffs = config_differences(stores[0].extraction, val_stores[0].extraction)
            raise StoreError(f"validation store {val_stores[0].uri} was made with another extraction config than "
                             f"the training stores: {'; '.join(diffs[:5])}")
        val, val_summary = load_labeled(val_stores, representation)
    if head_params.get("precision", "auto") == "auto" and (stores[0].extraction.get("clip") or {}).get("dtype") == "float32":
        # float32 features (the paper's protocol): a head trained in bfloat16 would round them again.
        head_params["precision"] = "float32"
    head = DiscrepancyHead(**head_params)
    head.fit(train.X, train.label, None if val is None else val.X, None if val is None else val.label,
             on_epoch=on_epoch)
    metrics = {"train": detection_metrics(train.label, head.predict_proba(train.X)[:, 1])}
    if val is not None:
        metrics["val"] = detection_metrics(val.label, head.predict_proba(val.X)[:, 1])
    seconds = time.perf_counter() - started
    metadata = {
        **pipeline_metadata(stores, representation),
        "training": {"data": summary.to_dict(), "validation": val_summary.to_dict() if val_summary else None,
                     "seconds": round(seconds, 3)},
        "metrics": metrics,
    }
    path = head.save(out, metadata)
    saved = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return TrainResult(head, path, saved, summary, seconds)
