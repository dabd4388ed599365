"""Detection: a trained head plus the extractor it was trained with, and per-image explanations.

``Detector.load(head)`` rebuilds the extractor from the extraction config stored in the head.
Model sources may be overridden (a local copy of the same checkpoint, say); after loading, the
models' fingerprint must match the head's, so features from other models are an error rather
than a silently wrong score.

A detection record (the same for the CLI, the Python API and the web service)::

    {"path", "sha256", "width", "height", "p_fake", "label": "fake"|"real", "caption",
     "objects": [{"phrase", "box": [x0, y0, x1, y1], "box_score", "discrepancy"}],
     "global_discrepancy", "error", "stage": "full"|"global", "random_weights": true|false,
     "provenance": {...}}

``stage`` says which head gave ``p_fake``: "global" when the cascade's global-only head was sure
enough to skip the objects (then ``objects`` is empty), else "full".

``random_weights`` is true when any model behind the verdict has random weights (the tiny bundle of
``tidy-detect models make-tiny``, or a benchmark's in-memory model): the score then means nothing,
and whatever shows the record should say so. It comes from the models' own ``describe()``
(``random_weights``, from the mark in their config), as loaded now or as recorded in the head.

``discrepancy`` is 1 - cos(I_i, T_i) for an object and 1 - cos(I0, T0) for the whole image.

``provenance`` is what the image file itself declares about how it was made (C2PA Content
Credentials, IPTC/XMP digital source type, generator text chunks, EXIF, the Stable Diffusion
watermark; see :mod:`tidy_detect.provenance` and docs/provenance.md). It is read from the file's
bytes beside the models and never enters ``p_fake`` or ``label``; records made without the file
(from a store, from decoded images, from in-memory PIL images) say it was not read.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from tidy_detect.config import (MODEL_KINDS, ExtractionConfig, FeatureConfig, ModelConfig, RepresentationConfig,
                                RuntimeConfig)
from tidy_detect.data import sources
from tidy_detect.data.inputs import ImageItem
from tidy_detect.errors import CheckpointError, ConfigError, ImageError
from tidy_detect.features import discrepancy
from tidy_detect.features.extractor import ExtractionSummary, Extractor, iter_decoded, rows_for_batch
from tidy_detect.features.store import DTYPE_HINT, FeatureStore, extraction_mismatches
from tidy_detect.head import DiscrepancyHead, OneClassHead, load_head
from tidy_detect.images import LoadedImage, load_image
from tidy_detect.provenance import ProvenanceOptions, not_read, read_provenance
from tidy_detect.provenance.content_credentials import unavailable as c2pa_unavailable
from tidy_detect.provenance.watermark import unavailable as watermark_unavailable

MODEL_OVERRIDES = ("clip", "captioner", "captioner_model", "grounder", "grounder_model")
NOT_FROM_FILES = "these records were scored without the image files (from stored features)"
NOT_FROM_BYTES = ("predict_loaded takes decoded images, not files; pass provenance= (records from "
                  "tidy_detect.provenance.read_provenance) to include it")


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

    head: DiscrepancyHead | OneClassHead
    metadata: dict[str, Any]
    band: tuple[float, float] = (0.2, 0.8)
    images: int = 0
    escalated: int = 0

    @property
    def fraction_escalated(self) -> float:
        return self.escalated / self.images if self.images else 0.0


class Detector:
    """A head with its extractor. Build with :meth:`load`; call :meth:`predict`."""

    def __init__(self, head: DiscrepancyHead | OneClassHead, metadata: dict[str, Any], extractor: Extractor,
                 threshold: float = 0.5, cascade: Cascade | None = None,
                 provenance: ProvenanceOptions | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
        self.head = head
        self.metadata = metadata
        self.extractor = extractor
        self.threshold = threshold
        self.representation = _rep(metadata)
        self.cascade = cascade
        # Evidence read beside the score (never an input to it); the environment's choice by default.
        self.provenance = provenance if provenance is not None else ProvenanceOptions.from_env()
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
             accept_dtype: bool = False, speedups: bool = True, provenance: ProvenanceOptions | None = None,
             **model_overrides: str | None) -> "Detector":
        """Load a head and the models it was trained with.

        Args:
            head_path: a head file of ``tidy-detect train`` or ``tidy-detect calibrate`` (one-class), or
                a Hugging Face hub reference ``ORG/REPO[@REV][/FILE.safetensors]`` (see
                :func:`tidy_detect.sharing.resolve_head`; a local path of that name wins).
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
            provenance: which provenance checks run on every image's file (default:
                :meth:`ProvenanceOptions.from_env`, every check unless ``TIDY_DETECT_PROVENANCE``
                says otherwise); they never change a score.

        Raises:
            CheckpointError: unreadable head, or overridden models that give other features.
            ModelLoadError: models that cannot be found.
            ConfigError: a bad provenance choice in the environment (mode or trust anchors).
        """
        head, metadata = load_head(head_path)
        cascade = Cascade(*load_head(cascade_head), band=band) if cascade_head else None
        runtime = RuntimeConfig(device=device, dtype=dtype, batch_size=batch_size, num_workers=num_workers,
                                compile=compile, speedups=speedups,
                                **recorded_dtypes(metadata["extraction"], dtype))
        config = config_from_extraction(metadata["extraction"], runtime, **model_overrides)
        extractor = Extractor(config).load()
        check_compatible(metadata["extraction"], extractor.extraction, f"head {head_path}", accept_dtype)
        return cls(head, metadata, extractor, threshold, cascade, provenance)

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
        info["provenance"] = self.provenance_info()
        if self.cascade is not None:
            info["cascade"] = {"band": list(self.cascade.band), "images": self.cascade.images,
                               "escalated": self.cascade.escalated,
                               "fraction_escalated": round(self.cascade.fraction_escalated, 4)}
        return info

    def provenance_info(self) -> dict[str, Any]:
        """Which provenance checks run, and why any cannot (for `--format json` headers and /v1/info)."""
        options = self.provenance
        return {"mode": options.mode, "trust_anchors": options.trust_source,
                "c2pa": c2pa_unavailable() or "available",
                "watermark": (watermark_unavailable() or "available") if options.watermark else "off"}

    def read_provenance(self, source: str | Path | bytes) -> dict[str, Any]:
        """The provenance record of one image file: a path, an archive member or table row
        (``ARCHIVE!/MEMBER``, ``FILE!/ROW``), or the file's bytes. Never raises for bad files."""
        if not self.provenance.enabled:
            return not_read("turned off (provenance mode 'off')")
        if isinstance(source, str) and sources.is_identity(source):
            try:
                data, _ = sources.read_item(source, max_bytes=self.provenance.limits.max_file_bytes)
            except Exception as exc:  # the record of the image itself says why it cannot be read
                record = not_read("the item cannot be read")
                record["error"] = str(exc)[:self.provenance.limits.max_string]
                return record
            return read_provenance(data, self.provenance)
        return read_provenance(source, self.provenance)

    # -- scoring -----------------------------------------------------------------------------

    def score_rows(self, rows: Sequence[dict[str, Any]], stages: Sequence[str] | None = None,
                   p_override: dict[int, float] | None = None,
                   provenance: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Detection records for store rows (from the extractor or read back from a store).

        ``p_override`` gives scores already decided (the cascade's global head), by row index;
        ``stages`` says which head scored each row ("full" or "global"); ``provenance`` gives each
        row's provenance record (default: not read, since rows carry no file).

        Raises:
            ConfigError: ``provenance`` of another length than ``rows``.
        """
        if provenance is not None and len(provenance) != len(rows):
            raise ConfigError(f"got {len(provenance)} provenance records for {len(rows)} rows")
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
            record["provenance"] = provenance[i] if provenance is not None else not_read(NOT_FROM_FILES)
            records.append(record)
        return records

    def score_batch(self, batch: Sequence[tuple[ImageItem, Any, float]],
                    summary: ExtractionSummary | None = None,
                    provenance: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Records for one decoded batch (see :func:`tidy_detect.features.extractor.iter_decoded`), in
        order; ``provenance`` as in :meth:`score_rows`."""
        summary = summary if summary is not None else ExtractionSummary(total=len(batch))
        if self.cascade is None:
            return self.score_rows(rows_for_batch(self.extractor, batch, summary), provenance=provenance)
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
        return self.score_rows(rows, stages, decided, provenance)

    def detect_items(self, items: Sequence[ImageItem], summary: ExtractionSummary | None = None
                     ) -> Iterator[list[dict[str, Any]]]:
        """Records for image items (paths on disk, archive members, table rows), batch by batch, in
        order. Each file's provenance is read in worker threads while the models run."""
        workers = max(1, self.extractor.config.runtime.num_workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-provenance") as pool:
            for batch in iter_decoded(items, self.extractor):
                pending = [pool.submit(self.read_provenance, item.path) for item, _, _ in batch]
                records = self.score_batch(batch, summary)
                for record, future in zip(records, pending):
                    record["provenance"] = future.result()
                yield records

    def detect_stored(self, store: FeatureStore, paths: Iterable[str]) -> Iterator[list[dict[str, Any]]]:
        """Records for the rows of ``store`` whose path is among ``paths``, batch by batch in the
        store's order, each path once, with each file's provenance read in worker threads: scoring
        what a run saved without holding its rows."""
        workers = max(1, self.extractor.config.runtime.num_workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-provenance") as pool:
            for rows in store.iter_rows_among(paths, batch_size=max(64, self.extractor.batch_size)):
                provenance = list(pool.map(self.read_provenance, [row["path"] for row in rows]))
                yield self.score_rows(rows, provenance=provenance)

    def provenance_for(self, items: Sequence[ImageItem]) -> list[dict[str, Any]]:
        """The provenance records of image items, in order (read in worker threads)."""
        workers = max(1, self.extractor.config.runtime.num_workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-provenance") as pool:
            return list(pool.map(self.read_provenance, [item.path for item in items]))

    def predict(self, images: Iterable[str | Path | bytes | Image.Image],
                captions: Sequence[str | None] | None = None, names: Sequence[str] | None = None
                ) -> list[dict[str, Any]]:
        """Detection records for images given as paths, bytes or PIL images, in order.

        Args:
            images: what to score; a bad image gives a record with ``error`` set, not an exception.
                Paths and bytes also get the file's provenance; a PIL image has no file, so its
                record says provenance was not read.
            captions: captions to use with the ``provided`` captioner (one per image).
            names: how to call in-memory images in records and messages (default ``<image N>``).

        Raises:
            ConfigError: as many captions as images are needed.
        """
        images = list(images)
        captions = list(captions) if captions is not None else [None] * len(images)
        if len(captions) != len(images):
            raise ConfigError(f"got {len(captions)} captions for {len(images)} images")
        entries: list[tuple[str, LoadedImage | ImageError]] = []
        provenance = []
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
            if isinstance(source, Image.Image):
                provenance.append(not_read("an in-memory PIL image carries no file; pass its path or bytes"))
            else:
                provenance.append(self.read_provenance(bytes(source) if isinstance(source, (bytearray, memoryview))
                                                       else source))
        return self.predict_loaded(entries, captions, provenance=provenance)

    def predict_loaded(self, entries: Sequence[tuple[str, LoadedImage | ImageError]],
                       captions: Sequence[str | None] | None = None,
                       provenance: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Detection records for images already decoded (by :func:`tidy_detect.images.load_image`), in order.

        Args:
            entries: ``(name, image)`` pairs; ``image`` is a :class:`LoadedImage` (possibly reduced
                by :func:`tidy_detect.images.reduce_for_models`) or the ``ImageError`` its decoding
                raised, which becomes a record with ``error`` set.
            captions: captions to use with the ``provided`` captioner (one per entry).
            provenance: each entry's provenance record (from :meth:`read_provenance` on its file);
                without it the records say provenance was not read.

        Raises:
            ConfigError: as many captions (and provenance records) as entries are needed.
        """
        captions = list(captions) if captions is not None else [None] * len(entries)
        if len(captions) != len(entries):
            raise ConfigError(f"got {len(captions)} captions for {len(entries)} images")
        if provenance is not None and len(provenance) != len(entries):
            raise ConfigError(f"got {len(provenance)} provenance records for {len(entries)} images")
        provenance = list(provenance) if provenance is not None else [not_read(NOT_FROM_BYTES) for _ in entries]
        decoded = [(ImageItem(name, caption=caption), loaded, 0.0)
                   for (name, loaded), caption in zip(entries, captions)]
        records = []
        summary = ExtractionSummary(total=len(decoded))
        batch_size = self.extractor.batch_size  # resolved by the extractor (runtime.batch_size may be unset)
        for start in range(0, len(decoded), batch_size):
            records.extend(self.score_batch(decoded[start:start + batch_size], summary,
                                            provenance[start:start + batch_size]))
        return records


def top_object(record: dict[str, Any]) -> dict[str, Any] | None:
    """The object whose crop disagrees most with its phrase (the most telling one)."""
    objects = record.get("objects") or []
    return max(objects, key=lambda o: o["discrepancy"]) if objects else None
