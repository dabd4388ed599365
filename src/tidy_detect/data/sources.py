"""Image sources read in place: zip and tar archives, WebDataset shards, Parquet and Arrow files.

Every image of a source has an **identity**, a string that stands in ``ImageItem.path`` and in the
store's ``path`` column:

- an archive member: ``ARCHIVE!/MEMBER``, the archive's absolute path, ``!/``, and the member's name
  exactly as the archive stores it (``/data/bench.zip!/progan/1_fake/img0.png``);
- a Parquet or Arrow row: ``FILE!/ROW``, ROW the row's number in the file from 0
  (``/data/train.parquet!/17``).

An identity is split at the first ``!/`` whose left part names an existing file with a source
suffix (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.parquet``, ``.arrow``); a path that exists as
it is is always a plain file.

Reading is bounded and never touches the disk beyond the source file: no member is extracted or
written anywhere (so a member named ``../../etc/passwd`` is only a string), a member larger than the
file-size limit is refused from the size the archive records before any byte of it is read, only
regular members are listed (no links, devices or folders), and a damaged archive gives an
``InputError`` when it cannot be listed and an error row (``corrupt``) for a member whose data
cannot be read, never an internal error.

**Sidecars (WebDataset).** In a zip or tar, files sharing an image's *key* (its path up to the
first dot of its name, as WebDataset groups a sample) describe it: ``KEY.cls`` holds its label
(``0``/``1``/``real``/``fake``), ``KEY.json`` a ``label`` (and optionally a ``caption``) field, and
``KEY.txt`` its caption. A label from a sidecar wins over the ``0_real``/``1_fake`` path parts.
So WebDataset shards need no option: a shard is a tar whose samples have such sidecars.

**Resume.** The stat recorded for an archive member is the archive file's own stat: an archive
whose size, mtime, ctime and inode are unchanged has unchanged members, so a rerun skips them
without reading a byte; when the archive was touched, every member's content is hashed and
compared (what :func:`tidy_detect.features.extractor.pending_items` does for a touched file), so a
rewritten archive only redoes the members that really changed. A member's CRC would add nothing to
this, and tar has none.

This module reads containers and reports raw records (:class:`SourceRecord`); how path parts
become labels and groups is :mod:`tidy_detect.data.inputs`'s rule, the same for every source.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import lzma
import os
import tarfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from tidy_detect.errors import CorruptImageError, ImageNotFoundError, ImageTooLargeError, InputError, \
    UnsupportedImageError
from tidy_detect.images import DEFAULT_MAX_FILE_BYTES, MIB, FileStat, is_image_path

SEPARATOR = "!/"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet", ".arrow")
SOURCE_SUFFIXES = ARCHIVE_SUFFIXES + TABLE_SUFFIXES
SIDECARS = ("cls", "json", "txt")
# A sidecar is a label or a caption: anything larger is not one, and is not read.
MAX_SIDECAR_BYTES = 1 * MIB
_BATCH_ROWS = 64  # Parquet rows decoded at a time when reading images (memory: one batch per cursor)
_CURSORS = 4  # sequential readers kept per compressed archive or Parquet file (threads read out of order)
_OPEN_SOURCES = 8


@dataclass(frozen=True)
class SourceOptions:
    """Which columns of a Parquet / Arrow file hold what. ``image_column=None`` picks the column
    named ``image`` or ``img``, else the first column of image structs (``{"bytes", "path"}``, as
    Hugging Face ``datasets`` writes them) or raw binary. Absent optional columns are ignored."""

    image_column: str | None = None
    label_column: str = "label"
    group_column: str = "group"
    caption_column: str = "caption"


@dataclass(frozen=True)
class SourceRecord:
    """One image of a source, before the label and group rules of :mod:`tidy_detect.data.inputs`."""

    identity: str
    parts: tuple[str, ...] = ()  # folders of the member's path inside the source
    label: str | None = None  # a label as written (sidecar or column), to be parsed
    group: str | None = None
    caption: str | None = None


def source_suffix(path: str | Path) -> str | None:
    """The source suffix of a file name (``.tar.gz`` before ``.gz``), or None."""
    name = str(path).lower()
    return next((s for s in sorted(SOURCE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def is_source_file(path: str | Path) -> bool:
    return source_suffix(path) is not None and os.path.isfile(path)


def source_stem(path: str | Path) -> str:
    """The file name without its source suffix (``bench.tar.gz`` -> ``bench``): a group's default."""
    name = Path(path).name
    suffix = source_suffix(name)
    return name[:-len(suffix)] if suffix else Path(name).stem


