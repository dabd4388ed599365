"""PNG figures: PR/ROC curves, the real-vs-fake cosine histogram (paper Fig. 1b), t-SNE of the
representation (Fig. 9), robustness curves (Fig. 3) and ablation bars (Figs. 4-8).

Each function takes plain arrays or result dicts, writes one PNG and returns its path.
matplotlib runs on its non-interactive Agg backend. What each figure's axes mean and what is
better is in ``HOW_TO_READ`` (shown under the figure in the HTML report; the PNGs stay plain for papers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

REAL_COLOR, FAKE_COLOR = "#1f77b4", "#d62728"
MEAN_GROUP = "mean"  # the bar group of grouped_bars drawn last, apart from the others

# What the axes of each figure mean and what is better, by file name (``ablation_*``: any study).
HOW_TO_READ = {
    "pr": "How to read this: precision (y) against recall (x) as the p_fake threshold moves, one line per "
          "generator; higher and further right is better, AP is the area under the line (100 = perfect).",
    "roc": "How to read this: true positive rate (fakes caught, y) against false positive rate (reals flagged, x), "
           "one line per generator; the closer to the top-left corner the better, the dotted diagonal is chance.",
    "cosine": "How to read this: how often (y) each image-caption cosine similarity (x) occurs, reals in blue and "
              "fakes in red; the less the two humps overlap, the easier real and fake are to tell apart.",
    "tsne": "How to read this: each dot is one image's representation squeezed into 2-D (the axes have no units); "
            "separate blue (real) and red (fake) clusters mean the representation tells them apart.",
    "robustness_ap": "How to read this: AP in % (y) at each perturbation severity (x, 'clean' first, harder to "
                     "the right); a flatter line is more robust, higher is better.",
    "robustness_acc": "How to read this: accuracy in % at p_fake > threshold (y) at each perturbation severity "
                      "(x, 'clean' first, harder to the right); a flatter line is more robust, higher is better.",
    "ablation": "How to read this: AP in % (y, higher is better) per test generator (x), one bar colour per "
                "variant; the hatched group on the right, set apart, is the mean over generators.",
}


def how_to_read(name: str | Path) -> str | None:
    """The "how to read this" line for a figure file written here (``pr.png``, ``ablation_modality.png``,
    ...), or ``None`` for another file."""
    stem = Path(name).stem
    return HOW_TO_READ.get(stem) or (HOW_TO_READ["ablation"] if stem.startswith("ablation_") else None)


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


def bar_positions(groups: Sequence[str], gap: float = 0.6) -> np.ndarray:
    """x position of each bar group: 0, 1, 2, ... with ``gap`` more before the ``MEAN_GROUP`` (last)."""
    x = np.arange(len(groups), dtype=float)
    if groups and groups[-1] == MEAN_GROUP:
        x[-1] += gap
    return x


def grouped_bars(values: dict[str, dict[str, float]], out: Path, *, ylabel: str = "AP (%)", title: str = "") -> Path:
    """Bars per group (x axis), one bar per variant: ``values[variant][group]`` in [0, 1].

    A group named ``"mean"`` (the mean over the others) is drawn last, after a gap and a dashed
    line, on a grey band, its bars hatched, so it never reads as one more generator.
    """
    plt = _pyplot()
    variants = list(values)
    found = {g for v in values.values() for g in v}
    groups = sorted(found - {MEAN_GROUP}) + ([MEAN_GROUP] if MEAN_GROUP in found else [])
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(variants)) * 0.5 + 3), 4))
    x = bar_positions(groups)
    has_mean = bool(groups) and groups[-1] == MEAN_GROUP
    if has_mean:
        ax.axvspan(x[-1] - 0.5, x[-1] + 0.5, color="#eeeeee", zorder=0)
        if len(groups) > 1:
            ax.axvline((x[-2] + x[-1]) / 2, color="#888888", linestyle="--", linewidth=0.8, zorder=1)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for k, variant in enumerate(variants):
        heights = [values[variant].get(g, float("nan")) * 100 for g in groups]
        offsets = x + (k - (len(variants) - 1) / 2) * width
        color = colors[k % len(colors)]
        n = len(groups) - 1 if has_mean else len(groups)
        ax.bar(offsets[:n], heights[:n], width, label=variant, color=color, zorder=2)
        if has_mean:
            ax.bar(offsets[n:], heights[n:], width, color=color, hatch="///", edgecolor="white", linewidth=0,
                   zorder=2, label=None if n else variant)
    labels = [*groups[:-1], "mean over\ngenerators"] if has_mean else groups
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)
