"""Hugging Face ``datasets`` inputs: ``save_to_disk`` folders, the datasets cache, and hub ids.

Each is read as the Arrow files that hold its rows, in order, through the table sources of
:mod:`tidy_detect.data.sources` (identities ``FILE.arrow!/ROW``); ``datasets`` itself is only
needed for hub ids.

- **A ``save_to_disk`` folder** of one dataset: ``dataset_info.json``, ``state.json`` (which lists
  its ``data-*.arrow`` files) and the files. Of a ``DatasetDict``: ``dataset_dict.json`` (its
  splits) and one such folder per split.
- **A datasets cache folder** (``~/.cache/huggingface/datasets/ORG___NAME/CONFIG/VERSION/HASH``):
  ``dataset_info.json`` with its splits and ``NAME-SPLIT[-NNNNN-of-NNNNN].arrow`` files.
- **A hub id**, ``hf-dataset:ORG/NAME`` or ``hf-dataset:ORG/NAME:CONFIG``: loaded with
  ``datasets.load_dataset`` (downloaded into the datasets cache when the hub is reachable, read from
  the cache otherwise; ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` never try the network),
  then its cache files are read. Anything ``load_dataset`` takes as a name works, a local dataset
  folder of Parquet files included. To read a hub repository's files without the cache, give them
  as ``hf://datasets/ORG/NAME/...`` URIs instead (see :mod:`tidy_detect.data.remote`).

**Splits.** ``--split`` chooses one. Without it, a dataset with a single split is read whole, and
one with several is refused with the list of its splits: the same rule as a benchmark folder with
``train/`` and ``val/``, since mixing a dataset's train and test images into one store would make
every evaluation on it meaningless.

**Labels and groups.** The label column's integers are mapped through the ``ClassLabel`` names the
dataset declares (its 0 may be "fake"); the group is the group column when the dataset has one,
else the dataset's name (the folder's name, or NAME of a hub id).

A split whose files hold fewer rows than the dataset's info records (an interrupted download, a
truncated copy) is refused before anything is extracted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidy_detect.data import remote
from tidy_detect.errors import InputError

HUB_PREFIX = "hf-dataset:"
_MAX_JSON_BYTES = 64 * 1024 * 1024  # dataset_info.json of a dataset with many files is still small


@dataclass(frozen=True)
class TableSet:
    """The Arrow files of one split of a ``datasets`` dataset, and what they mean."""

    name: str  # the dataset's name: the group of rows without a group column
    root: str  # the folder or the hub id
    kind: str  # "datasets folder", "datasets cache" or "hub dataset"
    split: str | None
    files: tuple[str, ...]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    rows: int | None = None  # rows the dataset's info records for the split, when it does


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is ``hf-dataset:NAME[:CONFIG]``."""
    return str(text).startswith(HUB_PREFIX)


def _join(base: str, name: str) -> str:
    return remote.join(base, name) if remote.is_uri(base) else os.path.join(base, name)


def _exists(base: str, name: str) -> bool:
    target = _join(base, name)
    if remote.is_uri(base):
        try:
            found = remote.info(target)
        except (OSError, InputError):
            return False
        return found is not None and found.is_file
    return os.path.isfile(target)


def _read_json(base: str, name: str) -> Any:
    target = _join(base, name)
    try:
        if remote.is_uri(base):
            raw = remote.read_bytes(target, _MAX_JSON_BYTES)
        else:
            if os.path.getsize(target) > _MAX_JSON_BYTES:
                raise InputError(f"{target}: larger than {_MAX_JSON_BYTES:,} bytes; not a datasets file")
            raw = Path(target).read_bytes()
        return json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise InputError(f"{target}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{target}: not valid JSON ({exc}); the datasets folder is damaged") from exc


def _names(base: str) -> list[str]:
    if remote.is_uri(base):
        prefix = base.rstrip("/") + "/"
        return [o.uri[len(prefix):] for o in remote.list_files(base) if "/" not in o.uri[len(prefix):]]
    try:
        return sorted(os.listdir(base))
    except OSError as exc:
        raise InputError(f"{base}: cannot list the folder ({exc.strerror or exc})") from exc


def _is_folder(base: str) -> bool:
    return remote.is_dir(base) if remote.is_uri(base) else os.path.isdir(base)


