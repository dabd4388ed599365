"""Inputs behind filesystem URIs, read through pyarrow's filesystems.

An INPUT (or a manifest's ``path``) may be a URI instead of a local path:

- ``s3://BUCKET/KEY`` and ``gs://BUCKET/KEY`` (also ``gcs://``) through pyarrow's own S3 and GCS
  filesystems. Credentials come the usual way and never from the command line: for S3 the AWS
  environment variables, ``~/.aws/credentials`` / ``~/.aws/config`` (``AWS_PROFILE``) or the
  instance's role; ``AWS_ENDPOINT_URL`` points at another S3-compatible endpoint (MinIO, Ceph).
  For GCS, Google's application default credentials; ``STORAGE_EMULATOR_HOST`` (as Google's client
  libraries read it) points at an emulator, without credentials.
- ``hf://datasets/ORG/NAME/PATH`` through ``huggingface_hub``'s ``HfFileSystem``, and any other
  protocol an installed fsspec implementation registers, each wrapped as a pyarrow filesystem
  (``PyFileSystem(FSSpecHandler(...))``).
- ``file:///PATH`` is the local path ``/PATH`` (read as any local path).

A URI that carries credentials (``s3://KEY:SECRET@bucket``) or options (``?endpoint_override=``)
is refused: they would end up in logs, shell histories and every store row.

**Identity and resume.** A remote image's identity is its URI. The stat recorded for resume is the
object's size and modification time, with ``ctime_ns = mtime_ns`` and ``inode = 0``: objects are
written whole and never changed in place, so the same key, size and mtime is the same object. The
racy rule of local files holds too (an object read within two seconds of being written is
recorded with ``ctime_ns = -1`` and hashed next time), which also covers stores whose mtime has
one-second resolution. Stats seen while listing a folder are reused for ten minutes instead of
asking the store again for every object (a resume of a million images would otherwise send a
million requests).

Reading is bounded as for local files: an object over the size limit is refused from its listed
size before any byte is read, and at most the limit is ever read.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from tidy_detect.errors import CorruptImageError, ImageError, ImageNotFoundError, ImageTooLargeError, \
    InputError, NotAFileError
from tidy_detect.images import DEFAULT_MAX_FILE_BYTES, MIB, RACY_NS, FileStat

NATIVE_SCHEMES = ("s3", "gs", "gcs")  # pyarrow's own filesystems
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
STAT_TTL_S = 600.0  # how long a stat seen in a listing stands for the object
# What decides which endpoint and credentials a filesystem object uses: a change (another test
# server, another profile) must build a new one, not reuse a cached one.
_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "HF_ENDPOINT",
                "HF_TOKEN")
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"  # what Google's client libraries and gcsfs read for a GCS emulator


def scheme_of(text: str) -> str | None:
    """The URI scheme of ``text`` in lower case (``s3``, ``hf``, ``file``), or None for a path."""
    found = _URI.match(str(text))
    return found.group(1).lower() if found else None


def is_uri(text: str) -> bool:
    """Whether ``text`` is a remote URI (any scheme but ``file``)."""
    scheme = scheme_of(text)
    return scheme is not None and scheme != "file"


def local_path(text: str) -> str:
    """``file:///data/x.zip`` -> ``/data/x.zip``; anything else unchanged."""
    if scheme_of(text) != "file":
        return str(text)
    parsed = urllib.parse.urlsplit(str(text))
    if parsed.netloc not in ("", "localhost"):
        raise InputError(f"{text}: a file:// URI names a file of this machine (file:///PATH), got the host "
                         f"{parsed.netloc!r}")
    return urllib.request.url2pathname(parsed.path)


def check_uri(uri: str) -> None:
    """Refuse URIs with credentials or options in them.

    Raises:
        InputError: naming the URI (credentials masked) and where such settings go instead.
    """
    parsed = urllib.parse.urlsplit(uri)
    if "@" in parsed.netloc:
        masked = f"{parsed.scheme}://***@{parsed.netloc.rpartition('@')[2]}{parsed.path}"
        raise InputError(f"{masked}: credentials do not belong in a URI (they would be logged and stored with "
                         f"every row); set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                         f"AWS_PROFILE) or the usual config files (~/.aws/credentials)")
    if parsed.query or parsed.fragment:
        raise InputError(f"{uri}: options in a URI ('?...') are not taken; set the endpoint with AWS_ENDPOINT_URL "
                         f"and the region with AWS_REGION")


def join(base: str, *names: str) -> str:
    """``join("s3://b/data", "x", "y.png")`` -> ``s3://b/data/x/y.png``."""
    out = base.rstrip("/")
    for name in names:
        if name:
            out = f"{out}/{name.strip('/')}"
    return out


def base_name(uri: str) -> str:
    """The last part of a URI's path (``s3://b/data/x.zip`` -> ``x.zip``), else its bucket."""
    path = uri.split("://", 1)[1].rstrip("/")
    return path.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Filesystems, one per (scheme, bucket) and environment

