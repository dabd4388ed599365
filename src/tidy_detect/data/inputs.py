"""Command-line inputs -> a list of labelled image items.

An INPUT is one of:

- an image file, or a folder walked recursively: a path part ``0_real`` labels an image 0 and
  ``1_fake`` labels it 1 (the part nearest the file wins); ``group`` is the first folder under
  INPUT that is not a label folder (e.g. the generator in a benchmark tree), or INPUT's own name
  when the images sit in label folders right under it;
- a CSV manifest (``path``, optional ``label``, ``group``, ``caption``, ``subgroup``);
- a zip / tar archive, a WebDataset shard, a Parquet or Arrow file, read in place (see
  :mod:`tidy_detect.data.sources`): members are labelled and grouped by the folder rules applied to
  their path inside the file, and a sidecar's or a column's label and group win;
- a Hugging Face ``datasets`` folder (``save_to_disk``, or the datasets cache) or a hub dataset
  ``hf-dataset:ORG/NAME[:CONFIG]`` (see :mod:`tidy_detect.data.hub`);
- any of these behind a filesystem URI, ``s3://``, ``gs://``, ``hf://``, ``file://`` (see
  :mod:`tidy_detect.data.remote`);
- a brace pattern, ``shards/shard-{0000..0099}.tar`` or ``{train,test}.parquet``, standing for
  the names it expands to that exist, in order (see :func:`expand_braces`).

Folders are walked with :func:`walk_tree` (see :mod:`tidy_detect.data.trees`): links are followed,
but every real folder is entered once and every real file listed once.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tidy_detect.data import hub, remote, sources, trees
from tidy_detect.data.sources import SourceOptions, source_suffix
from tidy_detect.data.trees import WalkCounts, walk_tree  # noqa: F401  (part of this module's API)
from tidy_detect.errors import ConfigError, InputError
from tidy_detect.images import is_image_path

log = logging.getLogger(__name__)

LABEL_FOLDERS = {"0_real": 0, "1_fake": 1}
# Label words of manifests, sidecars and table columns (class names such as GenImage's ai / nature).
REAL_WORDS = ("0", "real", "nature", "natural", "human", "authentic")
FAKE_WORDS = ("1", "fake", "ai", "generated", "synthetic")
_LABEL_WORDS = {**{w: 0 for w in REAL_WORDS}, **{w: 1 for w in FAKE_WORDS}}
MANIFEST_COLUMNS = ("path", "label", "group", "caption")
MAX_PATTERN_NAMES = 1_000_000  # names one brace pattern may expand to


@dataclass(frozen=True, slots=True)  # slots: a million of them is a dataset, and each costs less
class ImageItem:
    """One image to process: where it is and what is known about it."""

    path: str  # absolute path, source identity (ARCHIVE!/MEMBER, FILE!/ROW) or URI
    label: int | None = None  # 0 real, 1 fake, None unknown
    group: str | None = None  # generator / dataset part
    caption: str | None = None  # given caption (used by the "provided" captioner)
    subgroup: str | None = None  # part of the group, e.g. the LSUN class of a CNNDetection image


@dataclass
class InputSummary:
    images: int = 0
    ignored_files: int = 0  # files in walked folders without an image suffix
    repeated_links: int = 0  # folders and files reached a second time through links, not listed again


def label_from_parts(parts: Iterable[str]) -> int | None:
    """0 / 1 from the nearest ``0_real`` / ``1_fake`` folder name, else None."""
    label = None
    for part in parts:
        if part in LABEL_FOLDERS:
            label = LABEL_FOLDERS[part]
    return label


def parse_label(value: str | None, where: str) -> int | None:
    """A written label: 0/1/real/fake (any case; also ai, generated, synthetic for fake and
    nature, natural, human, authentic for real), empty for unknown.

    Raises:
        InputError: any other value, naming ``where``.
    """
    if value is None or value.strip() == "":
        return None
    key = value.strip().lower()
    if key not in _LABEL_WORDS:
        raise InputError(f"{where}: label must be 0, 1, real or fake (also {', '.join(FAKE_WORDS[2:])} for fake; "
                         f"{', '.join(REAL_WORDS[2:])} for real), or empty, got {value!r}")
    return _LABEL_WORDS[key]


# ---------------------------------------------------------------------------------------------
# INPUT strings: URIs, brace patterns

def normalize_input(raw: str | Path) -> str:
    """An INPUT as this module reads it: a URI or hub id unchanged, ``file://`` as a local path,
    a local path with ``~`` expanded (relative paths stay relative)."""
    text = str(raw)
    if hub.is_hub_id(text) or remote.is_uri(text):
        return text
    return os.path.expanduser(remote.local_path(text))


_RANGE = re.compile(r"^([+-]?\d+)\.\.([+-]?\d+)(?:\.\.([+-]?\d+))?$")


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _alternatives(inner: str) -> list[str] | None:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[last:i])
            last = i + 1
    if parts:
        return [*parts, inner[last:]]
    found = _RANGE.match(inner)
    if found is None:
        return None
    first, last_n = int(found.group(1)), int(found.group(2))
    step = abs(int(found.group(3) or 1)) or 1
    ends = [found.group(1).lstrip("+-"), found.group(2).lstrip("+-")]
    width = max(len(e) for e in ends) if any(len(e) > 1 and e.startswith("0") for e in ends) else 0
    count = abs(last_n - first) // step + 1
    if count > MAX_PATTERN_NAMES:
        raise InputError(f"{{{inner}}}: a range of {count:,} names is more than the {MAX_PATTERN_NAMES:,} a "
                         f"pattern may stand for")
    numbers = range(first, last_n + 1, step) if first <= last_n else range(first, last_n - 1, -step)
    return [f"{'-' if n < 0 else ''}{abs(n):0{width}d}" for n in numbers]


def expand_braces(text: str) -> list[str]:
    """Brace expansion as the shell and WebDataset do it: ``{a,b}`` (each alternative),
    ``{0000..0099}`` (every integer from one end to the other, zero-padded to the wider end when
    either end has a leading zero) and ``{0..10..2}`` (with a step); nested and several groups
    expand left to right (``a{1,2}b{x,y}`` -> a1bx a1by a2bx a2by). Braces that are neither
    (``{x}``, ``{}``, unmatched) are kept as they are.

    Raises:
        InputError: more than :data:`MAX_PATTERN_NAMES` names.
    """
    start = 0
    while True:
        opening = text.find("{", start)
        if opening < 0:
            return [text]
        closing = _matching_brace(text, opening)
        if closing < 0:
            return [text]
        options = _alternatives(text[opening + 1:closing])
        if options is None:
            start = opening + 1
            continue
        head, tails = text[:opening], expand_braces(text[closing + 1:])
        out = [head + option + tail for raw in options for option in expand_braces(raw) for tail in tails]
        if len(out) > MAX_PATTERN_NAMES:
            raise InputError(f"{text}: the pattern stands for more than {MAX_PATTERN_NAMES:,} names")
        return out


def _exists(name: str) -> bool:
    if remote.is_uri(name):
        try:
            return remote.info(name) is not None
        except (OSError, InputError):
            return False
    return os.path.exists(name)


def expand_inputs(inputs: Iterable[str | Path]) -> list[str]:
    """Every INPUT normalised (:func:`normalize_input`), brace patterns replaced by the names
    they stand for that exist, in order (a name that exists as it is, braces and all, is kept as
    it is). Missing names of a pattern are logged as a warning.

    Raises:
        InputError: a pattern none of whose names exists.
    """
    out: list[str] = []
    for raw in inputs:
        text = normalize_input(raw)
        names = expand_braces(text) if "{" in text and not hub.is_hub_id(text) else [text]
        if len(names) == 1 and names[0] == text or _exists(text):
            out.append(text)
            continue
        if any(remote.is_uri(n) for n in names):
            with ThreadPoolExecutor(max_workers=16, thread_name_prefix="tidy-pattern") as pool:
                present = list(pool.map(_exists, names))
        else:
            present = [os.path.exists(n) for n in names]
        found = [n for n, ok in zip(names, present) if ok]
        if not found:
            raise InputError(f"{raw}: the pattern matches no file (it stands for {len(names):,} names, from "
                             f"{names[0]} to {names[-1]})")
        if len(found) < len(names):
            missing = [n for n, ok in zip(names, present) if not ok]
            log.warning("%s: %d of the %d names do not exist (first: %s); reading the %d that do", raw,
                        len(missing), len(names), missing[0], len(found))
        out.extend(found)
    return out


# ---------------------------------------------------------------------------------------------
# Folders, manifests, sources

def walk_folder(root: Path | trees.Node, summary: InputSummary | None = None) -> Iterator[ImageItem]:
    """Images under ``root`` (a local folder, or an archive / remote folder's node) in a stable
    (sorted) order, labelled and grouped from their path."""
    if isinstance(root, Path):
        root = root.absolute()
    counts = WalkCounts()
    for path, parts, name in trees.walk_files(root, counts):
        if not is_image_path(Path(name)):
            if summary is not None:
                summary.ignored_files += 1
            continue
        group = next((p for p in parts if p not in LABEL_FOLDERS), None)
        yield ImageItem(path, label_from_parts(parts), group if group is not None else root.name)
    if summary is not None:
        summary.repeated_links += counts.repeated


def read_manifest(path: str | Path) -> list[ImageItem]:
    """The items of :func:`iter_manifest`, as a list.

    Raises:
        InputError: as :func:`iter_manifest`.
    """
    return list(iter_manifest(path))


def iter_manifest(path: str | Path) -> Iterator[ImageItem]:
    """Items from a CSV with a ``path`` column and optional ``label``, ``group``, ``caption``,
    ``subgroup`` (e.g. the LSUN class of a CNNDetection training image). The manifest is a local
    file or an object behind a URI (read as a stream).

    Relative paths are taken relative to the manifest's folder (its URI's folder for a remote
    manifest); URIs (``s3://...``), absolute paths and source identities (``/data/x.zip!/a.png``)
    are kept as written. Rows are read and yielded one at a time (a manifest of ten million lines is
    never held); the errors below come as the reading reaches them.

    Raises:
        InputError: unreadable file, no ``path`` column, an empty path or a bad label (with the line).
    """
    text = str(path)
    uri = remote.is_uri(text)
    if not uri:
        path = Path(text)
    encoding = _text_encoding(text)
    try:
        if uri:
            remote.check_uri(text)
            handle = io.TextIOWrapper(_Readable(remote.open_stream(text)), encoding=encoding, newline="")
        else:
            handle = path.open(newline="", encoding=encoding)
    except OSError as exc:
        raise InputError(f"{path}: cannot open the manifest ({getattr(exc, 'strerror', None) or exc})") from exc
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
                if remote.is_uri(raw):
                    image = raw
                elif uri:  # beside a remote manifest; an absolute path is a path of the machines that read it
                    local = remote.local_path(raw)
                    image = local if local.startswith("/") else _beside(text, local, f"{path}, line {line}")
                else:
                    local = Path(remote.local_path(raw)).expanduser()
                    image = str(local if local.is_absolute() else path.parent.absolute() / local)
                    if sources.SEPARATOR in raw and os.path.isabs(raw):
                        image = raw  # an identity: its member name is kept exactly
                yield ImageItem(
                    image,
                    parse_label(row.get("label"), f"{path}, line {line}"),
                    (row.get("group") or "").strip() or None,
                    row.get("caption") if (row.get("caption") or "").strip() else None,
                    (row.get("subgroup") or "").strip() or None,
                )
        except csv.Error as exc:
            where = f", line {reader.line_num}" if reader is not None else ""
            raise InputError(f"{path}{where}: not valid CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            name = "UTF-16" if encoding == "utf-16" else "UTF-8"
            raise InputError(f"{path}: the manifest is not {name} text ({exc.reason}); save it as UTF-8") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read the manifest ({getattr(exc, 'strerror', None) or exc})") from exc


class _Readable(io.RawIOBase):
    """A remote object's input stream as the raw binary file :class:`io.TextIOWrapper` wants."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


def _beside(manifest: str, relative: str, where: str) -> str:
    """A relative path of a remote manifest, from the manifest's folder (never above its bucket)."""
    scheme, _, rest = manifest.rsplit("/", 1)[0].partition("://")
    bucket, _, key = rest.partition("/")
    joined = posixpath.normpath(posixpath.join(key, relative))
    if joined == ".." or joined.startswith("../"):
        raise InputError(f"{where}: the path {relative!r} leads out of the bucket {scheme}://{bucket}")
    return f"{scheme}://{bucket}/{joined}"


def _text_encoding(path: str) -> str:
    """UTF-8 (with or without a BOM), or UTF-16 when the file starts with its byte-order mark
    (what spreadsheet programs write as "Unicode text")."""
    try:
        if remote.is_uri(path):
            with remote.open_stream(path) as handle:
                start = handle.read(2)
        else:
            with open(path, "rb") as handle:
                start = handle.read(2)
    except (OSError, InputError):
        return "utf-8-sig"  # opening again reports the error
    return "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def items_from_source(path: str | Path, options: SourceOptions | None = None, *, root_name: str | None = None,
                      class_names: dict[str, list[str]] | None = None) -> Iterator[ImageItem]:
    """The images of a zip / tar / WebDataset shard / Parquet / Arrow file (see
    :mod:`tidy_detect.data.sources`), labelled and grouped by the folder rules applied to the
    member's path inside the file (``root_name``, by default the file's name without its suffix,
    standing for INPUT's name); a label or group given by a sidecar or a column wins.

    Raises:
        InputError: the source cannot be listed, or holds a label that is not a label word.
    """
    root_name = root_name or sources.source_stem(path)
    for record in sources.iter_source(path, options, class_names):
        label = parse_label(record.label, record.identity) if record.label is not None else \
            label_from_parts(record.parts)
        group = record.group or next((p for p in record.parts if p not in LABEL_FOLDERS), None) or root_name
        yield ImageItem(record.identity, label, group, record.caption)


