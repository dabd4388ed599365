"""PNG figures: PR/ROC curves, the real-vs-fake cosine histogram (paper Fig. 1b), t-SNE of the
representation (Fig. 9), robustness curves (Fig. 3) and ablation bars (Figs. 4-8).

Each function takes plain arrays or result dicts, writes one PNG and returns its path.
matplotlib runs on its non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

REAL_COLOR, FAKE_COLOR = "#1f77b4", "#d62728"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def pr_roc_curves(groups: Sequence[str], labels: np.ndarray, scores: np.ndarray, group_of: np.ndarray,
                  out: Path, title: str = "") -> tuple[Path, Path]:
    """Precision-recall and ROC curves, one line per group (fake is the positive class)."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    plt = _pyplot()
    figs = {}
    for kind in ("pr", "roc"):
        fig, ax = plt.subplots(figsize=(6.5, 5))
        for group in groups:
            mask = group_of == group
            y, p = labels[mask], scores[mask]
            if len(np.unique(y)) < 2:
                continue
            if kind == "pr":
                precision, recall, _ = precision_recall_curve(y, p)
                ax.plot(recall, precision, label=f"{group} (AP {average_precision_score(y, p) * 100:.1f})")
            else:
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{group} (AUC {auc(fpr, tpr) * 100:.1f})")
        if kind == "pr":
            ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall {title}".strip(), ylim=(0, 1.02))
        else:
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}".strip())
        ax.legend(fontsize=7, loc="lower left" if kind == "pr" else "lower right")
        figs[kind] = _save(fig, out / f"{kind}.png")
    return figs["pr"], figs["roc"]


def cosine_histogram(similarity: np.ndarray, labels: np.ndarray, out: Path, title: str = "") -> Path:
    """Histogram of image-caption cosine similarity cos(I0, T0), real vs fake (paper Fig. 1b)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(float(np.min(similarity, initial=0)), float(np.max(similarity, initial=1)), 40)
    for label, name, color in ((0, "real", REAL_COLOR), (1, "fake", FAKE_COLOR)):
        values = similarity[labels == label]
        if len(values):
            ax.hist(values, bins=bins, alpha=0.55, color=color, density=True,
                    label=f"{name} (n={len(values)}, mean {values.mean():.3f})")
    ax.set(xlabel="cosine similarity of image and caption embeddings", ylabel="density",
           title=f"Image-caption similarity {title}".strip())
    ax.legend()
    return _save(fig, out)


def tsne_plot(X: np.ndarray, labels: np.ndarray, group_of: np.ndarray, out: Path, *, max_points: int = 1500,
              seed: int = 0, title: str = "") -> Path:
    """t-SNE of the representation, real vs fake, one panel per group (paper Fig. 9)."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    groups = sorted({str(g) for g in group_of})
    cols = min(len(groups), 3) or 1
    rows = int(np.ceil(len(groups) / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    rng = np.random.default_rng(seed)
    for ax, group in zip(axes.flat, groups):
        idx = np.flatnonzero(group_of == group)
        if len(idx) > max_points:
            idx = np.sort(rng.choice(idx, max_points, replace=False))
        if len(idx) < 4:
            ax.set_title(f"{group}: too few points")
            continue
        perplexity = float(min(30, max(2, (len(idx) - 1) // 3)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X[idx])
        for label, name, color in ((0, "real", REAL_COLOR), (1, "fake", FAKE_COLOR)):
            mask = labels[idx] == label
            ax.scatter(emb[mask, 0], emb[mask, 1], s=6, alpha=0.7, color=color, label=name)
        ax.set_title(group)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def robustness_curves(results: dict[str, list[dict[str, Any]]], clean: dict[str, float] | None, out: Path,
                      metric: str = "ap") -> Path:
    """``metric`` against severity, one panel per perturbation (paper Fig. 3).

    ``results[kind]`` is a list of {"level": ..., metric: ...} in increasing severity; the clean
    score (if given) is drawn as the first point of every panel.
    """
    plt = _pyplot()
    kinds = list(results)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        points = results[kind]
        xs = [str(p["level"]) for p in points]
        ys = [p.get(metric, float("nan")) * 100 for p in points]
        if clean is not None and metric in clean:
            xs, ys = ["clean", *xs], [clean[metric] * 100, *ys]
        ax.plot(range(len(xs)), ys, marker="o")
        ax.set_xticks(range(len(xs)), xs)
        ax.set(title=kind, xlabel="severity", ylabel=f"{metric.upper()} (%)")
        ax.grid(alpha=0.3)
    return _save(fig, out)


def grouped_bars(values: dict[str, dict[str, float]], out: Path, *, ylabel: str = "AP (%)", title: str = "") -> Path:
    """Bars per group (x axis), one bar per variant: ``values[variant][group]`` in [0, 1]."""
    plt = _pyplot()
    variants = list(values)
    groups = sorted({g for v in values.values() for g in v})
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(variants)) * 0.5 + 3), 4))
    x = np.arange(len(groups))
    for k, variant in enumerate(variants):
        heights = [values[variant].get(g, float("nan")) * 100 for g in groups]
        ax.bar(x + (k - (len(variants) - 1) / 2) * width, heights, width, label=variant)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)
