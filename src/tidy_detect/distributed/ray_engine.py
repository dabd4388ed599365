"""Extraction on a Ray cluster: the same rows in the same store as the local engine, on many machines.

The local runner's reader -> mapper -> writer, spread out by Ray Data:

- the driver lists the inputs, asks the store what is left (:func:`pending_items`) and cuts the
  remaining images into model batches, put in Ray's object store block by block as they are cut
  (read generically and not sampled, the inputs are streamed: listed to check, to plan and to
  cut, never held as a list);
- reader: decode tasks (``map_batches``, CPU slots anywhere in the cluster) read, hash, decode and
  perturb the images of a batch and pass the RGB pixels on;
- mapper + writer: an actor pool, each actor loading the models once (on its own GPU, or CPU
  slots), runs :func:`rows_for_batch` and writes the batch's rows as one shard itself, so only a
  few small status records travel back to the driver.

Why it is safe to kill anything:

- batches are cut from the *whole* input list (image ``i`` is in batch ``i // batch_size``), and a
  shard's name derives from the (sha256, path) keys it holds, so a batch written twice (an actor
  killed after writing, its task retried; a run abandoned while an actor was still writing, then
  rerun) lands in the same file, atomically replaced: each image ends up in the store once;
- actors are restartable and their tasks retried (Ray Data's default for actor pools); decode
  tasks are retried by Ray and are deterministic;
- a finished shard is never touched again, so a rerun after a killed driver skips it.

Unlike the local engine, an image whose content (sha256) equals another image's is extracted
again rather than copied, since the copy would need a store lookup per batch on every worker; the
features are the same up to floating-point noise.

The store must be writable from every node: a URI on object storage (``s3://bucket/prefix``,
``gs://``, ...; each worker writes its shards there itself, no shared filesystem needed) or a
path that is the same on every node (a shared filesystem such as NFS or Lustre mounted at the
same path); see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tidy_detect.config import CPU_BATCH_SIZE, ExtractionConfig
from tidy_detect.data.inputs import ImageItem
from tidy_detect.data.perturb import Perturbation
from tidy_detect.errors import ConfigError, ImageError, StoreError, TidyError
from tidy_detect.features.extractor import (
    STAGES,
    Extractor,
    ExtractionSummary,
    ProgressFn,
    pending_items,
    prefetch,
    recording_run,
    resolve_exif,
    rows_for_batch,
    utc_now,
)
from tidy_detect.features.storage import StoreLocation, is_uri
from tidy_detect.features.store import FeatureStore, extraction_mismatches
from tidy_detect.images import DEFAULT_MAX_FILE_BYTES, FileStat, LoadedImage

log = logging.getLogger(__name__)

RAY_MISSING = "the Ray engine needs the distributed extra: pip install 'tidy-detect[distributed]'"
# Input blocks: enough of them to spread decoding over the cluster, few enough that the driver does
# not put hundreds of thousands of tiny objects into the object store for a million images.
MAX_INPUT_BLOCKS = 2000
PROGRESS_LOG_SECONDS = 10.0


class RayNotInstalledError(ConfigError):
    """``--engine ray`` was asked for, but Ray is not installed."""


@dataclass(frozen=True)
class RayOptions:
    """Where the Ray engine runs its work. Does not change the features.

    Attributes:
        address: ``None`` starts a local cluster for the run (and stops it after); ``"auto"`` joins
            the cluster this machine is part of (``ray start`` / KubeRay); ``"HOST:PORT"`` or
            ``"ray://HOST:10001"`` joins that one. When Ray is already initialised in this process,
            that connection is used as it is.
        workers: extraction actors, each holding one copy of the models.
        num_gpus_per_worker: GPUs per actor (0: CPU; 0.5: two actors share a GPU).
        cpus_per_worker: CPU slots per actor (torch uses that many threads).
        decode_cpus: CPU slots per decode task.
        local_cpus: CPU slots of a local cluster started for the run (default: every core, and
            at least what the workers and one decode task need).
    """

    address: str | None = None
    workers: int = 2
    num_gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    decode_cpus: float = 0.5
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.address is None or (isinstance(self.address, str) and self.address.strip() != ""),
              f"ray address must be 'auto', HOST:PORT, ray://HOST:PORT or unset, got {self.address!r}")
        check(isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1,
              f"workers must be an integer >= 1, got {self.workers!r}")
        for name in ("num_gpus_per_worker", "cpus_per_worker", "decode_cpus"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                  f"{name} must be a number >= 0, got {value!r}")
        check(self.num_gpus_per_worker <= 1 or float(self.num_gpus_per_worker).is_integer(),
              f"num_gpus_per_worker above 1 must be a whole number, got {self.num_gpus_per_worker!r}")
        check(self.cpus_per_worker > 0 or self.num_gpus_per_worker > 0,
              "cpus_per_worker must be > 0 when num_gpus_per_worker is 0, got 0")
        check(self.decode_cpus > 0, f"decode_cpus must be > 0, got {self.decode_cpus!r}")
        check(self.local_cpus is None or (isinstance(self.local_cpus, int) and self.local_cpus >= 1),
              f"local_cpus must be an integer >= 1 or unset, got {self.local_cpus!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RayExtractionSummary(ExtractionSummary):
    """:class:`ExtractionSummary` plus how the work spread over the cluster.

    ``stage_seconds`` sum the time of every worker, so they can exceed the wall time.
    ``workers`` counts the images each worker process (``"NODE_IP:PID"``) finished.
    """

    workers: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "workers": dict(self.workers)}


@dataclass(frozen=True)
class ModelDescription:
    """What the store records about the models, as a worker of the cluster resolves them."""

    extraction: dict[str, Any]
    dim: int
    runtime: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The cluster

def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError(RAY_MISSING) from exc
    return ray


@contextlib.contextmanager
def ray_cluster(options: RayOptions) -> Iterator[Any]:
    """Connect to (or start) the cluster of ``options`` for the duration of the block; yields ``ray``.

    Without an address in ``options`` the ``RAY_ADDRESS`` environment variable is used, and
    without either a local cluster is started. A cluster started here is stopped at the end; a
    connection made here is closed; a connection the caller already made is left alone.

    Raises:
        RayNotInstalledError: Ray is missing.
        ConfigError: the cluster cannot be reached, or a local cluster cannot hold the workers
            asked for (e.g. GPUs it does not have).
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    # RAY_ADDRESS is how `ray job submit` and KubeRay tell a driver where its cluster is.
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        log.info("connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at --ray-address {address!r} ({exc}); start one "
                              f"with `ray start --head`, or leave --ray-address out for a local cluster") from exc
    else:
        needed = options.workers * options.cpus_per_worker + options.decode_cpus
        cpus = options.local_cpus or max(os.cpu_count() or 1, math.ceil(needed))
        log.info("starting a local Ray cluster with %d CPU slots", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        if address is None:
            _check_local_resources(ray, options)
        yield ray
    finally:
        ray.shutdown()


def _check_local_resources(ray: Any, options: RayOptions) -> None:
    """A local cluster never grows, so workers it cannot hold would wait forever: fail now."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    if options.num_gpus_per_worker * options.workers > gpus:
        raise ConfigError(f"{options.workers} workers x {options.num_gpus_per_worker:g} GPUs need "
                          f"{options.workers * options.num_gpus_per_worker:g} GPUs, but this machine has {gpus:g}; "
                          f"lower --workers or --num-gpus-per-worker, or join a cluster with --ray-address")
    if options.workers * options.cpus_per_worker + options.decode_cpus > cpus:
        raise ConfigError(f"{options.workers} workers x {options.cpus_per_worker:g} CPUs plus "
                          f"{options.decode_cpus:g} for decoding need more than the {cpus:g} CPU slots of the "
                          f"local cluster; lower --workers or the CPUs per worker")


def _warn_if_short(ray: Any, options: RayOptions) -> None:
    # A joined cluster may autoscale, so too few resources now is only worth a warning.
    resources = ray.cluster_resources()
    if options.num_gpus_per_worker * options.workers > resources.get("GPU", 0) or \
            options.workers * options.cpus_per_worker + options.decode_cpus > resources.get("CPU", 0):
        log.warning("the Ray cluster has %s CPUs and %s GPUs now; %d workers x (%g CPU, %g GPU) plus decoding "
                    "will wait until it grows", resources.get("CPU", 0), resources.get("GPU", 0),
                    options.workers, options.cpus_per_worker, options.num_gpus_per_worker)


@contextlib.contextmanager
def _quiet_ray_data(ray: Any) -> Iterator[None]:
    """Ray Data's own progress bars would fight the caller's; restore the context afterwards."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in ("enable_progress_bars", "print_on_execution_start")
             if hasattr(context, name)}
    for name in saved:
        setattr(context, name, False)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


