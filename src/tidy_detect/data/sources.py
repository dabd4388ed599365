"""Image sources read in place: zip and tar archives, WebDataset shards, Parquet and Arrow files,
on the local disk or behind a filesystem URI (see :mod:`tidy_detect.data.remote`).

Every image of a source has an **identity**, a string that stands in ``ImageItem.path`` and in the
store's ``path`` column:

- an archive member: ``ARCHIVE!/MEMBER``, the archive's absolute path or URI, ``!/``, and the
  member's name exactly as the archive stores it (``/data/bench.zip!/progan/1_fake/img0.png``,
  ``s3://bucket/bench.zip!/progan/1_fake/img0.png``);
- a Parquet or Arrow row: ``FILE!/ROW``, ROW the row's number in the file from 0
  (``/data/train.parquet!/17``), when the image is in the column chosen by default (see
  :class:`SourceOptions`); ``FILE!/COLUMN/ROW`` when another column was named, so two image
  columns of one table (a real and a fake image per row) are two images;
- a remote image file: its URI (``s3://bucket/data/0_real/x.png``).

An identity is split at the first ``!/`` whose left part names a file with a source suffix
(``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.parquet``, ``.arrow``): locally, an existing
file, and a path that exists as it is is always a plain file; behind a URI, the suffix alone
decides (asking the store would cost a request per image).

Reading is bounded and never touches the disk beyond the source file: no member is extracted or
written anywhere (so a member named ``../../etc/passwd`` is only a string), a member larger than the
file-size limit is refused from the size the archive records before any byte of it is read, only
regular members are listed (no links, devices or folders), and a damaged source gives an
``InputError`` when it cannot be listed and an error row (``corrupt``) for a member whose data
cannot be read, never an internal error. A **truncated** source is refused whole when it is listed,
before any extraction: a zip without its central directory, a tar without its end-of-archive
blocks (or cut inside a member), a Parquet file without its footer, an Arrow stream without its
end-of-stream marker.

**How bytes are read.** Zip members and uncompressed tar members are read by position
(``pread`` locally, one ranged request per member remotely), so threads read them in parallel;
Parquet through the file's random access (ranged reads of the column chunks wanted); a compressed
tar sequentially, by a few cursors that only move forward; a local Arrow file memory-mapped. Only
the members being read are ever in memory, whatever the source's size.

An archive made by packing a folder (``zip -r X.zip X``), whose members all sit under ``X/``,
reads as that folder: ``X/`` is not a part of the members' paths for labels and groups.

**Sidecars (WebDataset).** In a zip or tar, files sharing an image's *key* (its path up to the
first dot of its name, as WebDataset groups a sample) describe it: ``KEY.cls`` holds its label
(``0``/``1``/``real``/``fake``), ``KEY.json`` a ``label``, ``caption`` and ``group`` field (the
names :class:`SourceOptions` can change), and ``KEY.txt`` its caption. A label from a sidecar wins
over the ``0_real``/``1_fake`` path parts. So WebDataset shards need no option: a shard is a tar
whose samples have such sidecars.

**Resume.** The stat recorded for an archive member is the archive file's own mtime, ctime and
inode with the member's byte count: an archive whose mtime, ctime and inode are unchanged has
unchanged members (any rewrite or replacement changes the ctime), so a rerun skips them without
reading a byte; when the archive was touched, every member's content is hashed and
compared (what :func:`tidy_detect.features.extractor.pending_items` does for a touched file), so a
rewritten archive only redoes the members that really changed. A member's CRC would add nothing to
this, and tar has none. Behind a URI the stat is the object's size and mtime (see
:mod:`tidy_detect.data.remote`).

This module reads containers and reports raw records (:class:`SourceRecord`); how path parts
become labels and groups is :mod:`tidy_detect.data.inputs`'s rule, the same for every source.
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import io
import json
import lzma
import os
import posixpath
import queue
import struct
import tarfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from tidy_detect.data import remote
from tidy_detect.errors import CorruptImageError, ImageError, ImageNotFoundError, ImageTooLargeError, InputError, \
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
_CURSORS = 4  # sequential readers kept per compressed archive or table (threads read out of order)
_OPEN_SOURCES = 16  # containers kept open (an fd each; a tar.gz up to _CURSORS streams of 1 MiB)
# Archive listings kept after their container is closed (by members, all archives together): the
# shards of a pattern are listed once when the inputs are collected and read later, after others
# were opened; listing a tar again means reading it again.
_LISTED_MEMBERS = 2_000_000
_REMOTE_RECHECK_S = 5.0  # how often a remote container's stat is asked again while it is read
_CHUNK = 1 * MIB  # sequential reads of a tar stream
_LOOKBEHIND = 4 * MIB  # bytes a forward-only tar stream keeps behind its position (threads read a window ahead)
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker every Arrow stream writer closes with
_ZIP_HEADER_SLACK = 1024  # read with a member's local header: its name and extra field, usually all of it
_CONVERT_BATCH_BYTES = 16 * MIB  # an Arrow batch up to this size is converted whole when first read (4 kept)


@dataclass(frozen=True)
class SourceOptions:
    """Which columns of a Parquet / Arrow file (or fields of a WebDataset sample) hold what.

    A column left as None takes its default, and may be absent: ``label``, ``group``, ``caption``;
    the image column defaults to the column named ``image`` or ``img``, else the first column of
    image structs (``{"bytes", "path"}``, as Hugging Face ``datasets`` writes them) or raw binary.
    A column named here must exist: a source without it is an ``InputError`` listing its columns.

    In a WebDataset shard the columns are the sample's parts: ``image_column`` is the extension
    of the image member to take (``jpg``, ``png``; by default every member with an image suffix),
    and ``label_column`` / ``group_column`` / ``caption_column`` name fields of its ``.json``
    sidecar. When named, the field wins over ``.cls`` / ``.txt``.
    """

    image_column: str | None = None
    label_column: str | None = None
    group_column: str | None = None
    caption_column: str | None = None

    @property
    def label(self) -> str:
        return self.label_column or "label"

    @property
    def group(self) -> str:
        return self.group_column or "group"

    @property
    def caption(self) -> str:
        return self.caption_column or "caption"

    def named(self) -> dict[str, str]:
        """The columns given explicitly: ``{"--label-column": "y", ...}``."""
        return {f"--{kind}-column": value for kind, value in (("image", self.image_column),
                ("label", self.label_column), ("group", self.group_column), ("caption", self.caption_column))
                if value is not None}


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One image of a source, before the label and group rules of :mod:`tidy_detect.data.inputs`."""

    identity: str
    parts: tuple[str, ...] = ()  # folders of the member's path inside the source
    label: str | None = None  # a label as written (sidecar or column), to be parsed
    group: str | None = None
    caption: str | None = None


_LONGEST_FIRST = tuple(sorted(SOURCE_SUFFIXES, key=len, reverse=True))


