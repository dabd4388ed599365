"""One extraction over several devices of this machine: a process per device, one store.

``runtime.devices`` (``--devices cuda:0,cuda:1``, ``--gpus 2``) runs the local engine's reader ->
mapper -> writer with one mapper per device:

- the parent lists and samples the inputs, starts one worker process per device and opens the
  store with the models as the first worker describes them (every worker must describe the same
  models, fingerprints included); it decides what is left by the local engine's resume rule
  (:func:`~tidy_detect.features.extractor.pending_items`) and holds the store's writer lock for
  the whole run;
- the remaining images are queued in batches, a few ahead of the workers (generic inputs are
  streamed, see :class:`~tidy_detect.data.selection.ItemStream`, and never held or queued whole);
  each worker takes the next batch when it has room
  (a faster device takes more), decodes it in its own threads, prepares the next batch's inputs
  while the current one runs, and extracts it as the local engine does, on its device alone
  (``CUDA_VISIBLE_DEVICES`` names that one GPU before CUDA starts, so the process sees it as
  ``cuda:0``; a ``cpu`` worker sees none);
- the parent writes each batch's rows through the store's writer (one shard per batch), so the
  store, its resume rule and its lock are those of a one-process run.

Why not the Ray engine with ``--num-gpus-per-worker`` for one machine: Ray is an optional extra
that starts a cluster with an object store, decoded pixels travel through that store to the
actors, and its actors write shards themselves, so the store must be at one path for all of them
and an image with the content of another is extracted again. Here nothing but the standard
library is needed, each process decodes its own images, and the writer is the store's own. Ray
stays the engine for several machines (docs/distributed.md).

As in the Ray engine, an image whose content equals that of another image of the same run is
extracted again rather than copied (its features are the same): workers do not share what they
have seen. Content the store held before the run is still copied, as the local engine does.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tidy_detect.config import ExtractionConfig
from tidy_detect.data.inputs import ImageItem
from tidy_detect.data.perturb import Perturbation
from tidy_detect.errors import ConfigError, TidyError
from tidy_detect.features.extractor import (STAGES, ExtractionSummary, LabelCheck, ProgressFn, in_chunks, pending_items,
                                            recording_run, resolve_exif, utc_now)
from tidy_detect.features.store import FeatureStore, extraction_mismatches

log = logging.getLogger(__name__)

# How often the parent looks whether a worker died while it waits for results.
POLL_SECONDS = 2.0
# Seconds a worker may take to load its models before the run gives up on it.
LOAD_TIMEOUT_SECONDS = 3600.0


@dataclass
class MultiExtractionSummary(ExtractionSummary):
    """:class:`ExtractionSummary` plus the images each device finished (``"INDEX:DEVICE"``).

    ``stage_seconds`` sum the time of every device's process, so they can exceed the wall time.
    """

    device_images: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "device_images": dict(self.device_images)}


def worker_environment(device: str) -> dict[str, str]:
    """The environment one worker starts with: only its own GPU visible (as ``cuda:0``), or
    none for a CPU worker.

    Raises:
        ConfigError: a device that is neither cpu nor cuda[:N].
    """
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"devices must be cpu, cuda or cuda:N, got {device!r}")
    return {"CUDA_VISIBLE_DEVICES": index or "0"}


def worker_config(config: ExtractionConfig, device: str) -> ExtractionConfig:
    """The config a worker loads its models with: the run's, on its one device."""
    runtime = dataclasses.replace(config.runtime, devices=(), device="cpu" if device == "cpu" else "cuda")
    return dataclasses.replace(config, runtime=runtime)


def check_devices(devices: Sequence[str]) -> tuple[str, ...]:
    """The devices of a multi-process run, validated.

    Raises:
        ConfigError: fewer than two devices, an invalid one, or a GPU listed twice (two replicas on
            one GPU are allowed only as ``cuda:N`` given twice on purpose, which is refused here:
            they would compete for its memory with batch sizes planned for one).
    """
    devices = tuple(devices)
    if len(devices) < 2:
        raise ConfigError(f"a multi-process run needs at least two devices, got {list(devices)}; "
                          f"use --device for one")
    for device in devices:
        worker_environment(device)
    gpus = [d if d != "cuda" else "cuda:0" for d in devices if d != "cpu"]
    repeated = sorted({d for d in gpus if gpus.count(d) > 1})
    if repeated:
        raise ConfigError(f"GPU {repeated[0]} is listed more than once in --devices {','.join(devices)}; list each "
                          f"GPU once (one process per GPU)")
    return devices