# ---------------------------------------------------------------------------------------------
# Work done on the cluster

def describe_models(config: ExtractionConfig) -> ModelDescription:
    """Load the models and describe them (runs on a worker, so the driver never loads them)."""
    extractor = Extractor(config).load()
    return ModelDescription(extractor.extraction, extractor.dim, extractor.runtime_info())


def probe_models(ray: Any, config: ExtractionConfig, options: RayOptions) -> ModelDescription:
    """:func:`describe_models` on a worker with the extraction actors' resources.

    The same resources matter: ``device``/``dtype: auto`` resolve where the models run, and the
    run records what the probe resolved. On a GPU, ``max_calls=1`` ends the worker process
    afterwards, so that its CUDA context holds no GPU memory the actors need; on CPUs the idle
    worker, torch already imported, is kept for the actors or the next run.
    """
    gpu = options.num_gpus_per_worker > 0
    task = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.num_gpus_per_worker,
                      max_calls=1 if gpu else 0)(describe_models)
    try:
        return ray.get(task.remote(config))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, TidyError):  # e.g. ModelLoadError: raise it as the local engine would
            raise exc.cause from None
        raise


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


_IMAGE_ERRORS: dict[str, type[ImageError]] = {cls.kind: cls for cls in reversed(_subclasses(ImageError))}
# What travels with each image; ImageItem's fields, kept explicit because the Arrow schemas list them.
_ITEM_FIELDS = ("path", "label", "group", "caption", "subgroup")
_STAT_FIELDS = ("stat_size", "stat_mtime_ns", "stat_ctime_ns", "stat_inode")  # a FileStat, flattened


