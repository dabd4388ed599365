#!/usr/bin/env python
"""One-class calibration: how close the held-out false-positive rate comes to its target, and what it costs.

Builds a synthetic feature store of CLIP-sized rows (768-d by default) whose image-caption
discrepancy ``1 - cos(I0, T0)`` is drawn from known distributions (reals ~ N(0.30, 0.05), fakes
~ N(0.50, 0.05); no objects), then for each target rate runs ``calibrate_one_class`` (the code of
``tidy-detect calibrate --real-only``) and prints the calibration and held-out rates, the
threshold against the true quantile, and the time. Then it times loading the head and scoring
every row, and resolving it as a hub reference from a local cache laid out as huggingface_hub does.

    python benchmarks/one_class.py                        # 20,000 real + 5,000 fake rows, 768-d
    python benchmarks/one_class.py --real 40000 --fake 40000

Offline; needs nothing beyond the package.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def pairs(rng: np.random.Generator, scores: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw image and text embeddings whose cosine is ``1 - scores``."""
    u = rng.normal(size=(len(scores), dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.normal(size=(len(scores), dim))
    v -= np.sum(v * u, axis=1, keepdims=True) * u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    angle = np.arccos(1.0 - scores)[:, None]
    image_norm, text_norm = rng.uniform(0.5, 2.0, (2, len(scores), 1))  # raw norms vary, as CLIP's do
    return ((np.cos(angle) * u + np.sin(angle) * v) * image_norm).astype(np.float32), (u * text_norm).astype(np.float32)


def build_store(path: Path, n_real: int, n_fake: int, dim: int, seed: int) -> None:
    from tidy_detect.features.store import FeatureStore

    extraction = {"clip": {"source": "openai/clip-vit-large-patch14", "weights": "synthetic", "dim": dim},
                  "captioner": {"name": "blip2", "weights": "synthetic"}, "grounder": {"name": "none"}}
    store = FeatureStore.open_for_writing(path, extraction, dim)
    rng = np.random.default_rng(seed)
    empty = np.zeros((0, dim), np.float32)
    for label, n, mean in ((0, n_real, 0.30), (1, n_fake, 0.50)):
        for start in range(0, n, 5000):
            count = min(5000, n - start)
            scores = np.clip(rng.normal(mean, 0.05, count), 0.001, 1.5)
            image, text = pairs(rng, scores, dim)
            store.write([{"sha256": f"{label}-{start + k}", "path": f"/img/{label}/{start + k}.png", "label": label,
                          "group": "synthetic", "caption": "a photo", "phrases": [], "object_phrases": [], "boxes": [],
                          "box_scores": [], "global_image": image[k], "global_text": text[k], "local_images": empty,
                          "local_texts": empty, "local_fallback": True, "error": None, "error_kind": None}
                         for k in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=20000)
    parser.add_argument("--fake", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--fprs", default="0.01,0.05,0.1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from scipy.stats import norm

    from tidy_detect.calibrate import calibrate_one_class
    from tidy_detect.config import RepresentationConfig
    from tidy_detect.features.store import FeatureStore
    from tidy_detect.head import load_head

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build_store(root / "store", args.real, args.fake, args.dim, args.seed)
        print(f"store: {args.real} real + {args.fake} fake rows, {args.dim}-d, built in "
              f"{time.perf_counter() - started:.1f} s")
        print("| target FPR | calibration FPR (n) | held-out FPR (n) | held-out 95% interval | threshold | true quantile "
              "| calibrate s |")
        print("|---|---|---|---|---|---|---|")
        head_path = None
        for fpr in (float(v) for v in args.fprs.split(",")):
            started = time.perf_counter()
            result = calibrate_one_class([root / "store"], root / f"head-{fpr}.safetensors", fpr=fpr, real_only=True,
                                         seed=args.seed)
            seconds = time.perf_counter() - started
            cal, held = result.calibration, result.held_out
            print(f"| {fpr:.2%} | {cal['fpr']:.2%} ({cal['n']}) | {held['fpr']:.2%} ({held['n']}) | "
                  f"{held['fpr_ci'][0]:.2%}-{held['fpr_ci'][1]:.2%} | {result.head.threshold_:.4f} | "
                  f"{norm.ppf(1 - fpr, 0.30, 0.05):.4f} | {seconds:.2f} |")
            head_path = head_path or result.path
        X = FeatureStore(root / "store").load(RepresentationConfig("global")).X
        started = time.perf_counter()
        head, _ = load_head(head_path)
        loaded = time.perf_counter() - started
        started = time.perf_counter()
        head.predict_proba(X)
        scored = time.perf_counter() - started
        print(f"load_head: {loaded * 1000:.1f} ms; predict_proba on {len(X)} rows: {scored * 1000:.1f} ms")

        cache = root / "hf-cache"
        data = head_path.read_bytes()
        blob = cache / "models--lab--one-class" / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True)
        blob.write_bytes(data)
        snapshot = cache / "models--lab--one-class" / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / "head.safetensors").symlink_to(os.path.relpath(blob, snapshot))
        (cache / "models--lab--one-class" / "refs").mkdir()
        (cache / "models--lab--one-class" / "refs" / "main").write_text("0" * 40)
        os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
        from tidy_detect.sharing import resolve_head

        resolve_head("lab/one-class")  # the first call imports huggingface_hub
        started = time.perf_counter()
        for _ in range(20):
            resolve_head("lab/one-class")
        print(f"resolve_head('lab/one-class') from the cache, offline: "
              f"{(time.perf_counter() - started) / 20 * 1000:.2f} ms per call")


if __name__ == "__main__":
    main()
