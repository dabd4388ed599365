"""How far bfloat16 CLIP features are from float32 ones, and what that does to a head.

Real-size CLIP ViT-L/14 with random weights (compute and rounding do not depend on the weights'
values being trained; the size of the drift roughly does, so read these as an estimate), the
same images and captions through a float32 and a bfloat16 copy of the same weights:

- per-row cosine between the two I0 (image) and T0 (caption) embeddings, and the largest absolute
  difference of the L2-normalised embeddings;
- a head (the paper's MLP, float32) trained on the global discrepancy D_g of each, evaluated on
  held-out rows of each, and the float32 head applied to bfloat16 features (what mixing them
  would do): AP, ACC and how often the verdicts agree.

    python benchmarks/precision_drift.py [--images 240] [--out drift.json]

Prints the CPU model and flags next to the figures; medians and extremes over rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _host import cpu_flags, cpu_model  # this folder, first on the path of a script run from it


def images_and_captions(n: int, seed: int) -> tuple[list, list[str], np.ndarray]:
    from tidy_detect.demo import fake_like, real_like
    from tidy_detect.models.tiny import load_words

    rng = np.random.default_rng(seed)
    words = load_words()
    images, captions, labels = [], [], []
    for i in range(n):
        label = i % 2
        size = int(rng.integers(224, 320))
        image = real_like(rng, size, size) if label == 0 else fake_like(rng, size, size, ("upsampled", "smooth")[i // 2 % 2])
        images.append(image)
        captions.append("a photo of " + " ".join(rng.choice(words, int(rng.integers(3, 9)))))
        labels.append(label)
    return images, captions, np.array(labels)


def encoder(dtype: str):
    from tidy_detect.bench.archs import build
    from tidy_detect.models.clip import ClipEncoder

    # Built in float32 from the same seed, then cast by the encoder: both copies hold the same weights.
    return ClipEncoder(f"random:clip-vit-l-14:{dtype}", dtype=dtype, components=build("clip-vit-l-14", seed=0),
                       cache_size=0)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def drift(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(normalise(a) * normalise(b), axis=1)
    diff = np.abs(normalise(a) - normalise(b)).max(axis=1)
    return {"cosine_median": float(np.median(cos)), "cosine_min": float(cos.min()),
            "max_abs_diff_median": float(np.median(diff)), "max_abs_diff_max": float(diff.max())}


def head_effect(features: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> dict[str, float]:
    from tidy_detect.config import RepresentationConfig
    from tidy_detect.evaluate.metrics import detection_metrics
    from tidy_detect.features import discrepancy
    from tidy_detect.head import DiscrepancyHead

    rep = RepresentationConfig("global")
    X = {name: discrepancy.representation(rep, gi, gt, [np.zeros((0, gi.shape[1]), np.float32)] * len(gi),
                                          [np.zeros((0, gi.shape[1]), np.float32)] * len(gi))
         for name, (gi, gt) in features.items()}
    n = len(labels)
    train, test = np.arange(n) < int(0.6 * n), np.arange(n) >= int(0.6 * n)
    heads = {name: DiscrepancyHead(epochs=50, hidden=512, precision="float32").fit(x[train], labels[train])
             for name, x in X.items()}
    out: dict[str, float] = {}
    p = {}
    for head_name, head in heads.items():
        for feat_name, x in X.items():
            p[(head_name, feat_name)] = head.predict_proba(x[test])[:, 1]
            m = detection_metrics(labels[test], p[(head_name, feat_name)])
            out[f"head_{head_name}_on_{feat_name}_ap"] = m["ap"]
            out[f"head_{head_name}_on_{feat_name}_acc"] = m["acc"]
    same = p[("float32", "float32")] > 0.5
    for key in (("float32", "bfloat16"), ("bfloat16", "bfloat16")):
        out[f"verdicts_agree_float32_head_on_float32_vs_head_{key[0]}_on_{key[1]}"] = float(np.mean((p[key] > 0.5) == same))
    out["max_abs_p_fake_change_float32_head_bf16_features"] = float(np.abs(p[("float32", "bfloat16")] - p[("float32", "float32")]).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240, help="images (half real-like, half fake-like)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.images < 10:
        parser.error("--images must be at least 10")
    import torch

    images, captions, labels = images_and_captions(args.images, args.seed)
    features, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        clip = encoder(dtype)
        started = time.perf_counter()
        gi = np.concatenate([clip.encode_global(images[k:k + args.batch_size])
                             for k in range(0, len(images), args.batch_size)])
        gt = clip.encode_texts(captions)
        seconds[dtype] = time.perf_counter() - started
        features[dtype] = (gi, gt)
        del clip
    report = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images": args.images, "model": "CLIP ViT-L/14 (real size, random weights)",
        "seconds": seconds,
        "image_embedding_I0": drift(features["float32"][0], features["bfloat16"][0]),
        "text_embedding_T0": drift(features["float32"][1], features["bfloat16"][1]),
        "head": head_effect(features, labels),
    }
    print(f"{report['model']}, {args.images} images, {report['cpu']} [{report['cpu_flags']}], "
          f"torch {report['torch']}, {report['threads']} threads")
    print(f"time: float32 {seconds['float32']:.1f} s, bfloat16 {seconds['bfloat16']:.1f} s "
          f"({seconds['float32'] / seconds['bfloat16']:.2f}x)")
    for name in ("image_embedding_I0", "text_embedding_T0"):
        d = report[name]
        print(f"{name}: cosine median {d['cosine_median']:.6f}, min {d['cosine_min']:.6f}; max |diff| of "
              f"normalised vectors median {d['max_abs_diff_median']:.2e}, max {d['max_abs_diff_max']:.2e}")
    for key, value in report["head"].items():
        print(f"{key}: {value:.4f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
