#!/usr/bin/env python
"""Reading speed of every input kind against a folder of the same images, and the memory of
streaming a large Parquet image dataset.

Writes ``--images`` small JPEGs (seeded) into a folder tree ``bench/<group>/{0_real,1_fake}/``,
then packs the same files as each input kind: zip, tar, tar.gz, WebDataset shards (tar with
``.cls`` sidecars, read through a brace pattern), Parquet with image structs, a ``datasets``
``save_to_disk`` folder (Arrow), and with ``--s3`` the folder, the zip and the Parquet file on a
local S3 endpoint (moto on loopback: it measures the request path, not a real network). For each
kind it reports:

- ``list s``: listing the input into items (:func:`tidy_detect.data.inputs.collect_inputs`);
- ``decode images/s``: reading and decoding images the way extraction does (the extractor's
  ``prefetch`` / ``_load_item``, ``--workers`` threads, no models). The measurement is paired, as
  a shared machine's load comes and goes within seconds: each of ``--runs`` rounds decodes the
  next ``--slice`` images of every kind, the kinds in a new random order each round, and a kind's
  ratio to the folder is taken within each round. Reported: the median rate, the median of the
  per-round ratios (the target's figure), and the ratio of the best rounds (least disturbed);
- with ``--models``: extraction into a fresh store with the tiny random-weight models (after one
  uncounted warm-up extraction; up to 3 runs in shuffled orders, median, ratio to the folder).

Then, in fresh processes, the peak RSS of extraction's input side over a Parquet image dataset:
list it, plan the resume against a store, read and decode every pending row with the extractor's
own decoding threads (no models), for each row count of ``--rss-rows`` (default 10,000 and
100,000) and three ways: ``listed`` (the inputs held as one list, as runs held them before they streamed),
``streamed`` (the generic path: listed once to plan, once to extract) and ``resumed`` (streamed
against a store already holding every row: the resume plan's own memory). The target is flat,
independent of the dataset's size; ``per row`` is the growth from the smallest count. The rows
hold a cycle of ``--rss-distinct`` small JPEGs, so the file is large while writing it stays cheap.
The table also shows the anonymous and file-backed parts of the RSS once the plan is made: a large
resume index lives in mapped files (page cache), see ``--spill-min-mb``. Last, what a run keeps
per image besides its inputs, at the largest count (tracemalloc): the store's index when resuming,
and the contents it knows (stored, and extracted in the run), with the index in memory and with
every column in mapped files, each with the peak while it was built.

    python benchmarks/input_kinds.py                       # 3000 images, 30 rounds, 2 threads
    python benchmarks/input_kinds.py --s3 --models --images 600
    python benchmarks/input_kinds.py --rss-rows 10000,100000,300000 --skip-speed

On a shared machine, compare the kinds of one run (the paired ratios) rather than rates across
runs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _host import cpu_flags, cpu_model  # this folder, first on the path of a script run from it

MEMORY_MODES = ("listed", "streamed", "resumed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to write (default 3000)")
    parser.add_argument("--image-size", type=int, default=96, help="mean side of the images (default 96)")
    parser.add_argument("--runs", type=int, default=30, help="rounds; medians are reported (default 30)")
    parser.add_argument("--slice", type=int, default=500, help="images of each kind decoded per round (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    parser.add_argument("--models", action="store_true", help="also extract with the tiny random-weight models")
    parser.add_argument("--s3", action="store_true", help="also read the folder, zip and Parquet from a local "
                                                          "S3 endpoint (needs moto[server])")
    parser.add_argument("--rss-rows", default="10000,100000", help="row counts for the memory test "
                                                                   "(default 10000,100000; empty to skip)")
    parser.add_argument("--rss-distinct", type=int, default=200, help="distinct JPEGs cycled through the rows")
    parser.add_argument("--rss-modes", default=",".join(MEMORY_MODES),
                        help=f"which ways to measure the memory test (default {','.join(MEMORY_MODES)})")
    parser.add_argument("--extract-rows", default="", help="row counts for a whole `tidy-detect extract` with the "
                        "tiny models over a Parquet dataset of distinct images, peak RSS of each run (e.g. "
                        "2000,10000,40000; about 60 images/s on 2 cores; default: not run)")
    parser.add_argument("--spill-min-mb", type=float, help="columns of the resume index spilled to mapped files from "
                        "this size on (default: the library's, 4 MiB; 0 spills every column, as at ten million rows; "
                        "TIDY_DETECT_SPILL_DIR=off keeps them in memory)")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory test")
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--rss-child", nargs=4, metavar=("PARQUET", "OUT", "MODE", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--fill-store", nargs=2, metavar=("PARQUET", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--extract-child", nargs=4, metavar=("PARQUET", "STORE", "PRESET", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 8 or args.image_size < 16 or args.runs < 1 or args.workers < 0 or args.slice < 8:
        parser.error("--images must be >= 8, --image-size >= 16, --runs >= 1, --workers >= 0, --slice >= 8")
    args.rss_modes = [m.strip() for m in args.rss_modes.split(",") if m.strip()]
    if not args.rss_modes or set(args.rss_modes) - set(MEMORY_MODES):
        parser.error(f"--rss-modes takes some of {', '.join(MEMORY_MODES)}, got {','.join(args.rss_modes)!r}")
    try:
        args.rss_rows = [int(v) for v in args.rss_rows.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--rss-rows takes integers separated by commas, got {args.rss_rows!r}")
    try:
        args.extract_rows = [int(v) for v in args.extract_rows.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--extract-rows takes integers separated by commas, got {args.extract_rows!r}")
    return args


# ---------------------------------------------------------------------------------------------
# The images and their packings

def write_images(root: Path, count: int, size: int) -> Path:
    """``root/bench/<group>/{0_real,1_fake}/NNNNN.jpg``, four groups, sizes within +-25 % of ``size``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        group, label = f"gen{i % 4}", ("0_real", "1_fake")[(i // 4) % 2]
        width, height = (int(v) for v in rng.integers(int(size * 0.75), int(size * 1.25) + 1, 2))
        base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]  # JPEG-friendly blocks
        folder = root / "bench" / group / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:05d}.jpg", quality=90)
    return root / "bench"


