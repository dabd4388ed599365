"""Large read-only columns kept in files the kernel pages in and out, rather than in the process.

A resume over a store of ten million rows needs, for every stored row, its path, content hash,
file stat and label (:class:`~tidy_detect.features.store.StoreIndex`), and every stored content
(:class:`~tidy_detect.features.extractor.ContentIndex`): about 0.16 KiB a row, 1.6 GB that would
otherwise stay in the process's memory for the whole run. Once such a column is built it is only
read, so it is written to a file and mapped (``np.memmap``): pages are read when looked up and
are page cache, which the kernel drops under memory pressure (a container's memory limit
included) instead of killing the run. The file is unlinked as soon as it is mapped, so no file is
left behind, even when the run is killed (killed while it builds the index, it leaves its folder,
``tidy-detect-index-*``, and the column it was writing).

Only columns of at least :data:`MIN_BYTES` go to files (a small store stays in memory, where it
costs nothing). ``TIDY_DETECT_SPILL_DIR`` names the folder for the files (default: the system's
temporary folder; point it at a disk when that is a RAM-backed ``tmpfs``), and ``off`` keeps
everything in memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from tidy_detect.errors import StoreError

T = TypeVar("T")

log = logging.getLogger(__name__)

SPILL_ENV = "TIDY_DETECT_SPILL_DIR"
MIN_BYTES = 4 << 20  # columns smaller than this stay in memory (a 4 MiB column: 131,072 content hashes)


def spill_folder() -> str | None:
    """Where columns are spilled (None: they are not; ``TIDY_DETECT_SPILL_DIR=off``)."""
    value = os.environ.get(SPILL_ENV, "").strip()
    if value.lower() == "off":
        return None
    return value or tempfile.gettempdir()


class Spill:
    """Maps columns into files of one temporary folder (see the module docstring); made per index.

    ``put`` moves a finished array out of memory; ``builder`` gathers a column chunk by chunk,
    in memory until it is large and then in its file, so a column is never held whole while it
    is built.
    """

    def __init__(self, min_bytes: int | None = None) -> None:
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.folder = spill_folder()
        self._made: str | None = None
        self._count = 0

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def _path(self) -> str:
        if self._made is None:
            try:
                os.makedirs(self.folder, exist_ok=True)  # type: ignore[arg-type]
                self._made = tempfile.mkdtemp(prefix="tidy-detect-index-", dir=self.folder)
            except OSError as exc:
                raise StoreError(f"{self.folder}: cannot write the resume index's files there "
                                 f"({exc.strerror or exc}); set {SPILL_ENV} to a writable folder, or "
                                 f"{SPILL_ENV}=off to keep the index in memory") from exc
            # the files are unlinked once mapped; the folder goes when this object does
            weakref.finalize(self, shutil.rmtree, self._made, True)
        self._count += 1
        return os.path.join(self._made, f"{self._count}.bin")

    def _map(self, path: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if not shape[0]:
            os.unlink(path)
            return np.zeros(shape, dtype)
        mapped = np.memmap(path, dtype=dtype, mode="r", shape=shape)
        try:
            os.unlink(path)  # the mapping keeps the data; no file is left behind
        except OSError:  # a system that cannot unlink an open file: removed with the folder
            pass
        # a plain ndarray over the map (which it keeps alive as its base): np.memmap's own
        # indexing makes a subclass object per element read, several times slower per lookup
        return np.asarray(mapped)

    def put(self, array: np.ndarray) -> np.ndarray:
        """``array``, or a read-only memory map of a file holding it when it is large."""
        if not self.enabled or array.nbytes < self.min_bytes or is_mapped(array):
            return array
        path = self._path()
        try:
            np.ascontiguousarray(array).tofile(path)
        except OSError as exc:
            raise StoreError(f"{path}: cannot write the resume index ({exc.strerror or exc}); free space there, "
                             f"set {SPILL_ENV} to another folder, or {SPILL_ENV}=off") from exc
        return self._map(path, array.dtype, array.shape)

    def empty(self, length: int, dtype: Any) -> np.ndarray:
        """A writable column of ``length`` values: in a mapped file when it is large."""
        dtype = np.dtype(dtype)
        if not self.enabled or length * dtype.itemsize < self.min_bytes or not length:
            return np.empty(length, dtype)
        path = self._path()
        try:
            with open(path, "wb") as handle:
                handle.truncate(length * dtype.itemsize)
        except OSError as exc:
            raise StoreError(f"{path}: cannot write the resume index ({exc.strerror or exc}); free space there, "
                             f"set {SPILL_ENV} to another folder, or {SPILL_ENV}=off") from exc
        mapped = np.memmap(path, dtype=dtype, mode="r+", shape=(length,))
        try:
            os.unlink(path)
        except OSError:
            pass
        return np.asarray(mapped)

    def argsort(self, keys: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """``np.argsort(keys, kind="stable")`` of an int64 column, without its working memory
        when the column is large: rows are first placed by their key's top 8 bits (256 buckets,
        in row order, a chunk at a time) into a mapped result, then each bucket is sorted on its
        own. Memory is a chunk and a bucket, not the column (24 bytes a row for NumPy's sort)."""
        if not self.enabled or keys.nbytes < self.min_bytes:
            return np.argsort(keys, kind="stable")
        n = len(keys)

        def bucket(part: np.ndarray) -> np.ndarray:  # the top 8 bits, in the keys' signed order
            return ((np.asarray(part).view(np.uint64) ^ np.uint64(1 << 63)) >> np.uint64(56)).astype(np.intp)

        counts = np.zeros(256, np.int64)
        for start in range(0, n, chunk):
            counts += np.bincount(bucket(keys[start:start + chunk]), minlength=256)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        order = self.empty(n, np.int64)
        cursor = starts.copy()
        for start in range(0, n, chunk):
            b = bucket(keys[start:start + chunk])
            within = np.argsort(b, kind="stable")
            placed = b[within]
            first = np.searchsorted(placed, placed, side="left")
            order[cursor[placed] + (np.arange(len(placed)) - first)] = start + within
            cursor += np.bincount(b, minlength=256)
        for k in np.flatnonzero(counts):
            lo, hi = int(starts[k]), int(starts[k] + counts[k])
            rows = np.array(order[lo:hi])  # ascending: placed in row order, so the sort stays stable
            order[lo:hi] = rows[np.argsort(np.asarray(keys[rows]), kind="stable")]
        return order

    def builder(self, dtype: Any, width: tuple[int, ...] = ()) -> "ColumnBuilder":
        """A column of ``dtype`` (rows of shape ``width``) built by appending chunks."""
        return ColumnBuilder(self, np.dtype(dtype), width)


class ColumnBuilder:
    """Chunks of one column: in memory while they are small, then appended to a file."""

    def __init__(self, spill: Spill, dtype: np.dtype, width: tuple[int, ...]) -> None:
        self.spill, self.dtype, self.width = spill, dtype, width
        self._chunks: list[np.ndarray] = []
        self._held = 0
        self._rows = 0
        self._file: Any = None
        self._path = ""

    def append(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype).reshape((-1, *self.width))
        self._rows += len(chunk)
        if self._file is not None:
            self._write(chunk)
            return
        self._chunks.append(chunk)
        self._held += chunk.nbytes
        if self.spill.enabled and self._held >= self.spill.min_bytes:
            self._path = self.spill._path()
            self._file = open(self._path, "wb")
            chunks, self._chunks = self._chunks, []
            for held in chunks:
                self._write(held)

    def _write(self, chunk: np.ndarray) -> None:
        try:
            self._file.write(chunk.tobytes())
        except OSError as exc:
            raise StoreError(f"{self._path}: cannot write the resume index ({exc.strerror or exc}); free space "
                             f"there, set {SPILL_ENV} to another folder, or {SPILL_ENV}=off") from exc

    def finish(self) -> np.ndarray:
        """The whole column: an array, or a read-only map of its file."""
        shape = (self._rows, *self.width)
        if self._file is None:
            chunks, self._chunks = self._chunks, []
            return np.concatenate(chunks) if chunks else np.zeros(shape, self.dtype)
        self._file.close()
        self._file = None
        return self.spill._map(self._path, self.dtype, shape)


def find_key(his: np.ndarray, los: np.ndarray, key: bytes) -> int | None:
    """The position of a 16-byte ``key`` (two big-endian 64-bit halves) in columns of halves
    sorted by the high one, or None."""
    hi, lo = np.uint64(int.from_bytes(key[:8], "big")), np.uint64(int.from_bytes(key[8:16], "big"))
    k = int(np.searchsorted(his, hi))
    while k < len(his) and his[k] == hi:
        if los[k] == lo:
            return k
        k += 1
    return None


class KeySet:
    """A set of keys (any strings) that holds about 16 bytes a key, in mapped runs once large:
    what a listing of ten million rows remembers to give each row once.

    A key is kept as its 128-bit BLAKE2b digest (two 64-bit halves; a false "seen" among 10^10
    keys has a chance near 10^-19). The newest keys wait in a Python set of at most ``BUFFER``;
    then they become a sorted run, and runs of equal size merge as a binary counter adds, up to
    ``MAX_RUN`` keys, so a lookup searches a few runs. Runs of :data:`MIN_BYTES` and more go to
    ``spill`` (mapped files).
    """

    BUFFER = 1 << 16
    MAX_RUN = 1 << 21  # a merge sorts both runs in memory: some 80 MB at this size

    def __init__(self, spill: Spill | None = None) -> None:
        self._spill = spill if spill is not None else Spill()
        self._new: set[bytes] = set()
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (hi, lo), sorted by (hi, lo)
        self._count = 0

    @staticmethod
    def _digest(key: str) -> bytes:
        import hashlib

        return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def _in_runs(self, digest: bytes) -> bool:
        return any(find_key(his, los, digest) is not None for his, los in self._runs)

    def add(self, key: str) -> bool:
        """Add ``key``; whether it was new (one key: :meth:`add_many` is the fast way for many)."""
        return self.add_many([key])[0]

    def add_many(self, keys: Sequence[str]) -> list[bool]:
        """Add ``keys`` in order; for each, whether it was new (a key given twice is new the
        first time). The runs are searched once for the whole batch, which is what makes a
        listing of millions of rows fast: use batches of a few thousand."""
        digests = [self._digest(key) for key in keys]
        found = np.zeros(len(digests), bool)
        if self._runs and digests:
            halves = np.frombuffer(b"".join(digests), ">u8").astype(np.uint64).reshape(-1, 2)
            for his, los in self._runs:
                at = np.minimum(np.searchsorted(his, halves[:, 0]), len(his) - 1)
                same_hi = his[at] == halves[:, 0]
                found |= same_hi & (los[at] == halves[:, 1])
                for i in np.flatnonzero(same_hi & ~found):  # another key with the same high half first
                    found[i] = self._in_runs(digests[i])
        waiting = self._new  # the buffer the runs were searched beside (a flush below starts another)
        added: set[bytes] = set()  # this batch's new keys, also once the buffer has become a run
        new = []
        for digest, known in zip(digests, found):
            fresh = not known and digest not in waiting and digest not in added
            if fresh:
                added.add(digest)
                self._new.add(digest)
                self._count += 1
                if len(self._new) >= self.BUFFER:
                    self._flush()
            new.append(fresh)
        return new

    def firsts(self, items: Iterable[T], key: Callable[[T], str], batch: int = 4096) -> Iterator[tuple[T, bool]]:
        """``(item, whether its key is new)`` for each of ``items``, in order, their keys added
        ``batch`` at a time (see :meth:`add_many`)."""
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= batch:
                yield from zip(chunk, self.add_many([key(i) for i in chunk]))
                chunk = []
        yield from zip(chunk, self.add_many([key(i) for i in chunk]))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        digest = self._digest(key)
        return digest in self._new or self._in_runs(digest)

    def __len__(self) -> int:
        return self._count

    def _flush(self) -> None:
        halves = np.frombuffer(b"".join(self._new), ">u8").astype(np.uint64).reshape(-1, 2)
        self._new = set()
        parts = [(halves[:, 0], halves[:, 1])]
        while self._runs and len(self._runs[-1][0]) <= len(parts[0][0]) and \
                len(self._runs[-1][0]) + len(parts[0][0]) <= self.MAX_RUN:
            parts.insert(0, self._runs.pop())
        hi = np.concatenate([part[0] for part in parts])
        lo = np.concatenate([part[1] for part in parts])
        del parts, halves
        order = np.lexsort((lo, hi))
        self._runs.append((self._spill.put(hi[order]), self._spill.put(lo[order])))


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` reads a mapped file (what :meth:`Spill.put` and builders give when large)."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = getattr(array, "base", None)
        if not isinstance(array, np.ndarray):
            return False
    return False


__all__ = ["ColumnBuilder", "KeySet", "find_key", "MIN_BYTES", "SPILL_ENV", "Spill", "is_mapped", "spill_folder"]