# ---------------------------------------------------------------------------------------------
# The worker process

def _worker_main(index: int, device: str, config_data: dict[str, Any], control: Any, tasks: Any,
                 results: Any, threads: int) -> None:
    """One device's process: load the models, describe them, extract the batches it takes.

    ``threads``: this process's share of the machine's cores (torch's threads on a CPU worker,
    and the preprocessing threads of any worker): processes that each took every core would
    fight over them (OpenMP threads spin while they wait)."""
    # Before anything starts CUDA (or OpenMP) in this process, so it sees its own GPU only.
    os.environ.update(worker_environment(device))
    if device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        _worker_run(index, config_data, control, tasks, results, threads)
    except KeyboardInterrupt:
        pass
    except TidyError as exc:
        results.put(("failed", index, type(exc).__name__, str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which ends the run
        results.put(("failed", index, "TidyError", f"{type(exc).__name__}: {exc}"))


def _decode_window(batch_size: int) -> int:
    """Images a worker decodes ahead of its models (it takes them from the queue before its first
    batch is done)."""
    return max(2 * batch_size, 4)


def _batches_ahead(batch_sizes: Sequence[int], size: int) -> int:
    """How many batches of ``size`` images to keep queued: each worker holds its decoding window
    plus the batch it prepares ahead and the one it assembles before it answers, so fewer queued
    than all of them together could leave every worker waiting for more while the parent waits
    for an answer."""
    return sum(-(-(_decode_window(b) + 2 * size) // size) for b in batch_sizes) + 1


def _worker_run(index: int, config_data: dict[str, Any], control: Any, tasks: Any, results: Any,
                threads: int) -> None:
    import torch

    from tidy_detect.features.extractor import Extractor, prefetch, rows_for_batch, with_prepared

    config = ExtractionConfig.from_dict(config_data, source="worker config")
    if config.runtime.device == "cpu":
        torch.set_num_threads(threads)
    extractor = Extractor(config)
    extractor.prepare_threads = threads
    extractor.load()
    results.put(("ready", index, {"extraction": extractor.extraction, "dim": extractor.dim,
                                  "runtime": extractor.runtime_info(), "batch_size": extractor.batch_size}))
    start = control.get()  # the parent's go: the reading rules of the store it opened (None: stop)
    if start is None:
        return
    perturbation = Perturbation.from_dict(start["perturbation"]) if start["perturbation"] else None
    runtime = config.runtime
    order: deque[tuple[int, int]] = deque()

    def items() -> Iterator[ImageItem]:
        while True:
            task = tasks.get()
            if task is None:
                return
            batch_id, batch_items = task
            order.append((batch_id, len(batch_items)))
            yield from batch_items

    decoded = prefetch(items(), runtime.max_pixels, runtime.num_workers, _decode_window(extractor.batch_size),
                       perturbation, runtime.max_file_bytes, start["exif_transpose"])
    ids: deque[int] = deque()

    def batches() -> Iterator[list[Any]]:
        stream = iter(decoded)
        for first in stream:
            batch_id, size = order.popleft()
            batch = [first] + [next(stream) for _ in range(size - 1)]
            ids.append(batch_id)
            yield batch

    for batch, prepared in with_prepared(extractor, batches()):
        batch_id = ids.popleft()
        summary = ExtractionSummary(total=len(batch))
        before = dict(extractor.stage_seconds)
        rows = rows_for_batch(extractor, batch, summary, prepared=prepared)
        spent = {stage: extractor.stage_seconds[stage] - before.get(stage, 0.0) for stage in STAGES}
        results.put(("rows", index, batch_id, rows, {"processed": summary.processed, "errors": summary.errors,
                                                     "error_kinds": summary.error_kinds,
                                                     "error_examples": summary.error_examples}, spent))
    extractor.close()
    results.put(("done", index))


# ---------------------------------------------------------------------------------------------
# The parent

class _Workers:
    """The worker processes of a run, their queues, and what they said."""

    def __init__(self, devices: Sequence[str], config: ExtractionConfig) -> None:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; threads neither
        self.devices = list(devices)
        self.tasks = context.Queue()  # batches, shared: whoever has room takes the next
        self.results = context.Queue()
        self.controls = [context.Queue() for _ in self.devices]
        data = {"models": dataclasses.asdict(config.models), "features": config.to_dict()["features"]}
        self.processes = []
        threads = max(1, (os.cpu_count() or 1) // len(self.devices))
        for index, device in enumerate(self.devices):
            runtime = worker_config(config, device).runtime
            worker_data = {**data, "runtime": {**dataclasses.asdict(runtime), "devices": []}}
            process = context.Process(target=_worker_main, name=f"tidy-extract-{device}", daemon=True,
                                      args=(index, device, worker_data, self.controls[index], self.tasks,
                                            self.results, threads))
            process.start()
            self.processes.append(process)
        self.done: set[int] = set()

    def receive(self, timeout: float) -> Any:
        """The next message; raises when a worker died without saying why, or on ``timeout``."""
        waited = 0.0
        while True:
            try:
                return self.results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                waited += POLL_SECONDS
                for index, process in enumerate(self.processes):
                    if index not in self.done and not process.is_alive():
                        raise TidyError(f"the extraction process on {self.devices[index]} stopped (exit code "
                                        f"{process.exitcode}) before finishing its work; rerun to resume the store")
                if waited >= timeout:
                    raise TidyError(f"no extraction process answered for {timeout:.0f} s")

    def descriptions(self) -> list[dict[str, Any]]:
        """Every worker's description of its loaded models (in device order).

        Raises:
            the error a worker met while loading (ModelLoadError, ConfigError, ...).
        """
        found: dict[int, dict[str, Any]] = {}
        while len(found) < len(self.processes):
            message = self.receive(LOAD_TIMEOUT_SECONDS)
            if message[0] == "failed":
                raise _error(message[2], f"{self.devices[message[1]]}: {message[3]}")
            if message[0] == "ready":
                found[message[1]] = message[2]
        return [found[i] for i in range(len(self.processes))]

    def stop(self) -> None:
        for control in self.controls:
            control.put(None)  # a worker still waiting for its go
        for _ in self.processes:
            self.tasks.put(None)
        deadline = time.monotonic() + 30
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for handle in (self.tasks, self.results, *self.controls):
            handle.close()
            handle.cancel_join_thread()  # what is still queued is not needed: do not wait on it


def _error(kind: str, message: str) -> TidyError:
    """An error a worker reported, of the same kind when it is one of tidy-detect's."""
    from tidy_detect import errors
    from tidy_detect.models import device

    cls = getattr(errors, kind, None) or getattr(device, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, TidyError)):
        cls = TidyError
    return cls(message)


def extract_multi(inputs: Iterable[str | Path], out: str | Path, config: ExtractionConfig, *,
                  limit: int | None = None, progress: ProgressFn | None = None, retry_errors: bool = False,
                  perturbation: Perturbation | None = None, layout: str | None = None, split: str | None = None,
                  exclude: Iterable[str | Path] | None = None, pairing: dict[str, str] | None = None,
                  max_per_class: int | None = None, per_class: int | None = None, seed: int = 0,
                  accept_dtype: bool = False, exif: str = "auto", source_options: Any = None
                  ) -> MultiExtractionSummary:
    """:func:`tidy_detect.features.extractor.extract` with a process per device of
    ``config.runtime.devices``: same arguments, same store.

    The worker processes are spawned (CUDA cannot be forked), so a script that calls this, as
    any user of multiprocessing's spawn, runs its work under ``if __name__ == "__main__":``
    (the command line does).

    Raises:
        ConfigError: fewer than two devices or an invalid one; InputError, ModelLoadError,
        StoreError, DeviceMemoryError as the local engine raises them (a worker's error ends
        the run, finished batches stay in the store); TidyError when a worker process dies.
    """
    from tidy_detect.data.selection import select_inputs

    devices = check_devices(config.runtime.devices)
    selection = select_inputs(inputs, layout=layout, split=split, exclude=exclude, pairing=pairing,
                              max_per_class=max_per_class, per_class=per_class, seed=seed, limit=limit,
                              source_options=source_options, stream=True)  # checked: refused before workers start
    workers = _Workers(devices, config)
    try:
        described = workers.descriptions()
        first = described[0]
        for device, other in zip(devices[1:], described[1:]):
            differences = extraction_mismatches(first["extraction"], other["extraction"])
            if differences:
                raise ConfigError(f"the models loaded on {device} differ from those on {devices[0]} "
                                  f"({'; '.join(differences[:3])}); every device must run the same models")
        store = FeatureStore.open_for_writing(out, first["extraction"], first["dim"],
                                              perturbation.to_dict() if perturbation else None, selection.pairing,
                                              accept_dtype=accept_dtype, datasets=selection.datasets)
        if selection.params:
            store.save_inputs(selection.items, selection.params)
        exif_rule = resolve_exif(exif, bool(selection.datasets))
        with store.writing():
            store.record_reading(exif_rule)
            return _run_locked(selection.items, store, workers, described, progress, retry_errors,
                               selection.ignored_files, exif_rule)
    finally:
        workers.stop()


def _run_locked(items: Iterable[ImageItem], store: FeatureStore, workers: _Workers, described: list[dict[str, Any]],
                progress: ProgressFn | None, retry_errors: bool, ignored_files: int, exif: str
                ) -> MultiExtractionSummary:
    summary = MultiExtractionSummary(store=getattr(store, "uri", None) or str(store.path), ignored_files=ignored_files)
    started = time.perf_counter()
    run_record = {"started": utc_now(), "engine": "local", **described[0]["runtime"], "exif_orientation": exif,
                  "devices": workers.devices, "per_device": [d["runtime"] for d in described]}
    plan = pending_items(items, store, retry_errors, workers=4, summary=summary)
    labels = LabelCheck(plan.known_content)
    # One batch size for all (the smallest any device chose), so that batches are whole for each.
    size = min(d["batch_size"] for d in described)
    batches = enumerate(in_chunks(plan.todo, size))
    perturbation = store.config.get("perturbation")
    for control in workers.controls:
        control.put({"perturbation": perturbation, "exif_transpose": exif == "apply"})
    # Batches are queued as workers finish others, a few ahead of them: a streamed input is never
    # held whole, neither here nor in the queue.
    ahead = _batches_ahead([d["batch_size"] for d in described], size)
    sent = remaining = 0
    listed = False

    def feed() -> None:
        nonlocal sent, remaining, listed
        while not listed and remaining < ahead:
            batch = next(batches, None)
            if batch is None:
                listed = True
                for _ in workers.processes:
                    workers.tasks.put(None)
                return
            workers.tasks.put(batch)
            sent += 1
            remaining += 1

    done_count = summary.skipped
    if progress:
        progress(done_count, summary.total, summary)
    with recording_run(store, run_record, summary, started):
        feed()
        while remaining or not listed or len(workers.done) < len(workers.processes):
            feed()
            message = workers.receive(LOAD_TIMEOUT_SECONDS)
            kind, index = message[0], message[1]
            if kind == "failed":
                raise _error(message[2], f"{workers.devices[index]}: {message[3]}")
            if kind == "done":
                workers.done.add(index)
                continue
            if kind != "rows":
                continue
            _, _, _, rows, counts, spent = message
            labels.check(rows, summary)
            t0 = time.perf_counter()
            store.write(rows)
            spent["write"] = spent.get("write", 0.0) + time.perf_counter() - t0
            summary.processed += counts["processed"]
            summary.errors += counts["errors"]
            for name, count in counts["error_kinds"].items():
                summary.error_kinds[name] = summary.error_kinds.get(name, 0) + count
            summary.error_examples.extend(counts["error_examples"][:max(0, 20 - len(summary.error_examples))])
            for stage, seconds in spent.items():
                summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
            device = f"{index}:{workers.devices[index]}"
            summary.device_images[device] = summary.device_images.get(device, 0) + len(rows)
            remaining -= 1
            done_count += len(rows)
            if progress:
                progress(done_count, summary.total, summary)
        labels.finish(store, summary)
    return summary