def _files(tree: Path) -> list[tuple[str, bytes]]:
    return sorted((p.relative_to(tree).as_posix(), p.read_bytes()) for p in tree.rglob("*.jpg"))


def pack(tree: Path, work: Path) -> dict[str, tuple[list[str], Any]]:
    """Each input kind of the same files: name -> (inputs, source options)."""
    import tarfile
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tidy_detect.data.sources import SourceOptions

    files = _files(tree)
    kinds: dict[str, tuple[list[str], Any]] = {"folder": ([str(tree)], None)}
    with zipfile.ZipFile(work / "bench.zip", "w") as archive:  # stored: JPEGs do not compress
        for name, data in files:
            archive.writestr(name, data)
    kinds["zip"] = ([str(work / "bench.zip")], None)
    for mode, name in (("w", "bench.tar"), ("w:gz", "bench.tar.gz")):
        with tarfile.open(work / name, mode) as archive:
            for member, data in files:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        kinds[name[len("bench."):]] = ([str(work / name)], None)
    shards = work / "shards"
    shards.mkdir()
    per_shard = -(-len(files) // 4)
    for n in range(4):
        with tarfile.open(shards / f"shard-{n:04d}.tar", "w") as archive:
            for k, (member, data) in enumerate(files[n * per_shard:(n + 1) * per_shard]):
                for suffix, payload in ((".jpg", data), (".cls", b"1" if "1_fake" in member else b"0")):
                    info = tarfile.TarInfo(f"{n:02d}{k:06d}{suffix}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    kinds["webdataset"] = ([str(shards / "shard-{0000..0003}.tar")], None)
    table = pa.table({"image": [{"bytes": d, "path": n.rsplit("/", 1)[1]} for n, d in files],
                      "label": [int("1_fake" in n) for n, _ in files], "group": [n.split("/")[0] for n, _ in files]})
    pq.write_table(table, work / "bench.parquet", row_group_size=256)
    kinds["parquet"] = ([str(work / "bench.parquet")], None)
    try:
        import datasets
    except ImportError:
        logging.warning("datasets is not installed (the hub extra): no save_to_disk folder")
    else:
        datasets.disable_progress_bars()
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                      "group": datasets.Value("string")})
        datasets.Dataset.from_dict({c: table.column(c).to_pylist() for c in table.column_names},
                                   features=features).save_to_disk(str(work / "saved"))
        kinds["datasets"] = ([str(work / "saved")], SourceOptions())
    return kinds