def folder_kind(path: str) -> str | None:
    """``dict``, ``dataset`` or ``cache`` for a ``datasets`` folder (see the module docstring),
    None for any other folder or file."""
    try:
        if not _is_folder(path):
            return None
    except (OSError, InputError):
        return None
    if _exists(path, "dataset_dict.json"):
        return "dict"
    if _exists(path, "dataset_info.json"):
        if _exists(path, "state.json"):
            return "dataset"
        if any(n.endswith(".arrow") for n in _names(path)):
            return "cache"
    return None


def _class_names(info: Any) -> dict[str, list[str]]:
    features = info.get("features") if isinstance(info, dict) else None
    found = {}
    for column, feature in (features or {}).items() if isinstance(features, dict) else ():
        if not isinstance(feature, dict):
            continue
        names = feature.get("names")
        if feature.get("_type") == "ClassLabel" and isinstance(names, list):
            found[column] = [str(n) for n in names]
    return found


def _recorded_rows(info: Any, split: str | None) -> int | None:
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or split not in splits or not isinstance(splits[split], dict):
        return None
    rows = splits[split].get("num_examples")
    return rows if isinstance(rows, int) and not isinstance(rows, bool) else None


def _choose(splits: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in splits:
            raise InputError(f"{where}: no split {split!r}; splits: {', '.join(splits) or '(none)'}")
        return split
    if len(splits) == 1:
        return splits[0]
    raise InputError(f"{where}: holds the splits {', '.join(splits)}; choose one with --split")


def _dataset_folder(path: str, split: str | None, name: str) -> TableSet:
    state = _read_json(path, "state.json")
    info = _read_json(path, "dataset_info.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files or not all(isinstance(f, dict) and f.get("filename") for f in files):
        raise InputError(f"{_join(path, 'state.json')}: no '_data_files' list of Arrow files; the datasets folder "
                         f"is damaged or was written by another tool")
    recorded = state.get("_split") if isinstance(state.get("_split"), str) else None
    if split is not None and split not in (recorded, Path(path.rstrip("/")).name):
        raise InputError(f"{path}: a single dataset (split {recorded or 'not recorded'}), not split {split!r}; "
                         f"drop --split or give the folder of that split")
    names = [str(f["filename"]) for f in files]
    for file in names:
        if "/" in file or "\\" in file or file in ("", ".", ".."):
            raise InputError(f"{_join(path, 'state.json')}: the data file name {file!r} is not a file of the folder")
        if not _exists(path, file):
            raise InputError(f"{_join(path, file)}: listed in state.json but missing; the datasets folder is "
                             f"incomplete")
    return TableSet(name, path, "datasets folder", split or recorded, tuple(_join(path, f) for f in names),
                    _class_names(info), _recorded_rows(info, split or recorded))


def _cache_folder(path: str, split: str | None) -> TableSet:
    info = _read_json(path, "dataset_info.json")
    splits = list(info.get("splits") or {}) if isinstance(info.get("splits"), dict) else []
    if not splits:
        raise InputError(f"{_join(path, 'dataset_info.json')}: records no splits; not a datasets cache folder")
    chosen = _choose(splits, split, path)
    prefixes = [p for p in (info.get("dataset_name"), info.get("builder_name")) if isinstance(p, str) and p]
    names = _names(path)
    files: list[str] = []
    for prefix in prefixes:
        pattern = re.compile(rf"^{re.escape(prefix)}-{re.escape(chosen)}(?:-(\d+)-of-(\d+))?\.arrow$")
        matched = [(m, n) for n in names if (m := pattern.match(n))]
        if matched:
            files = [n for m, n in sorted(matched, key=lambda mn: int(mn[0].group(1) or 0))]
            break
    if not files:
        raise InputError(f"{path}: no Arrow file of the split {chosen!r} "
                         f"({'/'.join(p + '-' + chosen + '*.arrow' for p in prefixes) or 'NAME-SPLIT.arrow'}); "
                         f"files there: {', '.join(names)}")
    name = str(info.get("dataset_name") or prefixes[0])
    return TableSet(name, path, "datasets cache", chosen, tuple(_join(path, f) for f in files), _class_names(info),
                    _recorded_rows(info, chosen))


def read_folder(path: str, split: str | None = None) -> TableSet:
    """The Arrow files of a ``datasets`` folder (local or URI) for ``split``.

    Raises:
        InputError: not a datasets folder, no such split, several splits and none chosen,
            damaged or incomplete metadata.
    """
    path = path.rstrip("/") if remote.is_uri(path) else os.path.abspath(path)
    kind = folder_kind(path)
    name = remote.base_name(path) if remote.is_uri(path) else Path(path).name
    if kind == "dict":
        meta = _read_json(path, "dataset_dict.json")
        splits = [str(s) for s in meta.get("splits", [])] if isinstance(meta, dict) else []
        if not splits:
            raise InputError(f"{_join(path, 'dataset_dict.json')}: lists no splits")
        chosen = _choose(splits, split, path)
        found = _dataset_folder(_join(path, chosen), None, name)
        return TableSet(name, path, "datasets folder", chosen, found.files, found.class_names, found.rows)
    if kind == "dataset":
        return _dataset_folder(path, split, name)
    if kind == "cache":
        return _cache_folder(path, split)
    raise InputError(f"{path}: not a datasets folder (dataset_dict.json, or dataset_info.json with state.json or "
                     f"Arrow files)")


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """``hf-dataset:ORG/NAME[:CONFIG]`` -> ``(ORG/NAME, CONFIG)``.

    Raises:
        InputError: no name after the prefix.
    """
    rest = str(text)[len(HUB_PREFIX):].strip()
    name, _, config = rest.partition(":")
    if not name.strip():
        raise InputError(f"{text}: a hub dataset is hf-dataset:ORG/NAME or hf-dataset:ORG/NAME:CONFIG")
    return name.strip(), (config.strip() or None)


def load_hub(text: str, split: str | None = None) -> TableSet:
    """The cache files of a hub dataset, loaded with ``datasets.load_dataset``.

    Raises:
        InputError: ``datasets`` is not installed (the ``hub`` extra); the dataset cannot be loaded
            (the hub unreachable and no cache, no such dataset or split, several splits and none
            chosen); the loaded dataset is not backed by Arrow files.
    """
    name, config = parse_hub_id(text)
    try:
        import datasets
    except ImportError:
        raise InputError(f"{text}: hub datasets are loaded with the datasets library; pip install "
                         f"'tidy-detect[hub]'") from None
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError, ...)
        offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        cache = getattr(getattr(datasets, "config", None), "HF_DATASETS_CACHE", "the datasets cache")
        hint = (f"the hub is not reachable{' (offline mode is on)' if offline else ''} and the dataset is not in "
                f"the datasets cache ({cache}): load it once where the hub is reachable and copy the cache, or pass "
                f"its Parquet files or a save_to_disk folder" if offline or isinstance(exc, (ConnectionError, OSError))
                else "check the name, the config and the split")
        raise InputError(f"{text}: datasets cannot load {name!r}{f' ({config})' if config else ''}: "
                         f"{type(exc).__name__}: {exc}; {hint}") from exc
    if isinstance(loaded, dict):  # a DatasetDict: every split the dataset has
        chosen = _choose(list(loaded), split, text)
        loaded, split = loaded[chosen], chosen
    files = tuple(f["filename"] for f in getattr(loaded, "cache_files", []) or [])
    if not files:
        raise InputError(f"{text}: the loaded dataset is held in memory, not in Arrow cache files; save it with "
                         f"save_to_disk and pass that folder")
    features = getattr(loaded, "features", {}) or {}
    names = {c: list(f.names) for c, f in features.items() if type(f).__name__ == "ClassLabel"}
    recorded = (getattr(getattr(loaded, "info", None), "splits", None) or {}).get(split)
    rows = getattr(recorded, "num_examples", None) or None
    return TableSet(name.rstrip("/").rsplit("/", 1)[-1], text, "hub dataset", split, files, names, rows)


def table_set(text: str, split: str | None = None) -> TableSet | None:
    """:func:`load_hub` for a hub id, :func:`read_folder` for a datasets folder, else None."""
    if is_hub_id(text):
        return load_hub(text, split)
    if folder_kind(text) is not None:
        return read_folder(text, split)
    return None


__all__ = ["HUB_PREFIX", "TableSet", "folder_kind", "is_hub_id", "load_hub", "parse_hub_id", "read_folder",
           "table_set"]
