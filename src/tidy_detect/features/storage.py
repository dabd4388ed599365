"""Where a feature store lives: a local folder, or a prefix on object storage, behind one interface.

:class:`StoreLocation` is every file operation the store makes (read, write, list, delete, the
writer lock), so the store's own code is the same wherever it lives:

- :class:`LocalLocation` (a path, or a ``file://`` URI): POSIX files, each written to a temporary
  file beside its final name and renamed into place (``os.replace``), with the user's umask; the
  writer lock is an ``flock`` (:class:`StoreLock`).
- :class:`ObjectLocation` (``s3://bucket/prefix``, ``gs://``, ``abfs://``, ``hf://`` and any other
  URI pyarrow's ``FileSystem.from_uri`` understands, else any fsspec protocol): object storage
  has no atomic rename, so every object is written once, whole, straight to its final name (a PUT,
  or a multipart upload, appears complete or not at all); the writer lock is a lease object that a
  heartbeat renews (:class:`StoreLease`).

Credentials come the usual way of each filesystem (for S3: the ``AWS_*`` environment variables,
``AWS_ENDPOINT_URL`` included, ``~/.aws/config`` and ``credentials``, or an instance role), never
from the command line.
"""

from __future__ import annotations

import abc
import datetime as _dt
import errno
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tidy_detect.errors import StoreError

log = logging.getLogger(__name__)

LOCK_FILE = "writer.lock"
LEASE_SECONDS_ENV = "TIDY_DETECT_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0
# Read-back leases (no conditional writes): how long a writer waits between writing its claim and
# reading it back; a second writer racing it would have to read, decide and write inside this gap.
READ_BACK_SETTLE_SECONDS = 1.0
# Reading many small objects one after the other is one round trip each: read this many ahead, in
# threads, whole when they are at most this large (bounding the memory of the read-ahead).
PREFETCH_OBJECTS = 16
PREFETCH_MAX_BYTES = 8 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What pathlib makes of a URI: Path("s3://b/p") is "s3:/b/p".
_COLLAPSED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/[^/]")


class StorageError(StoreError, OSError):
    """An operation on a store's filesystem failed (unreachable endpoint, missing bucket, denied
    credentials). A :class:`StoreError` (exit code 6), and an ``OSError`` so that code which
    tolerates a failed write of bookkeeping tolerates it on object storage too."""

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


def is_uri(where: str | Path) -> bool:
    """Whether ``where`` is a URI (``scheme://...``) rather than a local path."""
    return isinstance(where, str) and bool(_SCHEME.match(where))


def join_uri(base: str | Path, *parts: str) -> str:
    """``base`` (a path or a URI) with ``parts`` appended, as a string; a URI keeps its query."""
    if not is_uri(base):
        return str(Path(base).joinpath(*parts))
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *parts]) + (sep + query if sep else "")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def temporary_path(final: Path) -> Path:
    """A unique, not yet existing name beside ``final`` for writing it atomically.

    The file is created by whoever writes it (``open``, pyarrow, safetensors), so it gets the
    user's umask like any other file; ``tempfile.mkstemp`` would make it 0600.
    """
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_bytes(data: Any) -> bytes:
    """The bytes :func:`write_json_atomic` writes, for objects written in one piece."""
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


def describe_holder(holder: dict[str, Any] | None) -> str:
    """One line about a writer lock's holder (pid, host, since when, command)."""
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}, "
            f"command: {holder.get('command') or '?'}")


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
            "command": " ".join(sys.argv)[:500]}


# ---------------------------------------------------------------------------------------------
# Locations