def _flat_stat(stat: FileStat | None) -> dict[str, int | None]:
    values = (stat.size, stat.mtime_ns, stat.ctime_ns, stat.inode) if stat is not None else (None,) * 4
    return dict(zip(_STAT_FIELDS, values))


def _unflat_stat(record: dict[str, Any]) -> FileStat | None:
    values = [record.get(name) for name in _STAT_FIELDS]
    return None if None in values else FileStat(*values)


def _image_error(kind: str, message: str, sha256: str | None) -> ImageError:
    """Rebuild an image error of the right kind from what travelled through the object store."""
    error = _IMAGE_ERRORS.get(kind, ImageError)(message)
    if kind not in _IMAGE_ERRORS:
        error.kind = kind
    error.sha256 = sha256
    return error


def _input_schema() -> Any:
    import pyarrow as pa

    item = pa.struct([("path", pa.string()), ("label", pa.int8()), ("group", pa.string()),
                      ("caption", pa.string()), ("subgroup", pa.string())])
    return pa.schema([("batch", pa.int64()), ("items", pa.list_(item))])


def _decoded_schema() -> Any:
    import pyarrow as pa

    image = pa.struct([
        ("path", pa.string()), ("label", pa.int8()), ("group", pa.string()), ("caption", pa.string()),
        ("subgroup", pa.string()), ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("format", pa.string()), ("num_bytes", pa.int64()), ("pixels", pa.large_binary()),
        ("seconds", pa.float64()), ("error", pa.string()), ("error_kind", pa.string()),
        *[(name, pa.int64()) for name in _STAT_FIELDS],
    ])
    return pa.schema([("batch", pa.int64()), ("images", pa.list_(image))])