def make_identity(container: str | Path, member: str | int) -> str:
    return f"{os.path.abspath(container)}{SEPARATOR}{member}"


def split_identity(path: str) -> tuple[str, str] | None:
    """``(container, member)`` of a source identity, or None for a plain path."""
    if SEPARATOR not in path or os.path.lexists(path):
        return None
    start = 0
    while (at := path.find(SEPARATOR, start)) >= 0:
        container = path[:at]
        if source_suffix(container) and os.path.isfile(container):
            return container, path[at + len(SEPARATOR):]
        start = at + 1
    return None


def is_identity(path: str) -> bool:
    return split_identity(path) is not None


# ---------------------------------------------------------------------------------------------
# Public reading API (what the extractor calls)

def list_source(path: str | Path, options: SourceOptions | None = None) -> list[SourceRecord]:
    """The images of a source file, in the order the file stores them.

    Raises:
        InputError: the file cannot be read or listed (not an archive, truncated before its
            members could be listed, no image column, a bad sidecar), naming the file.
    """
    return _container(str(path), options).records()


def read_item(identity: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, FileStat]:
    """The bytes of one source image and the stat that stands for it (the container file's).

    Raises:
        ImageNotFoundError: the container or the member is gone. ImageTooLargeError: over
        ``max_bytes`` (for archive members, from the recorded size, before reading).
        CorruptImageError: the member's data cannot be read (a truncated or damaged archive).
        UnsupportedImageError: an encrypted member or an unsupported compression.
    """
    split = split_identity(identity)
    if split is None:
        raise ImageNotFoundError(f"{identity}: no such file or archive member")
    container, member = split
    try:
        source = _container(container, None)
    except InputError as exc:
        raise CorruptImageError(f"{identity}: {exc}") from exc
    try:  # as read, with git's racy rule (see FileStat.of): a just-written archive is hashed next time
        stat = FileStat.of(os.stat(container), time.time_ns())
    except OSError as exc:
        raise ImageNotFoundError(f"{identity}: the archive cannot be read ({exc.strerror or exc})") from exc
    data = source.read(member, max_bytes, identity)
    _check_size(len(data), max_bytes, identity)
    return data, stat


def stat_item(path: str) -> FileStat | None:
    """What resume compares for an identity (its container's stat now), None when it cannot be
    stat'ed; for a plain path, the path's own stat."""
    split = split_identity(path)
    target = split[0] if split is not None else path
    try:
        return FileStat.of(os.stat(target))
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Containers, kept open (and their listing kept) while the file is unchanged

_cache: collections.OrderedDict[str, "_Container"] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _container(path: str, options: SourceOptions | None) -> "_Container":
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _cache_lock:
        found = _cache.get(path)
        if found is not None and found.key == key and (options is None or found.options == options):
            _cache.move_to_end(path)
            return found
    suffix = source_suffix(path)
    kind = {".zip": _Zip, ".parquet": _Parquet, ".arrow": _Arrow}.get(suffix or "", _Tar)
    made = kind(path, key, FileStat.of(st), options or (found.options if found else SourceOptions()))
    with _cache_lock:
        _cache[path] = made
        while len(_cache) > _OPEN_SOURCES:
            _cache.popitem(last=False)[1].close()
    return made


def _check_size(size: int, max_bytes: int, label: str) -> None:
    if size > max_bytes:
        raise ImageTooLargeError(f"{label}: {size:,} bytes is over the limit of {max_bytes:,} bytes "
                                 f"({max_bytes / MIB:g} MiB) per image file; raise --max-file-mb if the file is "
                                 f"genuine")


def _hidden(name: str) -> bool:
    # Hidden names are skipped as in a folder walk (``__MACOSX/._x.jpg``); "." and ".." are not names.
    return any(part.startswith(".") and part not in (".", "..") for part in PurePosixPath(name).parts)