def items_from_table_set(found: hub.TableSet, options: SourceOptions | None = None) -> list[ImageItem]:
    """The rows of a ``datasets`` split (see :mod:`tidy_detect.data.hub`), grouped by the group
    column or, without one, under the dataset's name.

    Raises:
        InputError: as :func:`items_from_source`, or the files hold fewer or more rows than the
            dataset's info records for the split (an incomplete copy).
    """
    return list(iter_table_set(found, options))


def iter_table_set(found: hub.TableSet, options: SourceOptions | None = None,
                   skip_files: set[str] | None = None) -> Iterator[ImageItem]:
    """:func:`items_from_table_set` one row at a time; the row count is checked when the last file
    has been read (so a streamed run learns of an incomplete copy after listing, before any model
    runs: the resume plan reads the whole listing first). Files in ``skip_files`` (absolute
    names, already listed by another INPUT) are counted but not yielded again."""
    count = 0
    for file in found.files:
        repeated = skip_files is not None and sources.container_name(file) in skip_files
        for item in items_from_source(file, options, root_name=found.name, class_names=found.class_names):
            count += 1
            if not repeated:
                yield item
    if found.rows is not None and found.rows != count:
        raise InputError(f"{found.root}: the split {found.split!r} has {count:,} rows in its files but the "
                         f"dataset's info records {found.rows:,}: the copy is incomplete or truncated")