def source_suffix(path: str | Path) -> str | None:
    """The source suffix of a file name (``.tar.gz`` before ``.gz``), or None."""
    name = str(path).lower()
    return next((s for s in _LONGEST_FIRST if name.endswith(s)), None)


def is_source_file(path: str | Path) -> bool:
    """Whether ``path`` is a source file: an existing local file, or a URI, with a source suffix."""
    if source_suffix(path) is None:
        return False
    if remote.is_uri(str(path)):
        try:
            found = remote.info(str(path), _REMOTE_RECHECK_S)
        except (OSError, InputError):
            return False
        return found is not None and found.is_file
    return os.path.isfile(path)


def container_kind(path: str | Path) -> str | None:
    """``zip``, ``tar``, ``tar.gz``, ``parquet`` or ``arrow`` for a source file name, else None."""
    suffix = source_suffix(path)
    return None if suffix is None else {".tgz": "tar.gz"}.get(suffix, suffix[1:])


def source_stem(path: str | Path) -> str:
    """The file name without its source suffix (``bench.tar.gz`` -> ``bench``): a group's default."""
    name = remote.base_name(str(path)) if remote.is_uri(str(path)) else Path(path).name
    suffix = source_suffix(name)
    return name[:-len(suffix)] if suffix else Path(name).stem


def container_name(container: str | Path) -> str:
    """The name a source file has in its members' identities: a URI as written, a local path made
    absolute."""
    text = str(container)
    return text if remote.is_uri(text) else os.path.abspath(text)


def make_identity(container: str | Path, member: str | int) -> str:
    return f"{container_name(container)}{SEPARATOR}{member}"


# Local containers seen to be files with no folder "NAME!" beside them (so no path through them
# can exist as it is): asked once a second, not for each of their million members.
_plain_containers: dict[str, float] = {}
_CONTAINER_RECHECK_S = 1.0


def _is_plain_container(container: str) -> bool:
    now = time.monotonic()
    seen = _plain_containers.get(container)
    if seen is not None and now - seen < _CONTAINER_RECHECK_S:
        return True
    if os.path.isfile(container) and not os.path.lexists(container + "!"):
        if len(_plain_containers) > 4096:
            _plain_containers.clear()
        _plain_containers[container] = now
        return True
    return False


def split_identity(path: str) -> tuple[str, str] | None:
    """``(container, member)`` of a source identity, or None for a plain path or URI."""
    if SEPARATOR not in path:
        return None
    at = path.find(SEPARATOR)
    seen = _plain_containers.get(path[:at])  # the common case: a member of a container seen this second
    if seen is not None and time.monotonic() - seen < _CONTAINER_RECHECK_S:
        return path[:at], path[at + len(SEPARATOR):]
    uri = remote.is_uri(path)
    if not uri and source_suffix(path[:at]) and _is_plain_container(path[:at]):
        return path[:at], path[at + len(SEPARATOR):]
    if not uri and os.path.lexists(path):
        return None
    start = 0
    while (at := path.find(SEPARATOR, start)) >= 0:
        container = path[:at]
        if source_suffix(container) and (uri or os.path.isfile(container)):
            return container, path[at + len(SEPARATOR):]
        start = at + 1
    return None


def is_identity(path: str) -> bool:
    """Whether ``path`` is read through this module: a source member or a remote URI (not a plain
    local file, which :func:`tidy_detect.images.load_image` reads itself)."""
    return remote.is_uri(path) or split_identity(path) is not None


# ---------------------------------------------------------------------------------------------
# Public reading API (what the extractor calls)

def list_source(path: str | Path, options: SourceOptions | None = None,
                class_names: dict[str, list[str]] | None = None) -> list[SourceRecord]:
    """The images of a source file, in the order the file stores them.

    Args:
        path: a local path or a URI.
        options: which columns (sidecar fields) hold what.
        class_names: ``{column: names}`` mapping integer labels to class names (a ``datasets``
            folder's ``ClassLabel``), over what the file's own metadata says.

    Raises:
        InputError: the file cannot be read or listed (not an archive, truncated, no image
            column, a named column or field that is absent, a bad sidecar), naming the file.
    """
    return list(iter_source(path, options, class_names))


def iter_source(path: str | Path, options: SourceOptions | None = None,
                class_names: dict[str, list[str]] | None = None) -> Iterator[SourceRecord]:
    """:func:`list_source`, one record at a time (a table's rows batch by batch).

    Raises:
        InputError: as :func:`list_source`; a table's damage may be found while iterating.
    """
    return _container(container_name(path)).records(options or SourceOptions(), class_names or {})


def archive_members(path: str | Path) -> list[str]:
    """Every regular, visible member of a zip or tar (images and the rest), in archive order:
    what a dataset layout walks inside the archive.

    Raises:
        InputError: as :func:`list_source`, or the file is a table.
    """
    container = _container(container_name(path))
    if not isinstance(container, _Archive):
        raise InputError(f"{path}: a table, not an archive of files")
    return container.member_names()


def read_item(identity: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, FileStat]:
    """The bytes of one source image and the stat that stands for it (the container file's, or a
    remote object's own).

    Raises:
        ImageNotFoundError: the container or the member is gone. ImageTooLargeError: over
        ``max_bytes`` (for archive members, from the recorded size, before reading).
        CorruptImageError: the member's data cannot be read (a truncated or damaged archive).
        UnsupportedImageError: an encrypted member or an unsupported compression.
        ImageError: a remote store cannot be reached.
    """
    split = split_identity(identity)
    if split is None:
        if remote.is_uri(identity):
            return remote.read_object(identity, max_bytes=max_bytes)
        raise ImageNotFoundError(f"{identity}: no such file or archive member")
    return read_member(*split, max_bytes=max_bytes, identity=identity)


def read_member(container: str, member: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                identity: str | None = None) -> tuple[bytes, FileStat]:
    """:func:`read_item` for an identity already split by :func:`split_identity` (the extractor
    splits each once). An :class:`ImageError` raised carries ``stat``: the container's as it was
    before the member was read (what resume compares for an error row), None when it is gone."""
    identity = identity or f"{container}{SEPARATOR}{member}"
    try:
        source, seen = _container_and_stat(container)
    except InputError as exc:
        if remote.is_uri(container) or os.path.exists(container):
            raise _with_stat(CorruptImageError(f"{identity}: {exc}"), container) from exc
        raise _with_stat(ImageNotFoundError(f"{identity}: the archive is gone"), None) from exc
    stat = FileStat.of(seen, time.time_ns()) if isinstance(seen, os.stat_result) else source.stat_now()
    try:
        data = source.read(member, max_bytes, identity)
        _check_size(len(data), max_bytes, identity)
    except ImageError as exc:
        exc.stat = stat
        raise
    return data, FileStat(len(data), stat.mtime_ns, stat.ctime_ns, stat.inode)


def _with_stat(exc: ImageError, container: str | None) -> ImageError:
    exc.stat = stat_item(container) if container is not None else None
    return exc


