#!/usr/bin/env python
"""What the resume plan keeps in anonymous memory, once the allocator gives back what it only kept.

In a fresh process, with every column of the resume index in mapped files
(``tidy_detect.features.spill.MIN_BYTES = 0``, as every column is at ten million rows): list a
Parquet image table once, plan the resume against a store holding every row, then call glibc's
``malloc_trim(0)`` and pyarrow's ``release_unused()``. Prints the anonymous and file-backed RSS
after each step, pyarrow's pool, and the table's Parquet footer (which any reader holds while the
file is open). The table and the store are those of ``benchmarks/input_kinds.py``'s memory test,
written into ``--work`` on the first run for a row count (then run again: the first process also
wrote them, so its figures are not a fresh process's).

    python benchmarks/resume_memory.py 30000 --work /tmp/resume-30k    # once to write, once to measure

``--content-build 1000000,4000000,8000000`` instead measures (tracemalloc) the peak of building
the stored contents' index from random 32-byte hashes given in 65,536-row slices, every column
mapped: it stops growing once the store is larger than one chunk (``ContentIndex.MAX_RUN``).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import input_kinds  # noqa: E402  (the memory test's table, store and RSS readers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int, nargs="?", help="rows of the table and the store")
    parser.add_argument("--work", type=Path, help="folder for the table and the store (kept)")
    parser.add_argument("--content-build", help="row counts for the stored contents' build peak (see above)")
    args = parser.parse_args(argv)
    if args.content_build:
        content_build([int(n) for n in args.content_build.split(",") if n])
        return 0
    if args.rows is None or args.work is None:
        parser.error("give ROWS and --work, or --content-build")

    from tidy_detect.features import spill

    spill.MIN_BYTES = 0
    table, store_path = args.work / "rows.parquet", args.work / "store"
    if not table.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        input_kinds.write_big_parquet(table, args.rows, 200)
        input_kinds.fill_store(str(table), str(store_path))
        print("wrote the table and the store; run again for a fresh process's figures")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tidy_detect.data.selection import select_inputs
    from tidy_detect.features.extractor import ExtractionSummary, pending_items

    def show(step: str) -> None:
        anon, file_backed = input_kinds._rss_parts_mib()
        print(f"{step:<28} anon {anon:7.1f} MiB  file {file_backed:6.1f} MiB  "
              f"pyarrow pool {pa.total_allocated_bytes() / 2 ** 20:6.1f} MiB", flush=True)

    show("imported")
    items = select_inputs([str(table)], stream=True).items
    show("listed once (the check)")
    summary = ExtractionSummary()
    plan = pending_items(items, input_kinds._open_store(str(store_path)), summary=summary)
    show("planned")
    pa.default_memory_pool().release_unused()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    show("after the trim")
    print(f"{summary.total:,} rows, {summary.skipped:,} skipped, plan alive: {plan is not None}; "
          f"input footer {pq.ParquetFile(table).metadata.serialized_size / 2 ** 20:.1f} MiB")
    return 0


def content_build(counts: list[int]) -> None:
    import tracemalloc

    import numpy as np

    from tidy_detect.features.extractor import ContentIndex
    from tidy_detect.features.spill import Spill

    def slices(n: int, step: int = 1 << 16):
        rng = np.random.default_rng(0)
        for start in range(0, n, step):
            m = min(step, n - start)
            yield rng.integers(0, 256, (m, 32), dtype=np.uint8), rng.integers(-1, 2, m).astype(np.int8)

    for n in counts:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        content = ContentIndex(slices(n), Spill(min_bytes=0))
        now, peak = tracemalloc.get_traced_memory()
        print(f"{n:>11,} rows: build peak {(peak - before) / 2 ** 20:7.1f} MiB ({(peak - before) / n:5.1f} B a row), "
              f"kept {(now - before) / 2 ** 20:6.2f} MiB, {len(content._stored)} stored runs", flush=True)
        del content
        tracemalloc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
