"""Ablations (paper Figs. 4-8) from stored embeddings, without running a model again.

Studies:
- ``modality``: image only (I0), text only (T0), both (D);
- ``distance``: global (D_g), local (D_l), both;
- ``weights``: w1/w2 sweep of D = w1·D_g + w2·D_l;
- ``compare``: named (train stores, test stores) sets, e.g. stores made with another CLIP model,
  captioner or training set (Figs. 6-8), each with the default head;
- baselines on the same stores: UniFD's linear probe on I0 and its nearest-neighbour variant;
  per-image scores of any other detector can be imported from a CSV (path, score).

Every variant trains a fresh head with the same options and seed and is scored on the same
sampled test rows; heads are saved under ``heads/`` for reuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tidy_detect.config import RepresentationConfig
from tidy_detect.evaluate.evaluation import (
    Scores,
    group_metrics,
    import_scores,
    markdown_table,
    mean_over_groups,
    sample_rows,
    select,
)
from tidy_detect.features.store import FeatureStore

STUDIES = ("modality", "distance", "weights")
DEFAULT_WEIGHTS = ((1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (0.5, 1.0), (0.0, 1.0))


def study_variants(study: str, weights: Sequence[tuple[float, float]] = DEFAULT_WEIGHTS
                   ) -> dict[str, RepresentationConfig]:
    """The representation of each variant of a study, by display name."""
    if study == "modality":
        return {"image (I0)": RepresentationConfig("image"), "text (T0)": RepresentationConfig("text"),
                "both (D)": RepresentationConfig("both")}
    if study == "distance":
        return {"local (D_l)": RepresentationConfig("local"), "global (D_g)": RepresentationConfig("global"),
                "both (D)": RepresentationConfig("both")}
    if study == "weights":
        return {f"w1={w1:g}, w2={w2:g}": RepresentationConfig("both", w1, w2) for w1, w2 in weights}
    from tidy_detect.errors import UnknownNameError

    raise UnknownNameError(f"Unknown ablation study {study!r}. Known: {', '.join(STUDIES)}.")


class _TestSet:
    """Sampled test rows of some stores, loaded once per representation."""

    def __init__(self, store_paths: Sequence[str | Path], max_per_class: int | None, seed: int) -> None:
        self.stores = [FeatureStore(p) for p in store_paths]
        self.selected = {s.uri: sample_rows(s, max_per_class, seed) for s in self.stores}
        self._cache: dict[RepresentationConfig, Any] = {}

    def arrays(self, rep: RepresentationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if rep not in self._cache:
            X, y, g, p, s = [], [], [], [], []
            for store in self.stores:
                data = store.load(rep, labeled_only=True)
                index, groups = select(data.path, self.selected[store.uri])
                X.append(data.X[index])
                y.append(data.label[index])
                g.append(groups)
                p.append(data.path[index])
                s.append(np.full(len(index), store.uri, dtype=object))
            self._cache[rep] = tuple(np.concatenate(v) for v in (X, y, g, p, s))
        return self._cache[rep]

    def scores(self, name: str, rep: RepresentationConfig, score_fn: Callable[[np.ndarray], np.ndarray]) -> Scores:
        X, y, g, p, s = self.arrays(rep)
        return Scores(name, p, g, y, score_fn(X), s)


def _train(store_paths: Sequence[str | Path], rep: RepresentationConfig, out: Path, head_params: dict[str, Any]):
    from tidy_detect.training import train_head

    return train_head(store_paths, out, representation=rep, **head_params).head


def _result(scores: Scores) -> dict[str, Any]:
    groups = group_metrics(scores)
    return {"groups": groups, "mean": mean_over_groups(groups)}


def unifd_linear_probe(X_train: np.ndarray, y_train: np.ndarray, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """UniFD's linear probe: logistic regression on (normalised) CLIP image embeddings."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000, random_state=seed).fit(X_train, y_train)
    return lambda X: model.predict_proba(X)[:, 1]


