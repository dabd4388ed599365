"""Stores and heads for the one-class and shared-head tests.

- :func:`discrepancy_store`: a synthetic store whose rows have image-caption discrepancies
  (``1 - cos(I0, T0)``, and of one object each) drawn from known distributions;
- :func:`tiny_heads` (a session fixture; import it into a test module to use it): a store of the
  tiny random-weight models over a small tree with more real images than fake ones, a trained head
  and a one-class head calibrated on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_tree, random_image

DIM = 16
EXTRACTION = {"clip": {"source": "/models/clip", "weights": "w-clip", "dim": DIM, "dtype": "float32"},
              "captioner": {"name": "blip2", "weights": "w-cap"}, "grounder": {"name": "none"},
              "phrases": {"max_objects": 6}}


def _pair(rng: np.random.Generator, discrepancy: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw (unnormalised) image and text vectors with ``1 - cos = discrepancy``."""
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    v = rng.normal(size=DIM)
    v -= v.dot(u) * u
    v /= np.linalg.norm(v)
    angle = np.arccos(1.0 - discrepancy)
    image = (np.cos(angle) * u + np.sin(angle) * v) * rng.uniform(0.5, 2.0)  # norms vary like CLIP's
    return image.astype(np.float32), (u * rng.uniform(0.5, 2.0)).astype(np.float32)


def discrepancy_rows(rng: np.random.Generator, global_scores: np.ndarray, local_scores: np.ndarray, label: int | None,
                     group: str, prefix: str) -> list[dict[str, Any]]:
    """Store rows with the given global and (one object's) local discrepancies."""
    rows = []
    for k, (g, loc) in enumerate(zip(global_scores, local_scores)):
        gi, gt = _pair(rng, float(g))
        li, lt = _pair(rng, float(loc))
        rows.append({
            "sha256": f"{prefix}-{k}", "path": f"/img/{prefix}/{k}.png", "label": label, "group": group,
            "width": 10, "height": 8, "format": "PNG", "num_bytes": 100, "caption": "a dog", "phrases": ["dog"],
            "object_phrases": ["dog"], "boxes": [[0, 0, 5, 5]], "box_scores": [0.5],
            "global_image": gi, "global_text": gt, "local_images": li[None], "local_texts": lt[None],
            "local_fallback": False, "error": None, "error_kind": None,
        })
    return rows


def discrepancy_store(path: Path, n_real: int, n_fake: int = 0, *, seed: int = 0, real=(0.30, 0.05),
                      fake=(0.50, 0.05), extraction: dict[str, Any] | None = None, groups=("g",)) -> Path:
    """A store of ``n_real`` real rows with global discrepancy ~ N(real) and local ~ N(real) + 0.1,
    and ``n_fake`` fake rows ~ N(fake), clipped to (0.001, 1.5); spread over ``groups``."""
    from tidy_detect.features.store import FeatureStore

    rng = np.random.default_rng(seed)
    store = FeatureStore.open_for_writing(path, extraction or EXTRACTION, DIM)
    for label, n, (mean, std) in ((0, n_real, real), (1, n_fake, fake)):
        if not n:
            continue
        g = np.clip(rng.normal(mean, std, n), 0.001, 1.5)
        loc = np.clip(rng.normal(mean + 0.1, std, n), 0.001, 1.5)
        for start in range(0, n, 2000):
            rows = []
            for i, group in enumerate(groups):
                part = slice(start, min(start + 2000, n))
                picks = np.arange(n)[part][i::len(groups)]
                rows += discrepancy_rows(rng, g[picks], loc[picks], label, group, f"{label}-{group}-{start}")
            store.write(rows)
    return path


@pytest.fixture(scope="session")
def tiny_heads(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``{"root", "tree", "store", "mlp", "one_class", "result"}``: 24 real and 8 fake images of the
    tiny models' store, a trained head on it, and a one-class head calibrated on its reals at fpr 0.4."""
    from tidy_detect.calibrate import calibrate_one_class
    from tidy_detect.config import load_preset
    from tidy_detect.features.extractor import Extractor, extract
    from tidy_detect.training import train_head

    root = tmp_path_factory.mktemp("one-class")
    make_tree(root / "tree", {"gen": 8}, seed=4)
    rng = np.random.default_rng(5)
    for i in range(16):
        random_image(rng, int(rng.integers(32, 96)), int(rng.integers(32, 96))).save(
            root / "tree" / "gen" / "0_real" / f"more{i}.png")
    extractor = Extractor(load_preset(tiny_bundle / "tiny.toml")).load()
    extract([root / "tree"], root / "store", extractor=extractor)
    trained = train_head([root / "store"], root / "mlp.safetensors", epochs=3, hidden=8, batch_size=8)
    result = calibrate_one_class([root / "store"], root / "one-class.safetensors", fpr=0.4, real_only=True)
    return {"root": root, "tree": root / "tree", "store": root / "store", "mlp": trained.path,
            "one_class": result.path, "result": result}