def _key_and_extension(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def _member_parts(name: str) -> tuple[str, ...]:
    # Only for labels and groups: the member is never used as a path, so ".." is just dropped.
    return tuple(p for p in PurePosixPath(name).parts[:-1] if p not in ("/", "..", "."))


class _Container:
    def __init__(self, path: str, key: tuple, stat: FileStat, options: SourceOptions) -> None:
        self.path, self.key, self.stat, self.options = path, key, stat, options
        self.lock = threading.Lock()
        self._records: list[SourceRecord] | None = None

    def records(self) -> list[SourceRecord]:
        if self._records is None:
            self._records = self.list()
        return self._records

    def list(self) -> list[SourceRecord]:
        raise NotImplementedError

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Archive(_Container):
    """Zip and tar: an index ``member -> where its data is`` and sidecars grouped by key."""

    def _records_from(self, names: list[str], sidecars: dict[str, dict[str, bytes]]) -> list[SourceRecord]:
        records = []
        for name in names:
            key, _ = _key_and_extension(name)
            label, caption = self._describe(key, sidecars.get(key, {}))
            records.append(SourceRecord(make_identity(self.path, name), _member_parts(name), label, None, caption))
        return records

    def _describe(self, key: str, found: dict[str, bytes]) -> tuple[str | None, str | None]:
        label = caption = None
        where = f"{self.path}{SEPARATOR}{key}"
        if "json" in found:
            try:
                meta = json.loads(found["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise InputError(f"{where}.json: not valid JSON ({exc})") from exc
            if isinstance(meta, dict):
                label = None if meta.get("label") is None else str(meta["label"])
                caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
        if "cls" in found:
            label = found["cls"].decode("utf-8", errors="replace").strip()
        if "txt" in found:
            caption = found["txt"].decode("utf-8", errors="replace")
        return label, (caption if caption and caption.strip() else None)


class _Zip(_Archive):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        try:
            self.zip = zipfile.ZipFile(self.path)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{self.path}: not a readable zip archive ({exc}); it may be truncated") from exc
        self.index = {info.filename: info for info in infos if not info.is_dir() and not _hidden(info.filename)}

    def list(self) -> list[SourceRecord]:
        names, sidecars = [], collections.defaultdict(dict)
        for name, info in self.index.items():
            key, extension = _key_and_extension(name)
            if is_image_path(PurePosixPath(name)):
                names.append(name)
            elif extension in SIDECARS and info.file_size <= MAX_SIDECAR_BYTES:
                sidecars[key][extension] = self.read(name, MAX_SIDECAR_BYTES, f"{self.path}{SEPARATOR}{name}")
        return self._records_from(names, sidecars)

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        info = self.index.get(member)
        if info is None:
            raise ImageNotFoundError(f"{label}: no such member in the archive")
        _check_size(info.file_size, max_bytes, label)
        try:
            with self.lock, self.zip.open(info) as handle:
                return handle.read(max_bytes + 1)  # the recorded size can lie: never read more
        except NotImplementedError as exc:
            raise UnsupportedImageError(f"{label}: {exc}") from exc
        except RuntimeError as exc:  # an encrypted member
            raise UnsupportedImageError(f"{label}: cannot be read ({exc})") from exc
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise CorruptImageError(f"{label}: the member's data cannot be read ({exc}); the archive may be "
                                    f"truncated or damaged") from exc

    def close(self) -> None:
        self.zip.close()


def _opener(path: str) -> Callable[[], Any] | None:
    """How to open a tar's decompressed stream (None for an uncompressed tar), from its magic bytes."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return lambda: gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return lambda: bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ"):
        return lambda: lzma.open(path, "rb")
    return None


class _Cursors:
    """Sequential readers of one stream, reused from the nearest one behind the wanted position:
    items are read nearly in order (a few threads a window ahead), so reading stays linear."""

    def __init__(self, open_cursor: Callable[[], Any], position: Callable[[Any], int]) -> None:
        self.open_cursor, self.position = open_cursor, position
        self.cursors: list[Any] = []

    def at_or_before(self, target: int) -> Any:
        behind = [c for c in self.cursors if self.position(c) <= target]
        if behind:
            return max(behind, key=self.position)
        if len(self.cursors) >= _CURSORS:
            oldest = min(self.cursors, key=self.position)
            self.cursors.remove(oldest)
            getattr(oldest, "close", lambda: None)()
        cursor = self.open_cursor()
        self.cursors.append(cursor)
        return cursor

    def close(self) -> None:
        for cursor in self.cursors:
            getattr(cursor, "close", lambda: None)()
        self.cursors = []


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


class _Tar(_Archive):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        try:
            self.open_stream = _opener(self.path)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot be read ({exc.strerror or exc})") from exc
        self.index: dict[str, tuple[int, int]] = {}  # member -> (data offset, size) in the tar stream
        self.cursors = _Cursors(self.open_stream, lambda c: c.tell()) if self.open_stream else None

    def list(self) -> list[SourceRecord]:
        names, sidecars = [], collections.defaultdict(dict)
        listed = 0
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for member in tar:
                    listed += 1
                    if not member.isfile() or _hidden(member.name):
                        continue
                    name = member.name
                    if name not in self.index and is_image_path(PurePosixPath(name)):
                        names.append(name)
                    self.index[name] = (member.offset_data, member.size)
                    key, extension = _key_and_extension(name)
                    if extension in SIDECARS and member.size <= MAX_SIDECAR_BYTES:
                        handle = tar.extractfile(member)
                        sidecars[key][extension] = handle.read() if handle else b""
        except _TAR_ERRORS as exc:
            where = f" after {listed} members" if listed else ""
            raise InputError(f"{self.path}: not a readable tar archive{where} ({exc or type(exc).__name__}); "
                             f"it may be truncated or damaged") from exc
        return self._records_from(names, sidecars)

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        if not self.index:
            self.records()
        where = self.index.get(member)
        if where is None:
            raise ImageNotFoundError(f"{label}: no such member in the archive")
        offset, size = where
        _check_size(size, max_bytes, label)
        try:
            if self.cursors is None:
                with open(self.path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read(size)
            else:
                with self.lock:
                    stream = self.cursors.at_or_before(offset)
                    stream.seek(offset)  # forward: decompresses and drops what lies between
                    data = stream.read(size)
        except _TAR_ERRORS as exc:
            raise CorruptImageError(f"{label}: the member's data cannot be read ({exc or type(exc).__name__}); "
                                    f"the archive may be truncated or damaged") from exc
        if len(data) < size:
            raise CorruptImageError(f"{label}: the archive ends {size - len(data):,} bytes before the end of this "
                                    f"member (truncated)")
        return data

    def close(self) -> None:
        if self.cursors is not None:
            self.cursors.close()


# ---------------------------------------------------------------------------------------------
# Tables: Parquet and Arrow

def _image_column(schema: Any, options: SourceOptions, path: str) -> str:
    import pyarrow as pa

    names = list(schema.names)
    if options.image_column is not None:
        if options.image_column not in names:
            raise InputError(f"{path}: no image column {options.image_column!r}; columns: {', '.join(names)}")
        return options.image_column

    def holds_images(field: Any) -> bool:
        kind = field.type
        if pa.types.is_struct(kind):
            return kind.get_field_index("bytes") >= 0
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

    for name in ("image", "img"):
        if name in names and holds_images(schema.field(name)):
            return name
    found = next((f.name for f in schema if holds_images(f)), None)
    if found is None:
        raise InputError(f"{path}: no image column (a struct with a 'bytes' field, as Hugging Face datasets "
                         f"writes images, or a binary column); columns: {', '.join(names) or '(none)'}")
    return found


def _class_names(schema: Any, column: str) -> list[str] | None:
    """The ClassLabel names Hugging Face ``datasets`` records for an integer label column: its 0 may
    be "fake", so integers are mapped through them, never taken as they are."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _image_bytes(value: Any, label: str) -> bytes:
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            where = f" (only a path: {value['path']!r})" if value.get("path") else ""
            raise ImageNotFoundError(f"{label}: the image column holds no bytes{where}")
        return bytes(data)
    if value is None:
        raise ImageNotFoundError(f"{label}: the image column is empty")
    return bytes(value)


class _Table(_Container):
    """Rows of record batches: listing reads the small columns (and the images' ``path`` field),
    never the image bytes; reading gets one image at a time."""

    def _describe_batches(self, schema: Any, batches: Iterator[Any]) -> list[SourceRecord]:
        import pyarrow as pa

        options = self.options
        image = _image_column(schema, options, self.path)
        names = _class_names(schema, options.label_column)
        records, row = [], 0
        for batch in batches:
            columns = {name: batch.column(name).to_pylist() for name in batch.schema.names if name != image}
            paths = [None] * batch.num_rows
            if image in batch.schema.names:
                column = batch.column(image)
                if pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0:
                    paths = column.field("path").to_pylist()  # the struct's path only, never its bytes
            empty = [None] * batch.num_rows
            labels, groups, captions = (columns.get(c, empty) for c in (options.label_column, options.group_column,
                                                                          options.caption_column))
            for i in range(batch.num_rows):
                parts = _member_parts(paths[i]) if isinstance(paths[i], str) else ()
                label, group, caption = labels[i], groups[i], captions[i]
                if isinstance(label, int) and not isinstance(label, bool) and names and 0 <= label < len(names):
                    label = names[label]
                records.append(SourceRecord(make_identity(self.path, row), parts,
                                            None if label is None else str(label),
                                            None if group is None else str(group),
                                            caption if isinstance(caption, str) and caption.strip() else None))
                row += 1
        self.rows = row
        return records

    def _row(self, member: str, label: str) -> int:
        if not member.isdigit():
            raise ImageNotFoundError(f"{label}: not a row number")
        return int(member)


class _Parquet(_Table):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(self.path)
            self.image = _image_column(self.file.schema_arrow, self.options, self.path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Parquet file ({exc})") from exc
        self.cursors = _Cursors(self._open_cursor, lambda c: c[0])

    def _open_cursor(self) -> list[Any]:
        # [first row of the current batch, the current batch's images, the batch iterator]
        batches = self.file.iter_batches(batch_size=_BATCH_ROWS, columns=[self.image], use_threads=False)
        return [0, [], batches]

    def list(self) -> list[SourceRecord]:
        import pyarrow as pa

        schema = self.file.schema_arrow
        small = [c for c in (self.options.label_column, self.options.group_column, self.options.caption_column)
                 if c in schema.names and c != self.image]
        image_type = schema.field(self.image).type
        has_path = pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0
        if not small and not has_path:  # nothing to read but the row count
            self.rows = self.file.metadata.num_rows
            return [SourceRecord(make_identity(self.path, row)) for row in range(self.rows)]
        try:
            batches = self.file.iter_batches(batch_size=4096, columns=small + ([f"{self.image}.path"] if has_path
                                                                               else []))
            return self._describe_batches(schema, batches)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: the Parquet file cannot be read ({exc}); it may be truncated") from exc

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        import pyarrow as pa

        row = self._row(member, label)
        if row >= self.file.metadata.num_rows:
            raise ImageNotFoundError(f"{label}: the file has {self.file.metadata.num_rows} rows")
        try:
            with self.lock:
                cursor = self.cursors.at_or_before(row)
                while row >= cursor[0] + len(cursor[1]):
                    cursor[0] += len(cursor[1])
                    cursor[1] = next(cursor[2]).column(0).to_pylist()
                value = cursor[1][row - cursor[0]]
        except (pa.ArrowException, OSError, StopIteration) as exc:
            raise CorruptImageError(f"{label}: the row cannot be read ({exc or 'the file ends early'})") from exc
        return _image_bytes(value, label)


class _Arrow(_Table):
    """Arrow IPC, file or stream format (what ``datasets`` caches), memory-mapped: batches are views
    of the mapped file, so holding them costs no memory beyond the page cache."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import pyarrow as pa

        try:
            self.source = pa.memory_map(self.path)
            try:
                reader = pa.ipc.open_file(self.source)
                self.schema = reader.schema
                self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            except pa.ArrowInvalid:
                self.source.seek(0)
                stream = pa.ipc.open_stream(self.source)
                self.schema = stream.schema
                self.batches = list(stream)
            self.image = _image_column(self.schema, self.options, self.path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Arrow file ({exc}); it may be truncated") from exc
        self.starts = []
        total = 0
        for batch in self.batches:
            self.starts.append(total)
            total += batch.num_rows
        self.total = total

    def list(self) -> list[SourceRecord]:
        small = [c for c in (self.options.label_column, self.options.group_column, self.options.caption_column)
                 if c in self.schema.names and c != self.image]
        return self._describe_batches(self.schema, (b.select(small + [self.image]) for b in self.batches))

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        import bisect

        row = self._row(member, label)
        if row >= self.total:
            raise ImageNotFoundError(f"{label}: the file has {self.total} rows")
        at = bisect.bisect_right(self.starts, row) - 1
        value = self.batches[at].column(self.image)[row - self.starts[at]].as_py()
        return _image_bytes(value, label)

    def close(self) -> None:
        self.source.close()


__all__ = [
    "SEPARATOR",
    "SOURCE_SUFFIXES",
    "SourceOptions",
    "SourceRecord",
    "is_identity",
    "is_source_file",
    "list_source",
    "make_identity",
    "read_item",
    "source_stem",
    "split_identity",
    "stat_item",
]