def stat_item(path: str, recorded: FileStat | None = None) -> FileStat | None:
    """What resume compares for a path now, None when it cannot be stat'ed.

    A plain file's or remote object's own stat. A member's (see the module docstring): its
    container's mtime, ctime and inode with the member's byte count, which is what the store
    records (``num_bytes``); that count is taken from ``recorded`` (the stat the store holds for
    the path), since a table row's size is not known without reading it, and it needs no
    comparing: rewriting the container changes its ctime (locally) or its mtime (an object).
    """
    split = split_identity(path)
    target = split[0] if split is not None else path
    if remote.is_uri(target):
        found = remote.stat(target)
    else:
        try:
            found = FileStat.of(os.stat(target))
        except OSError:
            return None
    if split is None or found is None:
        return found
    return dataclasses.replace(found, size=recorded.size if recorded is not None else found.size)


# ---------------------------------------------------------------------------------------------
# Where a container's bytes are: a local file or a remote object

class _Location:
    """Opens, stats and reads by position one local file or remote object."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.remote = remote.is_uri(name)
        self._fd: int | None = None
        self._file: Any = None
        self._lock = threading.Lock()

    def stat(self, max_age_s: float = 0.0) -> tuple[tuple, FileStat]:
        """(cache key, stat). Raises InputError when the file or object cannot be stat'ed."""
        if self.remote:
            try:
                found = remote.info(self.name, max_age_s)
            except OSError as exc:
                raise InputError(f"{self.name}: cannot be read ({exc})") from exc
            if found is None or not found.is_file:
                raise InputError(f"{self.name}: no such object")
            return (found.size, found.mtime_ns), remote.stat_of(found)
        try:
            st = os.stat(self.name)
        except OSError as exc:
            raise InputError(f"{self.name}: cannot be read ({exc.strerror or exc})") from exc
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), FileStat.of(st)

    def stat_as_read(self) -> FileStat:
        """The stat recorded with bytes read now (git's racy rule, see :meth:`FileStat.of`)."""
        try:
            if self.remote:
                found = remote.info(self.name, _REMOTE_RECHECK_S)
                if found is None:
                    raise ImageNotFoundError(f"{self.name}: the object is gone")
                return remote.stat_of(found, time.time_ns())
            return FileStat.of(os.stat(self.name), time.time_ns())
        except OSError as exc:
            raise ImageNotFoundError(f"{self.name}: the archive cannot be read ({exc})") from exc

    def random_file(self) -> Any:
        """A new seekable binary file (the caller closes it)."""
        return remote.open_random(self.name) if self.remote else open(self.name, "rb")

    def stream(self) -> Any:
        """A new sequential binary stream (the caller closes it)."""
        return remote.open_stream(self.name) if self.remote else open(self.name, "rb")

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``; thread-safe, no shared position."""
        with self._lock:
            if self.remote and self._file is None:
                self._file = remote.open_random(self.name)
            elif not self.remote and self._fd is None:
                self._fd = os.open(self.name, os.O_RDONLY)
        if self.remote:
            return self._file.read_at(size, offset)
        chunks, got = [], 0
        while got < size:
            chunk = os.pread(self._fd, size - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._file is not None:
                self._file.close()
                self._file = None


# ---------------------------------------------------------------------------------------------
# Containers, kept open (and their listing kept) while the file is unchanged

_cache: collections.OrderedDict[str, "_Container"] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _forget_containers() -> None:
    # A forked child has none of the parent's threads, so its read-ahead streams would never
    # deliver: it opens its containers anew.
    _cache.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_containers)


def _container(path: str) -> "_Container":
    return _container_and_stat(path)[0]


def _container_and_stat(path: str) -> tuple["_Container", Any]:
    """The open container of ``path`` and, for a local file, the ``os.stat`` that checked it is
    unchanged (None for a remote one)."""
    with _cache_lock:
        found = _cache.get(path)
    seen = None
    if remote.is_uri(path):
        if found is not None and time.monotonic() - found.checked < _REMOTE_RECHECK_S:
            return found, None
        key, _ = _Location(path).stat(_REMOTE_RECHECK_S)
    else:
        try:
            seen = os.stat(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
        key = (seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns, seen.st_ino)
    if found is not None and found.key == key:
        found.checked = time.monotonic()
        with _cache_lock:
            _cache.move_to_end(path)
        return found, seen
    return _open_container(path, key), seen


def _open_container(path: str, key: tuple) -> "_Container":
    location = _Location(path)
    kind = {".zip": _Zip, ".parquet": _Parquet, ".arrow": _Arrow}.get(source_suffix(path) or "", _Tar)
    made = kind(location, key)
    with _cache_lock:
        raced = _cache.get(path)
        if raced is not None and raced.key == key:  # another thread opened it meanwhile: one is enough
            keep, gone = raced, [made]
        else:
            if raced is not None:
                del _cache[path]
            _cache[path] = keep = made
            gone = ([raced] if raced is not None else []) + \
                [_cache.popitem(last=False)[1] for _ in range(max(0, len(_cache) - _OPEN_SOURCES))]
    for container in gone:
        container.close()
    return keep


_listings: collections.OrderedDict[tuple, tuple[int, Any]] = collections.OrderedDict()


def _listing(path: str, key: tuple) -> Any:
    with _cache_lock:
        found = _listings.get((path, key))
        if found is not None:
            _listings.move_to_end((path, key))
        return None if found is None else found[1]


def _keep_listing(path: str, key: tuple, members: int, listing: Any) -> None:
    with _cache_lock:
        _listings[(path, key)] = (members, listing)
        total = sum(n for n, _ in _listings.values())
        while total > _LISTED_MEMBERS and len(_listings) > 1:
            total -= _listings.popitem(last=False)[1][0]


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
    def __init__(self, location: _Location, key: tuple) -> None:
        self.location, self.key = location, key
        self.path = location.name
        self.checked = time.monotonic()
        self.lock = threading.Lock()

    def records(self, options: SourceOptions, class_names: dict[str, list[str]]) -> Iterator[SourceRecord]:
        # Not kept: the caller turns them into items, and a second list of a million would double
        # the listing's memory; listing again reads only the archive's index or the small columns.
        return iter(self.list(options, class_names))

    def list(self, options: SourceOptions, class_names: dict[str, list[str]]) -> Iterable[SourceRecord]:
        raise NotImplementedError

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        raise NotImplementedError

    def stat_now(self) -> FileStat:
        return self.location.stat_as_read()

    def close(self) -> None:
        self.location.close()


class _Archive(_Container):
    """Zip and tar: an index ``member -> where its data is`` and sidecars grouped by key."""

    def member_names(self) -> list[str]:
        raise NotImplementedError

    def sidecars(self) -> dict[str, dict[str, bytes]]:
        raise NotImplementedError

    def list(self, options: SourceOptions, class_names: dict[str, list[str]]) -> list[SourceRecord]:
        names = [n for n in self.member_names() if is_image_path(PurePosixPath(n))]
        if options.image_column is not None:
            wanted = options.image_column.lower().lstrip(".")
            found = sorted({_key_and_extension(n)[1] for n in names})
            names = [n for n in names if _key_and_extension(n)[1] == wanted]
            if not names:
                raise InputError(f"{self.path}: no image member with the extension {wanted!r} (--image-column); "
                                 f"image extensions there: {', '.join(found) or '(none)'}")
        sidecars = self.sidecars()
        self._check_fields(options, sidecars)
        # A packed folder (``zip -r X.zip X``: every member under X/) reads as X, so X/ is no group.
        stem = source_stem(self.path)
        packed = all(_member_parts(n)[:1] == (stem,) for n in self.member_names())
        records = []
        for name in names:
            key, _ = _key_and_extension(name)
            label, group, caption = self._describe(key, sidecars.get(key, {}), options)
            parts = _member_parts(name)[1:] if packed else _member_parts(name)
            records.append(SourceRecord(make_identity(self.path, name), parts, label, group, caption))
        return records

    def _check_fields(self, options: SourceOptions, sidecars: dict[str, dict[str, bytes]]) -> None:
        named = {flag: value for flag, value in options.named().items() if flag != "--image-column"}
        if not named:
            return
        fields: set[str] = set()
        for key, found in sidecars.items():
            if "json" in found:
                meta = self._json(key, found["json"])
                fields.update(meta if isinstance(meta, dict) else ())
        for flag, value in named.items():
            if value not in fields:
                raise InputError(f"{self.path}: no sample has the field {value!r} ({flag}) in its .json sidecar; "
                                 f"fields there: {', '.join(sorted(fields)) or '(no .json sidecars)'}")

    def _json(self, key: str, raw: bytes) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{self.path}{SEPARATOR}{key}.json: not valid JSON ({exc})") from exc

    def _describe(self, key: str, found: dict[str, bytes], options: SourceOptions
                  ) -> tuple[str | None, str | None, str | None]:
        label = group = caption = None
        meta = self._json(key, found["json"]) if "json" in found else None
        meta = meta if isinstance(meta, dict) else {}

        def field(name: str) -> str | None:
            value = meta.get(name)
            return None if value is None or isinstance(value, (dict, list)) else str(value)

        label, group = field(options.label), field(options.group)
        caption = meta.get(options.caption) if isinstance(meta.get(options.caption), str) else None
        if "cls" in found and options.label_column is None:
            label = found["cls"].decode("utf-8", errors="replace").strip()
        if "txt" in found and options.caption_column is None:
            caption = found["txt"].decode("utf-8", errors="replace")
        return label, group, (caption if caption and caption.strip() else None)


# Fields of a zip local file header (zipfile's own struct layout, ``_FH_*`` indices).
_FH_NAME_LENGTH, _FH_EXTRA_LENGTH = 10, 11


class _Zip(_Archive):
    """The central directory is read once with :mod:`zipfile`; members are then read by position
    (their local header and data in one ``read_at``) and decompressed and CRC-checked by
    ``zipfile.ZipExtFile``. Unlike ``ZipFile.open``, which holds one lock per archive for each read,
    threads (and ranged requests to a remote archive) read in parallel."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        kept = _listing(self.path, self.key)
        if kept is not None:
            self.index, self._sidecars = kept
            return
        handle = None
        try:
            handle = self.location.random_file()
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{self.path}: not a readable zip archive ({exc}); it may be truncated (a zip's "
                             f"index is at its end)") from exc
        finally:
            if handle is not None:
                handle.close()
        self.index = {info.filename: info for info in infos if not info.is_dir() and not _hidden(info.filename)}
        self._sidecars: dict[str, dict[str, bytes]] | None = None
        _keep_listing(self.path, self.key, len(self.index), (self.index, None))

    def member_names(self) -> list[str]:
        return list(self.index)

    def sidecars(self) -> dict[str, dict[str, bytes]]:
        if self._sidecars is None:
            found: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
            for name, info in self.index.items():
                key, extension = _key_and_extension(name)
                if extension in SIDECARS and info.file_size <= MAX_SIDECAR_BYTES:
                    found[key][extension] = self.read(name, MAX_SIDECAR_BYTES, f"{self.path}{SEPARATOR}{name}")
            self._sidecars = dict(found)
            _keep_listing(self.path, self.key, len(self.index), (self.index, self._sidecars))
        return self._sidecars

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        info = self.index.get(member)
        if info is None:
            raise ImageNotFoundError(f"{label}: no such member in the archive")
        _check_size(info.file_size, max_bytes, label)
        if info.compress_size > max_bytes + max_bytes // 64 + 64 * 1024:  # deflate grows data by < 0.1%
            raise ImageTooLargeError(f"{label}: the archive records {info.compress_size:,} compressed bytes, over "
                                     f"the limit of {max_bytes:,} bytes; raise --max-file-mb if it is genuine")
        if info.flag_bits & 0x1:
            raise UnsupportedImageError(f"{label}: the member is encrypted")
        try:
            wanted = zipfile.sizeFileHeader + _ZIP_HEADER_SLACK + info.compress_size
            data = self.location.read_at(info.header_offset, wanted)
            if len(data) < zipfile.sizeFileHeader:
                raise zipfile.BadZipFile("the member's header is cut off")
            header = struct.unpack(zipfile.structFileHeader, data[:zipfile.sizeFileHeader])
            if header[0] != zipfile.stringFileHeader:
                raise zipfile.BadZipFile("bad magic number for the member's header")
            start = zipfile.sizeFileHeader + header[_FH_NAME_LENGTH] + header[_FH_EXTRA_LENGTH]
            end = start + info.compress_size
            if end > len(data) and len(data) == wanted:  # a long extra field: the rest of the data
                data += self.location.read_at(info.header_offset + len(data), end - len(data))
            if end > len(data):
                raise EOFError(f"the archive ends {end - len(data):,} bytes before the end of this member")
            if info.compress_type == zipfile.ZIP_STORED:  # images mostly are: the bytes as they lie, CRC-checked
                payload = data[start:end]
                if zlib.crc32(payload) != info.CRC:
                    raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
                return payload
            with zipfile.ZipExtFile(io.BytesIO(data[start:end]), "r", info) as handle:
                return handle.read(max_bytes + 1)  # the recorded size can lie: never read more
        except NotImplementedError as exc:
            raise UnsupportedImageError(f"{label}: {exc}") from exc
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, lzma.LZMAError) as exc:
            raise CorruptImageError(f"{label}: the member's data cannot be read ({exc}); the archive may be "
                                    f"truncated or damaged") from exc