def unifd_nearest_neighbour(X_train: np.ndarray, y_train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """UniFD's nearest-neighbour variant: cosine distance to the nearest real and the nearest fake
    training embedding; p_fake = d_real / (d_real + d_fake), so nearer to fakes means higher."""
    from sklearn.neighbors import NearestNeighbors

    reals = NearestNeighbors(n_neighbors=1, metric="cosine").fit(X_train[y_train == 0])
    fakes = NearestNeighbors(n_neighbors=1, metric="cosine").fit(X_train[y_train == 1])

    def score(X: np.ndarray) -> np.ndarray:
        d_real = reals.kneighbors(X)[0][:, 0]
        d_fake = fakes.kneighbors(X)[0][:, 0]
        return d_real / np.maximum(d_real + d_fake, 1e-12)

    return score


def run_ablation(train_paths: Sequence[str | Path], test_paths: Sequence[str | Path], out: str | Path, *,
                 studies: Sequence[str] = STUDIES, weights: Sequence[tuple[float, float]] = DEFAULT_WEIGHTS,
                 compare: dict[str, tuple[Sequence[str], Sequence[str]]] | None = None, baselines: bool = True,
                 imports: dict[str, Path] | None = None, max_per_class: int | None = 1000, seed: int = 0,
                 say: Callable[[str], None] | None = None, **head_params: Any) -> dict[str, Any]:
    """Run the studies and write ablation.{json,md} and one bar chart per study.

    Args:
        train_paths, test_paths: stores (one extraction config among the training stores; test
            stores must match it).
        compare: extra named sets name -> (train stores, test stores), trained with the default head.
        head_params: DiscrepancyHead options shared by every variant (epochs, hidden, seed, ...).
    """
    from tidy_detect.detect import check_compatible
    from tidy_detect.evaluate import plots
    from tidy_detect.head import json_safe
    from tidy_detect.training import load_labeled, open_stores

    say = say or (lambda message: None)
    out = Path(out)
    (out / "heads").mkdir(parents=True, exist_ok=True)
    head_params = {"seed": seed, **head_params}
    train_stores = open_stores(train_paths)
    tests = _TestSet(test_paths, max_per_class, seed)
    for store in tests.stores:
        check_compatible(train_stores[0].extraction, store.extraction, f"training stores ({train_stores[0].uri})")
    payload: dict[str, Any] = {"kind": "ablation", "train": [str(p) for p in train_paths],
                               "test": [str(p) for p in test_paths], "head": head_params,
                               "sampling": {"max_per_class": max_per_class, "seed": seed}, "studies": {}}
    for study in studies:
        variants = study_variants(study, weights)
        results = {}
        for name, rep in variants.items():
            say(f"{study}: {name}")
            slug = "".join(c if c.isalnum() else "-" for c in f"{study}-{name}").strip("-")
            head = _train(train_paths, rep, out / "heads" / f"{slug}.safetensors", head_params)
            results[name] = {"representation": rep.__dict__, **_result(
                tests.scores(name, rep, lambda X, h=head: h.predict_proba(X)[:, 1]))}
        payload["studies"][study] = results
    if baselines:
        say("baselines: UniFD linear probe and nearest neighbour on I0")
        image_rep = RepresentationConfig("image", normalize=True)
        train, _ = load_labeled(train_stores, image_rep)
        payload["baselines"] = {
            "UniFD linear probe": _result(tests.scores("UniFD linear probe", image_rep,
                                                       unifd_linear_probe(train.X, train.label, seed))),
            "UniFD nearest neighbour": _result(tests.scores("UniFD nearest neighbour", image_rep,
                                                            unifd_nearest_neighbour(train.X, train.label))),
        }
        tidy = payload["studies"].get("modality", {}).get("both (D)") or payload["studies"].get("distance", {}).get("both (D)")
        if tidy is not None:
            payload["baselines"]["TIDY (both)"] = {"groups": tidy["groups"], "mean": tidy["mean"]}
    if imports:
        reference = tests.scores("reference", RepresentationConfig("image"), lambda X: np.zeros(len(X)))
        payload.setdefault("baselines", {})
        for name, csv_path in imports.items():
            scores, missing = import_scores(name, Path(csv_path), reference)
            payload["baselines"][name] = {**_result(scores), "missing_rows": missing, "source": str(csv_path)}
    if compare:
        payload["compare"] = {}
        for name, (set_train, set_test) in compare.items():
            say(f"compare: {name}")
            rep = RepresentationConfig("both")
            slug = "".join(c if c.isalnum() else "-" for c in f"compare-{name}").strip("-")
            head = _train(set_train, rep, out / "heads" / f"{slug}.safetensors", head_params)
            set_tests = _TestSet(set_test, max_per_class, seed)
            set_extraction = open_stores(set_train)[0].extraction
            for store in set_tests.stores:
                check_compatible(set_extraction, store.extraction, f"compare set {name!r}")
            payload["compare"][name] = {"train": list(map(str, set_train)), "test": list(map(str, set_test)),
                                        **_result(set_tests.scores(name, rep, lambda X, h=head: h.predict_proba(X)[:, 1]))}
    (out / "ablation.json").write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n",
                                       encoding="utf-8")
    sections = ["# Ablations", f"Train: {', '.join(payload['train'])}  ", f"Test: {', '.join(payload['test'])}",
                "AP (%) per group and the mean over groups."]
    figures = {}
    for title, block in [*[(s, payload["studies"][s]) for s in payload["studies"]],
                         *([("baselines", payload["baselines"])] if "baselines" in payload else []),
                         *([("compare", payload["compare"])] if "compare" in payload else [])]:
        sections += [f"\n## {title}\n", ablation_table(block)]
        values = {name: {**{g: m["ap"] for g, m in r["groups"].items()}, "mean": r["mean"].get("ap", float("nan"))}
                  for name, r in block.items()}
        figures[title] = plots.grouped_bars(values, out / f"ablation_{title}.png", title=f"Ablation: {title}")
    (out / "ablation.md").write_text("\n".join(sections) + "\n", encoding="utf-8")
    return payload


def ablation_table(block: dict[str, dict[str, Any]], metric: str = "ap") -> str:
    """Markdown: variants as rows, groups and the mean as columns, ``metric`` in %."""
    groups = sorted({g for r in block.values() for g in r["groups"]})
    rows = []
    for name, r in block.items():
        cells = [_pct(r["groups"].get(g, {}).get(metric)) for g in groups]
        rows.append([name, *cells, _pct(r["mean"].get(metric))])
    return markdown_table(["variant", *groups, "mean"], rows)


def _pct(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value * 100:.2f}"
