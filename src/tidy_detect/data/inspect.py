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
from typing import Any, Callable, Iterator, Sequence

from tidy_detect.data import sources
from tidy_detect.data.inputs import ImageItem
from tidy_detect.data.layouts import COLUMNS, Dataset, expand_item
from tidy_detect.data.sampling import pairing_users
from tidy_detect.errors import ConfigError, InputError
from tidy_detect.features.spill import KeySet
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
    """Counts, formats and warnings of a dataset, as plain (JSON-ready) data: what
    :func:`inspect_listings` reports when it walks the same input, here read from the dataset's
    items.

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
        InputError: a dataset without items.
    """
    report, _ = inspect_listings(lambda: [_HeldListing(dataset)], dataset.root, probe=probe, seed=seed,
                                 share=share)
    return report


class _HeldListing:
    """A :class:`Dataset` (items already per generator) read as a listing by :func:`inspect_listings`."""

    keep_order = True  # its items are the per-generator view already: no pairing to expand

    def __init__(self, dataset: Dataset) -> None:
        self.name, self.layout, self.root, self.split = dataset.name, dataset.layout, dataset.root, dataset.split
        self.container, self.items, self.pairing = dataset.container, dataset.items, dataset.pairing
        self.skipped, self.notes = dataset.skipped, dataset.notes

    def empty_error(self) -> InputError:
        return InputError(f"{self.root}: holds no images")


class _Cell:
    """One (group, class) of a streamed inspection: its size, whether its paths came sorted, and
    (second walk) the items at the chosen ranks, or every path when they did not come sorted."""

    def __init__(self) -> None:
        self.size = 0
        self.last: str | None = None
        self.sorted = True
        self.probe_ranks: set[int] = set()
        self.meta_ranks: list[int] = []
        self.at: dict[int, ImageItem] = {}
        self.items: list[ImageItem] = []

    def count(self, path: str) -> None:
        if self.last is not None and not self.last < path:
            self.sorted = False
        self.last = path
        self.size += 1

    def choose(self, n: int, probe: int, seed: int, metadata: int) -> None:
        """The ranks (among ``n`` sorted paths) to probe, with ``seed``, and to check for metadata
        (seed 0): ``random.Random(seed).sample`` picks indices that depend only on n and k."""
        self.probe_ranks = set(random.Random(seed).sample(range(n), min(probe, n)))
        self.meta_ranks = random.Random(0).sample(range(n), min(metadata, n))