class _Forward:
    """A forward-only view of a sequential stream for :mod:`tarfile`'s ``r:`` mode: ``tell``,
    ``seek`` ahead (reading, or seeking the underlying file when it can and the jump is long), and
    back within the last :data:`_LOOKBEHIND` bytes, so a member that a decoding thread asks for
    just after a later one was read (threads reach the lock out of order) is still held; and the
    last 512-byte block asked for (see :class:`_Watch`). The bytes held are a list of the chunks
    read, dropped whole once they lie that far behind."""

    def __init__(self, raw: Any, seekable: bool = False, chunk: int = _CHUNK, lookbehind: int = _LOOKBEHIND) -> None:
        self.raw, self.seekable, self.chunk, self.lookbehind = raw, seekable, chunk, lookbehind
        self.chunks: collections.deque[tuple[int, bytes]] = collections.deque()  # (stream position, bytes)
        self.start = 0  # stream position of the first byte held
        self.end = 0  # stream position after the last byte read
        self.pos = 0
        self.eof = False
        self.last_block: bytes | None = None

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            raise io.UnsupportedOperation("a tar stream has no known end")
        target = offset + (self.pos if whence == 1 else 0)
        if target < self.start:
            raise io.UnsupportedOperation(f"cannot seek back to {target} (stream at {self.pos}, bytes held from "
                                          f"{self.start})")
        self.pos = target
        return target

    def read(self, size: int | None = -1) -> bytes:
        want_end = None if size is None or size < 0 else self.pos + size
        while not self.eof and (want_end is None or self.end < want_end):
            if self.seekable and self.pos - self.end > self.chunk:  # a long jump: no need to read what lies between
                self.raw.seek(self.pos)
                self.chunks.clear()
                self.start = self.end = self.pos
                continue
            data = self.raw.read(self.chunk)
            if not data:
                self.eof = True
                break
            self.chunks.append((self.end, data))
            self.end += len(data)
            keep_from = self.pos - self.lookbehind
            while len(self.chunks) > 1 and self.chunks[0][0] + len(self.chunks[0][1]) <= keep_from:
                self.chunks.popleft()
            self.start = self.chunks[0][0]
        stop = self.end if want_end is None else min(want_end, self.end)
        data = self._held(self.pos, stop)
        self.pos += len(data)
        if size == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def _held(self, begin: int, stop: int) -> bytes:
        if stop <= begin:
            return b""
        parts = []
        for at, data in self.chunks:
            if at + len(data) <= begin:
                continue
            if at >= stop:
                break
            parts.append(data[max(0, begin - at):stop - at] if begin > at or stop < at + len(data) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self.raw.close()


class _Watch:
    """A local file as tarfile reads it, remembering the last 512-byte block asked for: where a
    listing stopped, the end-of-archive block of zeros, or less (or a bad header) when the tar is
    cut. tarfile itself takes a tar that just ends for a complete one."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.last_block: bytes | None = None

    def read(self, size: int | None = -1) -> bytes:
        data = self.raw.read(size)
        if size == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()


class _Decompressed:
    """A decompressing stream and the raw stream under it, closed together."""

    def __init__(self, kind: str | None, raw: Any) -> None:
        self.raw = raw
        self.stream = {"gz": lambda: gzip.GzipFile(fileobj=raw, mode="rb"), "bz2": lambda: bz2.BZ2File(raw, "rb"),
                       "xz": lambda: lzma.LZMAFile(raw, "rb"), None: lambda: raw}[kind]()

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


class _Cursors:
    """Sequential readers of one stream, reused from the one that reaches the wanted position
    most cheaply: items are read nearly in order (a few threads a window ahead), so reading stays
    linear. ``reach(c)`` is the earliest position a cursor can still serve (bytes it holds behind
    it), ``position(c)`` where it stands; the least recently used one is dropped for a new one."""

    def __init__(self, open_cursor: Callable[[], Any], position: Callable[[Any], int],
                 reach: Callable[[Any], int] | None = None) -> None:
        self.open_cursor, self.position = open_cursor, position
        self.reach = reach or position
        self.cursors: list[Any] = []  # least recently used first

    def at_or_before(self, target: int) -> Any:
        usable = [c for c in self.cursors if self.reach(c) <= target]
        if usable:
            cursor = min(usable, key=lambda c: max(0, target - self.position(c)))
            self.cursors.remove(cursor)
        else:
            if len(self.cursors) >= _CURSORS:
                getattr(self.cursors.pop(0), "close", lambda: None)()
            cursor = self.open_cursor()
        self.cursors.append(cursor)
        return cursor

    def close(self) -> None:
        for cursor in self.cursors:
            getattr(cursor, "close", lambda: None)()
        self.cursors = []


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError, io.UnsupportedOperation)


def _compression(magic: bytes) -> str | None:
    if magic.startswith(b"\x1f\x8b"):
        return "gz"
    if magic.startswith(b"BZh"):
        return "bz2"
    if magic.startswith(b"\xfd7zXZ"):
        return "xz"
    return None


class _Tar(_Archive):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        try:
            self.compression = _compression(self.location.read_at(0, 6))
        except OSError as exc:
            raise InputError(f"{self.path}: cannot be read ({exc.strerror or exc})") from exc
        self.index: dict[str, tuple[int, int]] = {}  # member -> (data offset, size) in the tar stream
        self._sidecars: dict[str, dict[str, bytes]] = {}
        self._names: list[str] = []
        self._listed = False
        kept = _listing(self.path, self.key)
        if kept is not None:
            self.index, self._names, self._sidecars = kept
            self._listed = True
        self.cursors = _Cursors(self._open_cursor, lambda c: c.tell(), lambda c: c.start) if self.compression else None

    def _open_cursor(self) -> _Forward:
        return _Forward(_ReadAheadStream(_Decompressed(self.compression, self.location.stream())))

    def _listing_stream(self) -> Any:
        if self.compression is not None:
            return self._open_cursor()
        if self.location.remote:  # ranged reads of 1 MiB, jumping over large members
            return _Forward(self.location.random_file(), seekable=True)
        return _Watch(open(self.path, "rb"))  # the OS seeks over members: only headers are read

    def _list(self) -> None:
        if self._listed:
            return
        names, sidecars = [], collections.defaultdict(dict)
        listed = 0
        stream = self._listing_stream()
        try:
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                for member in tar:
                    listed += 1
                    if not member.isfile() or _hidden(member.name):
                        continue
                    name = member.name
                    if name not in self.index:
                        names.append(name)
                    self.index[name] = (member.offset_data, member.size)
                    key, extension = _key_and_extension(name)
                    if extension in SIDECARS and member.size <= MAX_SIDECAR_BYTES:
                        handle = tar.extractfile(member)
                        sidecars[key][extension] = handle.read() if handle else b""
            block = stream.last_block
            if listed and (block is None or len(block) < tarfile.BLOCKSIZE or block.count(0) != len(block)):
                cut = "cut inside a header" if block else "cut after its last complete member"
                raise InputError(f"{self.path}: the tar archive ends without its end-of-archive blocks ({cut}, "
                                 f"after {listed} members): it is truncated; download or copy it again")
        except _TAR_ERRORS as exc:
            where = f" after {listed} members" if listed else ""
            raise InputError(f"{self.path}: not a readable tar archive{where} ({exc or type(exc).__name__}); "
                             f"it may be truncated or damaged") from exc
        finally:
            stream.close()
        self._names, self._sidecars, self._listed = names, dict(sidecars), True
        _keep_listing(self.path, self.key, len(self.index), (self.index, self._names, self._sidecars))

    def member_names(self) -> list[str]:
        self._list()
        return self._names

    def sidecars(self) -> dict[str, dict[str, bytes]]:
        self._list()
        return self._sidecars

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        self._list()
        where = self.index.get(member)
        if where is None:
            raise ImageNotFoundError(f"{label}: no such member in the archive")
        offset, size = where
        _check_size(size, max_bytes, label)
        try:
            if self.cursors is None:
                data = self.location.read_at(offset, size)
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
            with self.lock:
                self.cursors.close()
        super().close()


# ---------------------------------------------------------------------------------------------
# Tables: Parquet and Arrow

def _holds_images(field: Any) -> bool:
    import pyarrow as pa

    kind = field.type
    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _default_image_column(schema: Any) -> str | None:
    names = list(schema.names)
    for name in ("image", "img"):
        if name in names and _holds_images(schema.field(name)):
            return name
    return next((f.name for f in schema if _holds_images(f)), None)


def _image_column(schema: Any, options: SourceOptions, path: str) -> str:
    names = list(schema.names)
    if options.image_column is not None:
        if options.image_column not in names:
            raise InputError(f"{path}: no image column {options.image_column!r} (--image-column); columns: "
                             f"{', '.join(names)}")
        if not _holds_images(schema.field(options.image_column)):
            kind = schema.field(options.image_column).type
            raise InputError(f"{path}: the column {options.image_column!r} holds {kind}, not images (a struct with "
                             f"a 'bytes' field, or binary)")
        return options.image_column
    found = _default_image_column(schema)
    if found is None:
        raise InputError(f"{path}: no image column (a struct with a 'bytes' field, as Hugging Face datasets "
                         f"writes images, or a binary column); columns: {', '.join(names) or '(none)'}; "
                         f"name one with --image-column")
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


def _image_bytes(array: Any, index: int, label: str) -> bytes:
    """The image bytes of one cell of an image column (a struct's ``bytes`` field, or binary),
    read from the Arrow array itself: no other field and no other row is converted."""
    cell = array[index]
    if not cell.is_valid:
        raise ImageNotFoundError(f"{label}: the image column is empty")
    if hasattr(cell, "keys"):  # a struct
        data = cell["bytes"]
        if not data.is_valid:
            path = cell["path"].as_py() if "path" in cell.keys() else None
            where = f" (only a path: {path!r})" if path else ""
            raise ImageNotFoundError(f"{label}: the image column holds no bytes{where}")
        return data.as_py()
    return cell.as_py()


class _Table(_Container):
    """Rows of record batches: listing reads the small columns (and the images' ``path`` field),
    never the image bytes; reading gets one image at a time."""

    schema: Any

    @property
    def default_image(self) -> str | None:
        if not hasattr(self, "_default_image"):
            self._default_image = _default_image_column(self.schema)
        return self._default_image

    def _member(self, column: str, row: int) -> str:
        return str(row) if column == self.default_image else f"{column}/{row}"

    def _split_member(self, member: str, label: str) -> tuple[str, int]:
        column, _, row = member.rpartition("/")
        if not row.isdigit():
            raise ImageNotFoundError(f"{label}: not a row number")
        if not column:
            column = self.default_image or ""
            if not column:
                raise ImageNotFoundError(f"{label}: the table has no image column")
        elif column not in self.schema.names:
            raise ImageNotFoundError(f"{label}: the table has no column {column!r}")
        return column, int(row)

    def _small_columns(self, options: SourceOptions, image: str) -> list[str]:
        names = list(self.schema.names)
        for flag, value in options.named().items():
            if value not in names:
                raise InputError(f"{self.path}: no column {value!r} ({flag}); columns: {', '.join(names)}")
        return [c for c in dict.fromkeys((options.label, options.group, options.caption)) if c in names and c != image]

    def _describe_batches(self, batches: Iterator[Any], image: str, options: SourceOptions,
                          class_names: dict[str, list[str]], what: str) -> Iterator[SourceRecord]:
        """The rows' records, batch by batch: a million rows never exist twice (records and items)."""
        import pyarrow as pa

        try:
            yield from self._records_of(batches, image, options, class_names)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: the {what} file cannot be read ({exc}); it may be truncated") from exc

    def _records_of(self, batches: Iterator[Any], image: str, options: SourceOptions,
                    class_names: dict[str, list[str]]) -> Iterator[SourceRecord]:
        import pyarrow as pa

        names = class_names.get(options.label) or _class_names(self.schema, options.label)
        words: dict[Any, str] = {}  # one string per distinct label or group, not one per row
        row = 0
        for batch in batches:
            columns = {name: batch.column(name).to_pylist() for name in batch.schema.names if name != image}
            paths = [None] * batch.num_rows
            missing = None
            if image in batch.schema.names:
                column = batch.column(image)
                if pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0:
                    paths = column.field("path").to_pylist()  # the struct's path only, never its bytes
                    missing = _missing_bytes(column) if column.type.get_field_index("bytes") >= 0 else \
                        self._missing_rows(image, row, batch.num_rows)  # listing read the paths only
            elif f"{image}.path" in batch.schema.names:
                paths = columns.pop(f"{image}.path")
                missing = self._missing_rows(image, row, batch.num_rows)
            empty = [None] * batch.num_rows
            labels, groups, captions = (columns.get(c, empty) for c in (options.label, options.group, options.caption))
            for i in range(batch.num_rows):
                path = paths[i] if isinstance(paths[i], str) and paths[i].strip() else None
                # A relative path is read like a member's; an absolute one is where the image was
                # on the machine that wrote the table, and its folders mean nothing here.
                parts = _member_parts(path) if path and not path.startswith("/") and "://" not in path else ()
                label, group, caption = labels[i], groups[i], captions[i]
                if isinstance(label, int) and not isinstance(label, bool) and names and 0 <= label < len(names):
                    label = names[label]
                label = None if label is None else words.setdefault(label, str(label))
                group = None if group is None else words.setdefault(group, str(group))
                # A row with a path and no bytes (a ``datasets`` cache of local image files keeps
                # only their paths) is the file it names: its own identity, stat and resume.
                referenced = self._referenced(path) if path and missing is not None and missing[i] else None
                yield SourceRecord(referenced or make_identity(self.path, self._member(image, row)), parts,
                                   label, group, caption if isinstance(caption, str) and caption.strip() else None)
                row += 1

    def _missing_rows(self, image: str, start: int, count: int) -> list[bool] | None:
        """Which of ``count`` rows from ``start`` hold no image bytes, for a table whose listing does
        not read the image column (Parquet); None when every one holds bytes."""
        return None

    def _referenced(self, path: str) -> str | None:
        """Where a row's image ``path`` points: a URI as it is; a local path as it is when absolute,
        else from the table's folder; in a table behind a URI, relative paths from its folder (an
        absolute local path there names another machine's file: None, the row stays an error row)."""
        if remote.scheme_of(path) == "file":
            try:
                path = remote.local_path(path)
            except InputError:
                return None
        if remote.is_uri(path):
            try:
                remote.check_uri(path)
            except InputError:
                return None
            return path
        if self.location.remote:
            if path.startswith("/"):
                return None
            folder = self.path.rsplit("/", 1)[0]
            scheme, _, rest = folder.partition("://")
            bucket, _, key = rest.partition("/")
            joined = posixpath.normpath(posixpath.join(key, path))
            return None if joined == ".." or joined.startswith("../") else f"{scheme}://{bucket}/{joined}"
        return os.path.normpath(os.path.join(os.path.dirname(self.path), path))


def _missing_bytes(column: Any) -> list[bool] | None:
    """Which cells of an image struct column hold no bytes (a null struct too); None when all do."""
    import pyarrow as pa

    field = column.flatten()[column.type.get_field_index("bytes")] if pa.types.is_struct(column.type) else column
    if isinstance(field, pa.ChunkedArray):
        field = field.combine_chunks()
    return field.is_null().to_pylist() if field.null_count else None


class _ReadAhead:
    """The next few items of an iterator (a table's batches converted to Python values, a tar.gz
    stream's decompressed chunks), made by a background thread. Readers of one table or stream
    take turns under its lock; with the next item already made, the reader holding the lock takes
    it at once instead of decompressing while the other decoding threads wait. The thread alone
    touches the iterator, and closes it when stopped or done; an error it meets is raised where
    the item is read."""

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int = 2, closer: Callable[[], None] | None = None) -> None:
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._closer = closer
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items,), name="tidy-read-ahead", daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            self._put((self._END, exc))
        finally:
            for close in (getattr(items, "close", None), self._closer):
                if close is not None:
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - closing what is no longer read
                        pass

    def __iter__(self) -> "_ReadAhead":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._END:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()


class _ReadAheadStream:
    """A sequential binary stream read a few chunks ahead (see :class:`_ReadAhead`); ``read``
    returns the next chunk, whatever size is asked (callers loop), and ``b""`` at its end."""

    def __init__(self, raw: Any, chunk: int = _CHUNK, depth: int = 4) -> None:
        self._ahead = _ReadAhead(iter(lambda: raw.read(chunk), b""), depth, closer=raw.close)

    def read(self, size: int = -1) -> bytes:
        return next(self._ahead, b"")

    def close(self) -> None:
        self._ahead.close()


class _RowCursor:
    """A sequential reader of one image column: the current batch's first row, its images' bytes
    (None where absent) and paths (for structs with one), the next batches made ahead."""

    def __init__(self, batches: Iterator[Any], column: str, closer: Callable[[], None] | None = None) -> None:
        self.start, self.values, self.paths = 0, [], None
        self.ahead = _ReadAhead((_batch_values(b.column(column) if hasattr(b, "column") else b) for b in batches),
                                closer=closer)

    def close(self) -> None:
        self.ahead.close()


def _batch_values(array: Any) -> tuple[list[Any], list[Any] | None]:
    """A batch's image bytes as Python values, and the struct's paths: one conversion per batch
    of the column's ``bytes`` only (``flatten`` nulls a null struct's fields too)."""
    import pyarrow as pa

    if not pa.types.is_struct(array.type):
        return array.to_pylist(), None
    fields = dict(zip((f.name for f in array.type), array.flatten()))
    return fields["bytes"].to_pylist(), fields["path"].to_pylist() if "path" in fields else None


def _advance(cursor: _RowCursor, row: int) -> tuple[Any, Any]:
    """(bytes or None, path or None) of ``row``, moving the cursor forward batch by batch."""
    while row >= cursor.start + len(cursor.values):
        cursor.start += len(cursor.values)
        cursor.values, cursor.paths = next(cursor.ahead)
    at = row - cursor.start
    return cursor.values[at], (cursor.paths[at] if cursor.paths is not None else None)


def _cursor_bytes(found: tuple[Any, Any], label: str) -> bytes:
    data, path = found
    if data is None and path:
        raise ImageNotFoundError(f"{label}: the image column holds no bytes (only a path: {path!r})")
    if data is None:
        raise ImageNotFoundError(f"{label}: the image column is empty")
    return data


class _Parquet(_Table):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.handle = None
        try:
            self.handle = self.location.random_file() if self.location.remote else None
            # pre_buffer (pyarrow's default) keeps every row group's chunks of the columns read, i.e.
            # the whole image column by the end: memory would grow with the dataset. Unbuffered, a
            # row group's column chunk is one read (one ranged request remotely), dropped when done.
            self.file = pq.ParquetFile(self.handle if self.handle is not None else self.path, pre_buffer=False)
            self.schema = self.file.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Parquet file ({exc}); it may be truncated (a Parquet "
                             f"file's footer is at its end)") from exc
        self.cursors: dict[str, _Cursors] = {}

    def _open_cursor(self, column: str) -> _RowCursor:
        import pyarrow.parquet as pq

        # Its own file object: the cursor's thread reads it while others read theirs (a local one
        # opened by pyarrow from the path, read without the GIL).
        handle = self.location.random_file() if self.location.remote else None
        try:
            reader = pq.ParquetFile(handle if handle is not None else self.path, metadata=self.file.metadata,
                                    pre_buffer=False)
        except BaseException:
            if handle is not None:
                handle.close()
            raise
        return _RowCursor(reader.iter_batches(batch_size=_BATCH_ROWS, columns=[column], use_threads=False), column,
                          closer=handle.close if handle is not None else reader.close)

    def list(self, options: SourceOptions, class_names: dict[str, list[str]]) -> Iterator[SourceRecord]:
        import pyarrow as pa

        image = _image_column(self.schema, options, self.path)
        small = self._small_columns(options, image)
        image_type = self.schema.field(image).type
        has_path = pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0
        if not small and not has_path:  # nothing to read but the row count
            rows = self.file.metadata.num_rows
            return (SourceRecord(make_identity(self.path, self._member(image, row))) for row in range(rows))
        try:  # its own reader: listing shares nothing with the read cursors
            batches = self.file.iter_batches(batch_size=4096, columns=small + ([f"{image}.path"] if has_path else []))
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: the Parquet file cannot be read ({exc}); it may be truncated") from exc
        return self._describe_batches(batches, image, options, class_names, "Parquet")

    def _missing_rows(self, image: str, start: int, count: int) -> list[bool] | None:
        """From the row groups' null counts of the image bytes (written by pyarrow and ``datasets``):
        a group without nulls is not read at all; only a group mixing rows with and without bytes
        (or without statistics) has its bytes column read, once."""
        if getattr(self, "_missing_image", None) != image:
            self._missing_image, self._missing_groups = image, self._missing_by_group(image)
        found: list[bool] = []
        for entry in self._missing_groups:
            group, first, rows, state = entry
            if first + rows <= start or first >= start + count:
                continue
            if state is None:  # mixed, or no statistics: this group's bytes column, once
                column = self.file.read_row_group(group, columns=[f"{image}.bytes"], use_threads=False).column(image)
                state = entry[3] = _missing_bytes(column) or False
            lo, hi = max(start, first) - first, min(start + count, first + rows) - first
            found.extend(state[lo:hi] if isinstance(state, list) else [state] * (hi - lo))
        return found if any(found) else None

    def _missing_by_group(self, image: str) -> list[list[Any]]:
        """[group, first row, rows, False | True | None] per row group: no row / every row without
        bytes, or not known from the statistics (None, read when needed)."""
        metadata = self.file.metadata
        leaf = next((j for j in range(metadata.num_columns) if metadata.schema.column(j).path == f"{image}.bytes"),
                    None)
        groups, first = [], 0
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            stats = group.column(leaf).statistics if leaf is not None else None
            state: Any = None if leaf is not None else False  # raw binary: a null cell is an empty image
            if stats is not None and stats.has_null_count:
                state = False if stats.null_count == 0 else True if stats.null_count == group.num_rows else None
            groups.append([g, first, group.num_rows, state])
            first += group.num_rows
        return groups

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        import pyarrow as pa

        column, row = self._split_member(member, label)
        if row >= self.file.metadata.num_rows:
            raise ImageNotFoundError(f"{label}: the file has {self.file.metadata.num_rows} rows")
        try:
            with self.lock:
                if column not in self.cursors:
                    self.cursors[column] = _Cursors(lambda: self._open_cursor(column), lambda c: c.start)
                found = _advance(self.cursors[column].at_or_before(row), row)
        except (pa.ArrowException, OSError, StopIteration) as exc:
            raise CorruptImageError(f"{label}: the row cannot be read ({exc or 'the file ends early'})") from exc
        return _cursor_bytes(found, label)

    def close(self) -> None:
        with self.lock:
            for cursors in self.cursors.values():
                cursors.close()
            if self.handle is not None:
                self.handle.close()
        super().close()


class _Arrow(_Table):
    """Arrow IPC, file or stream format (what ``datasets`` writes and caches). A local file is
    memory-mapped: batches are views of the mapped file, so holding them costs no memory beyond the
    page cache. A remote one is read batch by batch, in order, by a few cursors."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import pyarrow as pa

        self.source: Any = None
        self.batches: list[Any] | None = None
        self.cursors: dict[str, _Cursors] = {}
        self._converted: dict[tuple[str, int], tuple[list[Any], list[Any] | None]] = {}
        try:
            self.source = pa.memory_map(self.path) if not self.location.remote else self.location.random_file()
            try:
                reader = pa.ipc.open_file(self.source)
                self.stream = False
                self.schema = reader.schema
                if not self.location.remote:
                    self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            except pa.ArrowInvalid:
                self.stream = True
                self._check_end()
                self.source.seek(0)
                reader = pa.ipc.open_stream(self.source)
                self.schema = reader.schema
                if not self.location.remote:
                    self.batches = list(reader)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Arrow file ({exc}); it may be truncated") from exc
        if self.batches is not None:
            self.starts, total = [], 0
            for batch in self.batches:
                self.starts.append(total)
                total += batch.num_rows
            self.total: int | None = total
        else:
            self.total = None

    def _check_end(self) -> None:
        size = self.source.size()
        if size < len(_ARROW_EOS):
            raise InputError(f"{self.path}: {size} bytes is not an Arrow file")
        self.source.seek(size - len(_ARROW_EOS))
        if self.source.read(len(_ARROW_EOS)) != _ARROW_EOS:
            raise InputError(f"{self.path}: the Arrow stream does not end with its end-of-stream marker: it is "
                             f"truncated (or its writer was never closed); write or copy it again")

    def _remote_batches(self) -> Iterator[Any]:
        import pyarrow as pa

        handle = self.location.stream() if self.stream else self.location.random_file()
        try:
            if self.stream:
                yield from pa.ipc.open_stream(handle)
            else:
                reader = pa.ipc.open_file(handle)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        finally:
            handle.close()

    def list(self, options: SourceOptions, class_names: dict[str, list[str]]) -> Iterator[SourceRecord]:
        image = _image_column(self.schema, options, self.path)
        small = self._small_columns(options, image)
        batches = self.batches if self.batches is not None else self._remote_batches()
        return self._describe_batches((b.select(small + [image]) for b in batches), image, options, class_names,
                                      "Arrow")

    def read(self, member: str, max_bytes: int, label: str) -> bytes:
        import bisect

        import pyarrow as pa

        column, row = self._split_member(member, label)
        if self.batches is not None:
            if row >= (self.total or 0):
                raise ImageNotFoundError(f"{label}: the file has {self.total} rows")
            at = bisect.bisect_right(self.starts, row) - 1
            index = row - self.starts[at]
            values = self._converted.get((column, at))
            if values is None:
                array = self.batches[at].column(column)
                if array.nbytes > _CONVERT_BATCH_BYTES:  # a huge batch: this cell only
                    return _image_bytes(array, index, label)
                with self.lock:  # rows are read nearly in order: convert a batch once, not a cell per row
                    values = self._converted.get((column, at))
                    if values is None:
                        values = self._converted[(column, at)] = _batch_values(array)
                        while len(self._converted) > _CURSORS:
                            self._converted.pop(next(iter(self._converted)))
            return _cursor_bytes((values[0][index], values[1][index] if values[1] is not None else None), label)
        try:
            with self.lock:
                if column not in self.cursors:
                    self.cursors[column] = _Cursors(lambda: _RowCursor(self._remote_batches(), column),
                                                    lambda c: c.start)
                found = _advance(self.cursors[column].at_or_before(row), row)
        except StopIteration:
            raise ImageNotFoundError(f"{label}: the file has fewer rows") from None
        except (pa.ArrowException, OSError) as exc:
            raise CorruptImageError(f"{label}: the row cannot be read ({exc})") from exc
        return _cursor_bytes(found, label)

    def close(self) -> None:
        with self.lock:
            for cursors in self.cursors.values():
                cursors.close()
            if self.source is not None:
                self.source.close()
        super().close()


__all__ = [
    "ARCHIVE_SUFFIXES",
    "SEPARATOR",
    "SOURCE_SUFFIXES",
    "TABLE_SUFFIXES",
    "SourceOptions",
    "SourceRecord",
    "archive_members",
    "container_kind",
    "container_name",
    "is_identity",
    "is_source_file",
    "iter_source",
    "list_source",
    "make_identity",
    "read_item",
    "read_member",
    "source_stem",
    "split_identity",
    "stat_item",
]
