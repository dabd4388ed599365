"""Batched extraction: images -> captions -> phrases -> boxes -> CLIP embeddings -> store rows.

Reader -> mapper -> writer under a small runner:

- the reader decodes and hashes images in worker threads, a bounded window ahead of the models;
- on a GPU (``runtime.prepare_ahead``), the next batch's model inputs are made in worker threads
  while the current batch runs (the captioner's and grounder's preprocessing, the global views'
  8-bit pixels) and sent to the device in one pinned, non-blocking copy on a side stream
  (:class:`PreparedBatch`);
- the mapper (:class:`Extractor`) runs each model stage once per batch: all captions in one
  ``generate``, all grounding in one forward, all global views and object crops in one CLIP image
  pass, all captions and phrases in one CLIP text pass (with a cache, since phrases repeat); on a
  GPU the batch size comes from the free memory (:mod:`tidy_detect.models.memory`) unless given;
- the writer appends one atomic shard per batch, so an interrupted run loses no finished batch and
  a rerun skips what is done.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import platform
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from tidy_detect.config import CPU_BATCH_SIZE, MODEL_KINDS, ExtractionConfig
from tidy_detect.data import remote, sources
from tidy_detect.data.inputs import ImageItem
from tidy_detect.data.perturb import Perturbation
from tidy_detect.errors import ConfigError, ImageError, InputError, InputsFailedError, NothingProcessedError, TidyError
from tidy_detect.features.spill import Spill, find_key
from tidy_detect.features.store import FeatureStore, IndexEntry, StoreIndex, content_digest
from tidy_detect.models.device import DeviceMemoryError, is_cuda
from tidy_detect.views import crop_box
from tidy_detect.images import DEFAULT_MAX_FILE_BYTES, FileStat, LoadedImage, load_image, read_file, sha256_bytes

log = logging.getLogger(__name__)
# What a person waits for (models loading): the command line shows these lines as they come.
status = logging.getLogger("tidy_detect.status")

STAGES = ("decode", "caption", "phrases", "ground", "clip", "write")


@dataclass
class ExtractionSummary:
    """What a run did; ``stage_seconds`` sums wall time per stage (decode: worker time)."""

    store: str = ""
    total: int = 0
    processed: int = 0
    skipped: int = 0  # already in the store (unchanged files), kept_errors included
    kept_errors: int = 0  # skipped files whose row is an error from an earlier run (still unchanged)
    changed: int = 0  # files whose content changed since their row was written: redone
    hashed: int = 0  # files whose stat had changed, so their content was hashed to decide
    copied: int = 0  # same content as another image: features copied, models not run
    label_conflicts: int = 0  # images with the same content as another of a different label
    label_conflict_examples: list[tuple[str, str]] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_examples: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    status: str = "completed"

    @property
    def usable(self) -> int:
        """Images of this run's inputs that have features in the store now (new, copied or kept)."""
        return self.processed + self.copied + self.skipped - self.kept_errors

    @property
    def failed(self) -> int:
        """Inputs without features: errors of this run plus error rows kept from earlier runs."""
        return self.errors + self.kept_errors

    @property
    def images_per_second(self) -> float:
        done = self.processed + self.copied + self.errors
        return done / self.seconds if self.seconds > 0 else 0.0

    def add_error(self, path: str, kind: str, message: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if len(self.error_examples) < 20:
            self.error_examples.append((path, message))

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store, "status": self.status, "total": self.total, "processed": self.processed,
            "skipped": self.skipped, "kept_errors": self.kept_errors, "changed": self.changed, "hashed": self.hashed,
            "copied": self.copied, "label_conflicts": self.label_conflicts, "errors": self.errors,
            "error_kinds": self.error_kinds,
            "ignored_files": self.ignored_files, "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


EXIF_CHOICES = ("auto", "apply", "ignore")


def resolve_exif(choice: str, benchmark: bool) -> str:
    """``apply`` or ``ignore`` for a run: ``auto`` ignores the EXIF orientation for benchmark
    layouts (the peers read their pixels as stored, and their centre crops must match) and applies
    it to everything else (what a viewer shows, which is what a photo's user means).

    Raises:
        ConfigError: an unknown choice.
    """
    if choice not in EXIF_CHOICES:
        raise ConfigError(f"exif must be one of {', '.join(EXIF_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "ignore" if benchmark else "apply"
    return choice


def check_outcome(summary: ExtractionSummary, fail_on_error: bool = False, what: str = "images") -> None:
    """Raise when a run's outcome should not look like success (the CLI turns it into an exit code).

    Raises:
        NothingProcessedError: no inputs, or none of them has features (new, copied or kept).
        InputsFailedError: with ``fail_on_error``, any input without features, errors kept from
            earlier runs included.
    """
    if summary.total == 0:
        raise NothingProcessedError(f"no {what} found in the inputs given (folders are searched for image "
                                    f"suffixes such as .jpg, .png, .webp)")
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(summary.error_kinds.items()))
    detail = f" ({kinds})" if kinds else ""
    if summary.usable == 0:
        kept = f", {summary.kept_errors} of them recorded as errors by earlier runs" if summary.kept_errors else ""
        raise NothingProcessedError(f"none of the {summary.total} {what} could be processed{kept}{detail}; "
                                    f"the store keeps each one's error")
    if fail_on_error and summary.failed:
        raise InputsFailedError(f"{summary.failed} of the {summary.total} {what} could not be processed "
                                f"({summary.errors} now, {summary.kept_errors} kept from earlier runs){detail} "
                                f"and --fail-on-error was given")


def error_row(item: ImageItem, error: Exception, loaded: LoadedImage | None = None) -> dict[str, Any]:
    """A store row recording why an image has no features."""
    kind = getattr(error, "kind", None) or ("input" if isinstance(error, InputError) else "model")
    stat = loaded.stat if loaded else getattr(error, "stat", None)
    return {
        "sha256": loaded.sha256 if loaded else getattr(error, "sha256", None),
        "path": item.path, "label": item.label, "group": item.group,
        "width": loaded.width if loaded else None, "height": loaded.height if loaded else None,
        "format": loaded.format if loaded else None,
        "num_bytes": loaded.num_bytes if loaded else (stat.size if stat else None),
        "error": str(error) or type(error).__name__, "error_kind": kind, "stat": stat,
    }


@dataclass
class _StageInputs:
    """What a :class:`PreparedBatch` holds for the images of one :meth:`Extractor.process` call."""

    caption: dict[str, Any] | None
    clip: Any
    ground: tuple[dict[str, Any], list[list[int]]] | None


@dataclass
class PreparedBatch:
    """One decoded batch's model inputs, made ahead of time (see :meth:`Extractor.prepare`).

    ``inputs`` are the captioner's tensors (``caption.*``), the grounder's per input size
    (``ground.*``, with ``ground_groups`` the images of each size) and the global views
    (``clip.global``), on the device or on their way there. :meth:`select` gives the part for
    some of the batch's images (those that are processed: bad images, duplicates and the like are
    not), by identity, or None when one of them was not prepared.
    """

    images: list[LoadedImage]
    inputs: Any  # models.device.DeviceInputs
    ground_groups: list[list[int]] | None = None

    def select(self, images: Sequence[LoadedImage]) -> _StageInputs | None:
        import torch

        where = {id(im): k for k, im in enumerate(self.images)}
        rows = [where.get(id(im)) for im in images]
        if not rows or any(row is None for row in rows):
            return None
        tensors = self.inputs.ready()
        whole = rows == list(range(len(self.images)))

        def take(tensor: Any) -> Any:
            return tensor if whole else tensor.index_select(0, torch.tensor(rows, device=tensor.device))

        caption = {k.split(".", 1)[1]: take(v) for k, v in tensors.items() if k.startswith("caption.")} or None
        clip = take(tensors["clip.global"]) if "clip.global" in tensors else None
        ground = None
        if self.ground_groups is not None:
            now = {row: k for k, row in enumerate(rows)}
            groups = [[now.get(position, -1) for position in group] for group in self.ground_groups]
            ground = ({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("ground.")}, groups)
        return _StageInputs(caption, clip, ground)


class Extractor:
    """The models of one extraction config, loaded once, run batch by batch.

    Use :meth:`load` (or the context of :func:`extract`) before :meth:`process`. After loading,
    ``batch_size`` is the resolved number of images per batch (``runtime.batch_size``, or chosen
    for the device) and ``memory_plan`` what the choice was made from on a GPU.
    """

    def __init__(self, config: ExtractionConfig | None = None) -> None:
        self.config = config or ExtractionConfig()
        self.clip: Any = None
        self.captioner: Any = None
        self.grounder: Any = None
        self.phrases: Any = None
        self.device = ""
        self.dtype = ""
        self.dtypes: dict[str, str] = {}
        self.speedups = True  # whether tidy-detect's model speed-ups run (set by load)
        self.stage_seconds = {s: 0.0 for s in STAGES}
        self.batch_size = self.config.runtime.batch_size or CPU_BATCH_SIZE
        self.memory_plan: dict[str, Any] | None = None
        self.prepare_threads: int | None = None  # preprocessing threads (None: one per core but one)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._copy_stream: Any = None

    @property
    def loaded(self) -> bool:
        return self.clip is not None

    def load(self) -> "Extractor":
        """Load every model (hub ids or local folders). Raises ``ModelLoadError`` clearly."""
        if self.loaded:
            return self
        from tidy_detect.models.captioners import build_captioner
        from tidy_detect.models.clip import ClipEncoder
        from tidy_detect.models.grounders import build_grounder
        from tidy_detect.models.loading import resolve_device, resolve_dtype
        from tidy_detect.models.optimize import speedups_enabled
        from tidy_detect.models.phrases import PhraseExtractor
        from tidy_detect.models.registry import check_models, resolve_clip

        models, features, runtime = self.config.models, self.config.features, self.config.runtime
        check_models(models)  # every missing checkpoint named at once, before minutes of loading
        self.speedups = speedups_enabled(runtime.speedups)  # the config's switch and TIDY_DETECT_SPEEDUPS
        self.device = resolve_device(runtime.device)
        self.dtype = resolve_dtype(runtime.dtype, self.device)
        self.dtypes = {kind: resolve_dtype(runtime.model_dtype(kind), self.device) for kind in MODEL_KINDS}
        started = time.perf_counter()
        status.info("loading the captioner: %s (%s)", models.captioner, models.captioner_model or "default")
        self.captioner = build_captioner(models.captioner, models.captioner_model, features=features,
                                         device=self.device, dtype=self.dtypes["captioner"], optimize=self.speedups,
                                         static_cache=runtime.static_cache)
        status.info("loading the grounder: %s (%s)", models.grounder, models.grounder_model or "default")
        self.grounder = build_grounder(models.grounder, models.grounder_model, features=features,
                                       device=self.device, dtype=self.dtypes["grounder"], optimize=self.speedups)
        status.info("loading spaCy's English pipeline")
        self.phrases = PhraseExtractor(features.max_objects, features.phrase_stoplist)
        self.phrases.nlp  # load now so the first batch's timing is honest
        status.info("loading CLIP: %s", models.clip)
        self.clip = ClipEncoder(resolve_clip(models.clip), device=self.device, dtype=self.dtypes["clip"],
                                global_view=features.global_view, view_size=features.view_size,
                                compile=runtime.compile, cuda_graphs=runtime.cuda_graphs, optimize=self.speedups)
        status.info("models loaded in %.1f s on %s", time.perf_counter() - started, self.device)
        self.plan_batches()
        return self

    @property
    def prepares_ahead(self) -> bool:
        """Whether the runner prepares each batch's model inputs during the previous batch
        (``runtime.prepare_ahead``; ``auto``: on CUDA devices)."""
        choice = self.config.runtime.prepare_ahead
        return choice == "on" or (choice == "auto" and is_cuda(self.device))

    def plan_batches(self) -> None:
        """Resolve ``batch_size`` and each stage's largest pass.

        ``runtime.batch_size`` given: every stage runs the whole batch in one pass (CLIP's image
        pass takes its global views and crops together). Unset: 8 on the CPU; on a CUDA device
        the sizes that fit in its free memory by the per-stage memory model
        (:func:`tidy_detect.models.memory.plan_batches`), recorded in ``memory_plan``.
        """
        from tidy_detect.models.device import memory_info
        from tidy_detect.models.memory import plan_batches

        runtime, features = self.config.runtime, self.config.features
        objects = features.max_objects if hasattr(self.grounder, "model") else 0
        if runtime.batch_size is not None or not is_cuda(self.device):
            self.batch_size = runtime.batch_size or CPU_BATCH_SIZE
            if is_cuda(self.device):
                self._set_stage_batches(self.batch_size, self.batch_size, self.batch_size * (1 + objects))
            return
        stages = {}
        for stage, adapter in (("caption", self.captioner), ("ground", self.grounder)):
            if hasattr(adapter, "memory"):
                try:
                    stages[stage] = adapter.memory()
                except ValueError as exc:  # no memory model for this architecture
                    log.info("%s; its batches are not capped by memory", exc)
        stages.update(self.clip.memory())
        info = memory_info(self.device)
        free = info[0] if info else 0
        plan = plan_batches(stages, free, items_per_image={"clip image": 1 + objects, "clip text": 1 + objects})
        self.batch_size = plan["batch"]
        self._set_stage_batches(plan.get("caption", self.batch_size), plan.get("ground", self.batch_size),
                                min(plan["clip image"], plan["clip text"]))
        self.memory_plan = {"free_bytes": free, "total_bytes": info[1] if info else None, "plan": plan,
                            "stages": {name: memory.to_dict() for name, memory in stages.items()}}
        status.info("batches of %d images on %s (%.1f GiB free; per-stage plan %s)", self.batch_size, self.device,
                    free / 2 ** 30, {k: v for k, v in plan.items() if k != "batch"})

    def _set_stage_batches(self, caption: int, ground: int, clip: int) -> None:
        if hasattr(self.captioner, "max_batch"):
            self.captioner.max_batch = caption
        if hasattr(self.grounder, "max_batch"):
            self.grounder.max_batch = ground
        self.clip.max_batch = max(1, clip)

    def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``map`` in the extractor's preprocessing threads (``prepare_threads``; by default one
        per core but one)."""
        with self._pool_lock:  # the stager thread and the main thread both map
            if self._pool is None:
                workers = self.prepare_threads or max(1, min(32, (os.cpu_count() or 2) - 1))
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-prepare")
            pool = self._pool
        return pool.map(fn, items)

    def close(self) -> None:
        """Stop the preprocessing threads (the models stay loaded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def prepare(self, images: Sequence[LoadedImage]) -> PreparedBatch:
        """The model inputs of a decoded batch, made ahead of time (in a worker thread): the
        captioner's and grounder's preprocessing and the global views, the same calls
        :meth:`process` would make, sent to the device with one copy (a side stream on CUDA,
        see :func:`tidy_detect.models.device.to_device`)."""
        import torch

        from tidy_detect.models.device import to_device

        self.load()
        images = list(images)
        pil = [im.image for im in images]
        tensors: dict[str, Any] = {}
        if hasattr(self.captioner, "prepare"):
            step = max(8, -(-len(pil) // 8))
            parts = list(self._map(self.captioner.prepare, [pil[i:i + step] for i in range(0, len(pil), step)]))
            for key in parts[0]:
                tensors[f"caption.{key}"] = torch.cat([part[key] for part in parts])
        groups = None
        if hasattr(self.grounder, "prepare"):
            ground, groups = self.grounder.prepare(pil, self._map)
            tensors.update({f"ground.{key}": value for key, value in ground.items()})
        tensors["clip.global"] = self.clip.prepare_global([self._global_source(im) for im in images])["clip_global"]
        if is_cuda(self.device) and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=torch.device(self.device))
        return PreparedBatch(images, to_device(tensors, self.device, stream=self._copy_stream), groups)

    @property
    def dim(self) -> int:
        return self.clip.dim

    @property
    def extraction(self) -> dict[str, Any]:
        """The resolved extraction config recorded in stores and heads (fingerprinted)."""
        self.load()
        described = {"clip": self.clip.describe(), "captioner": self.captioner.describe(),
                     "grounder": self.grounder.describe()}
        for kind, description in described.items():
            # The precision each model computed in; a model-less stage (a provided caption, no
            # grounder) has none. Part of the fingerprint: see features.store.extraction_mismatches.
            description["dtype"] = self.dtypes[kind] if description.get("weights") is not None else None
        return {**described, "phrases": self.phrases.describe()}

    def runtime_info(self) -> dict[str, Any]:
        import torch
        import transformers

        from tidy_detect import __version__

        runtime = self.config.runtime
        return {"device": self.device, "dtype": self.dtype, "dtypes": dict(self.dtypes),
                "batch_size": self.batch_size, "batch_size_given": runtime.batch_size is not None,
                "stage_batches": {"caption": getattr(self.captioner, "max_batch", None),
                                  "ground": getattr(self.grounder, "max_batch", None),
                                  "clip": getattr(self.clip, "max_batch", None)},
                "memory_plan": self.memory_plan, "prepare_ahead": self.prepares_ahead,
                "static_cache": bool(getattr(self.captioner, "static_cache", False)),
                "cuda_graphs": runtime.cuda_graphs,
                "attention": {kind: getattr(getattr(getattr(adapter, "model", None), "config", None),
                                            "_attn_implementation", None)
                              for kind, adapter in (("clip", self.clip), ("captioner", self.captioner),
                                                    ("grounder", self.grounder))},
                "compile": runtime.compile, "speedups": self.speedups,
                "torch_threads": torch.get_num_threads(),
                "package_version": __version__, "torch_version": torch.__version__,
                "transformers_version": transformers.__version__, "python": platform.python_version()}

    def _timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stage_seconds[stage] += time.perf_counter() - started

    def process(self, items: Sequence[ImageItem], images: Sequence[LoadedImage], local: bool = True,
                prepared: PreparedBatch | None = None) -> list[dict[str, Any]]:
        """Features for a batch of decoded images, one store row each (in order).

        With ``local=False`` only the caption, its phrases and the global pair (I0, T0) are
        computed and the object fields stay empty (the cascade's cheap first pass); call
        :meth:`add_local` on those rows to complete them. ``prepared``: the batch's inputs made
        by :meth:`prepare` (``images`` may be part of its images); the same rows as without.

        Raises whatever a model raises; :func:`run_extraction` isolates the failing image (but
        a :class:`~tidy_detect.models.device.DeviceMemoryError` ends the run).
        """
        self.load()
        if not items:
            return []
        inputs = prepared.select(images) if prepared is not None else None
        pil = [im.image for im in images]
        given = [it.caption for it in items]
        caption_args = (pil, given) if inputs is None or inputs.caption is None else (pil, given, inputs.caption)
        captions = self._timed("caption", self.captioner.caption, *caption_args)
        phrases = self._timed("phrases", self.phrases.extract, captions)
        views = [self._global_source(im) for im in images]

        def global_pass() -> tuple[np.ndarray, np.ndarray]:
            if inputs is not None and inputs.clip is not None:
                return self.clip.encode_global(views, prepared=inputs.clip), self.clip.encode_texts(list(captions))
            return self.clip.encode_global(views), self.clip.encode_texts(list(captions))

        global_emb, caption_emb = self._timed("clip", global_pass)
        empty = np.zeros((0, self.dim), dtype=np.float32)
        rows = [{
            "sha256": image.sha256, "path": item.path, "label": item.label, "group": item.group,
            "width": image.width, "height": image.height, "format": image.format, "num_bytes": image.num_bytes,
            "caption": captions[k], "phrases": list(phrases[k]),
            "object_phrases": [], "boxes": [], "box_scores": [],
            "global_image": global_emb[k], "global_text": caption_emb[k],
            "local_images": empty, "local_texts": empty, "local_fallback": True, "error": None, "error_kind": None,
            "stat": image.stat,
        } for k, (item, image) in enumerate(zip(items, images))]
        if local:
            self.add_local(rows, images, inputs.ground if inputs is not None else None)
        return rows

    def _global_source(self, loaded: LoadedImage) -> Any:
        """What CLIP's global view is taken from: the native centre crop kept by
        :func:`~tidy_detect.images.reduce_for_models` for a reduced image (cropping it again is
        the identity), else the image."""
        center = loaded.center
        size = self.clip.view_size
        if center is not None and self.clip.global_view == "center-crop" and center.size == (size, size):
            return center
        return loaded.image

    def add_local(self, rows: Sequence[dict[str, Any]], images: Sequence[LoadedImage],
                  prepared_ground: Any = None) -> None:
        """Ground the rows' phrases and embed every crop and phrase, filling the object fields in place.

        All grounding of the batch is one call, all crops one CLIP image pass and all phrases one
        (cached) CLIP text pass. ``prepared_ground``: the grounder's inputs made ahead of time.
        """
        pil = [im.image for im in images]
        phrases = [row["phrases"] for row in rows]
        ground_args = (pil, phrases) if prepared_ground is None else (pil, phrases, prepared_ground)
        detections = self._timed("ground", self.grounder.ground, *ground_args)
        map_fn = self._map if self.prepares_ahead else None  # crops in parallel threads where inputs are

        def local_pass() -> tuple[np.ndarray, np.ndarray]:
            crops = [crop_box(im, d.box) for im, dets in zip(pil, detections) for d in dets]
            texts = [d.phrase for dets in detections for d in dets]
            if map_fn is None:
                return self.clip.encode_crops(crops), self.clip.encode_texts(texts)
            return self.clip.encode_crops(crops, map_fn), self.clip.encode_texts(texts)

        crop_emb, phrase_emb = self._timed("clip", local_pass)
        offset = 0
        for row, dets, image in zip(rows, detections, images):
            n = len(dets)
            # Boxes are recorded in the original image's pixels, also for a reduced image.
            boxes = [[float(v) * image.scale for v in d.box] for d in dets]
            row.update(object_phrases=[d.phrase for d in dets], boxes=boxes,
                       box_scores=[d.score for d in dets], local_images=crop_emb[offset:offset + n],
                       local_texts=phrase_emb[offset:offset + n], local_fallback=n == 0)
            offset += n


# ---------------------------------------------------------------------------------------------
# The runner

def _decode(item: ImageItem, max_pixels: int, perturbation: Perturbation | None = None,
            max_bytes: int = DEFAULT_MAX_FILE_BYTES, exif_transpose: bool = True
            ) -> tuple[LoadedImage | ImageError, float]:
    started = time.perf_counter()
    try:
        result: LoadedImage | ImageError = _load_item(item, max_pixels, max_bytes, exif_transpose)
        if perturbation is not None:
            image = perturbation.apply(result.image, result.sha256)
            result = dataclasses.replace(result, image=image, width=image.width, height=image.height)
    except ImageError as exc:
        result = exc
    return result, time.perf_counter() - started


def _load_item(item: ImageItem, max_pixels: int, max_bytes: int, exif_transpose: bool) -> LoadedImage:
    """Decode a file, or an archive member / table row by its identity (see data.sources), whose
    ``stat`` is its container's."""
    split = sources.split_identity(item.path)
    if split is None and not remote.is_uri(item.path):
        return load_image(item.path, max_pixels=max_pixels, max_bytes=max_bytes, exif_transpose=exif_transpose)
    stat = None
    try:
        if split is None:
            data, stat = sources.read_item(item.path, max_bytes=max_bytes)
        else:
            data, stat = sources.read_member(*split, max_bytes=max_bytes, identity=item.path)
        loaded = load_image(data, max_pixels=max_pixels, max_bytes=max_bytes, name=item.path,
                            exif_transpose=exif_transpose)
    except ImageError as exc:
        # a member's read error carries its container's stat; a remote object's is looked up
        exc.stat = getattr(exc, "stat", None) or stat or sources.stat_item(item.path)
        raise
    loaded.stat = stat
    return loaded


def prefetch(items: Iterable[ImageItem], max_pixels: int, workers: int, window: int,
             perturbation: Perturbation | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
             exif_transpose: bool = True) -> Iterator[tuple[ImageItem, LoadedImage | ImageError, float]]:
    """Decode (and perturb) images in worker threads, at most ``window`` ahead of the consumer, in order."""
    items = iter(items)
    if workers == 0:
        for item in items:
            yield (item, *_decode(item, max_pixels, perturbation, max_bytes, exif_transpose))
        return
    pending: collections.deque[tuple[ImageItem, Future]] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-decode") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(_decode, item, max_pixels, perturbation, max_bytes,
                                                  exif_transpose)))
                if len(pending) >= window:
                    head, future = pending.popleft()
                    yield (head, *future.result())
            while pending:
                head, future = pending.popleft()
                yield (head, *future.result())
        finally:
            for _, future in pending:
                future.cancel()


