"""Evaluate heads on feature stores: per-generator metrics, the paper's tables, saved lists.

The protocol (DESIGN.md): per group (generator), at most ``max_per_class`` real and fake images,
shuffled with a seed reset for every store (dataset); ACC at ``p_fake > 0.5`` with real/fake ACC,
AP and ROC-AUC, and their mean over groups. A threshold calibrated on a validation store is
reported in its own columns, never tuned on the test data. Everything evaluated is written down:
``scores.csv`` is the exact list of images with their scores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import ConfigError, InputError, UnknownNameError
from tidy_detect.evaluate.metrics import (
    bootstrap_interval,
    calibrate_threshold,
    detection_metrics,
    expected_calibration_error,
)
from tidy_detect.features.store import FeatureStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

SUITE_DIR = Path(__file__).parent / "suites"
MEAN_METRICS = ("acc", "real_acc", "fake_acc", "ap", "auc", "ece", "acc_cal", "real_acc_cal", "fake_acc_cal")


# ---------------------------------------------------------------------------------------------
# Suites: the paper's tables as data

# Layouts that say how files were listed, not which benchmark they come from.
_NOT_A_DATASET = ("generic", "manifest")


@dataclass(frozen=True)
class Source:
    """A group of one dataset: ``group`` as the store names it, ``layout`` the dataset layout it
    must come from (None: any)."""

    group: str
    layout: str | None = None

    def __str__(self) -> str:
        return f"{self.layout}:{self.group}" if self.layout else self.group

    @classmethod
    def parse(cls, text: str, where: str) -> "Source":
        """``GROUP`` or ``LAYOUT:GROUP`` (``genimage:adm``, ``diffusionforensics:lsun_bedroom/adm``)."""
        layout, sep, group = str(text).strip().rpartition(":")
        if not group.strip() or (sep and not layout.strip()):
            raise ConfigError(f"{where} must be GROUP or LAYOUT:GROUP, got {text!r}")
        return cls(group.strip(), layout.strip() or None)


class Column(NamedTuple):
    label: str
    sources: tuple[Source, ...]  # in order of preference
    note: str = ""


@dataclass(frozen=True)
class ColumnMatch:
    """Which evaluated group fills a column, and what is known of its dataset."""

    label: str
    group: str | None
    source: Source | None  # the suite's source that matched
    layouts: tuple[str, ...] = ()  # the datasets the stores record for the group (empty: not recorded)

    def describe(self) -> str:
        if self.group is None or self.source is None:
            return f"{self.label} = missing"
        if self.layouts:
            dataset = ", ".join(self.layouts)
        elif self.source.layout:
            dataset = f"{self.source.layout} by the suite; the store does not record its dataset"
        else:
            dataset = "dataset not recorded"
        return f"{self.label} = {self.group} ({dataset})"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    metrics: tuple[str, ...]
    columns: tuple[Column, ...]

    def resolve(self, groups: Iterable[str], layouts: Mapping[str, Iterable[str]] | None = None
                ) -> list[ColumnMatch]:
        """For each column, the first of its sources among the evaluated ``groups``.

        A source matches a group of the same name (case aside) whose dataset, where the stores
        record one (``layouts``: group -> layouts), is the source's layout. Names are compared
        whole: "adm" is GenImage's ADM and never DiffusionForensics' ``lsun_bedroom/adm``.
        """
        recorded = {str(g).lower(): tuple(sorted(set(v) - set(_NOT_A_DATASET))) for g, v in (layouts or {}).items()}
        available = {str(g).lower(): str(g) for g in groups}
        found = []
        for column in self.columns:
            match = ColumnMatch(column.label, None, None)
            for source in column.sources:
                key = source.group.lower()
                known = recorded.get(key, ())
                if key in available and (source.layout is None or not known or source.layout in known):
                    match = ColumnMatch(column.label, available[key], source, known)
                    break
            found.append(match)
        return found

    def match(self, groups: Iterable[str], layouts: Mapping[str, Iterable[str]] | None = None
              ) -> list[tuple[str, str | None]]:
        """``(label, group or None)`` per column; see :meth:`resolve`."""
        return [(m.label, m.group) for m in self.resolve(groups, layouts)]

    def with_columns(self, choices: Mapping[str, str]) -> "Suite":
        """A copy in which the columns named in ``choices`` take the one source given
        (``{"Deepfakes": "whichfaceisreal"}``, ``{"ADM": "diffusionforensics:lsun_bedroom/adm"}``).

        Raises:
            ConfigError: a label the suite has no column for, or a malformed source.
        """
        labels = {c.label.lower(): c.label for c in self.columns}
        chosen = {}
        for label, value in choices.items():
            if label.lower() not in labels:
                raise ConfigError(f"suite {self.name} has no column {label!r}; its columns: "
                                  f"{', '.join(c.label for c in self.columns)}")
            chosen[labels[label.lower()]] = Source.parse(value, f"the source of column {label!r}")
        columns = tuple(c._replace(sources=(chosen[c.label],), note=f"chosen: {chosen[c.label]}")
                        if c.label in chosen else c for c in self.columns)
        return dataclasses.replace(self, columns=columns)


def builtin_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITE_DIR.glob("*.toml"))}


def _column(data: Any, where: str) -> Column:
    """One [[columns]] table: ``label`` and ``sources`` (tables with ``group`` and ``layout``), or
    the older ``groups`` (names, any dataset)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("label"), str):
        raise ConfigError(f"{where}: every [[columns]] needs a label")
    label = data["label"]
    if "sources" in data:
        sources = []
        for entry in data["sources"]:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("group"), str) \
                    or not isinstance(entry.get("layout", ""), str):
                raise ConfigError(f"{where}: column {label!r}: each source must be "
                                  f"{{layout = \"...\", group = \"...\"}}, got {entry!r}")
            sources.append(Source(entry["group"], entry.get("layout") or None))
    elif "groups" in data:
        sources = [Source(str(g)) for g in data["groups"]]
    else:
        raise ConfigError(f"{where}: column {label!r} needs sources = [{{layout = ..., group = ...}}, ...]")
    if not sources:
        raise ConfigError(f"{where}: column {label!r} has no source")
    return Column(label, tuple(sources), str(data.get("note", "")))