class StoreLocation(abc.ABC):
    """Where a store is, and every file operation on it; names are relative, ``/``-separated
    (``config.json``, ``shards/part-….parquet``).

    Build one with :meth:`parse`. ``uri`` is the store as the user gave it (a local path as
    ``str(Path(...))``), for messages and for opening the store again elsewhere (Ray workers).
    """

    uri: str
    is_local: bool

    @staticmethod
    def parse(where: "str | Path | StoreLocation") -> "StoreLocation":
        """The location of a store given as a path, a ``file://`` URI or an object-storage URI.

        Raises:
            StoreError: a ``Path`` that is a URI collapsed by pathlib (``s3:/bucket``), or a URI
                whose scheme neither pyarrow nor fsspec knows, or whose filesystem cannot be set up
                (the message says which and why).
        """
        if isinstance(where, StoreLocation):
            return where
        if isinstance(where, Path) or (isinstance(where, str) and where.strip() and not is_uri(where)):
            path = Path(where)
            if _COLLAPSED.match(str(where)) and not path.exists():
                fix = ("pathlib.Path turns 's3://b/p' into 's3:/b/p': pass the URI as a string"
                       if isinstance(where, Path) else "write two, as in 's3://bucket/prefix'")
                raise StoreError(f"{where}: looks like a URI with one '/' after its scheme; {fix}")
            return LocalLocation(path)
        if not isinstance(where, str) or not where.strip():
            raise StoreError(f"a store location must be a path or a URI, got {where!r}")
        return ObjectLocation.from_uri(where)

    # The interface; each location implements it.
    @property
    @abc.abstractmethod
    def path(self) -> Path:
        """The local folder. Raises StoreError for a store on object storage."""
        ...

    @abc.abstractmethod
    def child(self, *parts: str) -> str:
        """What to call ``parts`` inside the store in messages: a path, or a URI."""
        ...

    @abc.abstractmethod
    def absolute(self) -> "StoreLocation":
        """The same location, independent of the current folder (for other processes and nodes)."""
        ...

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        ...

    @abc.abstractmethod
    def is_file(self, name: str) -> bool:
        ...

    @abc.abstractmethod
    def is_unused(self) -> bool:
        """Whether a new store may be created here: nothing there yet, or an empty folder."""
        ...

    @abc.abstractmethod
    def prepare(self) -> None:
        """Make the location ready for a new store (create the folder; check the bucket)."""
        ...

    @abc.abstractmethod
    def read_bytes(self, name: str) -> bytes:
        ...

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    @abc.abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` so that readers see the old content or all of the new, never a part."""
        ...

    @abc.abstractmethod
    def write_json(self, name: str, data: Any) -> None:
        ...

    @abc.abstractmethod
    def write_parquet(self, name: str, table: Any) -> None:
        """Write a Parquet file (zstd) whole, or not at all, under ``name``."""
        ...

    @abc.abstractmethod
    def parquet_file(self, name: str) -> Any:
        """A ``pyarrow.parquet.ParquetFile`` for reading ``name`` (a context manager)."""
        ...

    def parquet_files(self, folder: str, names: Sequence[str]) -> Iterator[tuple[str, Callable[[], Any]]]:
        """``(name, open)`` for each of ``names`` in ``folder``, in order; ``open()`` gives its
        ``ParquetFile`` (or raises as :meth:`parquet_file` does). Locally each file is opened
        when asked for, as always."""
        for name in names:
            yield name, (lambda n=name: self.parquet_file(f"{folder}/{n}"))

    @abc.abstractmethod
    def read_table(self, name: str) -> Any:
        ...

    @abc.abstractmethod
    def list(self, folder: str, suffix: str) -> list[str]:
        """Sorted names of the files in ``folder`` ending with ``suffix`` (hidden ones left out)."""
        ...

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Delete ``name``; a name that is already gone is fine."""
        ...

    def delete_many(self, names: Sequence[str]) -> None:
        """Delete each of ``names`` (gone ones are fine)."""
        for name in names:
            self.delete(name)

    def remove_stale_temporaries(self, folder: str, max_age: float) -> None:
        """Delete temporary files of writers that died mid-write, older than ``max_age`` seconds."""

    @abc.abstractmethod
    def writer_lock(self) -> "StoreLock | StoreLease":
        """The store's one-writer lock for this kind of storage."""
        ...

    def upload_folder(self, folder: Path, prefix: str = "") -> list[str]:
        """Copy the files under a local ``folder`` to ``prefix`` here (results written locally
        first); returns their names here."""
        written = []
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
            self.write_bytes(name, path.read_bytes())
            written.append(name)
        return written

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalLocation(StoreLocation):
    """A store folder on a local (or mounted) POSIX filesystem: what the store always was."""

    is_local = True

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self.uri = str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    def child(self, *parts: str) -> str:
        return str(self._path.joinpath(*parts))

    def absolute(self) -> "LocalLocation":
        return LocalLocation(self._path.absolute())

    def _file(self, name: str) -> Path:
        return self._path / name

    def exists(self, name: str) -> bool:
        return self._file(name).exists()

    def is_file(self, name: str) -> bool:
        return self._file(name).is_file()

    def is_unused(self) -> bool:
        return not self._path.exists() or (self._path.is_dir() and not any(self._path.iterdir()))

    def prepare(self) -> None:
        self._path.mkdir(parents=True, exist_ok=True)

    def read_bytes(self, name: str) -> bytes:
        return self._file(name).read_bytes()

    def read_text(self, name: str) -> str:
        return self._file(name).read_text(encoding="utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self._file(name)
        tmp = temporary_path(final)
        try:
            with open(tmp, "xb") as handle:
                handle.write(data)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_json(self, name: str, data: Any) -> None:
        write_json_atomic(self._file(name), data)

    def write_parquet(self, name: str, table: Any) -> None:
        import pyarrow.parquet as pq

        final = self._file(name)
        final.parent.mkdir(exist_ok=True)
        tmp = temporary_path(final)
        try:
            pq.write_table(table, str(tmp), compression="zstd")
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def parquet_file(self, name: str) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._file(name))

    def read_table(self, name: str) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self._file(name))

    def list(self, folder: str, suffix: str) -> list[str]:
        return sorted(p.name for p in (self._path / folder).glob(f"*{suffix}"))

    def delete(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    def remove_stale_temporaries(self, folder: str, max_age: float) -> None:
        directory = self._path / folder
        stale = time.time() - max_age
        for tmp in directory.glob(".*.tmp") if directory.is_dir() else ():
            if tmp.stat().st_mtime < stale:
                tmp.unlink(missing_ok=True)

    def writer_lock(self) -> "StoreLock":
        return StoreLock(self._path)


class ObjectLocation(StoreLocation):
    """A store under a prefix of an object store (or any filesystem behind a URI), through a
    ``pyarrow.fs`` filesystem. Objects are written once, whole, under their final names."""

    is_local = False

    def __init__(self, uri: str, filesystem: Any, root: str) -> None:
        self.uri = uri
        self.filesystem = filesystem
        self.root = root.rstrip("/")
        head, _, self.query = uri.partition("?")
        self._base = head.rstrip("/")

    @classmethod
    def from_uri(cls, uri: str) -> "StoreLocation":
        """The location of ``uri``: pyarrow's filesystem for it, else fsspec's (e.g. ``memory://``).

        Raises:
            StoreError: neither knows the scheme, or the filesystem cannot be set up.
        """
        import pyarrow as pa
        import pyarrow.fs as pafs

        head, sep, query = uri.strip().partition("?")
        if not head.rstrip("/").endswith(":"):  # "s3://" alone stays as it is, for the check below
            head = head.rstrip("/")
        uri = head + sep + query
        scheme = _SCHEME.match(uri).group(1).lower()  # type: ignore[union-attr]
        try:
            emulated = _gcs_emulator(uri) if scheme in ("gs", "gcs") and not query else None
            if emulated is not None:
                filesystem, root = emulated, head.split("://", 1)[1]
            else:
                filesystem, root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
            filesystem, root = _fsspec_filesystem(uri, scheme, exc)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot set up its filesystem ({exc}); check the URI and the credentials "
                               f"(for S3: AWS_* environment variables, ~/.aws, or an instance role)") from exc
        if isinstance(filesystem, pafs.LocalFileSystem):  # file:///abs/path is a local store
            return LocalLocation(Path(root))
        if not root.strip("/"):
            raise StoreError(f"{uri}: name a bucket and, best, a prefix of the store's own (e.g. "
                             f"{scheme}://BUCKET/stores/NAME)")
        return cls(uri, filesystem, root)

    @property
    def path(self) -> Path:
        raise StoreError(f"{self.uri} is on object storage and has no local path; use the store's uri or "
                         f"location (tidy_detect.features.storage) to reach its files")

    def child(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    def absolute(self) -> "ObjectLocation":
        return self

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _fail(self, what: str, name: str, exc: BaseException) -> StorageError:
        return StorageError(f"{self.child(name) if name else self.uri}: {what} failed ({exc}); check that the "
                            f"endpoint is reachable, the bucket exists and the credentials allow it")

    def _info(self, name: str) -> Any:
        try:
            return self.filesystem.get_file_info(self._key(name))
        except OSError as exc:
            raise self._fail("looking it up", name, exc) from exc

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(name).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(name).type == pafs.FileType.File

    def _entries(self, folder: str, recursive: bool = False) -> list[Any]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self._key(folder), allow_not_found=True, recursive=recursive)
        try:
            return self.filesystem.get_file_info(selector)
        except OSError as exc:
            raise self._fail("listing", folder, exc) from exc

    def is_unused(self) -> bool:
        import pyarrow.fs as pafs

        if self._info("").type == pafs.FileType.File:
            return False
        # Empty "folder" markers (keys ending in "/", which some tools and pyarrow itself leave)
        # hold nothing.
        return all(entry.type == pafs.FileType.Directory for entry in self._entries("", recursive=True))

    def prepare(self) -> None:
        import pyarrow.fs as pafs

        bucket = self.root.split("/", 1)[0]
        if isinstance(self.filesystem, (pafs.S3FileSystem, pafs.GcsFileSystem)):
            try:
                found = self.filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
            except OSError as exc:
                raise self._fail("checking its bucket", "", exc) from exc
            if not found:
                raise StorageError(f"{self.uri}: bucket {bucket!r} does not exist (or these credentials cannot see "
                                   f"it); create it first, or check AWS_ENDPOINT_URL / the URI")

    def read_bytes(self, name: str) -> bytes:
        try:
            # the bytes as stored (pyarrow would otherwise decompress a name ending in .gz, .bz2, ...)
            with self.filesystem.open_input_stream(self._key(name), compression=None) as handle:
                return handle.read()
        except OSError as exc:
            raise self._fail("reading", name, exc) from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        # One object, whole: a PUT (or a multipart upload) appears complete or not at all.
        try:
            with self.filesystem.open_output_stream(self._key(name), compression=None) as handle:
                handle.write(data)
        except OSError as exc:
            raise self._fail("writing", name, exc) from exc

    def write_json(self, name: str, data: Any) -> None:
        self.write_bytes(name, _json_bytes(data))

    def write_parquet(self, name: str, table: Any) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Serialised in memory first: a writer failing half-way through must not close (and so
        # complete) an upload holding half a file.
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(name, buffer.getvalue())

    def parquet_file(self, name: str) -> Any:
        import pyarrow.parquet as pq

        # pre_buffer: the column chunks a read needs come in a few coalesced ranged GETs
        return pq.ParquetFile(self._key(name), filesystem=self.filesystem, pre_buffer=True)

    def read_table(self, name: str) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self._key(name), filesystem=self.filesystem, pre_buffer=True)

    def parquet_files(self, folder: str, names: Sequence[str]) -> Iterator[tuple[str, Callable[[], Any]]]:
        """As :meth:`StoreLocation.parquet_files`, reading up to ``PREFETCH_OBJECTS`` small objects
        ahead in threads (one GET each instead of a HEAD and ranged GETs in turn); objects over
        ``PREFETCH_MAX_BYTES`` are read by ranges when their turn comes."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow as pa
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        sizes = {entry.base_name: entry.size for entry in self._entries(folder) if entry.type == pafs.FileType.File}

        def opener(name: str, future: Any) -> Callable[[], Any]:
            if future is None:
                return lambda: self.parquet_file(f"{folder}/{name}")
            return lambda: pq.ParquetFile(pa.BufferReader(future.result()))

        with ThreadPoolExecutor(PREFETCH_OBJECTS, thread_name_prefix="tidy-read") as pool:
            def ahead(name: str) -> tuple[str, Any]:
                small = sizes.get(name) is not None and sizes[name] <= PREFETCH_MAX_BYTES
                return name, pool.submit(self.read_bytes, f"{folder}/{name}") if small else None

            queue = iter(names)
            window = deque(ahead(name) for _, name in zip(range(PREFETCH_OBJECTS), queue))
            try:
                while window:
                    name, future = window.popleft()
                    following = next(queue, None)
                    if following is not None:
                        window.append(ahead(following))
                    yield name, opener(name, future)
            finally:
                for _, future in window:  # a reader that stopped early: drop what it will not read
                    if future is not None:
                        future.cancel()

    def list(self, folder: str, suffix: str) -> list[str]:
        import pyarrow.fs as pafs

        return sorted(entry.base_name for entry in self._entries(folder)
                      if entry.type == pafs.FileType.File and entry.base_name.endswith(suffix)
                      and not entry.base_name.startswith("."))

    def delete(self, name: str) -> None:
        try:
            self.filesystem.delete_file(self._key(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._fail("deleting", name, exc) from exc

    def delete_many(self, names: Sequence[str]) -> None:
        """Delete each of ``names``, several at a time (a round trip each)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(PREFETCH_OBJECTS, thread_name_prefix="tidy-delete") as pool:
            for done in [pool.submit(self.delete, name) for name in names]:
                done.result()

    def writer_lock(self) -> "StoreLease":
        return StoreLease(self)

    def conditional_writes(self) -> "S3ConditionalWrites | None":
        """Exclusive-create and compare-and-swap writes of single objects, where the filesystem
        offers them (S3 through botocore); None elsewhere (the lease reads its claim back)."""
        import pyarrow.fs as pafs

        if not isinstance(self.filesystem, pafs.S3FileSystem):
            return None
        try:
            import botocore.session  # noqa: F401 - only whether it is there
        except ImportError:
            log.info("%s: botocore is not installed, so the writer lease is claimed by writing and reading back "
                     "(pip install boto3 for conditional writes)", self.uri)
            return None
        bucket, _, prefix = self.root.partition("/")
        params = dict(urllib.parse.parse_qsl(self.query))
        endpoint = params.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{params.get('scheme', 'https')}://{endpoint}"
        return S3ConditionalWrites(bucket, prefix, region=getattr(self.filesystem, "region", None) or None,
                                   endpoint=endpoint)


def _gcs_emulator(uri: str) -> Any | None:
    """The GCS emulator's filesystem when ``STORAGE_EMULATOR_HOST`` is set (as for inputs)."""
    from tidy_detect.data.remote import gcs_emulator
    from tidy_detect.errors import InputError

    try:
        return gcs_emulator(uri)
    except InputError as exc:
        raise StoreError(str(exc)) from None


def _fsspec_filesystem(uri: str, scheme: str, reason: BaseException) -> tuple[Any, str]:
    """A URI pyarrow does not know, through fsspec (wrapped as a pyarrow filesystem)."""
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError:
        raise StoreError(f"{uri}: pyarrow has no filesystem for {scheme}:// ({reason}), and fsspec, which might, is "
                         f"not installed; pyarrow knows s3://, gs://, abfs://, hdfs://, file:// and hf://") from None
    try:
        filesystem, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"{uri}: no filesystem for {scheme}:// in pyarrow ({reason}) or fsspec ({exc}); known: "
                         f"s3://, gs://, abfs://, hdfs://, file://, hf:// and fsspec's protocols "
                         f"({', '.join(sorted(fsspec.available_protocols())[:12])}, ...)") from exc
    return PyFileSystem(FSSpecHandler(filesystem)), root


# ---------------------------------------------------------------------------------------------
# One writer at a time

class StoreLock:
    """The one-writer lock of a store: ``flock`` on ``STORE/writer.lock``, holder described inside.

    ``flock`` is released by the system when the holding process exits or dies, so a lock left by
    a killed run is simply taken over; the file itself is never deleted (deleting a lock file races
    with a process that has just opened it). Re-entrant for the same object.
    """

    def __init__(self, store: Path) -> None:
        self.path = store / LOCK_FILE
        self._fd: int | None = None
        self._depth = 0

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait`` seconds for another writer.

        Raises:
            StoreError: another process holds it (the message names it), or it cannot be created.
        """
        if self._fd is not None:
            self._depth += 1
            return
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store's writer lock ({exc.strerror or exc})") from exc
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise StoreError(f"{self.path}: cannot lock the store ({exc.strerror or exc})") from exc
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    os.close(fd)
                    raise StoreError(f"{self.path.parent}: another process is writing to this store "
                                     f"({describe_holder(holder)}); wait for it to finish, or write to another "
                                     f"--out folder. Two writers would both redo the same images.") from None
                time.sleep(0.2)
        previous = self.holder()
        if previous and previous.get("pid") not in (None, os.getpid()):
            log.info("%s: taking over the writer lock of %s, which has ended", self.path.parent,
                     describe_holder(previous))
        record = _holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd, self._depth = fd, 1

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # holder info would be stale once released
        except OSError:
            pass
        os.close(fd)  # closing releases the flock

    def verify(self) -> None:
        """Nothing to check: an flock cannot be lost while its file stays open."""

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any] | None:
        """What the last (or current) holder wrote about itself, if anything readable."""
        try:
            text = self.path.read_text(encoding="utf-8").strip()
            data = json.loads(text) if text else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


class S3ConditionalWrites:
    """Exclusive create (``If-None-Match: *``) and compare-and-swap (``If-Match: ETAG``) of single
    S3 objects through botocore; pyarrow's filesystem does not expose these headers.

    botocore finds credentials, region and ``AWS_ENDPOINT_URL`` the same way pyarrow does
    (environment, ``~/.aws``, instance roles).
    """

    def __init__(self, bucket: str, prefix: str, region: str | None = None, endpoint: str | None = None) -> None:
        import botocore.session
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        session = botocore.session.get_session()
        self.client = session.create_client("s3", region_name=region, endpoint_url=endpoint,
                                            config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, name: str, **kwargs: Any) -> dict[str, Any] | None:
        """The call's response; None when its precondition (or the object) is not there."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, what)(Bucket=self.bucket, Key=self._key(name), **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412"):
                return None
            raise StorageError(f"s3://{self.bucket}/{self._key(name)}: {what} failed ({exc})") from exc
        except BotoCoreError as exc:
            raise StorageError(f"s3://{self.bucket}/{self._key(name)}: {what} failed ({exc})") from exc

    def create(self, name: str, body: bytes) -> str | None:
        """Write ``name`` unless it exists; its ETag, or None when it exists."""
        response = self._call("put_object", name, Body=body, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def replace(self, name: str, body: bytes, etag: str) -> str | None:
        """Overwrite ``name`` if it is still the version ``etag``; the new ETag, or None."""
        response = self._call("put_object", name, Body=body, IfMatch=etag)
        return None if response is None else response["ETag"]

    def abort_uploads(self, initiated_before: _dt.datetime) -> int:
        """Abort the unfinished multipart uploads under the prefix begun before ``initiated_before``
        (S3's clock): what writers killed mid-upload left, which S3 keeps, and bills, until aborted.
        Returns how many were aborted.

        Raises:
            StorageError: the uploads cannot be listed or aborted.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            for page in pages:
                for upload in page.get("Uploads", []):
                    if stale_upload(upload["Initiated"], initiated_before):
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"s3://{self.bucket}/{self.prefix}: the unfinished uploads cannot be listed or "
                               f"aborted ({exc})") from exc
        return aborted

    def read(self, name: str) -> tuple[bytes, str] | None:
        """``name``'s content and ETag, or None when there is no such object."""
        response = self._call("get_object", name)
        if response is None:
            return None
        with response["Body"] as body:
            return body.read(), response["ETag"]


def stale_upload(initiated: _dt.datetime, before: _dt.datetime) -> bool:
    """Whether an upload begun at ``initiated`` (an aware time; a naive one is UTC) is older than ``before``."""
    if initiated.tzinfo is None:
        initiated = initiated.replace(tzinfo=_dt.timezone.utc)
    return initiated < before


def lease_seconds() -> float:
    """How long a writer lease lasts without renewal (``TIDY_DETECT_LEASE_SECONDS``, default 60).

    Raises:
        StoreError: the variable is not a number of at least 2 seconds.
    """
    text = os.environ.get(LEASE_SECONDS_ENV)
    if text is None or not text.strip():
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 2.0:
        raise StoreError(f"{LEASE_SECONDS_ENV} must be a number of seconds >= 2, got {text!r}")
    return value


def _parse_time(text: Any) -> _dt.datetime | None:
    try:
        moment = _dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError, OverflowError):
        return True  # exists but not ours, or not a pid we can judge: assume alive
    return True


_RETRY = object()


class StoreLease:
    """The one-writer lock of a store on object storage: a lease object ``STORE/writer.lock``.

    The holder writes ``{pid, host, since, command, token, expires, ...}`` and a heartbeat thread
    renews ``expires`` every third of the lease (``TIDY_DETECT_LEASE_SECONDS``, default 60 s).
    Another writer is refused (the message names the holder) until the lease has expired, which
    happens within one lease after the holder dies, or at once when the holder was a process on
    this same host that no longer exists. Releasing marks the lease expired; the object stays.

    On S3 (with botocore installed) the claim is a conditional write: ``If-None-Match: *`` for a
    store without a lease object, ``If-Match`` on the ETag read for an expired lease, so two
    writers can never both win; renewals are ``If-Match`` too, so a writer whose lease another
    one took over (after it stalled past its expiry) learns it at the next heartbeat, and its
    next write is refused (:meth:`verify`). Elsewhere the claim is written and read back after a
    short pause, and a second writer that reads, decides and writes within that pause could also
    believe it won (docs/distributed.md). Expiry compares the holder's clock with the reader's:
    keep the machines' clocks synchronised (NTP) to well within a lease.

    Re-entrant for the same object, like :class:`StoreLock`.
    """

    def __init__(self, location: ObjectLocation, seconds: float | None = None,
                 conditional: bool | None = None) -> None:
        self.location = location
        self._seconds = float(seconds) if seconds is not None else None
        self._conditional = conditional
        self._resolved = False
        self._client: S3ConditionalWrites | None = None
        self._depth = 0
        self._record: dict[str, Any] | None = None
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def seconds(self) -> float:
        """The lease's length (read when first needed, so that readers never depend on it)."""
        if self._seconds is None:
            self._seconds = lease_seconds()
        return self._seconds

    @property
    def _writes(self) -> "S3ConditionalWrites | None":
        # Resolved on first use: readers open stores without ever taking the lease.
        if not self._resolved:
            if self._conditional in (None, True):
                self._client = self.location.conditional_writes()
            if self._conditional and self._client is None:
                raise StoreError(f"{self.location.uri}: conditional writes are not available here")
            self._resolved = True
        return self._client

    @property
    def mode(self) -> str:
        """``conditional-write`` or ``read-back``: how this lease is claimed."""
        return "conditional-write" if self._writes is not None else "read-back"

    @property
    def held(self) -> bool:
        return self._record is not None

    # -- the lease object ------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any] | None, str | None, bool]:
        """(record, etag, exists) of the lease object as it is now."""
        if self._writes is not None:
            found = self._writes.read(LOCK_FILE)
            if found is None:
                return None, None, False
            body, etag = found
        else:
            if not self.location.is_file(LOCK_FILE):
                return None, None, False
            body, etag = self.location.read_bytes(LOCK_FILE), None
        try:
            record = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, etag, True
        return (record if isinstance(record, dict) else None), etag, True

    def holder(self) -> dict[str, Any] | None:
        """What the current (or last) holder wrote about itself, if anything readable."""
        try:
            return self._read()[0]
        except StoreError:
            return None

    def _live(self, record: dict[str, Any] | None) -> bool:
        """Whether ``record`` is a lease someone holds now."""
        if not record or record.get("released"):
            return False
        expires = _parse_time(record.get("expires"))
        if expires is None or expires <= _dt.datetime.now(_dt.timezone.utc):
            return False
        # A holder on this host whose process is gone died without releasing: no need to wait.
        return not (record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")))

    def _new_record(self) -> dict[str, Any]:
        now = _dt.datetime.now(_dt.timezone.utc)
        return {**_holder_record(), "token": uuid.uuid4().hex, "lease_seconds": self.seconds,
                "renewed": now.isoformat(timespec="milliseconds"),
                "expires": (now + _dt.timedelta(seconds=self.seconds)).isoformat(timespec="milliseconds"),
                "claimed_by": self.mode}

    def _renewed(self, record: dict[str, Any]) -> dict[str, Any]:
        now = _dt.datetime.now(_dt.timezone.utc)
        return {**record, "renewed": now.isoformat(timespec="milliseconds"),
                "expires": (now + _dt.timedelta(seconds=self.seconds)).isoformat(timespec="milliseconds")}

    def _try_take(self) -> Any:
        """None when the lease is now ours; the live holder's record; or _RETRY."""
        record = self._new_record()
        body = _json_bytes(record)
        if self._writes is not None:
            etag = self._writes.create(LOCK_FILE, body)
            if etag is None:
                current, current_etag, exists = self._read()
                if not exists:
                    return _RETRY  # released and deleted in between
                if self._live(current):
                    return current
                etag = self._writes.replace(LOCK_FILE, body, current_etag)  # type: ignore[arg-type]
                if etag is None:
                    return _RETRY  # someone else took it first
                self._took_over(current)
            self._record, self._etag = record, etag
            return None
        current, _, _ = self._read()
        if self._live(current):
            return current
        self.location.write_bytes(LOCK_FILE, body)
        time.sleep(READ_BACK_SETTLE_SECONDS)
        back, _, _ = self._read()
        if back and back.get("token") == record["token"]:
            self._took_over(current)
            self._record = record
            return None
        return back if self._live(back) else _RETRY

    def _took_over(self, previous: dict[str, Any] | None) -> None:
        if previous and not previous.get("released"):
            log.info("%s: taking over the writer lease of %s, which has expired", self.location.uri,
                     describe_holder(previous))

    # -- the lock interface ----------------------------------------------------------------

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for another writer's to end.

        Raises:
            StoreError: another writer holds a live lease (the message names it and says when it
                expires), or the lease object cannot be read or written.
        """
        if self._record is not None:
            self._depth += 1
            return
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            outcome = self._try_take()
            if outcome is None:
                break
            if outcome is not _RETRY:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"{self.location.uri}: another process is writing to this store ({describe_holder(outcome)}; "
                        f"its lease runs to {outcome.get('expires')} unless renewed); wait for it to finish, or "
                        f"write to another --out. Two writers would both redo the same images. A writer that "
                        f"died leaves a lease that expires within {self.seconds:g} s "
                        f"({LEASE_SECONDS_ENV}).") from None
                time.sleep(0.5)
            else:
                time.sleep(0.05)
        self._depth, self._lost = 1, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.location.uri}", daemon=True)
        self._thread.start()
        self._reclaim_uploads()

    def _reclaim_uploads(self) -> None:
        """Abort the multipart uploads an earlier writer left (killed mid-upload). Holding the lease,
        this writer is the only one; an upload begun more than a lease period ago (plus a minute
        for clocks that differ) cannot belong to a live writer. Best effort: a failure is logged."""
        if self._writes is None:
            return
        cutoff = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=self.seconds + 60)
        try:
            aborted = self._writes.abort_uploads(cutoff)
        except StorageError as exc:
            log.warning("%s: %s; an AbortIncompleteMultipartUpload lifecycle rule reclaims them instead",
                        self.location.uri, exc)
            return
        if aborted:
            log.info("%s: aborted %d unfinished upload(s) left by an earlier writer", self.location.uri, aborted)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; verify() stops writes once it lapses
                log.warning("%s: could not renew the writer lease (%s); trying again", self.location.uri, exc)

    def _renew(self) -> None:
        with self._mutex:
            if self._record is None or self._lost:
                return
            record = self._renewed(self._record)
            if self._writes is not None:
                etag = self._writes.replace(LOCK_FILE, _json_bytes(record), self._etag)  # type: ignore[arg-type]
                if etag is None:
                    self._lost = f"taken over by {describe_holder(self.holder())}"
                    log.error("%s: the writer lease was %s", self.location.uri, self._lost)
                    return
                self._etag = etag
            else:
                back, _, _ = self._read()
                if not back or back.get("token") != self._record["token"]:
                    self._lost = f"taken over by {describe_holder(back)}"
                    log.error("%s: the writer lease was %s", self.location.uri, self._lost)
                    return
                self.location.write_bytes(LOCK_FILE, _json_bytes(record))
            self._record = record

    def verify(self) -> None:
        """Check, before a write, that a lease held here is still ours.

        Raises:
            StoreError: another writer took the lease over (it had expired: this process stalled
                longer than a lease), or it expired without renewal.
        """
        if self._record is None:
            return  # not held here: e.g. a Ray worker writing under its driver's lease
        lost = self._lost
        expires = _parse_time(self._record.get("expires"))
        if lost is None and expires is not None and expires <= _dt.datetime.now(_dt.timezone.utc):
            lost = f"expired at {self._record.get('expires')} without renewal"
        if lost:
            raise StoreError(f"{self.location.uri}: this writer lost its lease ({lost}); another writer may be "
                             f"using the store. Nothing more is written; rerun when it has finished.")

    def release(self) -> None:
        if self._record is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._mutex:
            record, self._record = self._record, None
            if self._lost:
                return
            now = _now()
            ended = {**record, "released": now, "expires": now}
            try:
                if self._writes is not None:
                    self._writes.replace(LOCK_FILE, _json_bytes(ended), self._etag)  # type: ignore[arg-type]
                else:
                    back, _, _ = self._read()
                    if back and back.get("token") == record["token"]:
                        self.location.write_bytes(LOCK_FILE, _json_bytes(ended))
            except StoreError as exc:
                log.warning("%s: could not release the writer lease (%s); it expires by itself within %g s",
                            self.location.uri, exc, self.seconds)