def start_s3(kinds: dict[str, tuple[list[str], Any]], tree: Path, work: Path) -> Callable[[], None]:
    """Upload the folder, the zip and the Parquet file to a local S3 endpoint; returns its stop."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    for path in sorted(tree.rglob("*.jpg")):
        client.put_object(Bucket="bench", Key=f"tree/{path.relative_to(tree).as_posix()}", Body=path.read_bytes())
    for name in ("bench.zip", "bench.parquet"):
        client.upload_file(str(work / name), "bench", name)
    kinds["s3 folder"] = (["s3://bench/tree"], None)
    kinds["s3 zip"] = (["s3://bench/bench.zip"], None)
    kinds["s3 parquet"] = (["s3://bench/bench.parquet"], None)
    return server.stop


# ---------------------------------------------------------------------------------------------
# Measurements

def decode_rate(items: list[Any], workers: int) -> float:
    from tidy_detect.features.extractor import prefetch
    from tidy_detect.images import DEFAULT_MAX_PIXELS

    started = time.perf_counter()
    errors = 0
    for _, loaded, _ in prefetch(items, DEFAULT_MAX_PIXELS, workers, max(4 * workers, 8)):
        errors += isinstance(loaded, Exception)
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{errors} images failed to decode")
    return len(items) / seconds


def speed(kinds: dict[str, tuple[list[str], Any]], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from tidy_detect.data.inputs import collect_inputs

    extractor = None
    if args.models:
        from tidy_detect.config import load_preset
        from tidy_detect.features.extractor import Extractor
        from tidy_detect.models.tiny import make_tiny_bundle

        bundle = make_tiny_bundle(work / "tiny", seed=0).parent
        extractor = Extractor(load_preset(bundle / "tiny.toml").updated(
            runtime={"batch_size": 8, "num_workers": args.workers})).load()
    rows, listed = [], {}
    for name, (inputs, options) in kinds.items():
        started = time.perf_counter()
        items = collect_inputs(inputs, options=options)
        listed[name] = (items, time.perf_counter() - started)
        if len(items) != args.images:
            raise RuntimeError(f"{name}: {len(items)} items, expected {args.images}")
    # Rounds interleave the kinds in a shuffled order, so a load that comes and goes on a shared
    # machine hits them alike; ratios are taken within a round.
    order = random.Random(0)
    size = min(args.slice, args.images)
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for run in range(args.runs):
        start = (run * size) % args.images
        names = list(kinds)
        order.shuffle(names)
        for name in names:
            items = listed[name][0]
            rates[name].append(decode_rate((items + items)[start:start + size], args.workers))
        if run % 5 == 4 or run == args.runs - 1:
            print(f"  round {run + 1}/{args.runs}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in kinds)
                  + " images/s", file=sys.stderr, flush=True)
    model_rates: dict[str, list[float]] = {name: [] for name in kinds}
    if extractor is not None:
        from tidy_detect.features.extractor import extract

        warm = work / "stores" / "warm-up"  # the first extraction pays for first calls: not counted
        extract(kinds["folder"][0], warm, extractor=extractor)
        shutil.rmtree(warm)
        for run in range(max(1, min(args.runs, 3))):
            names = list(kinds)
            order.shuffle(names)
            for name in names:
                inputs, options = kinds[name]
                store = work / "stores" / f"{name.replace(' ', '-')}-{run}"
                summary = extract(inputs, store, extractor=extractor, source_options=options)
                model_rates[name].append(summary.processed / summary.seconds)
                shutil.rmtree(store)
    base_runs = rates[next(iter(kinds))]
    best = max(1, len(base_runs) // 5)  # the least disturbed fifth of the rounds
    for name in kinds:
        runs = rates[name]
        row = {"kind": name, "images": len(listed[name][0]), "list_s": listed[name][1],
               "decode_images_per_s": statistics.median(runs), "decode_runs": runs,
               "decode_ratio": statistics.median(r / b for r, b in zip(runs, base_runs)),
               "decode_ratio_best": statistics.mean(sorted(runs)[-best:]) / statistics.mean(sorted(base_runs)[-best:])}
        if model_rates[name]:
            row["extract_images_per_s"] = statistics.median(model_rates[name])
            row["extract_runs"] = model_rates[name]
        rows.append(row)
    base = rows[0]
    for row in rows:
        if "extract_images_per_s" in row:
            row["extract_ratio"] = row["extract_images_per_s"] / base["extract_images_per_s"]
    return rows


def write_big_parquet(path: Path, rows: int, distinct: int) -> int:
    """``rows`` rows of image structs cycling through ``distinct`` JPEGs, written 1000 at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(1)
    images = []
    for _ in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB").save(buffer, "JPEG", quality=85)
        images.append(buffer.getvalue())
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64()), ("group", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1000):
            n = min(1000, rows - start)
            writer.write_table(pa.table({
                "image": [{"bytes": images[(start + i) % distinct], "path": f"{start + i:07d}.jpg"} for i in range(n)],
                "label": [(start + i) % 2 for i in range(n)],
                "group": [f"gen{(start + i) % 4}" for i in range(n)]}, schema=schema), row_group_size=100)
    return path.stat().st_size