def inspect_listings(open_listings: Callable[[], Sequence[Any]], root: str, probe: int = 0, seed: int = 0,
                     share: float = DOMINANT_SHARE, metadata: int = 0) -> tuple[dict[str, Any], list[ImageItem]]:
    """The report of :func:`inspect_dataset` (see there for its fields) for the datasets
    ``open_listings()`` opens, merged as :func:`~tidy_detect.data.layouts.merge_datasets` merges
    them, walking them instead of holding their items: memory does not grow with the dataset.

    The counts need one walk. Probing (``probe``) and the generator-metadata sample (``metadata``
    items per group and class, seed 0, as ``datasets inspect --generator-metadata`` takes them)
    choose by rank in each cell's sorted paths, so they need a second walk, which meets each item
    at its rank again (a cell whose paths do not come in sorted order keeps its paths, as the
    list did).

    Args:
        open_listings: opens the datasets anew (each :class:`~tidy_detect.data.layouts.Listing`
            yields its items once); called once per walk.
        root: what the report calls the datasets when there are several.

    Returns:
        The report, and the items chosen for the generator-metadata check (in the order
        ``datasets inspect`` checks them).

    Raises:
        ConfigError: as :func:`inspect_dataset`.
        InputError: as :func:`~tidy_detect.data.layouts.read_dataset` and ``merge_datasets``.
    """
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
        raise ConfigError(f"probe must be an integer >= 0, got {probe!r}")
    if not 0.5 < share <= 1.0:
        raise ConfigError(f"share must be in (0.5, 1], got {share!r}")

    def walk(listings: Sequence[Any]) -> Iterator[tuple[ImageItem, int]]:
        """(item, which copy of its extraction item it is) in the per-generator view."""
        for listing in listings:
            users = pairing_users(listing.pairing) if listing.pairing and not listing.keep_order else {}
            listed = False
            for item in listing.items:
                listed = True
                if users:
                    yield from ((copy, k) for k, copy in enumerate(expand_item(item, users)))
                else:
                    yield item, 0
            if not listed:
                raise listing.empty_error()

    listings = open_listings()
    if not listings:
        raise InputError(f"{root}: nothing to read")
    layouts = sorted({listing.layout for listing in listings})
    if len(layouts) > 1:
        raise InputError(f"{root}: its files are read with different layouts ({', '.join(layouts)}); inspect "
                         f"them one by one")
    entries: dict[str, dict[str, Any]] = {}
    suffixes: dict[str, dict[str, collections.Counter[str]]] = {}
    subgroups: dict[str, dict[str, dict[str, int]]] = {}
    cells: dict[tuple[str, Any], _Cell] = {}
    total = files = shared = 0
    # One tree's walk lists each file once (its copies, a shared real under each generator, come
    # together); a manifest may name a file under two groups, and several roots may overlap:
    # then the paths seen are remembered (16 bytes a path, see KeySet) to count each file once.
    keyed = len(listings) > 1 or any(listing.keep_order for listing in listings)
    paths, twice = KeySet(), KeySet()
    # (item, whether its file is new, whether its file has just become shared)
    walked = ((item, first, not first and twice.add(item.path))
              for item, first in paths.firsts((item for item, _ in walk(listings)), key=lambda i: i.path)) \
        if keyed else \
        ((item, copy == 0, copy == 1) for item, copy in walk(listings))
    for item, first_time, now_shared in walked:
        group, name = str(item.group), _CLASS_NAMES[item.label]
        entry = entries.get(group)
        if entry is None:
            entry = entries[group] = {"real": 0, "fake": 0, "unlabelled": 0}
            suffixes[group] = collections.defaultdict(collections.Counter)
        entry[name] += 1
        suffixes[group][name][format_from_suffix(item.path)] += 1
        if item.subgroup is not None:
            subgroups.setdefault(group, {}).setdefault(item.subgroup, {"real": 0, "fake": 0, "unlabelled": 0})[name] += 1
        total += 1
        files += first_time
        shared += now_shared
        if probe or metadata:
            cells.setdefault((group, item.label), _Cell()).count(item.path)
    pairing: dict[str, str] = {}  # a group without an entry takes its own reals
    for listing in listings:
        pairing.update(listing.pairing or {})

    if probe or metadata:
        for cell in cells.values():
            if cell.sorted:
                cell.choose(cell.size, probe, seed, metadata)
        seen: dict[tuple[str, Any], int] = collections.Counter()
        for item, _ in walk(open_listings()):
            key = (str(item.group), item.label)
            cell = cells.get(key)
            if cell is None:
                continue  # the tree changed between the walks
            if not cell.sorted:
                cell.items.append(item)
                continue
            rank = seen[key]
            seen[key] += 1
            if rank in cell.probe_ranks or rank in cell.meta_ranks:
                cell.at[rank] = item
        for cell in cells.values():
            if not cell.sorted:  # as the list does: the cell's paths sorted, then sampled
                members = sorted({i.path: i for i in cell.items}.values(), key=lambda i: i.path)
                cell.choose(len(members), probe, seed, metadata)
                cell.at = dict(enumerate(members))

    probed_cache: dict[str, str] = {}
    groups: dict[str, Any] = {}
    warnings = []
    for group in sorted(entries):
        entry = entries[group]
        entry["reals_from"] = pairing.get(group, group)
        formats: Any = suffixes[group]
        entry["formats"] = {name: dict(sorted(c.items())) for name, c in sorted(formats.items())}
        source = "file suffix"
        if probe:
            formats = {}
            for label in (0, 1, None):
                cell = cells.get((group, label))
                if cell is None:
                    continue
                counts: collections.Counter[str] = collections.Counter()
                for rank in sorted(cell.probe_ranks):
                    if rank not in cell.at:
                        continue  # the tree lost files between the walks
                    path = cell.at[rank].path
                    if path not in probed_cache:
                        probed_cache[path] = probe_format(path)
                    counts[probed_cache[path]] += 1
                formats[_CLASS_NAMES[label]] = counts
            entry["probed"] = {name: dict(sorted(c.items())) for name, c in sorted(formats.items())}
            source = f"reading {probe} files per class"
        # the list's key order: counts, reals_from, formats, [probed], [subgroups]
        groups[group] = {k: entry[k] for k in ("real", "fake", "unlabelled", "reals_from", "formats", "probed")
                         if k in entry}
        if group in subgroups:
            groups[group]["subgroups"] = dict(sorted(subgroups[group].items()))
        message = format_warning(group, formats.get("real", collections.Counter()),
                                 formats.get("fake", collections.Counter()), source, share)
        if message:
            warnings.append({"group": group, "message": message})
    chosen = [cells[key].at[rank] for key in sorted(cells, key=str) for rank in cells[key].meta_ranks
              if rank in cells[key].at] if metadata else []
    first = listings[0]
    skipped: collections.Counter[str] = collections.Counter()
    for listing in listings:
        skipped.update(listing.skipped)
    notes = [n for listing in listings for n in listing.notes]
    if first.layout == COLUMNS and not probe:
        notes.append("table rows have no file names, so their formats show as NONE; --probe N reads them")
    report = {
        "name": first.name,
        "layout": first.layout,
        "root": first.root if len(listings) == 1 else root,
        "container": first.container if len(listings) == 1 else f"{len(listings)} × {first.container}",
        "split": first.split,
        "items": total,
        "files": files,
        "shared_files": shared,
        "skipped": dict(sorted(skipped.items())),
        "notes": notes,
        "groups": groups,
        "warnings": warnings,
    }
    return report, chosen


__all__ = ["DOMINANT_SHARE", "format_from_suffix", "format_warning", "inspect_dataset", "inspect_listings",
           "probe_format"]