def load_suite(name_or_path: str | Path, columns: Mapping[str, str] | None = None) -> Suite:
    """A built-in suite (table1, table2, table3) or a TOML file with the same shape.

    ``columns`` chooses other sources for some columns (see :meth:`Suite.with_columns`).
    """
    suites = builtin_suites()
    path = suites.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise UnknownNameError(f"Unknown suite {str(name_or_path)!r}. Known: {', '.join(suites)}; "
                               f"or the path of a TOML file with 'metrics' and [[columns]] label/sources")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
        parsed = tuple(_column(c, f"suite {path}") for c in data["columns"])
        metrics = tuple(data.get("metrics", ["acc", "ap"]))
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"suite {path}: expected 'metrics' and [[columns]] with label and sources ({exc})") from exc
    description = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    suite = Suite(path.stem, description, metrics, parsed)
    return suite.with_columns(columns) if columns else suite


def recorded_layouts(stores: Iterable[FeatureStore]) -> dict[str, list[str]]:
    """Group -> the dataset layouts the stores record it was read with (``config["datasets"]``);
    groups of stores that record none are absent."""
    found: dict[str, set[str]] = {}
    for store in stores:
        for group, layout in (store.config.get("datasets") or {}).items():
            found.setdefault(str(group), set()).add(str(layout))
    return {g: sorted(v) for g, v in sorted(found.items())}


# ---------------------------------------------------------------------------------------------
# Scores

@dataclass
class Scores:
    """Per-image scores of one detector on the evaluated rows."""

    name: str
    path: np.ndarray
    group: np.ndarray
    label: np.ndarray
    p_fake: np.ndarray
    store: np.ndarray

    def __len__(self) -> int:
        return len(self.path)

    def groups(self) -> list[str]:
        return sorted({str(g) for g in self.group})


