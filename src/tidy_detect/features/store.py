"""The feature store: one folder (or object-storage prefix), ``config.json`` plus Parquet shards,
one row per image.

Extraction costs seconds per image and training a head milliseconds, so everything the method
needs is kept (raw embeddings, caption, phrases, boxes, label, group, errors) and every
representation is computed from it later without running a model again.

A store is a local path or a URI (``s3://bucket/prefix``, ``gs://``, ``hf://``, ``file://``, any
filesystem pyarrow or fsspec knows); every file operation goes through its
:class:`~tidy_detect.features.storage.StoreLocation`, so the guarantees are the same on both:

- a shard appears whole or not at all (locally: written to a temporary file and renamed into
  place; on object storage: one PUT of the finished file straight to its final name), so a
  crash never leaves half a shard, and a finished shard is never lost;
- shard names derive from the rows they hold, so a retried batch rewrites its own shard instead
  of adding a copy, and readers also skip any repeated (sha256, path) key;
- compaction writes a commit record (``compact-journal.json``: the merged shard and the shards it
  replaces) before the merged shard, and deletes the old ones after it; the next writer to open
  the store finishes an interrupted compaction, and readers meanwhile skip the repeated rows;
- a store remembers the extraction config it was made with (``fingerprint``); opening it for
  writing with another config is an error naming what differs;
- one writer at a time: extraction holds ``STORE/writer.lock``, locally an advisory ``flock``
  (which the system releases when its process dies, so a stale lock is taken over safely), on
  object storage a lease renewed by a heartbeat (:class:`~tidy_detect.features.storage.StoreLease`);
  a second writer is refused with a message naming the holder; config.json is updated
  (read-modify-write) only under it;
- each row records the file's size, mtime, ctime and inode as read, so a rerun can tell a changed
  file from an unchanged one (see :func:`tidy_detect.features.extractor.pending_items`).

The shards are plain Parquet in ``STORE/shards/``: ``pandas.read_parquet("STORE/shards")``, DuckDB's
``read_parquet('STORE/shards/*.parquet')`` and ``polars.read_parquet("STORE/shards/*.parquet")`` read
them as they are, at a URI too (docs/distributed.md, "Stores on object storage").
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import StoreError
from tidy_detect.features import discrepancy
# LOCK_FILE, StoreLock, describe_holder, temporary_path, write_json_atomic: re-exported, they lived here
from tidy_detect.features.storage import (  # noqa: F401
    LOCK_FILE,
    StoreLocation,
    StoreLock,
    describe_holder,
    temporary_path,
    write_json_atomic,
)
from tidy_detect.images import FileStat
from tidy_detect.features.spill import Spill

log = logging.getLogger(__name__)

STORE_FORMAT = "tidy-detect-store"
STORE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
COMPACT_JOURNAL = "compact-journal.json"
INPUTS_LIST = "inputs.csv"  # the sampled input list of a run (``save_list``), with inputs.json beside it
SHARD_DIR = "shards"  # Parquet only, so the folder itself reads as one dataset
# Keys of the extraction config that identify where a model came from, not what it computes;
# they are recorded but left out of the fingerprint. ``random_weights`` says what the weights are,
# not what they compute (stores from before it was recorded stay compatible).
_VOLATILE_KEYS = {"source", "revision", "spacy_version", "random_weights"}

KEY_COLUMNS = ["sha256", "path"]
META_COLUMNS = ["sha256", "path", "label", "group", "width", "height", "format", "num_bytes"]
STAT_COLUMNS = ["mtime_ns", "ctime_ns", "inode"]  # with num_bytes: the file as it was read
EMBEDDING_COLUMNS = ["global_image", "global_text", "local_images", "local_texts"]


def store_schema(dim: int) -> pa.Schema:
    """Arrow schema of a store whose CLIP embeddings have ``dim`` values."""
    vector = pa.list_(pa.float32(), dim)
    return pa.schema([
        ("sha256", pa.string()),
        ("path", pa.string()),
        ("label", pa.int8()),
        ("group", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("num_bytes", pa.int64()),
        ("caption", pa.string()),
        ("phrases", pa.list_(pa.string())),
        ("object_phrases", pa.list_(pa.string())),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("box_scores", pa.list_(pa.float32())),
        ("global_image", vector),
        ("global_text", vector),
        ("local_images", pa.list_(vector)),
        ("local_texts", pa.list_(vector)),
        ("local_fallback", pa.bool_()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        # Added after the first stores: shards without them read as nulls (see _conform).
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("inode", pa.int64()),
    ])


def config_fingerprint(extraction: dict[str, Any]) -> str:
    """Digest of the parts of an extraction config that change the features."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in sorted(value.items()) if k not in _VOLATILE_KEYS}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value

    canonical = json.dumps(strip(extraction), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Readable list of fingerprinted values that differ between two extraction configs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in _VOLATILE_KEYS:
            continue
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: store has {_short(a)}, now {_short(b)}")
    return out


# Grounder settings recorded since they became choices, and the value every store or head made
# before had: a recorded config without the key was made with that value.
_RECORDED_SINCE = {"grounding_rule": "token-max", "min_box_size": 0}


def _same_grounding(name: str, recorded: dict[str, Any], actual: dict[str, Any]) -> bool:
    """A grounder difference that is none: a key recorded before it existed, now at the value it
    had then, or a text threshold the grounder does not use (it records none then)."""
    section, _, key = name.partition(".")
    if section != "grounder":
        return False
    old, new = recorded.get("grounder") or {}, actual.get("grounder") or {}
    if key in _RECORDED_SINCE:
        return key not in old and new.get(key) == _RECORDED_SINCE[key]
    return key == "text_threshold" and key not in new


def extraction_mismatches(recorded: dict[str, Any], actual: dict[str, Any], *, accept_dtype: bool = False
                          ) -> list[str]:
    """The differences between two extraction configs that make their features incompatible.

    A model's ``dtype`` counts like any other value (bfloat16 CLIP features are not the float32
    ones a head was trained on), unless ``accept_dtype`` says the user knowingly mixes them, or
    the recorded config predates dtypes being recorded (nothing is known to differ then).
    """
    found = []
    for diff in config_differences(recorded, actual):
        name = diff.split(":", 1)[0]
        model = name.split(".", 1)[0]
        if name.endswith(".dtype") and (accept_dtype or "dtype" not in (recorded.get(model) or {})):
            continue
        if _same_grounding(name, recorded, actual):
            continue
        found.append(diff)
    return found


def compatible(recorded: dict[str, Any], actual: dict[str, Any], *, accept_dtype: bool = False) -> bool:
    """Whether features made with ``actual`` may be mixed with (or scored by a head trained on)
    features made with ``recorded``; see :func:`extraction_mismatches`."""
    return (config_fingerprint(recorded) == config_fingerprint(actual)
            or not extraction_mismatches(recorded, actual, accept_dtype=accept_dtype))


DTYPE_HINT = ("a model's dtype differs: features in another precision are not the same features; "
              "pass --allow-dtype-mismatch to use them anyway")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Rows -> Arrow

def _vectors(values: Sequence[np.ndarray | None], dim: int) -> pa.Array:
    mask = np.array([v is None for v in values], dtype=bool)
    flat = np.zeros((len(values), dim), dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None:
            flat[i] = v
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))


