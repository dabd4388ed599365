"""What a dataset holds, per group: real/fake counts, file formats, and format biases.

A class whose images are mostly one file format while the other class of the same group is mostly
another (GenImage: real JPEG, fake PNG) lets a detector learn the format instead of the fakeness;
such groups get a warning. Formats come from file suffixes, or, with ``probe``, from opening
files with Pillow (content beats names: a ``.png`` holding JPEG data counts as JPEG).

Every input kind is inspected the same way: folders, archives, WebDataset shards, tables,
``datasets`` folders and hub datasets, locally or behind a URI. A probed archive member, table row
or remote object is read through :mod:`tidy_detect.data.sources` (bounded like extraction), and its
header identified from those bytes; table rows have no file names, so only probing tells their
formats.
"""

from __future__ import annotations

import collections
import functools
import random
from pathlib import Path
from typing import Any, Iterable

from tidy_detect.data import sources
from tidy_detect.data.inputs import ImageItem
from tidy_detect.data.layouts import COLUMNS, Dataset
from tidy_detect.errors import ConfigError
from tidy_detect.images import DEFAULT_MAX_FILE_BYTES

DOMINANT_SHARE = 0.9  # a class this much one format is "one format"
UNREADABLE = "UNREADABLE"
_CLASS_NAMES = {0: "real", 1: "fake", None: "unlabelled"}


@functools.lru_cache(maxsize=1)
def _extension_formats() -> dict[str, str]:
    from PIL import Image

    return {ext.lower(): fmt for ext, fmt in Image.registered_extensions().items()}


