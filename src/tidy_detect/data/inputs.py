"""Command-line inputs -> a list of labelled image items.

An INPUT is an image file, a folder (walked recursively) or a CSV manifest. In folders, a path part
``0_real`` labels an image 0 and ``1_fake`` labels it 1 (the part nearest the file wins); ``group``
is the first folder under INPUT that is not a label folder (e.g. the generator in a benchmark
tree), or INPUT's own name when the images sit in label folders right under it.

Folders are walked with :func:`walk_tree`: symbolic links to folders and files are followed, but
every real folder is entered once and every real file listed once (by device and inode), so a link
back to a parent folder (a loop) or a second link to the same data never hangs a walk or lists an
image twice.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tidy_detect.data import sources
from tidy_detect.data.sources import SourceOptions, source_suffix
from tidy_detect.errors import InputError
from tidy_detect.images import is_image_path

log = logging.getLogger(__name__)

LABEL_FOLDERS = {"0_real": 0, "1_fake": 1}
_LABEL_WORDS = {"0": 0, "real": 0, "1": 1, "fake": 1}
MANIFEST_COLUMNS = ("path", "label", "group", "caption")


@dataclass(frozen=True)
class ImageItem:
    """One image to process: where it is and what is known about it."""

    path: str  # absolute path
    label: int | None = None  # 0 real, 1 fake, None unknown
    group: str | None = None  # generator / dataset part
    caption: str | None = None  # given caption (used by the "provided" captioner)
    subgroup: str | None = None  # part of the group, e.g. the LSUN class of a CNNDetection image


@dataclass
class InputSummary:
    images: int = 0
    ignored_files: int = 0  # files in walked folders without an image suffix
    repeated_links: int = 0  # folders and files reached a second time through links, not listed again


@dataclass
class WalkCounts:
    """What :func:`walk_tree` left out, and why."""

    folder_loops: int = 0  # folders already entered (a link back up, or a second link to them)
    repeated_files: int = 0  # files already listed under another name (a link or a hard link)

    @property
    def repeated(self) -> int:
        return self.folder_loops + self.repeated_files


def walk_tree(root: str | Path, counts: WalkCounts | None = None) -> Iterator[tuple[str, tuple[str, ...], list[str]]]:
    """``(folder, its parts relative to root, visible file names)`` for every folder under ``root``.

    Sorted (folders and files by name), hidden names skipped. Links are followed, but each real
    folder is entered once and each real file listed once: identity is ``(st_dev, st_ino)``, so a
    loop of links ends where it first comes back, and a file reached by two names keeps the first
    one in walk order. A file that cannot be stat'ed (a dangling link) is listed as it is; reading
    it later gives its error row.
    """
    counts = counts if counts is not None else WalkCounts()
    base = str(root)
    seen_folders: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        try:
            st = os.stat(dirpath)
            identity = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity is not None and identity in seen_folders:
            counts.folder_loops += 1
            log.info("%s: already walked (a link to a folder seen before); not entered again", dirpath)
            dirnames[:] = []
            continue
        if identity is not None:
            seen_folders.add(identity)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, base)
        parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        names = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            try:
                fst = os.stat(os.path.join(dirpath, name))
                key = (fst.st_dev, fst.st_ino)
            except OSError:
                names.append(name)
                continue
            if key in seen_files:
                counts.repeated_files += 1
                continue
            seen_files.add(key)
            names.append(name)
        yield dirpath, parts, names


def label_from_parts(parts: Iterable[str]) -> int | None:
    """0 / 1 from the nearest ``0_real`` / ``1_fake`` folder name, else None."""
    label = None
    for part in parts:
        if part in LABEL_FOLDERS:
            label = LABEL_FOLDERS[part]
    return label


def parse_label(value: str | None, where: str) -> int | None:
    """A manifest label: 0/1/real/fake (any case), empty for unknown."""
    if value is None or value.strip() == "":
        return None
    key = value.strip().lower()
    if key not in _LABEL_WORDS:
        raise InputError(f"{where}: label must be 0, 1, real or fake (or empty), got {value!r}")
    return _LABEL_WORDS[key]


def walk_folder(root: Path, summary: InputSummary | None = None) -> Iterator[ImageItem]:
    """Images under ``root`` in a stable (sorted) order, labelled and grouped from their path."""
    root_abs = root.absolute()
    counts = WalkCounts()
    for dirpath, _, filenames in walk_tree(root_abs, counts):
        for filename in filenames:
            path = Path(dirpath) / filename
            if not is_image_path(path):
                if summary is not None:
                    summary.ignored_files += 1
                continue
            rel_parts = path.relative_to(root_abs).parts[:-1]
            group = next((p for p in rel_parts if p not in LABEL_FOLDERS), None)
            if group is None:
                group = root_abs.name
            yield ImageItem(str(path), label_from_parts(rel_parts), group)
    if summary is not None:
        summary.repeated_links += counts.repeated


def read_manifest(path: Path) -> list[ImageItem]:
    """Items from a CSV with a ``path`` column and optional ``label``, ``group``, ``caption``,
    ``subgroup`` (e.g. the LSUN class of a CNNDetection training image).

    Relative paths are taken relative to the manifest's folder.

    Raises:
        InputError: unreadable file, no ``path`` column, an empty path or a bad label (with the line).
    """
    encoding = _text_encoding(path)
    try:
        handle = path.open(newline="", encoding=encoding)
    except OSError as exc:
        raise InputError(f"{path}: cannot open the manifest ({exc.strerror or exc})") from exc
    items = []
    reader = None
    with handle:
        try:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in columns:
                raise InputError(f"{path}: a manifest needs a 'path' column; found columns: "
                                 f"{', '.join(columns) or '(none)'}. Optional columns: label, group, caption")
            reader.fieldnames = columns
            for line, row in enumerate(reader, start=2):
                raw = (row.get("path") or "").strip()
                if not raw:
                    raise InputError(f"{path}, line {line}: the 'path' value is empty")
                if "\0" in raw:
                    raise InputError(f"{path}, line {line}: the 'path' value contains a NUL character")
                image = Path(raw).expanduser()
                if not image.is_absolute():
                    image = path.parent.absolute() / image
                items.append(ImageItem(
                    str(image),
                    parse_label(row.get("label"), f"{path}, line {line}"),
                    (row.get("group") or "").strip() or None,
                    row.get("caption") if (row.get("caption") or "").strip() else None,
                    (row.get("subgroup") or "").strip() or None,
                ))
        except csv.Error as exc:
            where = f", line {reader.line_num}" if reader is not None else ""
            raise InputError(f"{path}{where}: not valid CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            name = "UTF-16" if encoding == "utf-16" else "UTF-8"
            raise InputError(f"{path}: the manifest is not {name} text ({exc.reason}); save it as UTF-8") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from exc
    return items


def _text_encoding(path: Path) -> str:
    """UTF-8 (with or without a BOM), or UTF-16 when the file starts with its byte-order mark
    (what spreadsheet programs write as "Unicode text")."""
    try:
        with path.open("rb") as handle:
            start = handle.read(2)
    except OSError:
        return "utf-8-sig"  # opening again reports the error
    return "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def items_from_source(path: Path, options: SourceOptions | None = None) -> Iterator[ImageItem]:
    """The images of a zip / tar / WebDataset shard / Parquet / Arrow file (see
    :mod:`tidy_detect.data.sources`), labelled and grouped by the folder rules applied to the member's
    path inside the file (the file's name without its suffix standing for INPUT's name); a label or
    group given by a sidecar or a column wins."""
    root_name = sources.source_stem(path)
    for record in sources.list_source(path, options):
        label = parse_label(record.label, record.identity) if record.label is not None else \
            label_from_parts(record.parts)
        group = record.group or next((p for p in record.parts if p not in LABEL_FOLDERS), None) or root_name
        yield ImageItem(record.identity, label, group, record.caption)


def collect_inputs(inputs: Iterable[str | Path], summary: InputSummary | None = None,
                   options: SourceOptions | None = None) -> list[ImageItem]:
    """Expand every INPUT (file, folder, ``.csv`` manifest, or an archive / table source:
    ``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.parquet``, ``.arrow``, read in place with
    ``options`` naming table columns) into image items, in order.

    Files named directly are always included, whatever their suffix (a bad one becomes an error
    record later). Duplicate paths are kept once.

    Raises:
        InputError: an INPUT that does not exist, a bad manifest, or a source that cannot be listed.
    """
    summary = summary if summary is not None else InputSummary()
    items: list[ImageItem] = []
    seen: set[str] = set()
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = walk_folder(path, summary)
        elif path.suffix.lower() == ".csv" and path.is_file():
            found = iter(read_manifest(path))
        elif source_suffix(path) and path.is_file():
            found = items_from_source(path, options)
        elif path.is_file():
            found = iter([ImageItem(str(path.absolute()))])
        elif path.exists():
            raise InputError(f"{raw}: neither a file nor a folder")
        else:
            raise InputError(f"{raw}: no such file or folder")
        for item in found:
            if item.path not in seen:
                seen.add(item.path)
                items.append(item)
    summary.images = len(items)
    return items
