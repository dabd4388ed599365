"""From command-line INPUTs to the exact list of images a command extracts.

Reads the inputs (generic walking or a benchmark layout), applies the sampling protocol and keeps
what evaluation needs later: which real folder each generator pairs with.

Sampling of evaluation sets counts per generator: a real folder shared by several generators
(UniFD's ``laion``) is expanded to each of them first, so every generator gets at most N reals,
and since a sample depends only on its cell's files and the seed, they all get the same ones; each
file is still extracted once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from tidy_detect.data.inputs import ImageItem, InputSummary
from tidy_detect.data.sources import SourceOptions
from tidy_detect.errors import ConfigError, InputError


class ItemStream:
    """The images of INPUTs read generically (no layout, no sampling), listed anew each time it is
    iterated (see :func:`tidy_detect.data.inputs.iter_inputs`), so a run over ten million table
    rows never holds them as a list: extraction lists it three times, to check it before loading
    models (:meth:`check`), to plan the resume and to extract. Listing reads a table's small
    columns and an archive's headers (kept in memory for up to two million members, so the
    second and third listing of an archive cost nothing). ``summary`` describes the latest
    listing that ran to its end."""

    def __init__(self, inputs: Sequence[str | Path], options: SourceOptions | None = None,
                 split: str | None = None, limit: int | None = None) -> None:
        self.inputs, self.options, self.split, self.limit = list(inputs), options, split, limit
        self.summary = InputSummary()
        self._resolved: list[tuple[str, str]] | None = None  # patterns expanded and kinds asked once

    def __iter__(self) -> Iterator[ImageItem]:
        from tidy_detect.data.inputs import iter_inputs, resolve_inputs

        if self._resolved is None:
            self._resolved = resolve_inputs(self.inputs, self.split)
        summary = InputSummary()
        listed = iter_inputs(self.inputs, summary, self.options, self.split, resolved=self._resolved)
        if self.limit is not None:
            listed = itertools.islice(listed, self.limit)
        for item in listed:
            summary.images += 1
            yield item
        self.summary = summary

    def check(self) -> int:
        """List the inputs once, to the end: the number of images. What cannot be listed (a
        truncated archive or table, a bad manifest, a missing INPUT) raises here, so a caller can
        refuse it before loading models or making a store.

        Raises:
            InputError, ConfigError: as :func:`tidy_detect.data.inputs.iter_inputs`.
        """
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"ItemStream({self.inputs!r})"


class LayoutStream:
    """The extraction items of INPUTs read with a dataset layout (no sampling), walked anew each
    time it is iterated: the same items as :func:`~tidy_detect.data.layouts.items_for_datasets`
    (each file once per group, a shared real under its real folder's name), in walk order (each
    dataset in turn, folders and files sorted by name) rather than sorted by (group, label,
    path), and never held as a list: a GenImage tree of a million images costs what its folders'
    listings cost, as a streamed table does.

    Each image is yielded once: an image can only come twice when two roots overlap (one inside
    the other), so a dataset's (path, group) keys are remembered only while a later root overlaps
    it. :meth:`check` lists everything once (whatever ``limit``) and learns what the store
    records: ``pairing`` (generator -> real folder), ``datasets`` (group -> layout) and the
    ignored files; it raises what :func:`select_inputs` raises for the same INPUTs read whole.
    """

    def __init__(self, inputs: Sequence[str | Path], layout: str, *, split: str | None = None,
                 exclude: Iterable[str | Path] | None = None, pairing: Mapping[str, str] | None = None,
                 options: SourceOptions | None = None, limit: int | None = None) -> None:
        from tidy_detect.data.layouts import dataset_roots

        self.layout, self.split, self.options, self.limit = layout, split, options, limit
        self.exclude = list(exclude) if exclude else None
        self.user_pairing = dict(pairing) if pairing else None
        self.roots = dataset_roots(inputs)
        self.overlapping = [any(_overlap(root, later) for later in self.roots[i + 1:])
                            for i, root in enumerate(self.roots)]
        self.summary = InputSummary()
        self.pairing: dict[str, str] = {}
        self.datasets: dict[str, str] = {}

    @property
    def unique_paths(self) -> bool:
        """Whether every path is listed under one group only (no two roots overlap)."""
        return not any(self.overlapping)

    def keyed(self) -> Iterator[tuple[tuple[int, str, int, str] | tuple[int, int], ImageItem]]:
        """``(order, item)`` of every item, no limit: ``order`` sorts them as
        :func:`~tidy_detect.data.layouts.items_for_datasets` lists them (by dataset, then by
        (group, label, path) of the item's first copy under :func:`expand_pairing`, or in file
        order for manifests and tables)."""
        from tidy_detect.data.layouts import NOT_AN_IMAGE, SOURCE_LAYOUTS, open_dataset
        from tidy_detect.data.sampling import pairing_users

        summary, pairing, datasets = InputSummary(), {}, {}
        seen: set[tuple[str, str | None]] = set()
        for position, root in enumerate(self.roots):
            listing = open_dataset(root, self.layout, self.split, self.exclude, self.user_pairing, self.options)
            users = pairing_users(listing.pairing or {})
            count, groups = 0, set()
            for item in listing.items:
                count += 1
                key = (item.path, item.group)
                if key in seen:
                    continue
                if self.overlapping[position]:
                    seen.add(key)
                groups.add(str(item.group))
                if listing.keep_order:
                    order: Any = (position, count)
                else:
                    group = str(item.group)
                    first = users[group][0] if item.label == 0 and group in users else group
                    order = (position, first, -1 if item.label is None else item.label, item.path)
                yield order, item
            if not count:
                raise listing.empty_error()
            summary.ignored_files += listing.skipped.get(NOT_AN_IMAGE, 0)
            found = listing.pairing_of(groups)
            pairing.update({g: r for g, r in found.items() if g != r})
            if listing.layout not in ("generic", "manifest", *SOURCE_LAYOUTS):
                for group in sorted(groups):
                    if datasets.setdefault(group, listing.layout) != listing.layout:
                        raise InputError(f"group {group!r} is read both as {datasets[group]} and as "
                                         f"{listing.layout} ({listing.root}); one name for two datasets' "
                                         f"generators would mix them: extract them into separate stores")
        self.summary.ignored_files = summary.ignored_files
        self.pairing, self.datasets = pairing, datasets

    def known_pairing(self) -> dict[str, str]:
        """The pairing :meth:`check` would find (generator -> real folder), from opening each
        dataset without walking it: the layouts that pair decide it from folder names."""
        from tidy_detect.data.layouts import open_dataset

        pairing: dict[str, str] = {}
        for root in self.roots:
            listing = open_dataset(root, self.layout, self.split, self.exclude, self.user_pairing, self.options)
            pairing.update({g: r for g, r in (listing.pairing or {}).items() if g != r})
        return pairing

    def __iter__(self) -> Iterator[ImageItem]:
        listed = (item for _, item in self.keyed())
        if self.limit is not None:
            listed = itertools.islice(listed, self.limit)
        images = 0
        for item in listed:
            images += 1
            yield item
        self.summary.images = images

    def check(self) -> int:
        """List every dataset once, to the end (see the class docstring): the number of images.

        Raises:
            InputError, ConfigError, UnknownNameError: as :func:`select_inputs`.
        """
        count = sum(1 for _ in self.keyed())
        return count if self.limit is None else min(count, self.limit)

    def __repr__(self) -> str:
        return f"LayoutStream({self.roots!r}, layout={self.layout!r})"


def _overlap(a: str, b: str) -> bool:
    """Whether one root may hold the other's files (the same, or one inside the other)."""
    import os

    from tidy_detect.data.hub import is_hub_id
    from tidy_detect.data.remote import is_uri

    if not (is_uri(a) or is_hub_id(a) or is_uri(b) or is_hub_id(b)):
        a, b, sep = os.path.realpath(a), os.path.realpath(b), os.sep
    else:
        sep = "/"
    return a == b or a.startswith(b.rstrip(sep) + sep) or b.startswith(a.rstrip(sep) + sep)