def input_kind(text: str) -> str:
    """What an INPUT (after :func:`normalize_input`) is: ``hub``, ``datasets``, ``source``,
    ``manifest``, ``folder``, ``file`` or ``missing``; URIs the same (a remote folder is
    ``folder``). Asks a remote store when it has to.

    Raises:
        InputError: a URI that cannot be used (credentials in it, an unknown scheme).
    """
    if hub.is_hub_id(text):
        return "hub"
    if remote.is_uri(text):
        remote.check_uri(text)
        if source_suffix(text) and sources.is_source_file(text):
            return "source"
        try:
            found = remote.info(text)
        except OSError as exc:
            raise InputError(f"{text}: cannot be reached ({exc}); check the URI, the network and the "
                             f"credentials") from exc
        if found is None:
            return "missing"
        if found.is_dir:
            return "datasets" if hub.folder_kind(text) else "folder"
        return "manifest" if text.lower().endswith(".csv") else "file"
    path = Path(text)
    if path.is_dir():
        return "datasets" if hub.folder_kind(str(path)) else "folder"
    if path.suffix.lower() == ".csv" and path.is_file():
        return "manifest"
    if source_suffix(path) and path.is_file():
        return "source"
    if path.is_file():
        return "file"
    return "missing" if not path.exists() else "other"


