"""Command-line inputs -> a list of labelled image items.

An INPUT is an image file, a folder (walked recursively) or a CSV manifest. In folders, a path part
``0_real`` labels an image 0 and ``1_fake`` labels it 1 (the part nearest the file wins); ``group``
is the first folder under INPUT that is not a label folder (e.g. the generator in a benchmark
tree), or INPUT's own name when the images sit in label folders right under it.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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
    for dirpath, dirnames, filenames in os.walk(root_abs, followlinks=True):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if filename.startswith("."):
                continue
            if not is_image_path(path):
                if summary is not None:
                    summary.ignored_files += 1
                continue
            rel_parts = path.relative_to(root_abs).parts[:-1]
            group = next((p for p in rel_parts if p not in LABEL_FOLDERS), None)
            if group is None:
                group = root_abs.name
            yield ImageItem(str(path), label_from_parts(rel_parts), group)


def read_manifest(path: Path) -> list[ImageItem]:
    """Items from a CSV with a ``path`` column and optional ``label``, ``group``, ``caption``,
    ``subgroup`` (e.g. the LSUN class of a CNNDetection training image).

    Relative paths are taken relative to the manifest's folder.

    Raises:
        InputError: unreadable file, no ``path`` column, an empty path or a bad label (with the line).
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"{path}: cannot open the manifest ({exc.strerror or exc})") from exc
    items = []
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise InputError(f"{path}: a manifest needs a 'path' column; found columns: "
                             f"{', '.join(columns) or '(none)'}. Optional columns: label, group, caption")
        reader.fieldnames = columns
        try:
            for line, row in enumerate(reader, start=2):
                raw = (row.get("path") or "").strip()
                if not raw:
                    raise InputError(f"{path}, line {line}: the 'path' value is empty")
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
            raise InputError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: the manifest is not UTF-8 text ({exc.reason})") from exc
    return items


def collect_inputs(inputs: Iterable[str | Path], summary: InputSummary | None = None) -> list[ImageItem]:
    """Expand every INPUT (file, folder or ``.csv`` manifest) into image items, in order.

    Files named directly are always included, whatever their suffix (a bad one becomes an error
    record later). Duplicate paths are kept once.

    Raises:
        InputError: an INPUT that does not exist, or a bad manifest.
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