def format_from_suffix(path: str | Path) -> str:
    """Pillow's format name for a file suffix (``.jpg`` -> ``JPEG``), the bare suffix upper-cased
    when Pillow does not know it, ``NONE`` without a suffix."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "NONE"
    return _extension_formats().get(suffix, suffix[1:].upper())


def probe_format(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """The format Pillow reads from the file's header, or ``UNREADABLE`` (also for FIFOs and
    devices, which are never opened: reading them could block or never end). An archive member,
    table row or remote object (see :mod:`tidy_detect.data.sources`) is read, at most
    ``max_bytes``, and identified from its bytes."""
    import io
    import os
    import stat

    from PIL import Image

    if sources.is_identity(str(path)):
        try:
            data, _ = sources.read_item(str(path), max_bytes=max_bytes)
            with Image.open(io.BytesIO(data)) as image:
                return image.format or "UNKNOWN"
        except Exception:  # any failure to identify is the answer here, not an error
            return UNREADABLE
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return UNREADABLE
        # Non-blocking: a FIFO swapped in after the check must not hang the probe.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle, Image.open(handle) as image:  # reads the header only
            return image.format or "UNKNOWN"
    except Exception:  # any failure to identify is the answer here, not an error
        return UNREADABLE


def _dominant(counts: collections.Counter[str]) -> tuple[str, float] | None:
    total = sum(counts.values())
    if not total:
        return None
    name, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return name, n / total


def format_warning(group: str, real: collections.Counter[str], fake: collections.Counter[str], source: str,
                   share: float = DOMINANT_SHARE) -> str | None:
    """The warning for one group, or None.

    It fires when one class is at least ``share`` one format and the other class is mostly
    (over half) another format.
    """
    top_real, top_fake = _dominant(real), _dominant(fake)
    if top_real is None or top_fake is None or top_real[0] == top_fake[0]:
        return None
    if max(top_real[1], top_fake[1]) < share or min(top_real[1], top_fake[1]) <= 0.5:
        return None
    return (f"group {group!r}: real images are {top_real[1]:.0%} {top_real[0]} but fake images are "
            f"{top_fake[1]:.0%} {top_fake[0]} (by {source}); a detector can learn the file format instead of "
            f"the fakeness, so check it on both classes in one format (e.g. under JPEG compression)")


def inspect_dataset(dataset: Dataset, probe: int = 0, seed: int = 0,
                    share: float = DOMINANT_SHARE) -> dict[str, Any]:
    """Counts, formats and warnings of a dataset, as plain (JSON-ready) data.

    Args:
        dataset: from :func:`tidy_detect.data.layouts.read_dataset`.
        probe: open up to this many files per class and group (chosen with ``seed``) to read
            their real format; 0 reads suffixes only.
        seed: seeds the choice of probed files.
        share: how much of a class must be one format for the format warning.

    Returns:
        ``{"name", "layout", "root", "container", "split", "items", "files", "shared_files",
        "skipped", "notes", "groups": {group: {"real", "fake", "unlabelled", "reals_from", "formats":
        {"real": {fmt: n}, "fake": {...}}, ["probed": {...}], ["subgroups": {sub: {"real", "fake"}}]}},
        "warnings": [{"group", "message"}]}``. Warnings use probed formats when probing.

    Raises:
        ConfigError: ``probe`` < 0 or ``share`` outside (0.5, 1].
    """
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
        raise ConfigError(f"probe must be an integer >= 0, got {probe!r}")
    if not 0.5 < share <= 1.0:
        raise ConfigError(f"share must be in (0.5, 1], got {share!r}")
    by_group: dict[str, list[ImageItem]] = collections.defaultdict(list)
    for item in dataset.items:
        by_group[str(item.group)].append(item)
    probed_cache: dict[str, str] = {}
    groups: dict[str, Any] = {}
    warnings = []
    for group in sorted(by_group):
        items = by_group[group]
        entry: dict[str, Any] = {"real": 0, "fake": 0, "unlabelled": 0,
                                 "reals_from": dataset.pairing.get(group, group)}
        suffixes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        subgroups: dict[str, dict[str, int]] = {}
        for item in items:
            name = _CLASS_NAMES[item.label]
            entry[name] += 1
            suffixes[name][format_from_suffix(item.path)] += 1
            if item.subgroup is not None:
                subgroups.setdefault(item.subgroup, {"real": 0, "fake": 0, "unlabelled": 0})[name] += 1
        entry["formats"] = {name: dict(sorted(c.items())) for name, c in sorted(suffixes.items())}
        formats, source = suffixes, "file suffix"
        if probe:
            formats = _probe(items, probe, seed, probed_cache)
            entry["probed"] = {name: dict(sorted(c.items())) for name, c in sorted(formats.items())}
            source = f"reading {probe} files per class"
        if subgroups:
            entry["subgroups"] = dict(sorted(subgroups.items()))
        message = format_warning(group, formats.get("real", collections.Counter()),
                                 formats.get("fake", collections.Counter()), source, share)
        if message:
            warnings.append({"group": group, "message": message})
        groups[group] = entry
    notes = list(dataset.notes)
    if dataset.layout == COLUMNS and not probe:
        notes.append("table rows have no file names, so their formats show as NONE; --probe N reads them")
    return {
        "name": dataset.name,
        "layout": dataset.layout,
        "root": dataset.root,
        "container": dataset.container,
        "split": dataset.split,
        "items": len(dataset.items),
        "files": len(dataset.unique_paths()),
        "shared_files": len(dataset.shared_paths()),
        "skipped": dict(dataset.skipped),
        "notes": notes,
        "groups": groups,
        "warnings": warnings,
    }


def _probe(items: Iterable[ImageItem], n: int, seed: int, cache: dict[str, str]
           ) -> dict[str, collections.Counter[str]]:
    cells: dict[str, list[str]] = collections.defaultdict(list)
    for item in items:
        cells[_CLASS_NAMES[item.label]].append(item.path)
    found: dict[str, collections.Counter[str]] = {}
    for name, paths in cells.items():
        paths = sorted(set(paths))
        chosen = random.Random(seed).sample(paths, min(n, len(paths)))
        counts: collections.Counter[str] = collections.Counter()
        for path in chosen:
            if path not in cache:
                cache[path] = probe_format(path)
            counts[cache[path]] += 1
        found[name] = counts
    return found


__all__ = ["DOMINANT_SHARE", "format_from_suffix", "format_warning", "inspect_dataset", "probe_format"]