def _status_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("batch", pa.int64()), ("error", pa.string()),
                      ("error_kind", pa.string()), ("worker", pa.string()),
                      ("refusal_kind", pa.string()), ("refusal", pa.string()),
                      *[(f"seconds_{stage}", pa.float64()) for stage in STAGES]])


def decode_batches(table: Any, max_pixels: int, perturbation: dict[str, Any] | None,
                   max_bytes: int = DEFAULT_MAX_FILE_BYTES, exif_transpose: bool = True) -> Any:
    """Decode task: each row's images -> RGB pixels plus what the store records, or the error.

    Anything a file can throw at the decoder becomes that image's error record, so one odd file
    never fails (and endlessly retries) the task.
    """
    import pyarrow as pa

    perturb = Perturbation.from_dict(perturbation) if perturbation else None
    out = []
    for row in table.to_pylist():
        images = []
        for entry in row["items"]:
            item = ImageItem(**entry)
            started = time.perf_counter()
            try:
                ((_, loaded, seconds),) = prefetch([item], max_pixels, 0, 1, perturb, max_bytes, exif_transpose)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                loaded = ImageError(f"{item.path}: cannot be decoded ({type(exc).__name__}: {exc})")
                seconds = time.perf_counter() - started
            record = {**entry, "seconds": seconds, "sha256": None, "width": None, "height": None,
                      "format": None, "num_bytes": None, "pixels": None, "error": None, "error_kind": None}
            if isinstance(loaded, ImageError):
                record.update(sha256=getattr(loaded, "sha256", None), error=str(loaded), error_kind=loaded.kind,
                              **_flat_stat(getattr(loaded, "stat", None)))
            else:
                record.update(sha256=loaded.sha256, width=loaded.width, height=loaded.height,
                              format=loaded.format, num_bytes=loaded.num_bytes, pixels=loaded.image.tobytes(),
                              **_flat_stat(loaded.stat))
            images.append(record)
        out.append({"batch": row["batch"], "images": images})
    return pa.Table.from_pylist(out, schema=_decoded_schema())