def collect_inputs(inputs: Iterable[str | Path], summary: InputSummary | None = None,
                   options: SourceOptions | None = None, split: str | None = None) -> list[ImageItem]:
    """Expand every INPUT (see the module docstring) into image items, in order: the list of
    :func:`iter_inputs` (see there), with ``summary.images`` set to its length.

    Raises:
        InputError, ConfigError: as :func:`iter_inputs`.
    """
    summary = summary if summary is not None else InputSummary()
    items = list(iter_inputs(inputs, summary, options, split))
    summary.images = len(items)
    return items


def resolve_inputs(inputs: Iterable[str | Path], split: str | None = None) -> list[tuple[str, str]]:
    """Every INPUT expanded (:func:`expand_inputs`) with its kind (:func:`input_kind`): what
    :func:`iter_inputs` lists, resolved once so that a caller listing the same INPUTs again asks no
    store twice for them.

    Raises:
        InputError: as :func:`expand_inputs` and :func:`input_kind`.
        ConfigError: ``split`` given but no INPUT has splits.
    """
    names = expand_inputs(inputs)
    kinds = [input_kind(text) for text in names]
    if split is not None and not {"hub", "datasets"} & set(kinds):
        raise ConfigError(f"--split {split}: splits need a dataset layout (--layout auto or a name) or a datasets "
                          f"folder / hub dataset among the inputs, and none is one")
    return list(zip(names, kinds))