def _rss_mib() -> float:
    """Peak RSS of this process. Linux's ``ru_maxrss`` survives ``exec`` (a child started by a big
    parent reports the parent's peak), so the kernel's high-water mark of this process's own
    memory, ``VmHWM``, is read where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_parts_mib() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process now: the mapped files of a spilled
    index are file-backed page cache, which the kernel can drop; anonymous memory it cannot."""
    found = {"RssAnon:": 0.0, "RssFile:": 0.0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0] + ":"
            if key in found:
                found[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found["RssAnon:"], found["RssFile:"]


_STORE_DIM = 4  # the memory test's store: real rows, tiny embeddings (the index is what resume holds)


def _open_store(path: str) -> Any:
    from tidy_detect.features.store import FeatureStore

    return FeatureStore.open_for_writing(path, {"benchmark": "input_kinds memory"}, _STORE_DIM)


def fill_store(parquet: str, store_path: str) -> None:
    """A store holding a finished row for every row of ``parquet``, as a completed run leaves it
    (what the ``resumed`` measurement plans against); its memory is not measured."""
    import numpy as np

    from tidy_detect.data.inputs import iter_inputs
    from tidy_detect.data.sources import stat_item

    store = _open_store(store_path)
    zeros = np.zeros(_STORE_DIM, np.float32)
    with store.writing():
        rows: list[dict[str, Any]] = []
        stat = None
        for n, item in enumerate(iter_inputs([parquet])):
            stat = stat or stat_item(item.path)  # a table row's stat is its file's
            rows.append({"sha256": f"{n:064x}", "path": item.path, "label": item.label, "group": item.group,
                         "num_bytes": stat.size, "mtime_ns": stat.mtime_ns, "ctime_ns": stat.ctime_ns,
                         "inode": stat.inode, "global_image": zeros, "global_text": zeros, "local_images": [],
                         "local_texts": [], "caption": "a picture"})
            if len(rows) == 10_000:
                store.write(rows)
                rows = []
        store.write(rows)


def rss_child(parquet: str, out: str, mode: str, store_path: str) -> None:
    """In a fresh process, extraction's input side without its models: list the inputs, plan the
    resume against a store, then read and decode every pending image with the extractor's own
    ``prefetch``. ``listed``: the inputs as one list (how runs read them before they streamed);
    ``streamed``: the generic path, an ItemStream listed twice; ``resumed``: streamed against a
    store that already holds every row (the plan alone: nothing is left to decode)."""
    from tidy_detect.data.selection import select_inputs
    from tidy_detect.features.extractor import ExtractionSummary, pending_items, prefetch

    imported = _rss_mib()
    started = time.perf_counter()
    items = select_inputs([parquet], stream=mode != "listed").items
    store = _open_store(store_path)
    summary = ExtractionSummary()
    plan = pending_items(items, store, summary=summary)
    planned, plan_s = _rss_mib(), time.perf_counter() - started
    anon, file_backed = _rss_parts_mib()  # the plan (and the index it keeps) alive
    started = time.perf_counter()
    decoded = errors = 0
    for _, loaded, _ in prefetch(plan.todo, 10_000_000, 2, 16):
        decoded += 1
        errors += isinstance(loaded, Exception)
    if mode == "resumed" and (summary.skipped != summary.total or decoded):
        raise SystemExit(f"resume did not skip every row: {summary}")
    Path(out).write_text(json.dumps({"mode": mode, "rows": summary.total, "decoded": decoded, "errors": errors,
                                     "rss_imported_mib": imported, "rss_planned_mib": planned,
                                     "rss_planned_anon_mib": anon, "rss_planned_file_mib": file_backed,
                                     "rss_peak_mib": _rss_mib(), "plan_s": plan_s,
                                     "decode_s": time.perf_counter() - started}))


def bookkeeping(rows: int) -> dict[str, Any]:
    """Python and NumPy memory (tracemalloc) per row of what a run keeps besides its inputs: the
    store's index when resuming (``rows`` stored rows with table-row paths) and the content index
    (``rows`` stored contents, then ``rows`` contents extracted in the run with labels), and the
    time of a lookup in the index."""
    import hashlib
    import tracemalloc

    import pyarrow as pa

    from tidy_detect.features.extractor import ContentIndex, ExtractionSummary, LabelCheck
    from tidy_detect.features.store import STAT_COLUMNS, StoreIndex

    paths = [f"/data/sets/train-00001-of-00020.parquet!/image/{i}" for i in range(rows)]
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    batches = []
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        batches.append(pa.record_batch({
            "sha256": shas[start:start + n], "path": paths[start:start + n],
            "label": pa.array([i % 2 for i in range(n)], pa.int8()), "error": pa.nulls(n, pa.string()),
            "error_kind": pa.nulls(n, pa.string()), "num_bytes": pa.array([25_000_000] * n, pa.int64()),
            **{name: pa.array([1_700_000_000_000_000_000] * n, pa.int64()) for name in STAT_COLUMNS}}))
    from tidy_detect.features.spill import Spill

    tracemalloc.start()
    kept = {}
    for way in ("memory", "spilled"):  # the index in memory (TIDY_DETECT_SPILL_DIR=off), then in mapped files
        spill = Spill(min_bytes=0 if way == "spilled" else 10 ** 15)  # spilled: every column, whatever its size
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        index = StoreIndex.from_batches(batches, spill)
        index_bytes, index_peak = (value - before for value in tracemalloc.get_traced_memory())
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        content = ContentIndex(index.iter_contents(), spill)
        stored_bytes, stored_peak = (value - before for value in tracemalloc.get_traced_memory())
        kept[way] = {"index": index_bytes / rows, "index_peak": index_peak / rows, "stored": stored_bytes / rows,
                     "stored_peak": stored_peak / rows}
        if way == "memory":
            del index, content  # measured apart: the next way starts from nothing held
    fresh_bytes = {}
    for way in ("memory", "spilled"):  # what a fresh run adds per extracted image (rows_for_batch, LabelCheck)
        fresh = ContentIndex(spill=Spill(min_bytes=0 if way == "spilled" else 10 ** 15))
        labels, summary = LabelCheck(fresh), ExtractionSummary()
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, rows, 1000):
            batch = [{"sha256": hashlib.sha256(f"new {i}".encode()).hexdigest(), "label": i % 2, "path": paths[i]}
                     for i in range(start, min(rows, start + 1000))]
            for row in batch:
                fresh.add(row["sha256"])
            labels.check(batch, summary)
        fresh_bytes[way] = tracemalloc.get_traced_memory()[0] - before
        del fresh, labels
    tracemalloc.stop()
    probe = paths[:20_000]
    started = time.perf_counter()
    found = sum(1 for path in probe if path in index)
    contains_us = (time.perf_counter() - started) / len(probe) * 1e6
    started = time.perf_counter()
    entries = [index.get(path) for path in probe]
    get_us = (time.perf_counter() - started) / len(probe) * 1e6
    if found != len(probe) or any(e is None for e in entries) or len(content) != rows:
        raise SystemExit("the index lost rows")
    return {"rows": rows, "index_bytes_per_row": kept["memory"]["index"],
            "stored_content_bytes_per_row": kept["memory"]["stored"], "spilled": kept["spilled"],
            "in_memory": kept["memory"], "run_content_bytes_per_image": fresh_bytes["memory"] / rows,
            "run_content_bytes_per_image_spilled": fresh_bytes["spilled"] / rows,
            "index_contains_us": contains_us, "index_get_us": get_us}


