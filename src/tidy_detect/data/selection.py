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


@dataclass
class Selection:
    items: list[ImageItem] | ItemStream  # each file once, grouped as on disk (shared reals under their own folder)
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
        stream: when the INPUTs are read generically and not sampled, ``items`` is an
            :class:`ItemStream` (listed as it is iterated, and once here to check it) instead of
            a list; layouts and sampling need the whole list, so they always give one.

    Raises:
        ConfigError: both sampling options, or dataset options without a layout.
        InputError, UnknownNameError: as the layout readers.
    """
    from tidy_detect.data.inputs import normalize_input
    from tidy_detect.data.layouts import (SOURCE_LAYOUTS, datasets_for_inputs, expand_pairing, items_for_datasets,
                                          items_for_inputs)
    from tidy_detect.data.hub import is_hub_id
    from tidy_detect.data.remote import is_uri
    from tidy_detect.data.sampling import sample_per_class, stratified_per_class

    inputs = list(inputs)
    if max_per_class is not None and per_class is not None:
        raise ConfigError("give either --max-per-class (evaluation sampling) or --per-class (training subsets), not both")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    if stream and layout is None and max_per_class is None and per_class is None:
        if exclude or pairing:
            raise ConfigError("exclude and pairing need a dataset layout (--layout auto or a name)")
        stream = ItemStream(inputs, source_options, split, limit)
        stream.check()  # what cannot be listed is refused now, before a caller loads models or makes a store
        return Selection(stream, ignored_files=stream.summary.ignored_files)
    summary = InputSummary()
    found_pairing: dict[str, str] = {}
    found_datasets: dict[str, str] = {}
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
    params: dict[str, Any] = {}
    if per_class is not None:
        items = stratified_per_class(items, per_class, seed=seed)
        params = {"method": "per_class", "per_class": per_class, "seed": seed}
    elif max_per_class is not None:
        chosen = {it.path for it in sample_per_class(expand_pairing(items, found_pairing), max_per_class, seed=seed)}
        items = [it for it in items if it.path in chosen]
        params = {"method": "max_per_class", "max_per_class": max_per_class, "seed": seed}
    if limit is not None:
        items = items[:limit]
    if params:
        params["layout"] = layout
        params["inputs"] = [text if is_uri(text) or is_hub_id(text) else str(Path(text).absolute())
                            for text in map(normalize_input, inputs)]
    return Selection(items, found_pairing, params, summary.ignored_files, datasets=found_datasets)