def sample_rows(store: FeatureStore, max_per_class: int | None, seed: int) -> dict[str, list[str]]:
    """Which rows of a store are evaluated, and under which groups: path -> groups.

    Labelled, error-free rows only. Reals of a folder that generators pair with (the store's
    ``pairing``, e.g. UniFD's laion) count under each of those generators. At most
    ``max_per_class`` real and fake images per group (None: all), drawn with a generator seeded
    afresh for this store.
    """
    from tidy_detect.data.inputs import ImageItem
    from tidy_detect.data.layouts import expand_pairing
    from tidy_detect.data.sampling import sample_per_class

    items = []
    for batch in store.iter_batches(["path", "label", "group", "error"]):
        for path, label, group, error in zip(*(batch.column(i).to_pylist() for i in range(4))):
            if error is None and label is not None:
                items.append(ImageItem(path, label, group))
    items = expand_pairing(items, store.pairing)
    if max_per_class is not None:
        items = sample_per_class(items, max_per_class, seed=seed)
    selection: dict[str, list[str]] = {}
    for item in items:
        selection.setdefault(item.path, []).append(str(item.group))
    return selection


def select(paths: np.ndarray, selection: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices and their evaluation groups (a row repeats once per group it counts under)."""
    index, groups = [], []
    for i, path in enumerate(paths):
        for group in selection.get(path, ()):
            index.append(i)
            groups.append(group)
    return np.asarray(index, dtype=np.int64), np.asarray(groups, dtype=object)


def score_store(head: Any, representation: RepresentationConfig, store: FeatureStore,
                selection: dict[str, list[str]], name: str) -> Scores:
    """Score the selected rows of a store (see :func:`sample_rows`), batch by batch so memory
    stays bounded on large stores."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("path", "group", "label", "p_fake")}
    for arrays in store.iter_arrays(representation, labeled_only=True):
        index, groups = select(arrays.path, selection)
        if not len(index):
            continue
        parts["path"].append(arrays.path[index])
        parts["group"].append(groups)
        parts["label"].append(arrays.label[index])
        parts["p_fake"].append(head.predict_proba(arrays.X[index])[:, 1])
    if not parts["path"]:
        empty = np.zeros(0, dtype=object)
        return Scores(name, empty, empty, np.zeros(0, np.int8), np.zeros(0), empty)
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Scores(name, joined["path"], joined["group"], joined["label"], joined["p_fake"],
                  np.full(len(joined["path"]), store.uri, dtype=object))


def concat_scores(parts: Sequence[Scores], name: str) -> Scores:
    return Scores(name, *(np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0)
                          for f in ("path", "group", "label", "p_fake", "store")))


def import_scores(name: str, csv_path: Path, reference: Scores) -> tuple[Scores, int]:
    """Another detector's per-image scores (CSV with ``path`` and ``score``) on the evaluated rows.

    Paths in the CSV are matched exactly, after making relative ones absolute against the CSV's
    folder. Returns the scores and how many evaluated rows the CSV lacks.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"path", "score"} <= set(reader.fieldnames):
                raise InputError(f"{csv_path}: imported scores need columns 'path' and 'score'; found "
                                 f"{', '.join(reader.fieldnames or []) or '(none)'}")
            table = {}
            for line, row in enumerate(reader, start=2):
                path = Path(row["path"])
                if not path.is_absolute():
                    path = csv_path.parent.absolute() / path
                try:
                    table[str(path)] = float(row["score"])
                except ValueError:
                    raise InputError(f"{csv_path}, line {line}: score must be a number, got {row['score']!r}") from None
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot read imported scores ({exc.strerror or exc})") from exc
    keep = np.array([p in table for p in reference.path], dtype=bool)
    scores = Scores(name, reference.path[keep], reference.group[keep], reference.label[keep],
                    np.array([table[p] for p in reference.path[keep]], dtype=np.float64), reference.store[keep])
    return scores, int((~keep).sum())


# ---------------------------------------------------------------------------------------------
# Metrics per group

def group_metrics(scores: Scores, threshold: float = 0.5, calibrated: float | None = None,
                  bootstrap: int = 0, seed: int = 0) -> dict[str, dict[str, float]]:
    """Metrics of each group (plus ``calibrated`` threshold columns and bootstrap intervals)."""
    table = {}
    for group in scores.groups():
        mask = scores.group == group
        y, p = scores.label[mask], scores.p_fake[mask]
        m = detection_metrics(y, p, threshold)
        m["ece"] = expected_calibration_error(y, p)
        if calibrated is not None:
            cal = detection_metrics(y, p, calibrated)
            m.update(acc_cal=cal["acc"], real_acc_cal=cal["real_acc"], fake_acc_cal=cal["fake_acc"])
        if bootstrap:
            from sklearn.metrics import average_precision_score

            m["ap_ci"] = list(bootstrap_interval(y, p, lambda a, b: average_precision_score(a, b)
                                                 if len(np.unique(a)) == 2 else float("nan"), bootstrap, seed))
            m["acc_ci"] = list(bootstrap_interval(y, p, lambda a, b: float(((b > threshold) == a).mean()),
                                                  bootstrap, seed))
        table[group] = m
    return table


def mean_over_groups(table: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric over the groups where it is defined, with how many groups that was."""
    mean: dict[str, float] = {}
    for metric in MEAN_METRICS:
        values = [m[metric] for m in table.values() if metric in m and np.isfinite(m[metric])]
        if values:
            mean[metric] = float(np.mean(values))
            mean[f"{metric}_groups"] = len(values)
    return mean