_filesystems: dict[tuple, tuple[Any, str]] = {}
_fs_lock = threading.Lock()


def resolve(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem serving ``uri`` and the path it takes for it.

    Raises:
        InputError: a URI with credentials or options, an unknown scheme (the message lists the
            supported ones), a missing fsspec implementation, or a filesystem that cannot be set up.
    """
    check_uri(uri)
    scheme = scheme_of(uri)
    if scheme is None or scheme == "file":
        raise InputError(f"{uri}: not a remote URI")
    rest = uri.split("://", 1)[1]
    authority = rest.split("/", 1)[0]
    key = (scheme, authority, tuple(os.environ.get(name) for name in _ENVIRONMENT))
    with _fs_lock:
        found = _filesystems.get(key)
    if found is None:
        found = _make_filesystem(uri, scheme)
        with _fs_lock:
            _filesystems[key] = found
    fs, prefix = found
    return fs, _path_in(prefix, scheme, rest)


def gcs_emulator(uri: str) -> Any | None:
    """pyarrow's GCS filesystem for the emulator ``STORAGE_EMULATOR_HOST`` names (``http://HOST:PORT``,
    as Google's client libraries take it; no scheme means http), without credentials; None when the
    variable is unset (then Google's application default credentials and endpoint apply).

    Raises:
        InputError: the variable is not ``[http[s]://]HOST:PORT``.
    """
    import pyarrow.fs as pafs

    value = os.environ.get(GCS_EMULATOR_ENV, "").strip()
    if not value:
        return None
    parsed = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/"):
        raise InputError(f"{uri}: {GCS_EMULATOR_ENV} must be [http[s]://]HOST:PORT, got {value!r}")
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc, scheme=parsed.scheme)


def _path_in(prefix: str, scheme: str, rest: str) -> str:
    # pyarrow's S3/GCS filesystems take "bucket/key"; fsspec's take what their _strip_protocol gives
    # for the bucket (kept in ``prefix``) followed by the rest of the path.
    if scheme in NATIVE_SCHEMES:
        return rest.rstrip("/")
    authority, _, path = rest.partition("/")
    return f"{prefix}/{path}".rstrip("/") if path else prefix


def _make_filesystem(uri: str, scheme: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if scheme in NATIVE_SCHEMES:
        emulated = gcs_emulator(uri) if scheme in ("gs", "gcs") else None
        if emulated is not None:
            return emulated, ""
        try:
            fs, _ = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise InputError(f"{uri}: the {scheme}:// filesystem cannot be set up ({exc}); check the credentials "
                             f"in the environment or the config files and, for another endpoint, "
                             f"AWS_ENDPOINT_URL") from exc
        return fs, ""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with huggingface_hub
        raise InputError(f"{uri}: {scheme}:// needs fsspec (pip install fsspec)") from None
    if scheme == "hf":
        try:
            from huggingface_hub import HfFileSystem
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            raise InputError(f"{uri}: hf:// needs huggingface_hub (pip install huggingface_hub)") from None
        handler_fs: Any = HfFileSystem()
    else:
        try:
            handler_fs = fsspec.filesystem(scheme)
        except (ValueError, ImportError) as exc:
            raise InputError(f"{uri}: unknown or unavailable filesystem {scheme}:// ({exc}); supported: s3://, "
                             f"gs://, hf://, file:// and the protocols of installed fsspec implementations") from exc
    authority = uri.split("://", 1)[1].split("/", 1)[0]
    prefix = handler_fs._strip_protocol(f"{scheme}://{authority}").rstrip("/") if authority else ""
    return pafs.PyFileSystem(pafs.FSSpecHandler(handler_fs)), prefix


# ---------------------------------------------------------------------------------------------
# Stats

@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a stat says of one object."""

    uri: str
    size: int
    mtime_ns: int
    is_file: bool = True
    is_dir: bool = False


_stats: dict[str, tuple[ObjectInfo, float]] = {}
_stats_lock = threading.Lock()


def _remember(info: ObjectInfo) -> None:
    with _stats_lock:
        _stats[info.uri] = (info, time.monotonic())


def _from_arrow(uri: str, info: Any) -> ObjectInfo:
    import pyarrow.fs as pafs

    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return ObjectInfo(uri, int(info.size or 0), int(mtime), info.type == pafs.FileType.File,
                      info.type == pafs.FileType.Directory)


def info(uri: str, max_age_s: float = 0.0) -> ObjectInfo | None:
    """The object at ``uri`` (None when there is none), from a listing or stat at most
    ``max_age_s`` old, else asked now.

    Raises:
        InputError: the filesystem cannot be set up; OSError: the store cannot be reached.
    """
    if max_age_s > 0:
        with _stats_lock:
            found = _stats.get(uri)
        if found is not None and time.monotonic() - found[1] <= max_age_s:
            return found[0]
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    got = fs.get_file_info(path)
    if got.type == pafs.FileType.NotFound:
        return None
    made = _from_arrow(uri, got)
    if made.is_file:
        _remember(made)
    return made


def is_dir(uri: str) -> bool:
    """Whether ``uri`` names a folder (a prefix with objects under it)."""
    found = info(uri)
    return found is not None and found.is_dir


def stat_of(found: ObjectInfo, read_ns: int | None = None) -> FileStat:
    """The :class:`FileStat` resume records for an object (see the module docstring)."""
    ctime = found.mtime_ns
    if read_ns is not None and read_ns - found.mtime_ns < RACY_NS:
        ctime = -1
    return FileStat(found.size, found.mtime_ns, ctime, 0)


def stat(uri: str) -> FileStat | None:
    """The stat resume compares for ``uri`` now (a listing's, when recent), None when it is gone
    or cannot be reached."""
    try:
        found = info(uri, STAT_TTL_S)
    except (OSError, InputError):
        return None
    return stat_of(found) if found is not None and found.is_file else None


# ---------------------------------------------------------------------------------------------
# Listing and reading

def list_files(uri: str) -> list[ObjectInfo]:
    """Every object under the folder ``uri``, sorted by URI; their stats are remembered (see the
    module docstring).

    Raises:
        InputError: the folder cannot be listed (naming it and the filesystem's reason).
    """
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    base = uri.rstrip("/")
    try:
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputError(f"{uri}: cannot be listed ({exc}); check the URI and the credentials") from exc
    found = []
    start = len(path.rstrip("/")) + 1
    for entry in listed:
        if entry.type != pafs.FileType.File:
            continue
        made = _from_arrow(f"{base}/{entry.path[start:]}", entry)
        found.append(made)
    with _stats_lock:
        now = time.monotonic()
        for made in found:
            _stats[made.uri] = (made, now)
    return sorted(found, key=lambda o: o.uri)


def open_random(uri: str) -> Any:
    """A random-access file (``read_at``, ``seek``, ``read``) of the object: ranged reads.

    Raises:
        OSError: the object cannot be opened.
    """
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def open_stream(uri: str) -> Any:
    """A sequential stream of the object's bytes, as stored (never decompressed by its name).

    Raises:
        OSError: the object cannot be opened.
    """
    fs, path = resolve(uri)
    return fs.open_input_stream(path, compression=None)  # the bytes as stored: no guessing from ".gz"


def read_bytes(uri: str, max_bytes: int, label: str | None = None) -> bytes:
    """A small object's bytes (a JSON file of a dataset folder), at most ``max_bytes``.

    Raises:
        InputError: the object is missing, larger than ``max_bytes`` or cannot be read.
    """
    label = label or uri
    try:
        found = info(uri)
        if found is None or not found.is_file:
            raise InputError(f"{label}: no such object")
        if found.size > max_bytes:
            raise InputError(f"{label}: {found.size:,} bytes is larger than the {max_bytes:,} bytes such a file "
                             f"may have")
        with open_stream(uri) as handle:
            return handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{label}: cannot be read ({exc})") from exc


def read_object(uri: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, FileStat]:
    """The bytes of one remote image and its stat as read (see the module docstring).

    Raises:
        ImageNotFoundError: no such object. NotAFileError: a folder. ImageTooLargeError: over
        ``max_bytes``, from the listed size, before any byte is read. CorruptImageError: fewer
        bytes came than the object has. ImageError: the store cannot be reached or refuses.
    """
    try:
        found = info(uri, STAT_TTL_S)  # a listing's, when recent: the stat recorded is then never newer than the bytes
    except InputError as exc:
        raise ImageError(str(exc)) from exc
    except OSError as exc:
        raise ImageError(f"{uri}: cannot be read ({exc})") from exc
    if found is None:
        raise ImageNotFoundError(f"{uri}: no such object")
    if not found.is_file:
        raise NotAFileError(f"{uri}: a folder, not an image file")
    if found.size > max_bytes:
        raise ImageTooLargeError(f"{uri}: {found.size:,} bytes is over the limit of {max_bytes:,} bytes "
                                 f"({max_bytes / MIB:g} MiB) per image file; raise --max-file-mb if the file is "
                                 f"genuine")
    try:
        with open_stream(uri) as handle:
            data = handle.read(min(found.size, max_bytes) + 1)
    except OSError as exc:
        raise ImageError(f"{uri}: cannot be read ({exc})") from exc
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{uri}: more than {max_bytes:,} bytes; raise --max-file-mb if the file is genuine")
    if len(data) != found.size:
        raise CorruptImageError(f"{uri}: {len(data):,} bytes came of the {found.size:,} listed (replaced while "
                                f"being read?)")
    return data, stat_of(found, time.time_ns())


__all__ = [
    "NATIVE_SCHEMES",
    "ObjectInfo",
    "base_name",
    "check_uri",
    "info",
    "is_dir",
    "is_uri",
    "join",
    "list_files",
    "local_path",
    "open_random",
    "open_stream",
    "read_bytes",
    "read_object",
    "resolve",
    "scheme_of",
    "stat",
    "stat_of",
]
