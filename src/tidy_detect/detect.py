"""Detection: a trained head plus the extractor it was trained with, and per-image explanations.

``Detector.load(head)`` rebuilds the extractor from the extraction config stored in the head.
Model sources may be overridden (a local copy of the same checkpoint, say); after loading, the
models' fingerprint must match the head's, so features from other models are an error rather
than a silently wrong score.

A detection record (the same for the CLI, the Python API and the web service)::

    {"path", "sha256", "width", "height", "p_fake", "label": "fake"|"real", "caption",
     "objects": [{"phrase", "box": [x0, y0, x1, y1], "box_score", "discrepancy"}],
     "global_discrepancy", "error", "stage": "full"|"global", "random_weights": true|false}

``stage`` says which head gave ``p_fake``: "global" when the cascade's global-only head was sure
enough to skip the objects (then ``objects`` is empty), else "full".

``random_weights`` is true when any model behind the verdict has random weights (the tiny bundle of
``tidy-detect models make-tiny``, or a benchmark's in-memory model): the score then means nothing,
and whatever shows the record should say so. It comes from the models' own ``describe()``
(``random_weights``, from the mark in their config), as loaded now or as recorded in the head.

``discrepancy`` is 1 - cos(I_i, T_i) for an object and 1 - cos(I0, T0) for the whole image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from tidy_detect.config import (MODEL_KINDS, ExtractionConfig, FeatureConfig, ModelConfig, RepresentationConfig,
                                RuntimeConfig)
from tidy_detect.data.inputs import ImageItem
from tidy_detect.errors import CheckpointError, ConfigError, ImageError
from tidy_detect.features import discrepancy
from tidy_detect.features.extractor import ExtractionSummary, Extractor, iter_decoded, rows_for_batch
from tidy_detect.features.store import DTYPE_HINT, extraction_mismatches
from tidy_detect.head import DiscrepancyHead
from tidy_detect.images import LoadedImage, load_image

MODEL_OVERRIDES = ("clip", "captioner", "captioner_model", "grounder", "grounder_model")


def config_from_extraction(extraction: dict[str, Any], runtime: RuntimeConfig | None = None,
                           **model_overrides: str | None) -> ExtractionConfig:
    """The ExtractionConfig that reproduces a recorded extraction (a store's or a head's)."""
    clip, cap, grd, phr = (extraction.get(k, {}) for k in ("clip", "captioner", "grounder", "phrases"))
    models = ModelConfig(clip=clip["source"], captioner=cap["name"], captioner_model=cap.get("source"),
                         grounder=grd["name"], grounder_model=grd.get("source"))
    unknown = set(model_overrides) - set(MODEL_OVERRIDES)
    if unknown:
        raise ConfigError(f"unknown model override {sorted(unknown)[0]!r}; known: {', '.join(MODEL_OVERRIDES)}")
    changes = {k: v for k, v in model_overrides.items() if v is not None}
    if changes:
        models = dataclasses.replace(models, **changes)
    defaults = FeatureConfig()
    features = FeatureConfig(
        global_view=clip.get("global_view", defaults.global_view), view_size=clip.get("view_size"),
        caption_prompt=cap.get("prompt"), caption_max_tokens=cap.get("max_tokens", defaults.caption_max_tokens),
        caption_num_beams=cap.get("num_beams", defaults.caption_num_beams),
        max_objects=phr.get("max_objects", defaults.max_objects),
        box_threshold=grd.get("box_threshold"), text_threshold=grd.get("text_threshold"),
        phrase_stoplist=tuple(phr.get("stoplist", defaults.phrase_stoplist)),
        # A grounder recorded without these grounded by the rule of that time: best token
        # probability, no minimum box size.
        grounding_rule=grd.get("grounding_rule", "token-max"), min_box_size=grd.get("min_box_size", 0),
    )
    return ExtractionConfig(models, features, runtime or RuntimeConfig())


def recorded_dtypes(extraction: dict[str, Any], dtype: str = "auto") -> dict[str, str | None]:
    """Per-model dtype fields of a RuntimeConfig that reproduce a recorded extraction's precision.

    With ``dtype="auto"`` each model runs in the dtype recorded for it (unrecorded: the automatic
    choice); an explicit ``dtype`` applies to every model.
    """
    if dtype != "auto":
        return {f"{kind}_dtype": None for kind in MODEL_KINDS}
    return {f"{kind}_dtype": (extraction.get(kind) or {}).get("dtype") or "auto" for kind in MODEL_KINDS}


def check_compatible(expected: dict[str, Any], actual: dict[str, Any], what: str, accept_dtype: bool = False) -> None:
    """Raise CheckpointError when two extraction configs would give different features (a model's
    dtype included, unless ``accept_dtype``; see :func:`tidy_detect.features.store.extraction_mismatches`)."""
    diffs = extraction_mismatches(expected, actual, accept_dtype=accept_dtype)
    if diffs:
        hint = f" ({DTYPE_HINT})" if any(".dtype:" in d for d in diffs) else ""
        raise CheckpointError(
            f"{what} was trained on features from other models or settings than these: "
            f"{'; '.join(d.replace('store has', 'head has') for d in diffs[:5])}{hint}. "
            f"Override a model only with a copy of the same checkpoint (e.g. a local folder)."
        )


def _object_records(row: dict[str, Any]) -> list[dict[str, Any]]:
    local_i = np.asarray(row.get("local_images") if row.get("local_images") is not None else [], np.float32)
    local_t = np.asarray(row.get("local_texts") if row.get("local_texts") is not None else [], np.float32)
    scores = discrepancy.cosine_discrepancy(local_i, local_t) if len(local_i) else []
    return [{"phrase": phrase, "box": [round(float(v), 2) for v in box], "box_score": round(float(bs), 4),
             "discrepancy": round(float(d), 4)}
            for phrase, box, bs, d in zip(row["object_phrases"], row["boxes"], row["box_scores"], scores)]


def random_weight_models(*extractions: dict[str, Any]) -> list[str]:
    """The model roles ("clip", "captioner", "grounder") that any of the extraction configs records
    as random-weight (``random_weights: true`` in its ``describe()``), in that order."""
    return [kind for kind in MODEL_KINDS
            if any(((ex or {}).get(kind) or {}).get("random_weights") is True for ex in extractions)]


def _rep(metadata: dict[str, Any]) -> RepresentationConfig:
    rep = metadata["representation"]
    return RepresentationConfig(rep["kind"], rep["w1"], rep["w2"], rep["normalize"])


def _stack(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    gi = np.stack([np.asarray(r["global_image"], np.float32) for r in rows])
    gt = np.stack([np.asarray(r["global_text"], np.float32) for r in rows])
    dim = gi.shape[1]
    li = [np.asarray(r["local_images"], np.float32).reshape(-1, dim) for r in rows]
    lt = [np.asarray(r["local_texts"], np.float32).reshape(-1, dim) for r in rows]
    return gi, gt, li, lt


@dataclass
class Cascade:
    """The fast path: a global-only head scores every image; only images whose score falls in
    ``band`` (the uncertain ones) get grounding, local features and the full head."""

    head: DiscrepancyHead
    metadata: dict[str, Any]
    band: tuple[float, float] = (0.2, 0.8)
    images: int = 0
    escalated: int = 0

    @property
    def fraction_escalated(self) -> float:
        return self.escalated / self.images if self.images else 0.0


class Detector:
    """A head with its extractor. Build with :meth:`load`; call :meth:`predict`."""

    def __init__(self, head: DiscrepancyHead, metadata: dict[str, Any], extractor: Extractor,
                 threshold: float = 0.5, cascade: Cascade | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
        self.head = head
        self.metadata = metadata
        self.extractor = extractor
        self.threshold = threshold
        self.representation = _rep(metadata)
        self.cascade = cascade
        # What the head recorded and what runs now: a head trained before the mark was recorded
        # still learns it from the models loaded today.
        self.random_weight_models = random_weight_models(metadata.get("extraction") or {}, extractor.extraction)
        if cascade is not None:
            lo, hi = cascade.band
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"cascade band must satisfy 0 <= low <= high <= 1, got {cascade.band}")
            if _rep(cascade.metadata).kind not in ("global", "image", "text"):
                raise ConfigError(f"the cascade's first head must use a representation without objects "
                                  f"(global, image or text), got {_rep(cascade.metadata).kind!r}; train one with "
                                  f"`tidy-detect train STORE --representation global`")
            check_compatible(metadata["extraction"], cascade.metadata["extraction"], "the cascade's global head")

    @classmethod
    def load(cls, head_path: str | Path, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
             num_workers: int = 2, threshold: float = 0.5, compile: bool = False,
             cascade_head: str | Path | None = None, band: tuple[float, float] = (0.2, 0.8),
             accept_dtype: bool = False, speedups: bool = True, **model_overrides: str | None) -> "Detector":
        """Load a head and the models it was trained with.

        Args:
            head_path: the ``.safetensors`` checkpoint written by ``tidy-detect train``.
            device, batch_size, num_workers, compile: runtime choices (any value is compatible).
            speedups: run tidy-detect's CPU speed-ups of the models (same results; false runs
                transformers' own code, as does ``TIDY_DETECT_SPEEDUPS=off``).
            dtype: ``auto`` runs each model in the precision the head's features were made in (as
                recorded in the head); any other value runs every model in it, which gives other
                features than the head knows unless they were made so: refused unless ``accept_dtype``.
            cascade_head: a global-only head (same stores' config) for the cascade fast path;
                images it scores outside ``band`` skip grounding and the full head.
            model_overrides: ``clip``, ``captioner``, ``captioner_model``, ``grounder``, ``grounder_model``
                to load the same checkpoints from elsewhere (e.g. a local folder).

        Raises:
            CheckpointError: unreadable head, or overridden models that give other features.
            ModelLoadError: models that cannot be found.
        """
        head, metadata = DiscrepancyHead.load(head_path)
        cascade = Cascade(*DiscrepancyHead.load(cascade_head), band=band) if cascade_head else None
        runtime = RuntimeConfig(device=device, dtype=dtype, batch_size=batch_size, num_workers=num_workers,
                                compile=compile, speedups=speedups,
                                **recorded_dtypes(metadata["extraction"], dtype))
        config = config_from_extraction(metadata["extraction"], runtime, **model_overrides)
        extractor = Extractor(config).load()
        check_compatible(metadata["extraction"], extractor.extraction, f"head {head_path}", accept_dtype)
        return cls(head, metadata, extractor, threshold, cascade)

    def info(self) -> dict[str, Any]:
        """What the head is and was trained on (for `--format json` headers and the web API)."""
        meta = self.metadata
        ex = meta["extraction"]
        info = {"representation": meta["representation"], "threshold": self.threshold,
                "models": {"clip": ex["clip"].get("source"), "captioner": ex["captioner"].get("name"),
                           "captioner_model": ex["captioner"].get("source"), "grounder": ex["grounder"].get("name"),
                           "grounder_model": ex["grounder"].get("source")},
                "device": self.extractor.device, "dtype": self.extractor.dtype, "head": meta["head"],
                "training": meta.get("training", {}), "metrics": meta.get("metrics", {}),
                "package_version": meta.get("package_version"),
                "random_weights": bool(self.random_weight_models),
                "random_weight_models": list(self.random_weight_models)}
        if self.cascade is not None:
            info["cascade"] = {"band": list(self.cascade.band), "images": self.cascade.images,
                               "escalated": self.cascade.escalated,
                               "fraction_escalated": round(self.cascade.fraction_escalated, 4)}
        return info

    # -- scoring -----------------------------------------------------------------------------

    def score_rows(self, rows: Sequence[dict[str, Any]], stages: Sequence[str] | None = None,
                   p_override: dict[int, float] | None = None) -> list[dict[str, Any]]:
        """Detection records for store rows (from the extractor or read back from a store).

        ``p_override`` gives scores already decided (the cascade's global head), by row index;
        ``stages`` says which head scored each row ("full" or "global").
        """
        p_override = p_override or {}
        ok = [i for i, r in enumerate(rows) if r.get("error") is None]
        p_fake = np.zeros(len(rows))
        global_disc = np.zeros(len(rows))
        if ok:
            gi, gt, li, lt = _stack([rows[i] for i in ok])
            global_disc[ok] = discrepancy.cosine_discrepancy(gi, gt)
            full = [k for k, i in enumerate(ok) if i not in p_override]
            if full:
                X = discrepancy.representation(self.representation, gi[full], gt[full], [li[k] for k in full],
                                               [lt[k] for k in full])
                p_fake[[ok[k] for k in full]] = self.head.predict_proba(X)[:, 1]
            for i, p in p_override.items():
                p_fake[i] = p
        records = []
        for i, row in enumerate(rows):
            record = {"path": row["path"], "sha256": row.get("sha256"), "width": row.get("width"),
                      "height": row.get("height")}
            if row.get("error") is not None:
                record.update(p_fake=None, label=None, caption=None, objects=[], global_discrepancy=None,
                              error=row["error"], stage=None)
            else:
                record.update(p_fake=round(float(p_fake[i]), 6),
                              label="fake" if p_fake[i] > self.threshold else "real", caption=row["caption"],
                              objects=_object_records(row), global_discrepancy=round(float(global_disc[i]), 4),
                              error=None, stage=stages[i] if stages else "full")
            record["random_weights"] = bool(self.random_weight_models)
            records.append(record)
        return records

    def score_batch(self, batch: Sequence[tuple[ImageItem, Any, float]],
                    summary: ExtractionSummary | None = None) -> list[dict[str, Any]]:
        """Records for one decoded batch (see :func:`tidy_detect.features.extractor.iter_decoded`), in order."""
        summary = summary if summary is not None else ExtractionSummary(total=len(batch))
        if self.cascade is None:
            return self.score_rows(rows_for_batch(self.extractor, batch, summary))
        rows = rows_for_batch(self.extractor, batch, summary, local=False)
        ok = [i for i, r in enumerate(rows) if r.get("error") is None]
        stages = ["global"] * len(rows)
        decided: dict[int, float] = {}
        if ok:
            gi, gt, li, lt = _stack([rows[i] for i in ok])
            X = discrepancy.representation(_rep(self.cascade.metadata), gi, gt, li, lt)
            p_global = self.cascade.head.predict_proba(X)[:, 1]
            lo, hi = self.cascade.band
            uncertain = [i for i, p in zip(ok, p_global) if lo <= p <= hi]
            decided = {i: float(p) for i, p in zip(ok, p_global) if not lo <= p <= hi}
            self.cascade.images += len(ok)
            self.cascade.escalated += len(uncertain)
            if uncertain:
                self.extractor.add_local([rows[i] for i in uncertain], [batch[i][1] for i in uncertain])
                for i in uncertain:
                    stages[i] = "full"
        return self.score_rows(rows, stages, decided)

    def detect_items(self, items: Sequence[ImageItem], summary: ExtractionSummary | None = None
                     ) -> Iterator[list[dict[str, Any]]]:
        """Records for image items (paths on disk), batch by batch, in order."""
        for batch in iter_decoded(items, self.extractor):
            yield self.score_batch(batch, summary)

    def predict(self, images: Iterable[str | Path | bytes | Image.Image],
                captions: Sequence[str | None] | None = None, names: Sequence[str] | None = None
                ) -> list[dict[str, Any]]:
        """Detection records for images given as paths, bytes or PIL images, in order.

        Args:
            images: what to score; a bad image gives a record with ``error`` set, not an exception.
            captions: captions to use with the ``provided`` captioner (one per image).
            names: how to call in-memory images in records and messages (default ``<image N>``).
        """
        images = list(images)
        captions = list(captions) if captions is not None else [None] * len(images)
        if len(captions) != len(images):
            raise ConfigError(f"got {len(captions)} captions for {len(images)} images")
        entries: list[tuple[str, LoadedImage | ImageError]] = []
        max_pixels = self.extractor.config.runtime.max_pixels
        for k, source in enumerate(images):
            if isinstance(source, (str, Path)):
                name = str(Path(source).absolute())
            else:
                name = names[k] if names is not None else f"<image {k}>"
            try:
                loaded: LoadedImage | ImageError = load_image(source, max_pixels=max_pixels, name=name)
            except ImageError as exc:
                loaded = exc
            entries.append((name, loaded))
        return self.predict_loaded(entries, captions)

    def predict_loaded(self, entries: Sequence[tuple[str, LoadedImage | ImageError]],
                       captions: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """Detection records for images already decoded (by :func:`tidy_detect.images.load_image`), in order.

        Args:
            entries: ``(name, image)`` pairs; ``image`` is a :class:`LoadedImage` (possibly reduced
                by :func:`tidy_detect.images.reduce_for_models`) or the ``ImageError`` its decoding
                raised, which becomes a record with ``error`` set.
            captions: captions to use with the ``provided`` captioner (one per entry).
        """
        captions = list(captions) if captions is not None else [None] * len(entries)
        if len(captions) != len(entries):
            raise ConfigError(f"got {len(captions)} captions for {len(entries)} images")
        decoded = [(ImageItem(name, caption=caption), loaded, 0.0)
                   for (name, loaded), caption in zip(entries, captions)]
        records = []
        summary = ExtractionSummary(total=len(decoded))
        batch_size = self.extractor.config.runtime.batch_size
        for start in range(0, len(decoded), batch_size):
            records.extend(self.score_batch(decoded[start:start + batch_size], summary))
        return records


def top_object(record: dict[str, Any]) -> dict[str, Any] | None:
    """The object whose crop disagrees most with its phrase (the most telling one)."""
    objects = record.get("objects") or []
    return max(objects, key=lambda o: o["discrepancy"]) if objects else None