def iter_inputs(inputs: Iterable[str | Path], summary: InputSummary | None = None,
                options: SourceOptions | None = None, split: str | None = None, *,
                resolved: list[tuple[str, str]] | None = None) -> Iterator[ImageItem]:
    """Every INPUT (see the module docstring) as image items, in order, one at a time: a table of
    ten million rows is listed batch by batch and never held as a list.

    Files named directly are always included, whatever their suffix (a bad one becomes an error
    record later). Each image is yielded once. Keeping that promise costs memory only where two
    INPUTs can name the same image: an item of a folder, manifest or single file is remembered
    only when a later INPUT may name it again (a later manifest, the same file, or a folder
    holding it: disjoint folders remember nothing); an archive, shard or table read as an INPUT is
    remembered by its name alone (its members' identities are unique within it, so the same file
    given twice is skipped the second time, and a manifest line naming one of its members after it
    is a repeat).

    Args:
        summary: gets the non-image files seen in walked folders and the links reached twice
            (``images`` is left to the caller, who counts what it consumes).
        options: which columns of tables (fields of WebDataset samples) hold what.
        split: the split of ``datasets`` folders and hub datasets.
        resolved: the INPUTs as :func:`resolve_inputs` gave them (then ``inputs`` is not read).

    Raises:
        InputError: an INPUT that does not exist, a pattern that matches nothing, a bad
            manifest, or a source that cannot be listed.
        ConfigError: ``split`` given but no INPUT has splits.
    """
    summary = summary if summary is not None else InputSummary()
    resolved = resolved if resolved is not None else resolve_inputs(inputs, split)
    seen: set[str] = set()  # items a later INPUT may name again
    listed: set[str] = set()  # absolute names of the sources (archives, shards, tables) listed whole
    for position, (text, kind) in enumerate(resolved):
        if kind in ("hub", "datasets"):
            found_set = hub.table_set(text, split)
            yield from (item for item in iter_table_set(found_set, options, skip_files=listed)
                        if item.path not in seen)
            listed.update(sources.container_name(file) for file in found_set.files)
            continue
        if kind == "source":
            name = sources.container_name(text)
            if name not in listed:
                yield from (item for item in items_from_source(text, options) if item.path not in seen)
                listed.add(name)
            continue
        if kind == "folder":
            found: Iterable[ImageItem] = walk_folder(trees.open_tree(text) if remote.is_uri(text) else Path(text),
                                                     summary)
        elif kind == "manifest":
            found = iter_manifest(text)
        elif kind == "file":
            found = iter([ImageItem(_file_path(text))])
        elif kind == "other":
            raise InputError(f"{text}: neither a file nor a folder")
        else:
            raise InputError(f"{text}: no such file or folder")
        repeats = _repeated_later(resolved[position + 1:])
        for item in found:
            if item.path in seen or (listed and _member_of(item.path, listed)):
                continue
            if repeats is not None and repeats(item.path):
                seen.add(item.path)
            yield item