def in_chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items of ``iterable`` (the last one shorter), taken as they come."""
    chunk: list[Any] = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


ProgressFn = Callable[[int, int, ExtractionSummary], None]


def run_extraction(items: Iterable[ImageItem], store: FeatureStore, extractor: Extractor, *,
                   progress: ProgressFn | None = None, retry_errors: bool = False,
                   engine: str = "local", ignored_files: int = 0, exif: str = "apply") -> ExtractionSummary:
    """Extract ``items`` (a list, or a re-iterable listed twice, see :func:`pending_items`) into
    ``store``, skipping what it already holds.

    Images whose content (sha256) is already in the store get the stored features, not a second
    model run. Holds the store's writer lock for the whole run.

    ``exif`` is ``apply`` (turn pixels by the EXIF orientation tag) or ``ignore`` (keep them as
    stored, as the benchmarks' reference code does); see :func:`resolve_exif`. A store is read one
    way only.

    Returns the run's summary (also appended to the store's config.json).

    Raises:
        StoreError: another process is writing to the store, or it was read the other way.
    """
    with store.writing():
        store.record_reading(exif)
        return _run_locked(items, store, extractor, progress, retry_errors, engine, ignored_files, exif)


def _run_locked(items: Iterable[ImageItem], store: FeatureStore, extractor: Extractor, progress: ProgressFn | None,
                retry_errors: bool, engine: str, ignored_files: int, exif: str) -> ExtractionSummary:
    summary = ExtractionSummary(store=store.uri, ignored_files=ignored_files)
    started = time.perf_counter()
    run_record = {"started": utc_now(), "engine": engine, **extractor.runtime_info(), "exif_orientation": exif}
    plan = pending_items(items, store, retry_errors, workers=extractor.config.runtime.num_workers,
                         max_bytes=extractor.config.runtime.max_file_bytes, summary=summary)
    todo, known_content = plan.todo, plan.known_content
    labels = LabelCheck(known_content)
    deferred: list[Copy] = []  # same content as a row written earlier
    stage = extractor.stage_seconds
    before = dict(stage)
    done_count = summary.skipped
    if progress:
        progress(done_count, summary.total, summary)

    def stage_totals() -> None:
        summary.stage_seconds = {k: stage[k] - before.get(k, 0.0) for k in STAGES}

    with recording_run(store, run_record, summary, started, on_end=stage_totals):
        perturbation = store.config.get("perturbation")
        perturbation = Perturbation.from_dict(perturbation) if perturbation else None
        runtime = extractor.config.runtime

        def decode(item: ImageItem) -> tuple[LoadedImage | ImageError, float]:
            return _decode(item, runtime.max_pixels, perturbation, runtime.max_file_bytes, exif == "apply")

        batches = iter_decoded(todo, extractor, perturbation, exif_transpose=exif == "apply")
        for batch, prepared in with_prepared(extractor, batches):
            rows = rows_for_batch(extractor, batch, summary, known_content, deferred, prepared=prepared)
            labels.check(rows, summary)
            t0 = time.perf_counter()
            store.write(rows)
            stage["write"] += time.perf_counter() - t0
            done_count += len(batch)
            if progress:
                progress(done_count - len(deferred), summary.total, summary)
        if deferred:
            _write_copies(store, extractor, deferred, summary, labels, decode)
            if progress:
                progress(summary.total, summary.total, summary)
        labels.finish(store, summary)
    return summary


_UNSEEN = object()


class ContentIndex:
    """The contents a run has features for (from the store, or extracted in this run), each with
    the label it first came with: what finds duplicates (their features are copied, not extracted
    again) and label conflicts. A content is keyed by the first 16 bytes of its sha256, held in
    sorted NumPy columns (17 bytes each: two 64-bit halves and a label): the store's, and the
    run's own, which gather in a dict of at most ``BUFFER`` keys first and then become a sorted
    run of their own (hex strings and paths took about 0.35 KiB a content, a dict of every key 85
    bytes). Runs of equal size are merged, as a binary counter adds, up to ``MAX_RUN`` keys, so
    a run of ten million images has about ten runs, each key merged a few times. The store's keys
    are sorted the same way, a chunk of at most ``MAX_RUN`` rows at a time, into runs in store
    order (a key's first labelled row wins across them). Large columns
    (the store's, and runs from about 500,000 keys) live in mapped files (see
    :mod:`tidy_detect.features.spill`), so what the process holds stays bounded whatever the
    number of contents: the buffer, the runs still under the spill size, and the labels that
    keys of a run received after it was made (a content first seen unlabelled, then labelled)
    until its next merge."""

    BUFFER = 1 << 16  # the run's newest keys, in a dict until they become a sorted run
    MAX_RUN = 1 << 21  # runs are not merged past this (a merge sorts both runs in memory: ~70 MB)

    def __init__(self, stored: tuple[np.ndarray, np.ndarray] | Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
                 spill: Spill | None = None) -> None:
        """``stored``: ``(sha256s as an (n, 32) uint8 array, labels or -1)``, in the store's
        order (:meth:`~tidy_detect.features.store.StoreIndex.contents`), or such pairs in slices
        (:meth:`~tidy_detect.features.store.StoreIndex.iter_contents`). ``spill``: where the
        store's columns go once sorted when they are large (see :mod:`tidy_detect.features.spill`)."""
        self._new: dict[bytes, int | None] = {}  # key -> first label, this run's newest keys
        self._spill = spill or Spill()
        # the store's keys as sorted runs in store order, each at most MAX_RUN rows sorted at a
        # time (never the whole store at once); a key may sit in several (see _stored_label)
        self._stored: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        held = 0
        for sha, lab in ([stored] if isinstance(stored, tuple) else stored or ()):  # a slice's 32-byte hashes at a time
            start = 0
            while start < len(sha):
                end = start + self.MAX_RUN - held  # fill the chunk to MAX_RUN rows, no more
                part = sha[start:end]
                chunk.append((part[:, :8].copy().view(">u8").ravel().astype(np.uint64),
                              part[:, 8:16].copy().view(">u8").ravel().astype(np.uint64),
                              np.asarray(lab[start:end], np.int8)))
                held += len(part)
                start = end
                if held >= self.MAX_RUN:
                    self._add_stored(chunk)
                    chunk, held = [], 0
        if chunk:
            self._add_stored(chunk)
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # this run's keys, each run sorted by hi
        self._relabel: dict[bytes, int] = {}  # a run's key that got its first label after the run was made

    @staticmethod
    def _first_of_each(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``parts`` (in store order) as one run sorted by key, each key once: its first labelled
        row, else its first row (lexsort is stable, so equal keys keep their order)."""
        hi = np.concatenate([p[0] for p in parts])
        lo = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
        order = np.lexsort((labels == -1, lo, hi))
        hi = hi[order]
        lo = lo[order]
        labels = labels[order]
        del order
        first = np.ones(len(hi), bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        return hi[first], lo[first], labels[first]

    def _add_stored(self, chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """A chunk of the store's keys becomes a run; equal runs merge (up to MAX_RUN keys)."""
        parts = [self._first_of_each(chunk)]
        while self._stored and len(self._stored[-1][0]) <= len(parts[0][0]) and \
                len(self._stored[-1][0]) + len(parts[0][0]) <= self.MAX_RUN:
            parts.insert(0, self._stored.pop())  # the older run first: store order decides ties
        run = self._first_of_each(parts) if len(parts) > 1 else parts[0]
        self._stored.append(tuple(self._spill.put(column) for column in run))  # type: ignore[arg-type]

    def _stored_label(self, key: bytes) -> Any:
        """A stored key's first label across the store's runs (runs in store order: the first
        labelled row wins, else None), or _UNSEEN."""
        found: Any = _UNSEEN
        for run in self._stored:
            k = self._find(run, key)
            if k is not None:
                label = int(run[2][k])
                if label >= 0:
                    return label
                found = None
        return found

    @staticmethod
    def key(sha256: str) -> bytes:
        # Half of a sha256 is 128 bits: a collision among 10^12 contents has a chance near 10^-15,
        # and a false "seen" would only send an image down the copy path, which extracts it itself
        # when the store holds no row of that content (see _write_copies).
        return content_digest(sha256)[:16]

    @staticmethod
    def _find(columns: tuple[np.ndarray, np.ndarray, np.ndarray], key: bytes) -> int | None:
        """The position of ``key`` in sorted ``(hi, lo, labels)`` columns, or None."""
        return find_key(columns[0], columns[1], key)

    def _label_of(self, key: bytes) -> Any:
        """The first label of a known key (None: known without a label), or _UNSEEN."""
        if key in self._new:
            return self._new[key]
        if key in self._relabel:
            return self._relabel[key]
        for columns in self._runs:  # the run's label wins over the store's unlabelled row
            k = self._find(columns, key)
            if k is not None:
                label = int(columns[2][k])
                return None if label < 0 else label
        return self._stored_label(key)

    def add(self, sha256: str, label: int | None = None) -> int | None:
        """Record content ``sha256`` (with ``label``, if its first labelled row); returns the
        label it first came with (None while no labelled row has been seen)."""
        key = self.key(sha256)
        first = self._label_of(key)
        if first is _UNSEEN or (first is None and label is not None):
            if first is None and label is not None and key not in self._new and \
                    any(self._find(run, key) is not None for run in self._runs):
                self._relabel[key] = label  # a run's key gets its first label (runs may be mapped: read-only)
            else:
                self._new[key] = label  # new, or a stored key without a label gets this run's
                if len(self._new) >= self.BUFFER:
                    self._flush()
            first = label
        return first

    def _flush(self) -> None:
        """The buffer becomes a sorted run; equal runs are merged (up to MAX_RUN keys)."""
        halves = np.frombuffer(b"".join(self._new), ">u8").astype(np.uint64).reshape(-1, 2)
        labels = np.array([-1 if v is None else v for v in self._new.values()], np.int8)
        self._new = {}
        runs = [(halves[:, 0], halves[:, 1], labels)]
        while self._runs and len(self._runs[-1][0]) <= len(runs[0][0]) and \
                len(self._runs[-1][0]) + len(runs[0][0]) <= self.MAX_RUN:
            runs.insert(0, self._runs.pop())
        hi = np.concatenate([run[0] for run in runs])
        lo = np.concatenate([run[1] for run in runs])
        lab = np.concatenate([run[2] for run in runs])
        del runs
        order = np.argsort(hi, kind="stable")  # equal halves keep both keys
        hi, lo, lab = hi[order], lo[order], lab[order]
        del order
        for key, relabelled in list(self._relabel.items()):  # labels given since: written into the run now
            k = self._find((hi, lo, lab), key)
            if k is not None:
                lab[k] = relabelled
                del self._relabel[key]
        self._runs.append((self._spill.put(hi), self._spill.put(lo), self._spill.put(lab)))

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and self._label_of(self.key(sha256)) is not _UNSEEN

    def labels(self) -> dict[bytes, int | None]:
        """Every known content's key and first label (for tests and small stores: it makes a
        Python object per content)."""
        found: dict[bytes, int | None] = {}
        for his, los, labels in self._stored:  # in store order: a key's first label stays
            for h, l, b in zip(his, los, labels):
                key = int(h).to_bytes(8, "big") + int(l).to_bytes(8, "big")
                if found.get(key) is None:
                    found[key] = None if b < 0 else int(b)
        for his, los, labels in self._runs:  # the run's keys after, so they win
            for h, l, b in zip(his, los, labels):
                found[int(h).to_bytes(8, "big") + int(l).to_bytes(8, "big")] = None if b < 0 else int(b)
        found.update(self._relabel)
        found.update(self._new)
        return found

    def __len__(self) -> int:
        return len(self.labels())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ContentIndex) and other.labels() == self.labels()


class LabelCheck:
    """Warns about images with the same content as another image but a different label (a
    mislabelled manifest, or a real image that also sits among the fakes). The other image's
    path is not kept per content (it would cost a path per image); :meth:`finish` finds it in the
    store for the conflicts the summary shows."""

    EXAMPLES = 20

    def __init__(self, content: ContentIndex | None = None) -> None:
        self.content = content if content is not None else ContentIndex()
        self._examples: list[tuple[str, str, int]] = []  # (path, sha256, the other label)

    def check(self, rows: Iterable[dict[str, Any]], summary: ExtractionSummary) -> None:
        for row in rows:
            sha, label = row.get("sha256"), row.get("label")
            if sha is None or label is None or row.get("error") is not None:
                continue
            first = self.content.add(sha, label)
            if first != label:
                summary.label_conflicts += 1
                if len(self._examples) < self.EXAMPLES:
                    self._examples.append((row["path"], sha, first))
                log.warning("%s has the same content as an image labelled %s, but label %s", row["path"], first,
                            label)

    def finish(self, store: FeatureStore, summary: ExtractionSummary) -> None:
        """Name the other image of each conflict kept as an example (one pass over the store's
        content, path and label columns, only when there were conflicts)."""
        if not self._examples:
            return
        wanted = {(sha, label) for _, sha, label in self._examples}
        found: dict[tuple[str, int], list[str]] = {}
        for batch in store.iter_batches(["sha256", "label", "path", "error"]):
            for sha, label, path, error in zip(*(batch.column(i).to_pylist() for i in range(4))):
                if error is None and (sha, label) in wanted and len(found.setdefault((sha, label), [])) < 2:
                    found[(sha, label)].append(path)
        for path, sha, label in self._examples:
            other = next((p for p in found.get((sha, label), []) if p != path), None)
            if other is not None:
                summary.label_conflict_examples.append((path, other))
        self._examples.clear()


@dataclass(frozen=True, slots=True)
class Copy:
    """An image whose content the run has extracted already: its row copies those features at the
    end of the run. Only what that row needs is kept, not the pixels: a dataset with many
    duplicates would otherwise hold every duplicate decoded until the run ends."""

    item: ImageItem
    sha256: str
    stat: FileStat | None


def rows_for_batch(extractor: Extractor, batch: Sequence[tuple[ImageItem, LoadedImage | ImageError, float]],
                   summary: ExtractionSummary, known_content: ContentIndex | None = None,
                   deferred: list[Copy] | None = None, local: bool = True,
                   prepared: PreparedBatch | None = None) -> list[dict[str, Any]]:
    """Store rows for one decoded batch, in batch order: error rows for bad images, features for the rest.

    With ``known_content``/``deferred``, images whose content was already seen are put aside in
    ``deferred`` as a :class:`Copy` (their features are copied later) instead of being extracted
    again; they have no row here. ``local=False`` skips grounding (see :meth:`Extractor.process`).
    ``prepared``: the batch's model inputs made ahead (:func:`with_prepared`).

    Raises:
        DeviceMemoryError: a stage ran out of device memory (not retried image by image).
    """
    rows: list[dict[str, Any] | None] = []
    good_slots: list[int] = []
    good_items: list[ImageItem] = []
    good_images: list[LoadedImage] = []
    for item, loaded, seconds in batch:
        extractor.stage_seconds["decode"] += seconds
        if isinstance(loaded, ImageError):
            rows.append(error_row(item, loaded))
            summary.add_error(item.path, rows[-1]["error_kind"], str(loaded))
        elif extractor.captioner.requires_caption and not (item.caption and item.caption.strip()):
            error = InputError(f"{item.path}: no caption given (the 'provided' captioner needs the "
                               f"manifest's 'caption' column filled)")
            rows.append(error_row(item, error, loaded))
            summary.add_error(item.path, "input", str(error))
        elif known_content is not None and deferred is not None and loaded.sha256 in known_content:
            deferred.append(Copy(item, loaded.sha256, loaded.stat))
        else:
            if known_content is not None:
                known_content.add(loaded.sha256)
            good_slots.append(len(rows))
            good_items.append(item)
            good_images.append(loaded)
            rows.append(None)
    for slot, row in zip(good_slots, _process_isolating(extractor, good_items, good_images, summary, local,
                                                         prepared)):
        rows[slot] = row
    return [row for row in rows if row is not None]


DecodedBatch = list[tuple[ImageItem, LoadedImage | ImageError, float]]


def iter_decoded(items: Iterable[ImageItem], extractor: Extractor, perturbation: Perturbation | None = None,
                 exif_transpose: bool = True) -> Iterator[DecodedBatch]:
    """Decoded batches of ``items`` (decoding runs ahead in worker threads), in input order,
    of the extractor's resolved batch size."""
    runtime = extractor.config.runtime
    size = extractor.batch_size
    window = max(2 * size, 4)
    decoded = prefetch(items, runtime.max_pixels, runtime.num_workers, window, perturbation, runtime.max_file_bytes,
                       exif_transpose)
    yield from in_chunks(decoded, size)


def with_prepared(extractor: Extractor, batches: Iterable[DecodedBatch]
                  ) -> Iterator[tuple[DecodedBatch, PreparedBatch | None]]:
    """Each batch with its model inputs, each prepared in a worker thread while the previous
    batch is processed (when the extractor prepares ahead, see :attr:`Extractor.prepares_ahead`;
    else with None). A batch whose preparation failed comes with None, and is then prepared
    inline by the models, where a bad image becomes an error row as usual."""
    if not extractor.prepares_ahead:
        for batch in batches:
            yield batch, None
        return

    def result(future: Future | None) -> PreparedBatch | None:
        if future is None:
            return None
        try:
            return future.result()
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - the inline path reports the image that fails
            log.warning("preparing a batch ahead failed (%s: %s); its inputs are made inline", type(exc).__name__, exc)
            return None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidy-stage") as stager:
        pending: tuple[DecodedBatch, Future | None] | None = None
        try:
            for batch in batches:
                good = [loaded for _, loaded, _ in batch if not isinstance(loaded, ImageError)]
                future = stager.submit(extractor.prepare, good) if good else None
                if pending is not None:
                    yield pending[0], result(pending[1])
                pending = (batch, future)
            if pending is not None:
                yield pending[0], result(pending[1])
                pending = None
        finally:
            if pending is not None and pending[1] is not None:
                pending[1].cancel()


@dataclass
class ResumePlan:
    """What a run still has to do (see :func:`pending_items`)."""

    todo: Iterable[ImageItem]  # a list when the items were one; else listed again as it is iterated
    known_content: ContentIndex  # contents the store has features for, with their first labels


class _Pending:
    """The items of a streamed input that the store has no row for, found by listing the input
    again: what :func:`pending_items` decided, without holding the items in between."""

    def __init__(self, items: Iterable[ImageItem], index: StoreIndex, summary: ExtractionSummary,
                 expected: int) -> None:
        self.items, self.index, self.summary, self.expected = items, index, summary, expected

    def __iter__(self) -> Iterator[ImageItem]:
        for _, item in self.with_positions():
            yield item

    def with_positions(self) -> Iterator[tuple[int, ImageItem]]:
        """(position in the whole listing, item) of each pending item, in order."""
        listed = 0
        for item in self.items:
            listed += 1
            if item.path not in self.index:
                yield listed - 1, item
        if listed != self.expected:  # the inputs changed between the two listings
            log.warning("the inputs held %d images when the run was planned and %d when they were read again to "
                        "extract (files were added or removed meanwhile); the run counts the second listing",
                        self.expected, listed)
            self.summary.total += listed - self.expected


HASH_CHUNK = 256  # touched files hashed together while the plan streams through the inputs


def pending_items(items: Iterable[ImageItem], store: FeatureStore, retry_errors: bool = False, *,
                  workers: int = 2, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                  summary: ExtractionSummary | None = None) -> ResumePlan:
    """Decide, for every item, whether the store's row for its path is still good.

    An item is redone when the store has no row for its path, or when its file's content changed
    since the row was written; the changed file's old row is removed first, so the store keeps one
    row per path. Deciding costs no model run:

    1. a cheap ``stat``: size, mtime, ctime and inode equal to those recorded when the file was
       read mean the file was not touched (ctime changes with every write or replacement and
       cannot be set back, so a same-size rewrite with a restored mtime is still seen);
    2. otherwise (touched, copied, recorded by an older tidy-detect, or changed so close to its
       read that timestamps could not tell) the file is read and hashed: the same sha256 as the row
       means unchanged (the row's stat is updated so the next run needs no hash), another means
       changed.

    A file that failed before (an error row) is retried the same way when it changed, and kept
    (``summary.kept_errors``) when it did not; ``retry_errors`` redoes every error row. A file
    that is gone keeps its row.

    ``items`` is a list, or any re-iterable (such as :class:`~tidy_detect.data.selection.ItemStream`):
    then it is read once here to decide and count (``summary.total``), and once more as
    ``todo`` is iterated, so no list of the items is ever held; what is kept meanwhile is the
    store's index and the paths of changed files.
    """
    summary = summary if summary is not None else ExtractionSummary()
    index = store.index()
    if retry_errors:
        failed = index.error_paths()
        if failed:
            store.remove_paths(failed)
            for path in failed:
                index.pop(path)
    total = new = kept = changed_count = 0
    changed: set[str] = set()
    restat: dict[str, FileStat] = {}
    touched: list[tuple[ImageItem, IndexEntry]] = []

    def hash_touched() -> None:
        nonlocal kept, changed_count
        found = _hash_files([item for item, _ in touched], workers, max_bytes)
        for (item, entry), (digest, stat) in zip(touched, found):
            summary.hashed += 1
            if digest is not None and digest == entry.sha256:
                if stat is not None and stat != entry.stat:
                    restat[item.path] = stat
                kept += entry.has_error
            else:
                changed.add(item.path)
                changed_count += 1
        touched.clear()

    for item in items:
        total += 1
        entry = index.get(item.path)
        if entry is None:
            new += 1
            continue
        now = sources.stat_item(item.path, entry.stat)  # a plain file's stat, or an archive member's container's
        if now is not None and (entry.stat is None or entry.stat != now):
            touched.append((item, entry))
            if len(touched) >= HASH_CHUNK:
                hash_touched()
        else:  # untouched, or gone since (its row stays)
            kept += entry.has_error
    hash_touched()
    if changed:
        log.info("%d files changed since they were extracted; redoing them", len(changed))
        store.remove_paths(changed)
        for path in changed:
            index.pop(path, None)
    if restat:
        store.update_stats(restat)
    summary.total = total
    summary.skipped = total - new - changed_count
    summary.kept_errors = kept
    summary.changed = len(changed)
    if isinstance(items, Sequence):
        todo: Iterable[ImageItem] = [item for item in items if item.path not in index]
    else:
        todo = _Pending(items, index, summary, total)
    return ResumePlan(todo, ContentIndex(index.iter_contents()))


def _hash_files(items: Sequence[ImageItem], workers: int, max_bytes: int
                ) -> Iterator[tuple[str | None, FileStat | None]]:
    """(sha256, stat as read) of each item's file, in order; (None, None) when it cannot be read."""

    def one(item: ImageItem) -> tuple[str | None, FileStat | None]:
        try:
            if sources.is_identity(item.path):
                data, stat = sources.read_item(item.path, max_bytes=max_bytes)
            else:
                data, stat = read_file(item.path, max_bytes=max_bytes)
        except ImageError:
            return None, None
        return sha256_bytes(data), stat

    if workers <= 1 or len(items) < 2:
        yield from map(one, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-hash") as pool:
        yield from pool.map(one, items)


def _process_isolating(extractor: Extractor, items: list[ImageItem], images: list[LoadedImage],
                       summary: ExtractionSummary, local: bool = True,
                       prepared: PreparedBatch | None = None) -> list[dict[str, Any]]:
    """Run a batch; if it fails, run its images one by one so only the culprit becomes an error.
    Returns one row per item, in order. Running out of memory (host or device) is not an image's
    fault: it ends the run with an error that says what to lower, and nothing is retried."""
    if not items:
        return []
    try:
        extra = {"prepared": prepared} if prepared is not None else {}
        rows = extractor.process(items, images, local=local, **extra)
        summary.processed += len(rows)
        return rows
    except (KeyboardInterrupt, MemoryError, DeviceMemoryError):
        raise
    except Exception as exc:
        if len(items) == 1:
            message = f"{items[0].path}: extraction failed ({type(exc).__name__}: {exc})"
            log.warning(message)
            row = error_row(items[0], TidyError(message), images[0])
            row["error_kind"] = "model"
            summary.add_error(items[0].path, "model", message)
            return [row]
        log.warning("batch of %d failed (%s); retrying image by image", len(items), exc)
        rows = []
        for item, image in zip(items, images):
            rows.extend(_process_isolating(extractor, [item], [image], summary, local))
        return rows


def _write_copies(store: FeatureStore, extractor: Extractor, deferred: list[Copy], summary: ExtractionSummary,
                  labels: LabelCheck | None = None,
                  decode: Callable[[ImageItem], tuple[LoadedImage | ImageError, float]] | None = None) -> None:
    """Rows for images whose content was already extracted: copy features, new path/label/group.
    A copy whose original has no features (it failed in the model stage) is decoded again with
    ``decode`` (the run's decoding: its perturbation and EXIF choice) and extracted itself."""
    originals = store.lookup({copy.sha256 for copy in deferred})
    rows, redo = [], []
    for copy in deferred:
        source = originals.get(copy.sha256)
        if source is None:
            redo.append(copy.item)
            continue
        item = copy.item
        rows.append({**source, "path": item.path, "label": item.label, "group": item.group, "stat": copy.stat})
        summary.copied += 1
    decode = decode or (lambda item: _decode(item, extractor.config.runtime.max_pixels))
    for chunk in in_chunks(redo, extractor.batch_size):
        rows.extend(rows_for_batch(extractor, [(item, *decode(item)) for item in chunk], summary))
    if labels is not None:
        labels.check(rows, summary)
    for start in range(0, len(rows), 1024):
        store.write(rows[start:start + 1024])


def utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def recording_run(store: FeatureStore, run_record: dict[str, Any], summary: ExtractionSummary, started: float,
                  on_end: Callable[[], None] | None = None) -> Iterator[None]:
    """The body of a run (every engine's): what ends it early marks the summary ``interrupted``
    (Ctrl-C) or ``failed`` and is raised again; in any case ``on_end`` runs (an engine's last
    bookkeeping), the run is timed from ``started`` and recorded in the store (:func:`finish_run`)."""
    try:
        yield
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise
    except BaseException:
        summary.status = "failed"
        raise
    finally:
        if on_end is not None:
            on_end()
        summary.seconds = time.perf_counter() - started
        finish_run(store, run_record, summary)


def finish_run(store: FeatureStore, run_record: dict[str, Any], summary: ExtractionSummary) -> None:
    """Record a run that has ended (whatever its status) in the store, and compact the store when
    the run completed. A bookkeeping failure is logged, never raised over the run's own outcome."""
    run_record.update(finished=utc_now(), **summary.to_dict())
    run_record.pop("store", None)
    try:
        store.record_run(run_record)
        if summary.status == "completed":
            store.compact()
    except OSError as exc:
        log.warning("could not record the run in %s: %s", store.uri, exc)


def extract(inputs: Iterable[str | Path], out: str | Path, config: ExtractionConfig | None = None, *,
            limit: int | None = None, progress: ProgressFn | None = None, retry_errors: bool = False,
            extractor: Extractor | None = None, perturbation: Perturbation | None = None,
            layout: str | None = None, split: str | None = None, exclude: Iterable[str | Path] | None = None,
            pairing: dict[str, str] | None = None, max_per_class: int | None = None, per_class: int | None = None,
            seed: int = 0, accept_dtype: bool = False, exif: str = "auto",
            source_options: Any = None) -> ExtractionSummary:
    """Extract features of images, folders, CSV manifests or benchmark datasets into a store.

    Args:
        inputs: image files, folders (recursive), ``.csv`` manifests, or dataset roots with ``layout``.
        out: the store folder (created, or resumed when made with the same config).
        config: models, feature choices and runtime; defaults to the paper's setup.
        limit: process at most this many images (in input order, after sampling).
        progress: called as ``progress(done, total, summary)`` after each batch.
        retry_errors: redo images whose earlier attempt was recorded as an error.
        extractor: an already loaded :class:`Extractor` to reuse (its config wins).
        perturbation: perturb every image first (robustness sweeps); recorded in the store.
        layout, split, exclude, pairing: read INPUTs as benchmark datasets (see
            :mod:`tidy_detect.data.layouts`); ``group`` becomes the generator.
        max_per_class, per_class, seed: the sampling protocol (see :mod:`tidy_detect.data.selection`);
            the sampled list is saved in the store as ``inputs.csv``.
        accept_dtype: write into a store made with the same models in another precision.
        exif: ``auto`` (ignore the EXIF orientation for benchmark layouts, apply it otherwise),
            ``apply`` or ``ignore``; see :func:`resolve_exif`.
        source_options: a :class:`~tidy_detect.data.sources.SourceOptions` naming table columns.

    Returns:
        An :class:`ExtractionSummary`.

    Raises:
        InputError, ModelLoadError, StoreError, ConfigError.
    """
    from tidy_detect.data.selection import select_inputs

    selection = select_inputs(inputs, layout=layout, split=split, exclude=exclude, pairing=pairing,
                              max_per_class=max_per_class, per_class=per_class, seed=seed, limit=limit,
                              source_options=source_options, stream=True)
    items = selection.items  # generic inputs stream: listed to plan, and again to extract (see pending_items)
    extractor = extractor or Extractor(config)
    extractor.load()
    store = FeatureStore.open_for_writing(out, extractor.extraction, extractor.dim,
                                          perturbation.to_dict() if perturbation else None, selection.pairing,
                                          accept_dtype=accept_dtype, datasets=selection.datasets)
    if selection.params:
        store.save_inputs(items, selection.params)
    return run_extraction(items, store, extractor, progress=progress, retry_errors=retry_errors,
                          ignored_files=selection.ignored_files,
                          exif=resolve_exif(exif, bool(selection.datasets)))


def extract_items(items: Sequence[ImageItem], out: str | Path, extractor: Extractor, *,
                  progress: ProgressFn | None = None, retry_errors: bool = False,
                  perturbation: Perturbation | None = None, pairing: dict[str, str] | None = None,
                  exif: str = "apply") -> ExtractionSummary:
    """Extract already listed image items (e.g. a sampled dataset) into the store at ``out``;
    ``exif`` is ``apply`` or ``ignore`` (see :func:`run_extraction`)."""
    extractor.load()
    store = FeatureStore.open_for_writing(out, extractor.extraction, extractor.dim,
                                          perturbation.to_dict() if perturbation else None, pairing)
    return run_extraction(items, store, extractor, progress=progress, retry_errors=retry_errors, exif=exif)