class ExtractionWorker:
    """Actor: the models once, then decoded batch -> rows -> one shard in the store per batch.

    Returns one small status record per image, never the embeddings: the shard is the output.

    A worker that cannot work here (the store cannot be reached from its node, the models do
    not load, or they describe themselves differently from the store's config, e.g. other model
    files at the same path on another node) refuses every batch with the error instead of
    raising it: Ray would hand the driver only its text, a refusal lets it raise the same error.
    """

    def __init__(self, config: ExtractionConfig, store_path: str, reference: dict[str, Any] | None = None) -> None:
        import ray

        self.worker = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.refusal: tuple[str, str] | None = None
        try:
            try:
                self.store = FeatureStore(store_path)
            except StoreError as exc:
                where = ("the store's object storage must be reachable from every node, with credentials there "
                         "(environment, ~/.aws, an instance role)" if is_uri(store_path) else
                         "the store must be on a filesystem mounted at the same path on every node")
                raise StoreError(f"{exc}; {where}") from exc
            self.extractor = Extractor(config).load()
            extraction = self.extractor.extraction
            # Against what the driver's probe found (and the store accepted), else the store's own.
            diffs = extraction_mismatches(reference or self.store.extraction, extraction)
            if diffs:
                raise StoreError(f"its models differ from the store's extraction config "
                                 f"({'; '.join(diffs[:5]) or 'fingerprints differ'}); every node needs the same "
                                 f"model files at the same paths")
        except TidyError as exc:
            log.error("worker %s refuses to work: %s", self.worker, exc)
            self.refusal = (type(exc).__name__, f"worker {self.worker}: {exc}")

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        statuses: list[dict[str, Any]] = []
        for row in table.to_pylist():
            if self.refusal is not None:
                kind, message = self.refusal
                statuses.extend({"path": image["path"], "batch": row["batch"], "worker": self.worker,
                                 "refusal_kind": kind, "refusal": message} for image in row["images"])
            else:
                statuses.extend(self._batch(row["batch"], row["images"]))
        return pa.Table.from_pylist(statuses, schema=_status_schema())

    def _batch(self, batch_id: int, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from PIL import Image

        batch = []
        for record in images:
            item = ImageItem(**{name: record[name] for name in _ITEM_FIELDS})
            if record["error"] is not None:
                loaded: LoadedImage | ImageError = _image_error(record["error_kind"], record["error"], record["sha256"])
                loaded.stat = _unflat_stat(record)
            else:
                size = (record["width"], record["height"])
                loaded = LoadedImage(Image.frombytes("RGB", size, record["pixels"]), record["sha256"], *size,
                                     record["format"], record["num_bytes"], _unflat_stat(record))
            batch.append((item, loaded, record["seconds"]))
        stage = self.extractor.stage_seconds
        before = dict(stage)
        # Without known_content every image is extracted here, duplicates included (module docstring).
        rows = rows_for_batch(self.extractor, batch, ExtractionSummary(total=len(batch)))
        started = time.perf_counter()
        self.store.write(rows)
        stage["write"] += time.perf_counter() - started
        spent = {f"seconds_{s}": stage[s] - before.get(s, 0.0) for s in STAGES}
        statuses = []
        for k, row in enumerate(rows):
            zero = {name: 0.0 for name in spent}
            statuses.append({"path": row["path"], "batch": batch_id, "error": row["error"],
                             "error_kind": row["error_kind"], "worker": self.worker, **(spent if k == 0 else zero)})
        return statuses


# ---------------------------------------------------------------------------------------------
# The runner

def plan_batches(items: Iterable[ImageItem], todo: Iterable[ImageItem], batch_size: int
                 ) -> Iterator[tuple[int, list[ImageItem]]]:
    """The pending images as (batch id, items), batch ``i // batch_size`` of the whole input list,
    in order, cut as they come.

    Cutting from the whole list rather than from what is pending keeps a batch's contents, and so
    its shard's name, the same from one run to the next. A path listed twice is done once. ``todo``
    is the resume plan's list, or its streamed plan (see
    :func:`~tidy_detect.features.extractor.pending_items`), whose positions in the listing come
    with it: then nothing is held but the batch being cut.
    """
    if hasattr(todo, "with_positions"):
        positioned: Iterable[tuple[int, ImageItem]] = todo.with_positions()
    else:
        pending = {item.path for item in todo}

        def in_list() -> Iterator[tuple[int, ImageItem]]:
            for position, item in enumerate(items):
                if item.path in pending:
                    pending.discard(item.path)
                    yield position, item

        positioned = in_list()
    current_id, current = -1, []
    for position, item in positioned:
        batch_id = position // batch_size
        if current and batch_id != current_id:
            yield current_id, current
            current = []
        current_id = batch_id
        current.append(item)
    if current:
        yield current_id, current


def _input_blocks(ray: Any, batches: Iterable[tuple[int, list[ImageItem]]], per_block: int
                  ) -> tuple[list[Any], dict[int, int]]:
    """The batches as Arrow blocks of ``per_block`` batches, each put in Ray's object store as it
    is cut (the driver keeps references, and each batch's size to account for its images)."""
    import pyarrow as pa

    schema = _input_schema()
    refs: list[Any] = []
    sizes: dict[int, int] = {}
    rows: list[dict[str, Any]] = []
    for batch_id, batch in batches:
        sizes[batch_id] = len(batch)
        rows.append({"batch": batch_id, "items": [{name: getattr(it, name) for name in _ITEM_FIELDS} for it in batch]})
        if len(rows) == per_block:
            refs.append(ray.put(pa.Table.from_pylist(rows, schema=schema)))
            rows = []
    if rows:
        refs.append(ray.put(pa.Table.from_pylist(rows, schema=schema)))
    return refs, sizes


class _Accounts:
    """Which images of each batch have come back, each image counted once even if Ray redid its
    batch. Only batches still in flight are held: a finished batch's entry is dropped, and the
    paths seen are kept only for a batch that has come back in part."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.waiting = dict(sizes)  # batch -> its size, until all its images are in
        self.partial: dict[int, set[str]] = {}
        self.done = 0

    def first_time(self, batch_id: int, path: str) -> bool:
        if batch_id not in self.waiting:
            return False  # a batch already complete (Ray redid it)
        seen = self.partial.setdefault(batch_id, set())
        if path in seen:
            return False
        seen.add(path)
        self.done += 1
        if len(seen) == self.waiting[batch_id]:
            del self.waiting[batch_id], self.partial[batch_id]
        return True

    def missing(self) -> tuple[int, list[int]]:
        """Images that got no status, and the batches they are in."""
        return (sum(size - len(self.partial.get(b, ())) for b, size in self.waiting.items()),
                sorted(self.waiting))


def run_extraction_ray(items: Iterable[ImageItem], store: FeatureStore, config: ExtractionConfig,
                       options: RayOptions | None = None, *, progress: ProgressFn | None = None,
                       retry_errors: bool = False, ignored_files: int = 0,
                       models: ModelDescription | None = None, exif: str = "apply") -> RayExtractionSummary:
    """Extract ``items`` into ``store`` on the Ray cluster, skipping what the store already holds.

    The Ray counterpart of :func:`tidy_detect.features.extractor.run_extraction`: same rows, same
    resume rule, same summary (appended to the store's config.json with ``engine: ray``); the
    store is compacted after a completed run. Must run inside :func:`ray_cluster`.

    Args:
        items: the images, in input order (batches are cut from this order): a list, or a
            re-iterable such as :class:`~tidy_detect.data.selection.ItemStream`, listed again to
            plan the resume and to cut the batches, never held whole.
        store: opened for writing with the models' extraction config (see :func:`open_store`).
        config: the extraction config every worker builds its models from.
        options: cluster resources; see :class:`RayOptions`.
        progress: ``progress(done, total, summary)`` at the start and after each finished batch.
        retry_errors: redo images recorded as errors before.
        models: the probe's description, recorded in the run (device, dtype, versions).
        exif: ``apply`` or ``ignore`` the EXIF orientation (see the local engine's run_extraction).

    Raises:
        KeyboardInterrupt, or whatever stops the run (after recording it as interrupted/failed);
        StoreError when a worker's models differ from the store's, or another process writes to it.
    """
    with store.writing():
        store.record_reading(exif)
        return _run_ray_locked(items, store, config, options, progress, retry_errors, ignored_files, models)


def _run_ray_locked(items: Iterable[ImageItem], store: FeatureStore, config: ExtractionConfig,
                    options: RayOptions | None, progress: ProgressFn | None, retry_errors: bool, ignored_files: int,
                    models: ModelDescription | None) -> RayExtractionSummary:
    ray = _import_ray()
    options = options or RayOptions()
    summary = RayExtractionSummary(store=store.uri, ignored_files=ignored_files)  # total: from the plan
    started = time.perf_counter()
    run_record: dict[str, Any] = {"started": utc_now(), "engine": "ray", **(models.runtime if models else {}),
                                  "exif_orientation": store.config.get("exif_orientation"),
                                  "batch_size": config.runtime.batch_size or CPU_BATCH_SIZE, "ray": options.to_dict()}
    # The driver hashes touched files itself (I/O bound, so a few threads regardless of its cores).
    plan = pending_items(items, store, retry_errors, workers=4,
                         max_bytes=config.runtime.max_file_bytes, summary=summary)
    batch_size = config.runtime.batch_size or CPU_BATCH_SIZE
    # At most MAX_INPUT_BLOCKS blocks: the number of batches is at most the listing's, cut in order.
    per_block = max(1, math.ceil(math.ceil(summary.total / batch_size) / MAX_INPUT_BLOCKS))
    refs, sizes = _input_blocks(ray, plan_batches(items, plan.todo, batch_size), per_block)
    accounts = _Accounts(sizes)
    if progress:
        progress(summary.skipped, summary.total, summary)
    iterator = None

    def stop_pipeline() -> None:
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()  # stops the pipeline and its actors now, not whenever it is collected

    with recording_run(store, run_record, summary, started, on_end=stop_pipeline):
        if refs:
            _warn_if_short(ray, options)
            with _quiet_ray_data(ray):
                dataset = _pipeline(ray, refs, store, config, options, models.extraction if models else None)
                iterator = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
                last_log = time.perf_counter()
                for statuses in iterator:
                    _account(summary, statuses, accounts)
                    if progress:
                        progress(summary.skipped + accounts.done, summary.total, summary)
                    if time.perf_counter() - last_log >= PROGRESS_LOG_SECONDS:
                        last_log = time.perf_counter()
                        log.info("ray: %d/%d images, %.2f images/s, %d errors", summary.skipped + accounts.done,
                                 summary.total, accounts.done / (last_log - started), summary.errors)
        missing, batches = accounts.missing()
        if missing:  # Ray promises every row; say so loudly if it ever does not
            summary.status = "incomplete"
            log.warning("%d images in %d batches got no status from the cluster (e.g. batch %d); rerun to redo them",
                        missing, len(batches), batches[0])
    return summary


def _pipeline(ray: Any, blocks: list[Any], store: FeatureStore, config: ExtractionConfig, options: RayOptions,
              reference: dict[str, Any] | None = None) -> Any:
    """Ray Data: input blocks (object references) -> decode tasks -> extraction actors (which write
    the shards)."""
    dataset = ray.data.from_arrow_refs(blocks)
    # batch_size=1: one row is one model batch, so Ray never re-cuts a model batch.
    dataset = dataset.map_batches(
        decode_batches, batch_size=1, batch_format="pyarrow", num_cpus=options.decode_cpus,
        fn_kwargs={"max_pixels": config.runtime.max_pixels, "perturbation": store.config.get("perturbation"),
                   "max_bytes": config.runtime.max_file_bytes,
                   "exif_transpose": store.config.get("exif_orientation", "apply") == "apply"})
    gpu = {"num_gpus": options.num_gpus_per_worker} if options.num_gpus_per_worker > 0 else {}
    # Ray Data creates actor-pool actors with max_restarts=-1 and max_task_retries=-1: a killed
    # actor is replaced and its batches rerun on it (passing them ourselves is deprecated).
    # No more workers than blocks: each one loads the models, for nothing if it gets no work.
    pool = ray.data.ActorPoolStrategy(size=min(options.workers, len(blocks)))
    return dataset.map_batches(
        ExtractionWorker, batch_size=1, batch_format="pyarrow", compute=pool, num_cpus=options.cpus_per_worker,
        fn_constructor_kwargs={"config": config, "store_path": store.location.absolute().uri, "reference": reference},
        **gpu)


def _account(summary: RayExtractionSummary, statuses: Any, accounts: _Accounts) -> None:
    """Fold a block of status records into the summary, each image once (even if Ray redid it)."""
    for record in statuses.to_pylist():
        if record["refusal"] is not None:
            raise _refusal_error(record["refusal_kind"], record["refusal"])
        path = record["path"]
        if not accounts.first_time(record["batch"], path):
            continue
        if record["error"] is None:
            summary.processed += 1
        else:
            summary.add_error(path, record["error_kind"] or "model", record["error"])
        summary.workers[record["worker"]] = summary.workers.get(record["worker"], 0) + 1
        for stage in STAGES:
            summary.stage_seconds[stage] += record[f"seconds_{stage}"] or 0.0


def _refusal_error(kind: str, message: str) -> TidyError:
    """The error a worker refused to work with, of the same kind when it is one of ours."""
    from tidy_detect import errors

    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, TidyError)):
        cls = TidyError
    return cls(message)


def open_store(ray: Any, out: str | Path, config: ExtractionConfig, options: RayOptions,
               perturbation: Perturbation | None = None, pairing: dict[str, str] | None = None,
               accept_dtype: bool = False, datasets: dict[str, str] | None = None
               ) -> tuple[FeatureStore, ModelDescription]:
    """Create or reopen the store at ``out`` for these models, described by a cluster worker.

    Raises:
        StoreError: the store was made with another config or perturbation (as the local engine).
        ModelLoadError: the worker cannot load the models.
    """
    models = probe_models(ray, config, options)
    # Workers open the store again on their own nodes: a URI as it is, a path made absolute.
    store = FeatureStore.open_for_writing(StoreLocation.parse(out).absolute(), models.extraction, models.dim,
                                          perturbation.to_dict() if perturbation else None, pairing,
                                          accept_dtype=accept_dtype, datasets=datasets)
    return store, models


def extract_items_ray(items: Iterable[ImageItem], out: str | Path, config: ExtractionConfig,
                      options: RayOptions | None = None, *, progress: ProgressFn | None = None,
                      retry_errors: bool = False, perturbation: Perturbation | None = None,
                      pairing: dict[str, str] | None = None, ignored_files: int = 0,
                      params: dict[str, Any] | None = None, accept_dtype: bool = False,
                      datasets: dict[str, str] | None = None, exif: str = "apply") -> RayExtractionSummary:
    """Extract already listed images into the store at ``out`` on a Ray cluster.

    Connects to (or starts) the cluster of ``options`` (see :func:`ray_cluster`), opens the store
    (see :func:`open_store`) and runs :func:`run_extraction_ray`. ``params``, when given, saves
    ``items`` as the store's ``inputs.csv`` with how they were sampled; ``exif`` is ``apply`` or
    ``ignore`` (see :func:`run_extraction_ray`).
    """
    options = options or RayOptions()
    with ray_cluster(options) as ray:
        store, models = open_store(ray, out, config, options, perturbation, pairing, accept_dtype, datasets)
        if params:
            store.save_inputs(items, params)
        return run_extraction_ray(items, store, config, options, progress=progress, retry_errors=retry_errors,
                                  ignored_files=ignored_files, models=models, exif=exif)


def extract_ray(inputs: Iterable[str | Path], out: str | Path, config: ExtractionConfig | None = None,
                options: RayOptions | None = None, *, limit: int | None = None, progress: ProgressFn | None = None,
                retry_errors: bool = False, perturbation: Perturbation | None = None, layout: str | None = None,
                split: str | None = None, exclude: Iterable[str | Path] | None = None,
                pairing: dict[str, str] | None = None, max_per_class: int | None = None,
                per_class: int | None = None, seed: int = 0, accept_dtype: bool = False,
                exif: str = "auto", source_options: Any = None) -> RayExtractionSummary:
    """:func:`tidy_detect.features.extractor.extract` on a Ray cluster: same arguments, same store.

    Inputs are listed and sampled on the driver; images must be reachable at the same paths from
    every node, and so must the store: a path on a shared filesystem, or a URI on object storage.

    Raises:
        RayNotInstalledError, InputError, ModelLoadError, StoreError, ConfigError.
    """
    from tidy_detect.data.selection import select_inputs

    _import_ray()  # before walking a million files
    config = config or ExtractionConfig()
    selection = select_inputs(inputs, layout=layout, split=split, exclude=exclude, pairing=pairing,
                              max_per_class=max_per_class, per_class=per_class, seed=seed, limit=limit,
                              source_options=source_options, stream=True)
    items = selection.items  # a sample is a list; else listed as it is read (ItemStream, LayoutStream)
    return extract_items_ray(items, out, config, options, progress=progress, retry_errors=retry_errors,
                             perturbation=perturbation, pairing=selection.pairing,
                             ignored_files=selection.ignored_files, params=selection.params or None,
                             accept_dtype=accept_dtype, datasets=selection.datasets,
                             exif=resolve_exif(exif, bool(selection.datasets)))