def _file_path(text: str) -> str:
    """The item path of a file named as an INPUT."""
    return text if remote.is_uri(text) else str(Path(text).absolute())


def _repeated_later(later: list[tuple[str, str]]) -> Callable[[str], bool] | None:
    """Which item paths the INPUTs in ``later`` may yield again (None: none can).

    Identity is the item path as written, so a later folder can only repeat the paths under its
    own root, a later file only its own path; a later manifest may name any path. Tables,
    datasets and archives yield member identities (``set.zip!/a.png``), which a manifest before
    them may name but a walked file's path never is. So a run over many disjoint folders
    remembers nothing, however many images they hold.
    """
    prefixes: list[str] = []
    names: set[str] = set()
    members = False
    for text, kind in later:
        if kind == "manifest":
            return lambda path: True
        if kind == "folder":
            prefixes.append(text.rstrip("/") + "/" if remote.is_uri(text)
                            else str(Path(text).absolute()).rstrip(os.sep) + os.sep)
        elif kind == "file":
            names.add(_file_path(text))
        elif kind in ("source", "hub", "datasets"):
            members = True
    if not prefixes and not names and not members:
        return None
    under = tuple(prefixes)
    return lambda path: (path in names or path.startswith(under)
                         or (members and sources.split_identity(path) is not None))


def _member_of(path: str, listed: set[str]) -> bool:
    """Whether ``path`` names a member of a source already listed whole."""
    parts = sources.split_identity(path)
    return parts is not None and parts[0] in listed


__all__ = [
    "FAKE_WORDS",
    "ImageItem",
    "InputSummary",
    "LABEL_FOLDERS",
    "REAL_WORDS",
    "WalkCounts",
    "collect_inputs",
    "expand_braces",
    "expand_inputs",
    "input_kind",
    "items_from_source",
    "items_from_table_set",
    "iter_manifest",
    "iter_inputs",
    "iter_table_set",
    "label_from_parts",
    "normalize_input",
    "parse_label",
    "read_manifest",
    "resolve_inputs",
    "walk_folder",
    "walk_tree",
]