def _vector_lists(values: Sequence[np.ndarray | None], dim: int) -> pa.Array:
    mask = np.array([v is None for v in values], dtype=bool)
    counts = [0 if v is None else len(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    parts = [np.asarray(v, dtype=np.float32).reshape(-1, dim) for v in values if v is not None and len(v)]
    flat = np.concatenate(parts).reshape(-1) if parts else np.zeros(0, dtype=np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=pa.array(mask))


def rows_to_table(rows: Sequence[dict[str, Any]], dim: int) -> pa.Table:
    """Row dicts (as the extractor makes them) to a table with the store's schema.

    Embedding fields are NumPy arrays: ``global_image``/``global_text`` (dim,),
    ``local_images``/``local_texts`` (n, dim); ``None`` for rows with an error.
    """
    schema = store_schema(dim)
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if field.name in STAT_COLUMNS:
            values = [_stat_value(row, field.name) for row in rows]
        if field.name in ("global_image", "global_text"):
            columns[field.name] = _vectors(values, dim)
        elif field.name in ("local_images", "local_texts"):
            columns[field.name] = _vector_lists(values, dim)
        elif field.name == "boxes":
            columns[field.name] = pa.array(
                [None if v is None else [list(map(float, b)) for b in v] for v in values], field.type)
        else:
            columns[field.name] = pa.array(values, field.type)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _stat_value(row: dict[str, Any], name: str) -> int | None:
    """A row's file-stat column: rows from the extractor carry a FileStat under ``stat``; rows
    read back from a store (copies) carry the columns themselves."""
    stat = row.get("stat")
    if isinstance(stat, FileStat):
        return {"mtime_ns": stat.mtime_ns, "ctime_ns": stat.ctime_ns, "inode": stat.inode}[name]
    return row.get(name)


def row_stat(num_bytes: int | None, mtime_ns: int | None, ctime_ns: int | None, inode: int | None
             ) -> FileStat | None:
    """The FileStat recorded in a row's columns (None when the row has none, e.g. older stores)."""
    if None in (num_bytes, mtime_ns, ctime_ns, inode):
        return None
    return FileStat(int(num_bytes), int(mtime_ns), int(ctime_ns), int(inode))


def _conform(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """A shard's table in the current schema: columns added since it was written read as nulls."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    for field in schema:
        if field.name not in table.schema.names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def vectors_to_numpy(array: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed-size-list column (no nulls) as an (N, dim) float32 array."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False)
    start = array.offset * dim
    return values[start:start + len(array) * dim].reshape(len(array), dim).astype(np.float32, copy=False)


def vector_lists_to_numpy(array: pa.Array | pa.ChunkedArray, dim: int) -> list[np.ndarray]:
    """A list-of-vectors column as a list of (n_k, dim) arrays (null rows give (0, dim))."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = array.offsets.to_numpy()
    flat = vectors_to_numpy(array.values, dim) if len(array.values) else np.zeros((0, dim), np.float32)
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(array))]


@dataclass(frozen=True, slots=True)  # slots: resume holds one per stored row
class IndexEntry:
    """What the store holds for one path: resume decides from this whether to redo the file."""

    sha256: str | None
    has_error: bool
    error_kind: str | None
    stat: FileStat | None  # None for rows without a readable file (not found) or from older stores
    label: int | None = None


_NO_LABEL = -1


def content_digest(sha256: str) -> bytes:
    """A row's content hash as 32 raw bytes. A hash that is not 64 hex digits (tidy-detect never
    writes one, but a store is a user's file) is digested itself, so it still has 32 bytes."""
    if len(sha256) == 64:
        try:
            return bytes.fromhex(sha256)
        except ValueError:
            pass
    return hashlib.sha256(sha256.encode()).digest()


@dataclass
class _IndexColumns:
    """The columns of a :class:`StoreIndex`, one entry per store row (arrays, or maps of files:
    see :mod:`tidy_detect.features.spill`)."""

    offsets: np.ndarray  # int64, rows + 1: where each path's UTF-8 bytes start in ``data``
    data: np.ndarray  # uint8: the paths' UTF-8 bytes, one after another
    sha: np.ndarray  # (rows, 32) uint8: the content hash's raw bytes (zeros where none)
    has_sha: np.ndarray
    has_error: np.ndarray
    label: np.ndarray  # int8, -1 where none
    stat: np.ndarray  # (rows, 4) int64: size, mtime_ns, ctime_ns, inode
    has_stat: np.ndarray
    error_kinds: dict[int, str] = field(default_factory=dict)  # row -> kind, for error rows
    odd_sha: dict[int, str] = field(default_factory=dict)  # row -> a hash that is not 64 hex digits, as written


class StoreIndex(Mapping[str, IndexEntry]):
    """``path -> IndexEntry`` of every row of a store, held as columns instead of Python objects:
    the paths' UTF-8 bytes in one buffer, content hashes as 32 raw bytes, stats and labels in
    NumPy, and the paths' hashes sorted for lookup (a path's first row wins, as the store keeps one
    row per path). About 0.15 KiB per row (most of it the path), where a dict of entries took
    about 0.4; an entry is made when asked for. ``pop`` forgets a path (resume does, for rows it
    removes).

    A large index's columns are built into files and mapped (:class:`~tidy_detect.features.spill.Spill`):
    the run holds no memory per stored row, only page cache the kernel can drop; building it
    sorts the paths' hashes by buckets into a mapped column (:meth:`Spill.argsort`), so the
    build's working memory does not grow with the store either."""

    def __init__(self, hashes: np.ndarray, columns: _IndexColumns, spill: Spill | None = None) -> None:
        self._c = columns
        self._spill = spill or Spill()
        order = self._spill.argsort(hashes)  # stable: equal hashes keep the store's row order
        self._order = self._spill.put(order)
        del order
        sorted_hashes = self._spill.empty(len(hashes), np.int64)
        step = 1 << 16
        for start in range(0, len(hashes), step):  # gathered a slice at a time
            sorted_hashes[start:start + step] = hashes[self._order[start:start + step]]
        del hashes
        self._hashes = self._spill.put(sorted_hashes)
        del sorted_hashes
        self._gone: set[int] = set()  # rows popped (resume removes a few)
        self._shadowed = self._shadowed_rows()

    @classmethod
    def from_batches(cls, batches: Iterable[pa.RecordBatch], spill: Spill | None = None) -> "StoreIndex":
        """From record batches with the columns sha256, path, label, error, error_kind,
        num_bytes and the stat columns. Each batch is turned into columns as it comes (the
        Python strings of one batch at a time), appended to the columns' files once they are
        large."""
        spill = spill or Spill()
        build = {"hashes": spill.builder(np.int64), "offsets": spill.builder(np.int64),
                 "data": spill.builder(np.uint8), "sha": spill.builder(np.uint8, (32,)),
                 "has_sha": spill.builder(bool), "has_error": spill.builder(bool), "label": spill.builder(np.int8),
                 "stat": spill.builder(np.int64, (4,)), "has_stat": spill.builder(bool)}
        build["offsets"].append(np.zeros(1, np.int64))
        error_kinds: dict[int, str] = {}
        odd: dict[int, str] = {}
        rows = size = 0
        for batch in batches:
            n = batch.num_rows
            paths = batch.column("path").to_pylist()
            build["hashes"].append(np.fromiter(map(hash, paths), np.int64, count=n))
            encoded = [p.encode("utf-8", "surrogatepass") for p in paths]
            build["offsets"].append(size + np.cumsum([len(e) for e in encoded], dtype=np.int64))
            joined = b"".join(encoded)
            build["data"].append(np.frombuffer(joined, np.uint8))
            size += len(joined)
            del paths, encoded, joined
            values = batch.column("sha256").to_pylist()
            digests = [content_digest(v) if v else bytes(32) for v in values]
            build["sha"].append(np.frombuffer(b"".join(digests), np.uint8).reshape(n, 32))
            build["has_sha"].append(np.array([bool(v) for v in values], bool))
            odd.update({rows + i: v for i, (v, d) in enumerate(zip(values, digests)) if v and d.hex() != v})
            errors = batch.column("error").is_valid().to_numpy(zero_copy_only=False)
            build["has_error"].append(errors)
            if errors.any():
                kinds = batch.column("error_kind").to_pylist()
                error_kinds.update({rows + int(i): kinds[i] for i in np.flatnonzero(errors) if kinds[i] is not None})
            build["label"].append(batch.column("label").fill_null(_NO_LABEL).to_numpy(zero_copy_only=False)
                                  .astype(np.int8))
            stats = [batch.column(name) for name in ("num_bytes", *STAT_COLUMNS)]
            build["has_stat"].append(np.logical_and.reduce([c.is_valid().to_numpy(zero_copy_only=False)
                                                           for c in stats]))
            build["stat"].append(np.stack([c.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                                           for c in stats], axis=1))
            rows += n
        done = {name: builder.finish() for name, builder in build.items()}
        hashes = done.pop("hashes")
        return cls(hashes, _IndexColumns(**done, error_kinds=error_kinds, odd_sha=odd), spill)

    def _shadowed_rows(self) -> set[int]:
        """Rows that are not their path's first (a later row of the same path is shadowed)."""
        shadowed: set[int] = set()
        hashes = self._hashes
        for start in range(0, len(hashes) - 1, 1 << 20):  # in slices: the comparison's mask stays small
            part = np.asarray(hashes[start:start + (1 << 20) + 1])
            for k in (np.flatnonzero(part[1:] == part[:-1]) + 1 + start).tolist():  # rare: repeats, hash ties
                here = self._path_at(int(self._order[k]))
                back = k - 1
                while back >= 0 and hashes[back] == hashes[k]:
                    if self._path_at(int(self._order[back])) == here:
                        shadowed.add(int(self._order[k]))
                        break
                    back -= 1
        return shadowed

    def _path_bytes(self, row: int) -> bytes:
        return self._c.data[self._c.offsets[row]:self._c.offsets[row + 1]].tobytes()

    def _path_at(self, row: int) -> str:
        return self._path_bytes(row).decode("utf-8", "surrogatepass")

    def _row(self, path: str) -> int | None:
        if not isinstance(path, str):
            return None
        h = hash(path)
        hashes = self._hashes
        k = int(hashes.searchsorted(h))
        encoded = None
        while k < len(hashes) and hashes[k] == h:
            row = int(self._order[k])
            encoded = encoded or path.encode("utf-8", "surrogatepass")
            if row not in self._shadowed and self._path_bytes(row) == encoded:
                return None if row in self._gone else row
            k += 1
        return None

    def _entry(self, row: int) -> IndexEntry:
        c = self._c
        stat = FileStat(*c.stat[row].tolist()) if c.has_stat[row] else None
        label = int(c.label[row])
        sha = (c.odd_sha.get(row) or c.sha[row].tobytes().hex()) if c.has_sha[row] else None
        return IndexEntry(sha, bool(c.has_error[row]), c.error_kinds.get(row), stat,
                          None if label == _NO_LABEL else label)

    def __getitem__(self, path: str) -> IndexEntry:
        row = self._row(path)
        if row is None:
            raise KeyError(path)
        return self._entry(row)

    def __contains__(self, path: object) -> bool:
        return self._row(path) is not None  # type: ignore[arg-type]

    def _dropped(self) -> np.ndarray:
        return np.fromiter(sorted(self._shadowed | self._gone), np.int64)

    def _live(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``rows`` (default: all), without the shadowed and popped ones."""
        rows = np.arange(len(self._c.label)) if rows is None else rows
        dropped = self._dropped()
        return rows[~np.isin(rows, dropped)] if len(dropped) else rows

    def _live_slices(self, step: int = 1 << 16) -> Iterator[np.ndarray]:
        """The live rows, a slice at a time (a whole index's row numbers would be 8 bytes a row)."""
        for start in range(0, len(self._c.label), step):
            yield self._live(np.arange(start, min(start + step, len(self._c.label))))

    def __iter__(self) -> Iterator[str]:
        for rows in self._live_slices():
            for row in rows.tolist():
                yield self._path_at(row)

    def __len__(self) -> int:
        return len(self._c.label) - len(self._shadowed | self._gone)

    def pop(self, path: str, *default: Any) -> IndexEntry | None:
        row = self._row(path)
        if row is None:
            if default:
                return default[0]
            raise KeyError(path)
        self._gone.add(row)
        return self._entry(row)

    def error_paths(self) -> list[str]:
        """Paths whose row is an error row."""
        errors = np.flatnonzero(np.asarray(self._c.has_error))
        return [self._path_at(int(row)) for row in self._live(errors)]

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sha256s as an (n, 32) array of bytes, labels or -1)`` of the rows with features, in
        store order (a copy: 33 bytes a row; :meth:`iter_contents` gives it in slices)."""
        parts = list(self.iter_contents())
        if not parts:
            return np.zeros((0, 32), np.uint8), np.zeros(0, np.int8)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def iter_contents(self, step: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`contents` in slices of at most ``step`` rows, in store order."""
        for rows in self._live_slices(step):
            rows = rows[np.asarray(self._c.has_sha[rows]) & ~np.asarray(self._c.has_error[rows])]
            if len(rows):
                yield np.asarray(self._c.sha[rows]), np.asarray(self._c.label[rows])


@dataclass
class FeatureArrays:
    """A representation matrix with the metadata of its rows."""

    X: np.ndarray  # (N, d) float32
    label: np.ndarray  # (N,) int8, -1 where unknown
    group: np.ndarray  # (N,) object (str or None)
    path: np.ndarray  # (N,) object
    sha256: np.ndarray  # (N,) object
    local_fallback: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.X)


class FeatureStore:
    """A store: a local folder or a URI (``s3://bucket/prefix`` and the like; see
    :mod:`tidy_detect.features.storage`). Open an existing one with ``FeatureStore(path_or_uri)``;
    create or reopen one for writing with :meth:`open_for_writing`.

    ``uri`` names the store in messages and for opening it again elsewhere; ``location`` does
    its file operations; ``path`` is its local folder (local stores only).

    Raises:
        StoreError: the location is not a store, its config.json is unreadable, or its filesystem
            cannot be reached.
    """

    def __init__(self, path: str | Path | StoreLocation) -> None:
        self.location = StoreLocation.parse(path)
        self.uri = self.location.uri
        if not self.location.is_file(CONFIG_FILE):
            raise StoreError(f"{self.uri}: not a feature store (no {CONFIG_FILE}); create one with `tidy-detect extract`")
        self.config = _read_config(self.location)
        self.lock = self.location.writer_lock()
        self._recover_on_open()

    @property
    def path(self) -> Path:
        """The store's local folder.

        Raises:
            StoreError: the store is on object storage (use ``uri`` or ``location``).
        """
        return self.location.path

    @property
    def is_local(self) -> bool:
        return self.location.is_local

    @contextlib.contextmanager
    def writing(self, wait: float = 0.0) -> Iterator["FeatureStore"]:
        """Hold the store's writer lock for the block (re-entrant); see
        :class:`~tidy_detect.features.storage.StoreLock` and
        :class:`~tidy_detect.features.storage.StoreLease`.

        Raises:
            StoreError: another process holds it.
        """
        self.lock.acquire(wait)
        try:
            yield self
        finally:
            self.lock.release()

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def open_for_writing(cls, path: str | Path | StoreLocation, extraction: dict[str, Any], dim: int,
                         perturbation: dict[str, Any] | None = None,
                         pairing: dict[str, str] | None = None, accept_dtype: bool = False,
                         datasets: dict[str, str] | None = None) -> "FeatureStore":
        """Create a store, or reopen one made with the same extraction config.

        ``perturbation`` (robustness sweeps) is recorded apart from the extraction config: a
        perturbed store still fits heads trained on clean features, but clean and perturbed rows
        never share a store.

        ``pairing`` (generator -> the real folder it is evaluated against, from dataset layouts
        like UniFD's) is merged into what the store already records, and so is ``datasets``
        (group -> the dataset layout it was read with, e.g. ``{"ADM": "genimage"}``), which lets
        evaluation tell GenImage's ``adm`` from another dataset's group of that name.

        Raises:
            StoreError: the folder holds a store made with another config or perturbation (the
                message lists the differences), or it is a non-empty folder that is not a store,
                or a generator would be paired with two real folders.
        """
        location = StoreLocation.parse(path)
        path = location.uri  # as the user gave it, for messages
        fingerprint = config_fingerprint(extraction)
        if location.is_file(CONFIG_FILE):
            store = cls(location)
            if store.config.get("perturbation") != perturbation:
                raise StoreError(f"{path} holds images with perturbation {store.config.get('perturbation')}, "
                                 f"not {perturbation}; use another --out folder")
            if store.fingerprint != fingerprint:
                diffs = extraction_mismatches(store.extraction, extraction, accept_dtype=accept_dtype)
                if diffs:
                    hint = f" ({DTYPE_HINT})" if any(".dtype:" in d for d in diffs) else ""
                    raise StoreError(
                        f"{path} was made with a different extraction config, so its rows cannot be mixed with "
                        f"these: {'; '.join(diffs[:5]) or 'fingerprints differ'}{hint}. Use another --out folder, "
                        f"or the same options as the store (see {location.child(CONFIG_FILE)})."
                    )
                log.warning("%s: writing with %s into a store made with %s (accepted)", path,
                            {k: (extraction.get(k) or {}).get("dtype") for k in ("clip", "captioner", "grounder")},
                            {k: (store.extraction.get(k) or {}).get("dtype") for k in ("clip", "captioner", "grounder")})
            if pairing:
                store._merge_pairing(pairing)
            if datasets:
                store._merge_datasets(datasets)
            return store
        if not location.is_unused():
            raise StoreError(f"{path}: exists and is not an empty folder or a feature store; choose another --out")
        location.prepare()
        from tidy_detect import __version__

        location.write_json(CONFIG_FILE, {
            "format": STORE_FORMAT,
            "format_version": STORE_FORMAT_VERSION,
            "created": _now(),
            "package_version": __version__,
            "fingerprint": fingerprint,
            "dim": dim,
            "extraction": extraction,
            "perturbation": perturbation,
            "pairing": dict(pairing or {}),
            "datasets": dict(sorted((datasets or {}).items())),
            "runs": [],
        })
        return cls(location)

    @property
    def fingerprint(self) -> str:
        return self.config["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def extraction(self) -> dict[str, Any]:
        return self.config["extraction"]

    @property
    def pairing(self) -> dict[str, str]:
        """Generator -> real folder it is evaluated against (empty for self-contained groups)."""
        return dict(self.config.get("pairing") or {})

    def _merge_pairing(self, pairing: dict[str, str]) -> None:
        current = self.pairing
        clashes = [g for g, r in pairing.items() if current.get(g, r) != r]
        if clashes:
            g = clashes[0]
            raise StoreError(f"{self.uri}: generator {g!r} is paired with real folder {current[g]!r} in this store, "
                             f"not {pairing[g]!r}; use another --out folder or the same --pairing")
        if any(current.get(g) != r for g, r in pairing.items()):
            self._update_config(lambda config: config.update(pairing={**current, **pairing}))

    @property
    def datasets(self) -> dict[str, str]:
        """Group -> the dataset layout it was read with (empty for stores made without a layout,
        or before this was recorded)."""
        return dict(self.config.get("datasets") or {})

    def _merge_datasets(self, datasets: dict[str, str]) -> None:
        current = self.datasets
        clashes = [g for g, layout in datasets.items() if current.get(g, layout) != layout]
        if clashes:
            g = clashes[0]
            raise StoreError(f"{self.uri}: group {g!r} holds {current[g]} images in this store, not "
                             f"{datasets[g]} ones; one name for two datasets' generators would mix them: "
                             f"use another --out folder")
        if any(g not in current for g in datasets):
            self._update_config(lambda config: config.update(datasets=dict(sorted({**current, **datasets}.items()))))

    def record_reading(self, exif: str) -> None:
        """Record how this store's images are read (``exif_orientation``: ``apply`` or ``ignore``),
        or refuse a run that would read them the other way (an EXIF-tagged image would get other
        pixels, so other features, than its rows have).

        Raises:
            StoreError: the store was read the other way.
        """
        known = self.config.get("exif_orientation")
        if known == exif:
            return
        if known is not None:
            done = {"apply": "applied", "ignore": "ignored (pixels as stored, the benchmark protocol)"}
            raise StoreError(f"{self.uri}: its images were read with the EXIF orientation {done.get(known, known)}, "
                             f"and this run would {exif} it; use --exif {known}, or another --out folder")
        self._update_config(lambda config: config.update(exif_orientation=exif))

    def record_run(self, run: dict[str, Any]) -> None:
        """Append a run's summary (device, dtype, counts, timings) to config.json.

        Raises:
            StoreError: another process holds the writer lock, or config.json became unreadable.
        """

        def append(config: dict[str, Any]) -> None:
            runs = config.get("runs")
            config["runs"] = [*(runs if isinstance(runs, list) else []), run]

        self._update_config(append)

    def _update_config(self, change: Any) -> None:
        """Read config.json, ``change(config)`` in place, write it back whole: by the one writer,
        so under the writer lock (re-entrant: a run already holds it)."""
        with self.writing():
            self.lock.verify()
            config = _read_config(self.location)
            change(config)
            self.location.write_json(CONFIG_FILE, config)
            self.config = config

    def save_inputs(self, items: Iterable[Any], params: dict[str, Any] | None = None) -> str:
        """Save a run's image list in the store as ``inputs.csv`` (and ``inputs.json``, how it was
        sampled; see :func:`tidy_detect.data.sampling.save_list`). Returns where it went.

        Raises:
            InputError: the list cannot be written locally; StoreError: it cannot be uploaded.
        """
        from tidy_detect.data.sampling import save_list

        if self.location.is_local:
            return str(save_list(items, self.path / INPUTS_LIST, params))
        import tempfile

        # save_list writes files; on object storage they are written locally, then uploaded whole.
        with tempfile.TemporaryDirectory(prefix="tidy-inputs-") as folder:
            csv_path = save_list(items, Path(folder) / INPUTS_LIST, params)
            for local in (csv_path, csv_path.with_suffix(".json")):
                self.location.write_bytes(local.name, local.read_bytes())
        return self.location.child(INPUTS_LIST)

    # -- writing -----------------------------------------------------------------------------

    def write(self, rows: Sequence[dict[str, Any]]) -> Path | str | None:
        """Write rows as one shard, whole or not at all. Returns the shard (a path, or a URI on
        object storage; None for no rows).

        Raises:
            StoreError: this process held the writer lease and lost it (object storage), or the
                shard cannot be written there.
        """
        if not rows:
            return None
        table = rows_to_table(rows, self.dim)
        return self._shard(self._write_table(table, prefix="part"))

    def _shard_name(self, table: pa.Table, prefix: str) -> str:
        keys = sorted(f"{s}\0{p}" for s, p in zip(table["sha256"].to_pylist(), table["path"].to_pylist()))
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
        return f"{prefix}-{name}.parquet"

    def _write_table(self, table: pa.Table, prefix: str, final: str | None = None) -> str:
        """Write ``table`` as the shard ``final`` (default: named by its rows); returns the name."""
        self.lock.verify()
        final = final or self._shard_name(table, prefix)
        self.location.write_parquet(f"{SHARD_DIR}/{final}", table)
        return final

    def _shard(self, name: str) -> Path | str:
        return self.path / SHARD_DIR / name if self.location.is_local else self.location.child(SHARD_DIR, name)

    # -- reading -----------------------------------------------------------------------------

    def _shard_names(self) -> list[str]:
        return self.location.list(SHARD_DIR, ".parquet")

    def shards(self) -> list[Path | str]:
        """The shards in name order: paths for a local store, URIs on object storage."""
        return [self._shard(name) for name in self._shard_names()]

    @property
    def shard_dir(self) -> Path:
        """The local folder of Parquet shards: ``pandas.read_parquet(store.shard_dir)`` reads all
        rows (``shards_uri`` names it wherever the store is).

        Raises:
            StoreError: the store is on object storage.
        """
        return self.path / SHARD_DIR

    @property
    def shards_uri(self) -> str:
        """Where the shards are, for other readers: ``pandas.read_parquet(store.shards_uri)``."""
        return self.location.child(SHARD_DIR)

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 8192,
                     dedupe: bool = True) -> Iterator[pa.RecordBatch]:
        """Record batches over all shards, each (sha256, path) key once, with bounded memory."""
        schema = store_schema(self.dim)
        wanted = list(columns) if columns is not None else None
        read = schema.names if wanted is None else list(dict.fromkeys([*wanted, *KEY_COLUMNS] if dedupe else wanted))
        seen = _SeenKeys()
        for shard, open_shard in self.location.parquet_files(SHARD_DIR, self._shard_names()):
            try:
                with open_shard() as reader:
                    present = set(reader.schema_arrow.names)
                    missing = [name for name in read if name not in present]
                    batches = reader.iter_batches(batch_size=batch_size, columns=[n for n in read if n in present])
                    for batch in batches:
                        if missing:  # a shard written before these columns existed
                            batch = _with_nulls(batch, [schema.field(n) for n in missing], read)
                        if dedupe:
                            batch = _drop_seen(batch, seen)
                        if wanted is not None:
                            batch = batch.select(wanted)
                        if batch.num_rows:
                            yield batch
            except (OSError, pa.ArrowException) as exc:
                raise self._unreadable(shard, exc) from exc

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        batches = list(self.iter_batches(columns))
        if not batches:
            schema = store_schema(self.dim)
            return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.Table.from_batches(batches)

    def rows(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts (embeddings as lists); convenient for small stores and inspection."""
        for batch in self.iter_batches(columns, batch_size=1024):
            yield from batch.to_pylist()

    def keys(self) -> set[tuple[str | None, str]]:
        """(sha256, path) of every row."""
        keys: set[tuple[str | None, str]] = set()
        for batch in self.iter_batches(KEY_COLUMNS, dedupe=False):
            keys.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
        return keys

    def __len__(self) -> int:
        return len(self.keys())

    def index(self) -> StoreIndex:
        """path -> :class:`IndexEntry` (content hash, error or not, file stat as read) for every
        row: what resume needs, cheaply (see :class:`StoreIndex`)."""
        columns = ["sha256", "path", "label", "error", "error_kind", "num_bytes", *STAT_COLUMNS]
        return StoreIndex.from_batches(self.iter_batches(columns, dedupe=False))  # a path's first row wins there

    def update_stats(self, stats: dict[str, FileStat]) -> int:
        """Record new file stats for rows whose files were touched but hold the same content, so
        the next resume recognises them from their stat alone. Returns the rows updated."""
        if not stats:
            return 0
        schema = store_schema(self.dim)
        updated = 0
        for shard in self._shard_names():
            table = _conform(self._read_shard(shard), schema)
            paths = table["path"].to_pylist()
            hits = [i for i, p in enumerate(paths) if p in stats]
            if not hits:
                continue
            columns = {name: table[name].to_pylist() for name in ("num_bytes", *STAT_COLUMNS)}
            for i in hits:
                stat = stats[paths[i]]
                columns["num_bytes"][i] = stat.size
                columns["mtime_ns"][i], columns["ctime_ns"][i], columns["inode"][i] = (
                    stat.mtime_ns, stat.ctime_ns, stat.inode)
            for name, values in columns.items():
                table = table.set_column(schema.get_field_index(name), schema.field(name),
                                         pa.array(values, schema.field(name).type))
            self._replace([shard], table)
            updated += len(hits)
        return updated

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Rewrite the shards holding rows of ``paths`` without them; returns rows removed."""
        doomed = set(paths)
        removed = 0
        if not doomed:
            return 0
        for shard in self._shard_names():
            table = self._read_shard(shard)
            keep = pc.invert(pc.is_in(table["path"], value_set=pa.array(sorted(doomed), pa.string())))
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            removed += table.num_rows - kept.num_rows
            if kept.num_rows:
                self._replace([shard], _conform(kept, store_schema(self.dim)))
            else:
                self.lock.verify()
                self.location.delete(f"{SHARD_DIR}/{shard}")
        return removed

    def lookup(self, sha256s: Iterable[str]) -> dict[str, dict[str, Any]]:
        """One successful row per content hash, for hashes already in the store."""
        wanted = set(sha256s)
        found: dict[str, dict[str, Any]] = {}
        if not wanted:
            return found
        for batch in self.iter_batches():
            shas = batch.column("sha256").to_pylist()
            errors = batch.column("error").to_pylist()
            take = [i for i, (s, e) in enumerate(zip(shas, errors)) if s in wanted and e is None and s not in found]
            if take:
                sub = batch.take(pa.array(take))
                for row in _rows_with_arrays(sub, self.dim):
                    found.setdefault(row["sha256"], row)
        return found

    def rows_for_paths(self, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Rows (embeddings as NumPy arrays) of the given image paths that the store holds."""
        return {row["path"]: row for rows in self.iter_rows_among(paths) for row in rows}

    def iter_rows_among(self, paths: Iterable[str], batch_size: int = 256) -> Iterator[list[dict[str, Any]]]:
        """The rows (embeddings as NumPy arrays) of the given image paths, a list of at most
        ``batch_size`` at a time in the store's order, each path's first row once; one pass over
        the shards, holding the paths asked for (not their rows)."""
        wanted = pa.array(sorted(set(paths)), pa.string())
        seen: set[str] = set()
        for batch in self.iter_batches(batch_size=batch_size):
            batch = batch.filter(pc.is_in(batch.column("path"), value_set=wanted))
            rows = []
            for row in _rows_with_arrays(batch, self.dim):
                if row["path"] not in seen:
                    seen.add(row["path"])
                    rows.append(row)
            if rows:
                yield rows

    def iter_arrays(self, representation: RepresentationConfig, batch_size: int = 8192,
                    labeled_only: bool = False) -> Iterator[FeatureArrays]:
        """Representations of the rows without errors, batch by batch (bounded memory)."""
        columns = ["sha256", "path", "label", "group", "local_fallback", "error", *EMBEDDING_COLUMNS]
        if representation.kind in ("image", "text", "global"):
            columns = columns[:-2]  # local embeddings are not needed
        for batch in self.iter_batches(columns, batch_size=batch_size):
            ok = batch.column("error").is_null()
            if labeled_only:
                ok = pc.and_(ok, batch.column("label").is_valid())
            batch = batch.filter(ok)
            if batch.num_rows == 0:
                continue
            gi = vectors_to_numpy(batch.column("global_image"), self.dim)
            gt = vectors_to_numpy(batch.column("global_text"), self.dim)
            if "local_images" in batch.schema.names:
                li = vector_lists_to_numpy(batch.column("local_images"), self.dim)
                lt = vector_lists_to_numpy(batch.column("local_texts"), self.dim)
            else:
                li = lt = [np.zeros((0, self.dim), np.float32)] * batch.num_rows
            labels = batch.column("label").to_numpy(zero_copy_only=False)
            yield FeatureArrays(
                X=discrepancy.representation(representation, gi, gt, li, lt),
                label=np.where(np.isnan(labels.astype(float)), -1, labels).astype(np.int8),
                group=np.array(batch.column("group").to_pylist(), dtype=object),
                path=np.array(batch.column("path").to_pylist(), dtype=object),
                sha256=np.array(batch.column("sha256").to_pylist(), dtype=object),
                local_fallback=np.array(batch.column("local_fallback").to_pylist(), dtype=bool),
            )

    def load(self, representation: RepresentationConfig, labeled_only: bool = False) -> FeatureArrays:
        """All rows without errors as one :class:`FeatureArrays`."""
        parts = list(self.iter_arrays(representation, labeled_only=labeled_only))
        if not parts:
            empty = np.zeros(0, dtype=object)
            return FeatureArrays(np.zeros((0, self.dim), np.float32), np.zeros(0, np.int8), empty, empty, empty,
                                 np.zeros(0, bool))
        return FeatureArrays(*(np.concatenate([getattr(p, f) for p in parts])
                               for f in ("X", "label", "group", "path", "sha256", "local_fallback")))

    def summary(self) -> dict[str, Any]:
        """Counts: rows, errors by kind, labels, groups."""
        counts: dict[str, Any] = {"rows": 0, "errors": 0, "error_kinds": {}, "labels": {"real": 0, "fake": 0, "none": 0},
                                  "groups": {}, "no_objects": 0}
        for batch in self.iter_batches(["label", "group", "error", "error_kind", "local_fallback"]):
            for label, group, error, kind, fallback in zip(*(batch.column(i).to_pylist() for i in range(5))):
                counts["rows"] += 1
                if error is not None:
                    counts["errors"] += 1
                    counts["error_kinds"][kind] = counts["error_kinds"].get(kind, 0) + 1
                    continue
                counts["labels"][{0: "real", 1: "fake"}.get(label, "none")] += 1
                counts["groups"][group] = counts["groups"].get(group, 0) + 1
                counts["no_objects"] += bool(fallback)
        return counts

    # -- maintenance -------------------------------------------------------------------------

    def compact(self, target_rows: int = 4096) -> int:
        """Merge small shards into larger ones (and delete temporary files older than an hour left by
        writers that died mid-write); returns how many shards were merged.

        Crash-safe: the plan is journalled before the merged shard is written, so a crash leaves
        either the old shards or the complete new one plus a journal the next open finishes.
        """
        # Temporary files of writers that died mid-write: readers skip them, so only their space is
        # lost. (Object stores have none: objects are written whole under their final names.)
        self.location.remove_stale_temporaries(SHARD_DIR, 3600)
        with self.writing():
            return self._compact(target_rows)

    def _compact(self, target_rows: int) -> int:
        sizes = self._shard_rows(self._shard_names())
        small = [s for s, n in sizes.items() if n < target_rows]
        if len(small) < 2:
            return 0
        merged = 0
        group: list[str] = []
        rows = 0
        for shard in small + [None]:
            if shard is not None:
                group.append(shard)
                rows += sizes[shard]
            if group and (shard is None or rows >= target_rows):
                if len(group) > 1:
                    self._merge(group)
                    merged += len(group)
                group, rows = [], 0
        return merged

    def _merge(self, shards: list[str]) -> None:
        schema = store_schema(self.dim)
        tables = []
        for shard, open_shard in self.location.parquet_files(SHARD_DIR, shards):
            try:
                with open_shard() as reader:
                    tables.append(_conform(reader.read(), schema))
            except (OSError, pa.ArrowException) as exc:
                raise self._unreadable(shard, exc) from exc
        self._replace(shards, pa.concat_tables(tables))

    def _shard_rows(self, shards: list[str]) -> dict[str, int]:
        rows = {}
        for shard, open_shard in self.location.parquet_files(SHARD_DIR, shards):
            try:
                with open_shard() as reader:
                    rows[shard] = reader.metadata.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise self._unreadable(shard, exc) from exc
        return rows

    def _read_shard(self, shard: str) -> pa.Table:
        try:
            return self.location.read_table(f"{SHARD_DIR}/{shard}")
        except (OSError, pa.ArrowException) as exc:
            raise self._unreadable(shard, exc) from exc

    def _unreadable(self, shard: str, exc: BaseException) -> StoreError:
        where = self.location.child(SHARD_DIR, shard)
        if isinstance(exc, FileNotFoundError) or "Path does not exist" in str(exc):
            return StoreError(f"{where}: the shard went away while it was read (a writer compacted the store "
                              f"meanwhile); read the store again")
        return StoreError(f"{where}: unreadable shard ({exc}); move it out of the store folder and rerun the "
                          f"extraction to redo its images")

    def _replace(self, shards: list[str], table: pa.Table) -> None:
        """Write ``table`` as a new shard, then remove ``shards``, with a commit record for crash
        safety (the same on disk and on object storage, where nothing can be renamed)."""
        merged = self._shard_name(table, prefix="part")
        self.lock.verify()
        # Journal first: after a crash the next open either finds the merged shard complete and
        # removes the old ones, or finds it missing and keeps them.
        self.location.write_json(COMPACT_JOURNAL, {"merged": merged, "replaced": [s for s in shards if s != merged]})
        self._write_table(table, prefix="part", final=merged)
        self._recover_compaction()

    def _recover_on_open(self) -> None:
        """Finish a compaction a crashed writer left, unless a writer is at work (it finishes its
        own; readers skip the rows they see twice meanwhile) or the store is read-only to us."""
        if not self.location.is_file(COMPACT_JOURNAL):
            return
        try:
            self.lock.acquire()
        except StoreError as exc:
            log.debug("%s: leaving the compaction journal to the writer (%s)", self.uri, exc)
            return
        try:
            self._recover_compaction()
        except OSError as exc:
            log.warning("%s: could not finish an interrupted compaction (%s); readers skip its repeated rows",
                        self.uri, exc)
        finally:
            self.lock.release()

    def _recover_compaction(self) -> None:
        if not self.location.is_file(COMPACT_JOURNAL):
            return
        try:
            plan = json.loads(self.location.read_text(COMPACT_JOURNAL))
            merged, replaced = plan["merged"], plan["replaced"]
            if not isinstance(merged, str) or not all(isinstance(n, str) for n in replaced):
                raise ValueError("not a compaction plan")
        except (OSError, ValueError, KeyError, TypeError):
            # written whole, so unreadable means foreign; merged rows are deduped
            self.location.delete(COMPACT_JOURNAL)
            return
        if self.location.is_file(f"{SHARD_DIR}/{_base_name(merged)}"):
            self.location.delete_many([f"{SHARD_DIR}/{_base_name(name)}" for name in replaced])
        self.location.delete(COMPACT_JOURNAL)


def _with_nulls(batch: pa.RecordBatch, fields: list[pa.Field], order: list[str]) -> pa.RecordBatch:
    arrays = dict(zip(batch.schema.names, batch.columns))
    for field in fields:
        arrays[field.name] = pa.nulls(batch.num_rows, field.type)
    return pa.RecordBatch.from_arrays([arrays[n] for n in order], names=order)


def _base_name(name: str) -> str:
    """A journal's shard name without any folder part (a journal names shards, nothing else)."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def _read_config(location: StoreLocation) -> dict[str, Any]:
    """config.json, checked enough that every later use of it is safe.

    Raises:
        StoreError: unreadable, not JSON, not an object, another format, a newer version, or a
            required field of the wrong type.
    """
    config_file = location.child(CONFIG_FILE)
    try:
        config = json.loads(location.read_text(CONFIG_FILE))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{config_file}: cannot be read ({exc})") from exc
    if not isinstance(config, dict):
        raise StoreError(f"{config_file}: must hold a JSON object (a tidy-detect store config), "
                         f"got {type(config).__name__}")
    if config.get("format") != STORE_FORMAT:
        raise StoreError(f"{config_file}: not a tidy-detect store config (format {config.get('format')!r})")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(f"{config_file}: format_version must be an integer, got {version!r}")
    if version > STORE_FORMAT_VERSION:
        raise StoreError(f"{location.uri}: store format {version} is newer than this tidy-detect "
                         f"understands ({STORE_FORMAT_VERSION}); upgrade tidy-detect")
    checks = {"fingerprint": (isinstance(config.get("fingerprint"), str), "a string"),
              "dim": (isinstance(config.get("dim"), int) and not isinstance(config.get("dim"), bool)
                      and 1 <= config.get("dim") <= 65536, "an integer in 1..65536"),
              "extraction": (isinstance(config.get("extraction"), dict), "an object"),
              "pairing": (config.get("pairing") is None or isinstance(config.get("pairing"), dict), "an object"),
              "datasets": (config.get("datasets") is None or isinstance(config.get("datasets"), dict), "an object")}
    for name, (ok, rule) in checks.items():
        if not ok:
            raise StoreError(f"{config_file}: field {name} must be {rule}, got {config.get(name)!r}")
    return config


class _SeenKeys:
    """The (sha256, path) keys a read has passed, as their 64-bit hashes in sorted NumPy runs
    (8 bytes a row, where a set of Python ints took about 70). Each batch's new keys are a small
    run; ``RUNS`` of them are merged into a middle run, which is merged into the main one once it
    is an eighth of its size, so merging costs O(n log n) over a whole read."""

    RUNS = 16

    def __init__(self) -> None:
        self._main = np.zeros(0, np.int64)
        self._middle = np.zeros(0, np.int64)
        self._small: list[np.ndarray] = []

    def _known(self, hashes: np.ndarray) -> np.ndarray:
        known = np.zeros(len(hashes), bool)
        for run in (self._main, self._middle, *self._small):
            if len(run):
                at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
                known |= run[at] == hashes
        return known

    def first_time(self, hashes: np.ndarray) -> np.ndarray:
        """Which of ``hashes`` (a batch, in order) were not seen before, counting each once; they
        are remembered."""
        _, first = np.unique(hashes, return_index=True)
        keep = np.zeros(len(hashes), bool)
        keep[first] = True
        keep &= ~self._known(hashes)
        if keep.any():
            self._small.append(np.sort(hashes[keep]))
            if len(self._small) >= self.RUNS:
                self._middle = np.sort(np.concatenate([self._middle, *self._small]))
                self._small = []
                if len(self._middle) >= len(self._main) // 8:
                    self._main = np.sort(np.concatenate([self._main, self._middle]))
                    self._middle = np.zeros(0, np.int64)
        return keep

    def __len__(self) -> int:
        return len(self._main) + len(self._middle) + sum(len(run) for run in self._small)


def _drop_seen(batch: pa.RecordBatch, seen: _SeenKeys) -> pa.RecordBatch:
    shas = batch.column("sha256").to_pylist()
    paths = batch.column("path").to_pylist()
    keep = seen.first_time(np.fromiter(map(hash, zip(shas, paths)), np.int64, count=batch.num_rows))
    if keep.all():
        return batch
    return batch.filter(pa.array(keep))


def _rows_with_arrays(batch: pa.RecordBatch, dim: int) -> Iterator[dict[str, Any]]:
    """Rows as dicts with embeddings as NumPy arrays (the form the writer takes)."""
    gi = vectors_to_numpy(batch.column("global_image"), dim)
    gt = vectors_to_numpy(batch.column("global_text"), dim)
    li = vector_lists_to_numpy(batch.column("local_images"), dim)
    lt = vector_lists_to_numpy(batch.column("local_texts"), dim)
    plain = batch.drop_columns(EMBEDDING_COLUMNS).to_pylist()
    for k, row in enumerate(plain):
        if row.get("error") is None:
            row.update(global_image=gi[k], global_text=gt[k], local_images=li[k], local_texts=lt[k])
        else:
            row.update(global_image=None, global_text=None, local_images=None, local_texts=None)
        yield row
