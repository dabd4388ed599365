"""How many images of each class carry generator metadata: a dataset leak check.

A benchmark whose fake images still carry their generator's text chunks or watermark (and whose
real ones carry camera EXIF) lets anything that reads the files tell the classes apart without
looking at the image, like the JPEG-vs-PNG bias; a detector that reads pixels can still learn an
invisible watermark. :func:`count_generator_metadata` counts, :func:`metadata_warnings` flags.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from tidy_detect.errors import ConfigError
from tidy_detect.provenance.options import ProvenanceOptions

LEAK_SHARE = 0.05  # a class with at least this share carrying metadata ...
LEAK_RATIO = 2.0  # ... and at least this many times the other class's share gets a warning
_CLASS = {0: "real", 1: "fake", None: "unlabelled"}


def _empty() -> dict[str, Any]:
    return {"checked": 0, "unreadable": 0, "with_metadata": 0, "declares_ai": 0, "declares_not_ai": 0,
            "sources": {}, "generators": {}}


def _item_fields(item: Any) -> tuple[str, int | None, str | None]:
    if isinstance(item, (str, Path)):
        return str(item), None, None
    path = getattr(item, "path", None)
    if path is None:
        raise ConfigError(f"count_generator_metadata takes paths or items with a .path (ImageItem), got {item!r}")
    return str(path), getattr(item, "label", None), getattr(item, "group", None)


def _read(path: str, options: ProvenanceOptions) -> dict[str, Any]:
    from tidy_detect.data import sources
    from tidy_detect.provenance.reader import not_read, read_provenance

    if sources.is_identity(path):  # an archive member or a table row
        try:
            data, _ = sources.read_item(path, max_bytes=options.limits.max_file_bytes)
        except Exception as exc:
            record = not_read("the item cannot be read")
            record["error"] = str(exc)[:300]
            return record
        return read_provenance(data, options)
    return read_provenance(path, options)


def count_generator_metadata(items: Iterable[Any], options: ProvenanceOptions | None = None,
                             workers: int = 2) -> dict[str, Any]:
    """Count, per group and class, the images whose files declare how they were made.

    Args:
        items: paths, or :class:`~tidy_detect.data.inputs.ImageItem` (label 0 real / 1 fake /
            None, and group) such as a dataset's ``items``; archive members and table rows are
            read through their source.
        options: which checks run (default: metadata only, no watermark: the watermark decodes
            every image's pixels).
        workers: threads reading files.

    Returns:
        ``{"groups": {group: {"real" | "fake" | "unlabelled": {"checked", "unreadable",
        "with_metadata", "declares_ai", "declares_not_ai", "sources": {source: n},
        "generators": {name: n}}}}, "warnings": [{"group", "message"}]}``. ``with_metadata``
        counts images with any finding; items without a group count under ``"(none)"``.

    Raises:
        ConfigError: ``workers`` < 1, or an item that is neither a path nor has a ``path``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    options = options or ProvenanceOptions(mode="metadata")
    fields = [_item_fields(item) for item in items]
    groups: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tidy-provenance-count") as pool:
        records = pool.map(lambda f: _read(f[0], options), fields)
        for (_, label, group), record in zip(fields, records):
            counts = groups[str(group) if group is not None else "(none)"].setdefault(_CLASS.get(label, "unlabelled"),
                                                                                    _empty())
            counts["checked"] += 1
            if not record.get("checked"):
                counts["unreadable"] += 1
                continue
            findings = record.get("findings") or []
            if findings:
                counts["with_metadata"] += 1
            if record.get("declares_ai") is True:
                counts["declares_ai"] += 1
            elif record.get("declares_ai") is False:
                counts["declares_not_ai"] += 1
            for source in dict.fromkeys(f["source"] for f in findings):
                counts["sources"][source] = counts["sources"].get(source, 0) + 1
            for generator in dict.fromkeys(f["generator"] for f in findings if f.get("generator")):
                counts["generators"][generator] = counts["generators"].get(generator, 0) + 1
    result = {"groups": {g: groups[g] for g in sorted(groups)}}
    result["warnings"] = metadata_warnings(result["groups"])
    return result


def metadata_warnings(groups: dict[str, dict[str, dict[str, Any]]], share: float = LEAK_SHARE,
                      ratio: float = LEAK_RATIO) -> list[dict[str, str]]:
    """Warnings for groups where one class carries metadata far more often than the other.

    A group is flagged when one class's share of images with metadata is at least ``share`` and
    at least ``ratio`` times the other class's (both classes must have been checked).
    """
    warnings = []
    for group, classes in groups.items():
        real, fake = classes.get("real"), classes.get("fake")
        if not real or not fake or not real["checked"] or not fake["checked"]:
            continue
        r, f = real["with_metadata"] / real["checked"], fake["with_metadata"] / fake["checked"]
        high, low, more, fewer = (f, r, "fake", "real") if f >= r else (r, f, "real", "fake")
        if high >= share and high >= ratio * low:
            warnings.append({"group": group, "message": (
                f"group {group!r}: {high:.0%} of the {more} images carry provenance metadata but {low:.0%} of the "
                f"{fewer} ones; anything that reads the files can tell the classes apart by it, without looking "
                f"at the image (strip the metadata, or re-encode both classes alike)")})
    return warnings