@dataclass
class EvalResult:
    scores: list[Scores]
    groups: dict[str, dict[str, dict[str, float]]]  # detector -> group -> metrics
    means: dict[str, dict[str, float]]
    threshold: float
    calibrated_threshold: float | None = None
    suite: Suite | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def aggregate(self, names: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
        """Mean and std across detectors (e.g. heads trained with different seeds), per group."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        groups = sorted({g for n in names for g in self.groups[n]})
        for group in [*groups, "__mean__"]:
            per = [self.means[n] if group == "__mean__" else self.groups[n].get(group, {}) for n in names]
            out[group] = {}
            for metric in MEAN_METRICS:
                values = [m[metric] for m in per if metric in m and np.isfinite(m[metric])]
                if values:
                    out[group][metric] = (float(np.mean(values)), float(np.std(values)))
        return out


def evaluate(head_paths: Sequence[str | Path], store_paths: Sequence[str | Path], *, threshold: float = 0.5,
             calibrate_on: Sequence[str | Path] = (), bootstrap: int = 0, max_per_class: int | None = 1000,
             seed: int = 0, suite: str | None = None, imports: dict[str, Path] | None = None,
             cascade_head: str | Path | None = None, band: tuple[float, float] = (0.2, 0.8),
             columns: Mapping[str, str] | None = None) -> EvalResult:
    """Score stores with one or more heads and compute per-group metrics.

    Args:
        head_paths: head files or hub references (see :func:`tidy_detect.sharing.resolve_head`), of
            either kind: several trained (MLP) heads (e.g. one per training seed) give mean ± std
            over them too; one-class heads (``tidy-detect calibrate``) are reported beside them,
            each with its calibration (target and held-out false-positive rates) in
            ``info["one_class"]`` and in the table's notes, and never enter the mean ± std.
        store_paths: test stores; each store is sampled on its own with ``seed`` reset.
        threshold: ACC threshold on p_fake.
        calibrate_on: validation stores to calibrate an extra threshold on (per head).
        bootstrap: number of bootstrap resamples for 95% intervals (0: none).
        max_per_class: at most this many real and fake images per group and store (None: all).
        suite: ``table1``/``table2``/``table3`` or a suite file, for paper-style tables.
        columns: other sources for some of the suite's columns, label -> ``[LAYOUT:]GROUP``
            (``{"Deepfakes": "whichfaceisreal"}``).
        imports: other detectors' per-image scores, name -> CSV (path, score).
        cascade_head: a global-only head; adds, for every head, the cascade "HEAD+cascade" that
            keeps the global head's score outside ``band`` and the full head's inside it (the fast
            path of ``detect --cascade-head``, simulated on stored features), with the fraction
            of images escalated in ``info["cascade"]``.

    Raises:
        CheckpointError: a head trained on features of other models than a store's.
        StoreError, InputError, UnknownNameError.
    """
    from tidy_detect.detect import check_compatible
    from tidy_detect.head import load_head
    from tidy_detect.sharing import resolve_head

    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1, got {max_per_class!r}")
    stores = [FeatureStore(p) for p in store_paths]
    if not stores:
        raise InputError("no test store given")
    selections = {s.uri: sample_rows(s, max_per_class, seed) for s in stores}
    if columns and not suite:
        raise ConfigError(f"columns {', '.join(columns)} were chosen, but no suite has them; give a suite too")
    suite_obj = load_suite(suite, columns) if suite else None
    result = EvalResult([], {}, {}, threshold, suite=suite_obj)
    names = _unique_names(head_paths)
    references = [str(p) for p in head_paths]
    head_paths = [resolve_head(p) for p in head_paths]  # results name the local files (hub heads: in the cache)
    calibrated_by_head = {}
    cascades: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    one_class: dict[str, Any] = {}
    for name, head_path in zip(names, head_paths):
        head, meta = load_head(head_path)
        kinds[name] = meta["head"].get("kind", "mlp")
        if kinds[name] == "one-class":
            one_class[name] = one_class_summary(meta)
        rep = RepresentationConfig(**meta["representation"])
        parts = []
        for store in stores:
            check_compatible(meta["extraction"], store.extraction, f"head {head_path}")
            parts.append(score_store(head, rep, store, selections[store.uri], name))
        scores = concat_scores(parts, name)
        calibrated = None
        if calibrate_on:
            val_parts = []
            for val_path in calibrate_on:
                val_store = FeatureStore(val_path)
                check_compatible(meta["extraction"], val_store.extraction, f"head {head_path}")
                val_parts.append(score_store(head, rep, val_store, sample_rows(val_store, None, seed), name))
            val = concat_scores(val_parts, name)
            calibrated = calibrate_threshold(val.label, val.p_fake)
            calibrated_by_head[name] = calibrated
        result.scores.append(scores)
        result.groups[name] = group_metrics(scores, threshold, calibrated, bootstrap, seed)
        result.means[name] = mean_over_groups(result.groups[name])
        if cascade_head is not None:
            combined, escalated = _cascade_scores(scores, cascade_head, meta, stores, selections, band, name)
            result.scores.append(combined)
            result.groups[combined.name] = group_metrics(combined, threshold, None, bootstrap, seed)
            result.means[combined.name] = mean_over_groups(result.groups[combined.name])
            cascades[combined.name] = {"global_head": str(cascade_head), "band": list(band),
                                       "fraction_escalated": escalated}
    missing_imports = {}
    for name, csv_path in (imports or {}).items():
        scores, missing = import_scores(name, Path(csv_path), result.scores[0])
        missing_imports[name] = missing
        if missing:
            log.warning("%s: %d evaluated images have no score in %s; they are left out of its metrics",
                        name, missing, csv_path)
        result.scores.append(scores)
        result.groups[name] = group_metrics(scores, threshold, None, bootstrap, seed)
        result.means[name] = mean_over_groups(result.groups[name])
    if calibrated_by_head:
        result.calibrated_threshold = float(np.mean(list(calibrated_by_head.values())))
    result.info = {
        "heads": [str(p) for p in head_paths], "head_names": names, "head_references": references,
        "head_kinds": kinds, "one_class": one_class, "stores": [s.uri for s in stores],
        "threshold": threshold, "calibrated_thresholds": calibrated_by_head,
        "calibrate_on": [str(p) for p in calibrate_on], "bootstrap": bootstrap,
        "sampling": {"max_per_class": max_per_class, "seed": seed, "seed_reset": "per store",
                     "rows": {s.uri: int((result.scores[0].store == s.uri).sum()) for s in stores}},
        "perturbations": {s.uri: s.config.get("perturbation") for s in stores},
        "imports": {k: str(v) for k, v in (imports or {}).items()}, "imports_missing_rows": missing_imports,
        "suite": suite_obj.name if suite_obj else None, "cascade": cascades,
        "datasets": recorded_layouts(stores),
    }
    if suite_obj is not None:
        all_groups = sorted({g for table in result.groups.values() for g in table})
        result.info["suite_columns"] = {
            m.label: {"group": m.group, "source": str(m.source) if m.source else None, "datasets": list(m.layouts)}
            for m in suite_obj.resolve(all_groups, result.info["datasets"])}
        result.info["suite_choices"] = dict(columns or {})
    return result


def _cascade_scores(full: Scores, cascade_head: str | Path, meta: dict[str, Any], stores: Sequence[FeatureStore],
                    selections: dict[str, dict[str, list[str]]], band: tuple[float, float], name: str
                    ) -> tuple[Scores, float]:
    """The cascade's scores on the same rows as ``full``, and the fraction it escalates."""
    from tidy_detect.detect import check_compatible
    from tidy_detect.head import load_head

    head, cascade_meta = load_head(cascade_head)
    rep = RepresentationConfig(**cascade_meta["representation"])
    if rep.kind not in ("global", "image", "text"):
        raise ConfigError(f"the cascade head {cascade_head} uses the {rep.kind!r} representation; it must use one "
                          f"without objects (global, image or text)")
    check_compatible(meta["extraction"], cascade_meta["extraction"], f"cascade head {cascade_head}")
    quick = concat_scores([score_store(head, rep, s, selections[s.uri], name) for s in stores], name)
    lo, hi = band
    uncertain = (quick.p_fake >= lo) & (quick.p_fake <= hi)
    combined = Scores(f"{name}+cascade", full.path, full.group, full.label,
                      np.where(uncertain, full.p_fake, quick.p_fake), full.store)
    return combined, float(uncertain.mean()) if len(uncertain) else 0.0


def one_class_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What a one-class head's metadata says of its calibration, for results and reports."""
    head, training = meta["head"], meta.get("training") or {}
    return {"representation": (meta.get("representation") or {}).get("kind"), "fpr_target": head["fpr"],
            "threshold": head["threshold"], "calibration_rows": head["calibration_rows"],
            "real_only": training.get("real_only"),
            "held_out": (meta.get("metrics") or {}).get("held_out"),
            "stores": [Path(str(s)).name for s in (training.get("data") or {}).get("stores", [])]}


def one_class_note(name: str, summary: dict[str, Any]) -> str:
    """One line on a one-class head: what it is and the false-positive rate it was calibrated for."""
    held = summary.get("held_out") or {}
    measured = ""
    if held.get("fpr") is not None:
        ci = held.get("fpr_ci") or [None, None]
        measured = (f"; held-out FPR {held['fpr']:.2%} on {held.get('n')} real images"
                    + (f" (95% {ci[0]:.2%}-{ci[1]:.2%})" if None not in ci else ""))
    return (f"{name} is a one-class head (no fake image seen): the {summary.get('representation')} image-caption "
            f"discrepancy, thresholded at a {summary['fpr_target']:.2%} false-positive rate on "
            f"{summary['calibration_rows']} real images{measured}")


def trained_heads(result: "EvalResult") -> list[str]:
    """The detectors that are trained (MLP) heads: those mean ± std is taken over."""
    kinds = result.info.get("head_kinds") or {}
    return [n for n in result.info.get("head_names", []) if kinds.get(n, "mlp") == "mlp"]


def _unique_names(paths: Sequence[str | Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        base = Path(p).stem
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# ---------------------------------------------------------------------------------------------
# Writing results

def _fmt(value: Any, scale: float = 100.0) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value * scale:.2f}"


def paper_table(result: EvalResult, metric: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and notes of a paper-style table: detectors as rows, generators as columns.

    Missing generators show as "missing", never as zero; the average is over the present ones.
    """
    all_groups = sorted({g for table in result.groups.values() for g in table})
    if result.suite is not None:
        matches = result.suite.resolve(all_groups, result.info.get("datasets"))
        columns = [(m.label, m.group) for m in matches]
    else:
        columns = [(g, g) for g in all_groups]
    header = ["detector", *[label for label, _ in columns], "Avg."]
    notes = []
    if result.suite is not None:
        # Every column names the group and dataset behind it: a column filled from another
        # dataset than the paper's would otherwise look like the paper's number.
        notes.append("columns from: " + "; ".join(m.describe() for m in matches if m.group is not None))
        chosen = [f"{c.label} ({c.note})" for c in result.suite.columns if c.note.startswith("chosen:")]
        if chosen:
            notes.append("columns given another source than the suite's: " + "; ".join(chosen))
        mixed = [f"{m.group} ({', '.join(m.layouts)})" for m in matches if len(m.layouts) > 1]
        if mixed:
            notes.append("groups holding images of several datasets under one name (evaluate them apart): "
                         + "; ".join(mixed))
        extra = sorted(set(all_groups) - {g for _, g in columns if g})
        if extra:
            notes.append("groups evaluated but not in this suite: " + ", ".join(extra))
    rows = []
    detector_names = list(result.groups)
    heads = trained_heads(result)
    for name in detector_names:
        table = result.groups[name]
        values = [table.get(g, {}).get(metric) if g else None for _, g in columns]
        present = [v for v in values if v is not None and np.isfinite(v)]
        cells = ["missing" if g is None else _fmt(v) for (_, g), v in zip(columns, values)]
        avg = _fmt(float(np.mean(present))) if present else "–"
        if len(present) < len(values):
            avg += f" ({len(present)}/{len(values)})"
        rows.append([name, *cells, avg])
    if len(heads) > 1:
        agg = result.aggregate(heads)
        cells = []
        present = []
        for _, g in columns:
            stat = agg.get(g, {}).get(metric) if g else None
            cells.append("missing" if g is None else ("–" if stat is None else f"{stat[0] * 100:.2f} ± {stat[1] * 100:.2f}"))
        per_head_avgs = []
        for name in heads:
            vals = [result.groups[name].get(g, {}).get(metric) for _, g in columns if g]
            vals = [v for v in vals if v is not None and np.isfinite(v)]
            if vals:
                per_head_avgs.append(np.mean(vals))
        avg = f"{np.mean(per_head_avgs) * 100:.2f} ± {np.std(per_head_avgs) * 100:.2f}" if per_head_avgs else "–"
        rows.append([f"mean ± std ({len(heads)} heads)", *cells, avg])
    return header, rows, notes


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(result: EvalResult, out: str | Path) -> dict[str, Path]:
    """metrics.json, metrics.csv, table.md, scores.csv (the exact evaluated list); returns paths."""
    from tidy_detect.head import json_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    payload = {"kind": "evaluation", "info": result.info, "threshold": result.threshold,
               "calibrated_threshold": result.calibrated_threshold, "groups": result.groups, "mean": result.means}
    heads = trained_heads(result)
    if len(heads) > 1:
        payload["across_heads"] = {g: {m: {"mean": v[0], "std": v[1]} for m, v in stats.items()}
                                   for g, stats in result.aggregate(heads).items()}
    files["metrics.json"] = out / "metrics.json"
    files["metrics.json"].write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    files["metrics.csv"] = out / "metrics.csv"
    columns = ["detector", "group", "n_real", "n_fake", "acc", "real_acc", "fake_acc", "ap", "auc", "ece",
               "acc_cal", "real_acc_cal", "fake_acc_cal", "ap_ci", "acc_ci"]
    with files["metrics.csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for name, table in result.groups.items():
            for group, m in [*table.items(), ("mean", result.means[name])]:
                writer.writerow([name, group, *[_csv_cell(m.get(c)) for c in columns[2:]]])

    metrics = result.suite.metrics if result.suite else ("acc", "ap")
    sections = [f"# Evaluation{f' ({result.suite.name}: {result.suite.description})' if result.suite else ''}",
                f"Stores: {', '.join(result.info['stores'])}  ",
                f"Sampling: at most {result.info['sampling']['max_per_class']} images per class and group, "
                f"seed {result.info['sampling']['seed']} (reset per store). Threshold {result.threshold}."]
    for metric in metrics:
        header, rows, notes = paper_table(result, metric)
        sections += [f"\n## {metric.upper().replace('_', ' ')} (%)\n", markdown_table(header, rows)]
        sections += [f"\n_{note}_" for note in notes]
    for name, summary in (result.info.get("one_class") or {}).items():
        sections.append(f"\n{one_class_note(name, summary)}.")
    sections.append("\n## Per group\n")
    detail_header = ["detector", "group", "real", "fake", "ACC", "real ACC", "fake ACC", "AP", "AUC", "ECE"]
    if result.calibrated_threshold is not None:
        detail_header += ["ACC (cal.)", "real ACC (cal.)", "fake ACC (cal.)"]
    detail = []
    for name, table in result.groups.items():
        for group, m in [*table.items(), ("mean", result.means[name])]:
            row = [name, group, str(m.get("n_real", "")), str(m.get("n_fake", "")),
                   *[_fmt(m.get(k)) for k in ("acc", "real_acc", "fake_acc", "ap", "auc")], _fmt(m.get("ece"), 1.0)]
            if result.calibrated_threshold is not None:
                row += [_fmt(m.get(k)) for k in ("acc_cal", "real_acc_cal", "fake_acc_cal")]
            detail.append(row)
    sections.append(markdown_table(detail_header, detail))
    for name, info in result.info.get("cascade", {}).items():
        sections.append(f"\n{name}: the global head {info['global_head']} decides outside the band "
                        f"{info['band'][0]:g}-{info['band'][1]:g}; {info['fraction_escalated']:.1%} of the images "
                        f"were escalated to the full head.")
    if result.calibrated_threshold is not None:
        sections.append(f"\nCalibrated thresholds (on {', '.join(result.info['calibrate_on'])}): "
                        f"{result.info['calibrated_thresholds']}")
    files["table.md"] = out / "table.md"
    files["table.md"].write_text("\n".join(sections) + "\n", encoding="utf-8")

    files["scores.csv"] = out / "scores.csv"
    with files["scores.csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["detector", "path", "label", "group", "store", "p_fake"])
        for scores in result.scores:
            for row in zip(scores.path, scores.label, scores.group, scores.store, scores.p_fake):
                writer.writerow([scores.name, row[0], int(row[1]), row[2], row[3], f"{row[4]:.6f}"])
    return files


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(_csv_cell(v) for v in value)
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.6f}"
    return str(value)


def write_plots(result: EvalResult, out: str | Path, *, tsne_points: int = 1500, seed: int = 0) -> dict[str, Path]:
    """pr.png and roc.png per detector, cosine.png (Fig. 1b) and tsne.png (Fig. 9) of the evaluated rows."""
    from tidy_detect.evaluate import plots
    from tidy_detect.head import read_metadata

    out = Path(out)
    files: dict[str, Path] = {}
    for scores in result.scores:
        folder = out if len(result.scores) == 1 else out / scores.name
        pr, roc = plots.pr_roc_curves(scores.groups(), scores.label, scores.p_fake, scores.group, folder,
                                      title=f"({scores.name})")
        files[f"pr:{scores.name}"], files[f"roc:{scores.name}"] = pr, roc
    first_head = result.info["heads"][0]
    meta = read_metadata(first_head)
    rep = RepresentationConfig(**meta["representation"])
    first = result.scores[0]
    xs, sims, labels, groups = [], [], [], []
    for store_path in result.info["stores"]:
        store = FeatureStore(store_path)
        selection: dict[str, list[str]] = {}
        for path, group in zip(first.path[first.store == store_path], first.group[first.store == store_path]):
            selection.setdefault(path, []).append(group)
        image = RepresentationConfig("image", normalize=True)
        text = RepresentationConfig("text", normalize=True)
        for a_rep, a_img, a_txt in zip(store.iter_arrays(rep, labeled_only=True),
                                       store.iter_arrays(image, labeled_only=True),
                                       store.iter_arrays(text, labeled_only=True)):
            index, row_groups = select(a_rep.path, selection)
            xs.append(a_rep.X[index])
            sims.append(np.sum(a_img.X[index] * a_txt.X[index], axis=1))
            labels.append(a_rep.label[index])
            groups.append(row_groups.astype(str))
    if xs:
        X, sim, y, g = (np.concatenate(v) for v in (xs, sims, labels, groups))
        files["cosine"] = plots.cosine_histogram(sim, y, out / "cosine.png")
        files["tsne"] = plots.tsne_plot(X, y, g, out / "tsne.png", max_points=tsne_points, seed=seed,
                                        title=f"t-SNE of the '{rep.kind}' representation")
    return files