def write_distinct_parquet(path: Path, rows: int) -> int:
    """``rows`` rows of image structs, every image different (32 px PNGs whose first pixels count
    the rows), so extraction runs the models on each one; written 1000 at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    base = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1000):
            images = []
            for i in range(start, min(rows, start + 1000)):
                pixels = base.copy()
                pixels[0, :4, 0] = np.frombuffer(i.to_bytes(4, "little"), np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "PNG")
                images.append(buffer.getvalue())
            writer.write_table(pa.table({"image": [{"bytes": b, "path": f"{start + k:07d}.png"}
                                                   for k, b in enumerate(images)],
                                         "label": [(start + k) % 2 for k in range(len(images))]}, schema=schema),
                               row_group_size=500)
    return path.stat().st_size


def extract_child(parquet: str, store: str, preset: str, out: str) -> None:
    """One `tidy-detect extract` in this process; its peak RSS and rate to ``out``."""
    from tidy_detect.cli import app

    started = time.perf_counter()
    try:
        app(["extract", parquet, "--out", store, "--preset", preset, "--device", "cpu", "--batch-size", "32"],
            standalone_mode=False)
    finally:
        seconds = time.perf_counter() - started
        Path(out).write_text(json.dumps({"rss_peak_mib": _rss_mib(), "seconds": seconds}))


def extract_memory(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from tidy_detect.features.store import FeatureStore
    from tidy_detect.models.tiny import make_tiny_bundle

    preset = make_tiny_bundle(work / "tiny")
    results = []
    for rows in args.extract_rows:
        path = work / f"distinct-{rows}.parquet"
        size = write_distinct_parquet(path, rows)
        store, out = work / f"extract-store-{rows}", work / f"extract-{rows}.json"
        subprocess.run([sys.executable, __file__, "--extract-child", str(path), str(store), str(preset), str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        found = json.loads(out.read_text())
        found.update(rows=rows, file_mib=size / 2 ** 20, stored=len(FeatureStore(store)))
        results.append(found)
        print(f"  extract {rows:,} rows: peak RSS {found['rss_peak_mib']:.0f} MiB, {found['seconds']:.0f} s",
              file=sys.stderr, flush=True)
        shutil.rmtree(store, ignore_errors=True)
        path.unlink()
    return results


def _footer_mib(path: Path) -> float:
    """The Parquet footer's size: what any reader holds while the file is open (it grows with the
    row groups, and here with the min/max statistics of the image bytes the writer keeps)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.serialized_size / 2 ** 20