@dataclass
class Selection:
    items: list[ImageItem] | ItemStream | LayoutStream  # each file once, grouped as on disk (shared reals under their own folder)
    pairing: dict[str, str] = field(default_factory=dict)  # generator -> real folder it pairs with
    params: dict[str, Any] = field(default_factory=dict)  # how the list was sampled (empty: not sampled)
    ignored_files: int = 0
    datasets: dict[str, str] = field(default_factory=dict)  # group -> the layout it was read with


def select_inputs(inputs: Iterable[str | Path], *, layout: str | None = None, split: str | None = None,
                  exclude: Iterable[str | Path] | None = None, pairing: Mapping[str, str] | None = None,
                  max_per_class: int | None = None, per_class: int | None = None, seed: int = 0,
                  limit: int | None = None, source_options: SourceOptions | None = None,
                  stream: bool = False) -> Selection:
    """Read INPUTs and sample them.

    Args:
        layout: None for generic walking (folders, files, manifests, archives, tables, datasets),
            else a layout name or "auto".
        max_per_class: evaluation sampling: at most N real and N fake per generator.
        per_class: training subsets: exactly N real and N fake, spread over the classes
            (subgroups) of the training set.
        seed: the sampling seed.
        limit: keep at most this many images (in order, after sampling).
        source_options: which columns of tables (fields of WebDataset samples) hold what.
        stream: when the INPUTs are not sampled, ``items`` is an :class:`ItemStream` (read
            generically) or a :class:`LayoutStream` (read with a layout), listed as it is
            iterated and once here to check it, instead of a list.

    A sample is always a list, but it is made without listing the inputs whole: the listing is
    read twice (counting each cell, then taking the chosen ranks; see
    :func:`~tidy_detect.data.sampling.sample_listing`), so only the sample is held. Without
    ``stream`` and sampling the items are read whole, sorted as :class:`Dataset` sorts them.

    Raises:
        ConfigError: both sampling options, or dataset options without a layout.
        InputError, UnknownNameError: as the layout readers.
    """
    from tidy_detect.data.inputs import normalize_input
    from tidy_detect.data.layouts import SOURCE_LAYOUTS, datasets_for_inputs, items_for_datasets, items_for_inputs
    from tidy_detect.data.hub import is_hub_id
    from tidy_detect.data.remote import is_uri
    from tidy_detect.data.sampling import sample_listing

    inputs = list(inputs)
    if max_per_class is not None and per_class is not None:
        raise ConfigError("give either --max-per-class (evaluation sampling) or --per-class (training subsets), not both")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    if layout is None and (exclude or pairing):
        raise ConfigError("exclude and pairing need a dataset layout (--layout auto or a name)")
    sampled = max_per_class is not None or per_class is not None
    if sampled or stream:
        # Read as the listing goes: the sample (a list as long as the sample) or the stream
        # is all that is held, never the whole dataset.
        if layout is None:
            listing: ItemStream | LayoutStream = ItemStream(inputs, source_options, split, None if sampled else limit)
        else:
            listing = LayoutStream(inputs, layout, split=split, exclude=exclude, pairing=pairing,
                                   options=source_options, limit=None if sampled else limit)
        layouts = listing if isinstance(listing, LayoutStream) else None
        if not sampled:
            listing.check()  # what cannot be listed is refused now, before a caller loads models or makes a store
            return Selection(listing, dict(layouts.pairing) if layouts else {},
                             ignored_files=listing.summary.ignored_files,
                             datasets=dict(layouts.datasets) if layouts else {})
        # the sampler's first pass lists everything, and raises what a check would
        keyed = layouts.keyed if layouts else lambda: enumerate(listing)
        items = sample_listing(keyed, layouts.known_pairing() if layouts else {}, max_per_class=max_per_class,
                               per_class=per_class, seed=seed, unique_paths=layouts is None or layouts.unique_paths)
        found_pairing = layouts.pairing if layouts else {}
        found_datasets = layouts.datasets if layouts else {}
        ignored = listing.summary.ignored_files
    else:
        summary = InputSummary()
        found_pairing, found_datasets = {}, {}
        if layout is None:
            items = items_for_inputs(inputs, None, split=split, exclude=exclude, pairing=pairing, summary=summary,
                                     options=source_options)
        else:
            datasets = datasets_for_inputs(inputs, layout, split=split, exclude=exclude, pairing=pairing,
                                           options=source_options)
            items = items_for_datasets(datasets, summary)
            for dataset in datasets:
                found_pairing.update({g: r for g, r in dataset.pairing.items() if g != r})
                if dataset.layout in ("generic", "manifest", *SOURCE_LAYOUTS):
                    continue  # how the files were listed, not which benchmark they come from
                for group in sorted({str(item.group) for item in dataset.extraction_items()}):
                    if found_datasets.setdefault(group, dataset.layout) != dataset.layout:
                        raise InputError(f"group {group!r} is read both as {found_datasets[group]} and as "
                                         f"{dataset.layout} ({dataset.root}); one name for two datasets' "
                                         f"generators would mix them: extract them into separate stores")
        ignored = summary.ignored_files
    params: dict[str, Any] = {}
    if per_class is not None:
        params = {"method": "per_class", "per_class": per_class, "seed": seed}
    elif max_per_class is not None:
        params = {"method": "max_per_class", "max_per_class": max_per_class, "seed": seed}
    if limit is not None:
        items = items[:limit]
    if params:
        params["layout"] = layout
        params["inputs"] = [text if is_uri(text) or is_hub_id(text) else str(Path(text).absolute())
                            for text in map(normalize_input, inputs)]
    return Selection(items, dict(found_pairing), params, ignored, datasets=dict(found_datasets))