def memory(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    results = []
    for rows in args.rss_rows:
        path = work / f"rows-{rows}.parquet"
        size = write_big_parquet(path, rows, args.rss_distinct)
        for mode in args.rss_modes:
            store = work / f"store-{rows}-{mode}"
            if mode == "resumed":
                subprocess.run([sys.executable, __file__, "--fill-store", str(path), str(store)], check=True)
            out = work / f"rss-{rows}-{mode}.json"
            spill = [] if args.spill_min_mb is None else ["--spill-min-mb", str(args.spill_min_mb)]
            subprocess.run([sys.executable, __file__, "--rss-child", str(path), str(out), mode, str(store), *spill],
                           check=True)
            found = json.loads(out.read_text())
            found["file_mib"] = size / 2 ** 20
            found["footer_mib"] = _footer_mib(path)
            results.append(found)
            shutil.rmtree(store, ignore_errors=True)
            print(f"  {rows:,} rows, {mode}: peak RSS {found['rss_peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
        path.unlink()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        if args.spill_min_mb is not None:
            from tidy_detect.features import spill

            spill.MIN_BYTES = int(args.spill_min_mb * 2 ** 20)
        rss_child(*args.rss_child)
        return 0
    if args.fill_store:
        fill_store(*args.fill_store)
        return 0
    if args.extract_child:
        extract_child(*args.extract_child)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="tidy-input-kinds-"))
    work.mkdir(parents=True, exist_ok=True)
    stop = None
    report: dict[str, Any] = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
                              "images": args.images, "image_size": args.image_size, "workers": args.workers,
                              "runs": args.runs, "slice": args.slice}
    try:
        if not args.skip_speed:
            tree = write_images(work, args.images, args.image_size)
            kinds = pack(tree, work)
            if args.s3:
                stop = start_s3(kinds, tree, work)
            report["speed"] = speed(kinds, args, work)
        if args.rss_rows:
            report["memory"] = memory(args, work)
            report["bookkeeping"] = bookkeeping(max(args.rss_rows))
        if args.extract_rows:
            report["extract_memory"] = extract_memory(args, work)
    finally:
        if stop is not None:
            stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"CPU: {report['cpu']} ({report['cpus']} cores visible; {cpu_flags()}), {args.workers} decoding "
          f"threads, {args.runs} rounds of {min(args.slice, args.images)} images per kind")
    if "speed" in report:
        models = any("extract_images_per_s" in r for r in report["speed"])
        print(f"\n{args.images} JPEGs of about {args.image_size} px")
        print(f"{'kind':<12} {'list s':>8} {'decode img/s':>13} {'vs folder':>10} {'best rounds':>12}"
              + (f" {'extract img/s':>14} {'vs folder':>10}" if models else ""))
        for r in report["speed"]:
            line = (f"{r['kind']:<12} {r['list_s']:>8.2f} {r['decode_images_per_s']:>13.0f} {r['decode_ratio']:>10.2f}"
                    f" {r['decode_ratio_best']:>12.2f}")
            if models:
                line += f" {r['extract_images_per_s']:>14.1f} {r['extract_ratio']:>10.2f}"
            print(line)
    if "memory" in report:
        print("\nextraction's input side without models (list, plan the resume, decode every pending row) over a "
              "Parquet image dataset, fresh process each")
        print(f"{'rows':>9} {'mode':>9} {'file MiB':>9} {'footer MiB':>11} {'RSS imports':>12} {'RSS planned':>12} "
              f"{'(anon/file)':>12} {'RSS peak':>9} {'per row':>8} {'plan s':>7} {'decode s':>9}")
        base = {r["mode"]: r for r in report["memory"] if r["rows"] == report["memory"][0]["rows"]}
        for r in report["memory"]:
            first = base[r["mode"]]
            growth = (r["rss_peak_mib"] - first["rss_peak_mib"]) * 1024 / max(r["rows"] - first["rows"], 1)
            parts = f"{r.get('rss_planned_anon_mib', 0):.0f}/{r.get('rss_planned_file_mib', 0):.0f}"
            print(f"{r['rows']:>9,} {r['mode']:>9} {r['file_mib']:>9.0f} {r['footer_mib']:>11.1f} "
                  f"{r['rss_imported_mib']:>12.0f} "
                  f"{r['rss_planned_mib']:>12.0f} {parts:>12} {r['rss_peak_mib']:>9.0f} "
                  f"{(f'{growth:.2f} KiB' if r['rows'] != first['rows'] else '-'):>8} {r['plan_s']:>7.2f} "
                  f"{r['decode_s']:>9.2f}")
    if "bookkeeping" in report:
        b = report["bookkeeping"]
        print(f"\nbookkeeping at {b['rows']:,} rows (tracemalloc: Python and NumPy memory kept, and the peak while "
              f"it was built), bytes per row:")
        for way in ("in_memory", "spilled"):
            k = b[way]
            print(f"  {way:<9}: store index {k['index']:.0f} (building {k['index_peak']:.0f}), stored contents "
                  f"{k['stored']:.0f} (building {k['stored_peak']:.0f})")
        print(f"  lookup in the spilled index {b['index_contains_us']:.1f} us, entry {b['index_get_us']:.1f} us; "
              f"per image extracted in the run: {b['run_content_bytes_per_image']:.0f} B in memory, "
              f"{b['run_content_bytes_per_image_spilled']:.1f} B with its runs mapped")
    if "extract_memory" in report:
        print("\nthe whole `tidy-detect extract` (tiny models, batch 32) over a Parquet dataset of distinct images, "
              "fresh process each")
        print(f"{'rows':>9} {'file MiB':>9} {'stored':>8} {'RSS peak':>9} {'per row':>9} {'images/s':>9}")
        first = report["extract_memory"][0]
        for r in report["extract_memory"]:
            growth = (r["rss_peak_mib"] - first["rss_peak_mib"]) * 1024 / max(r["rows"] - first["rows"], 1)
            print(f"{r['rows']:>9,} {r['file_mib']:>9.1f} {r['stored']:>8,} {r['rss_peak_mib']:>9.0f} "
                  f"{(f'{growth:.2f} KiB' if r is not first else '-'):>9} {r['rows'] / r['seconds']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
