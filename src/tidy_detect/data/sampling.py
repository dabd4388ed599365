"""The sampling protocol: which images of a dataset are evaluated or trained on, and the record of it.

Evaluation (UniFD/CNNDetection protocol): at most N images per class (real, fake) per group,
drawn by shuffling with a seed (default 0). Training subsets: a fixed number per class spread
evenly over the strata of the training set (the LSUN classes of CNNDetection's ProGAN set; the
paper uses 40k real + 40k fake).

Each cell is sorted by path and then shuffled by a generator seeded afresh, so a sample depends
only on the cell's files and the seed: not on the order the file system lists folders in, nor on
what other groups hold. A real folder shared by several generators (UniFD's laion) therefore
yields the same reals for each of them, and a smaller N gives a prefix of a larger N's sample.

The exact list is saved as a CSV manifest (``save_list``) that ``--layout manifest`` or
:func:`tidy_detect.data.inputs.read_manifest` read back, with the parameters in a JSON beside it.
"""

from __future__ import annotations

import array
import collections
import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from tidy_detect.data.inputs import ImageItem, read_manifest
from tidy_detect.errors import ConfigError, InputError

LIST_COLUMNS = ("path", "label", "group", "caption", "subgroup")
DEFAULT_MAX_PER_CLASS = 1000  # per class per group in evaluation (UniFD, CNNDetection)
DEFAULT_SEED = 0


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


def _cell_key(item: ImageItem) -> tuple[str, int]:
    return (str(item.group) if item.group is not None else "", -1 if item.label is None else item.label)


def _item_key(item: ImageItem) -> tuple[str, str, str]:
    return (item.path, item.subgroup or "", item.caption or "")


def _shuffled(items: list[ImageItem], seed: int) -> list[ImageItem]:
    cell = sorted(items, key=_item_key)
    random.Random(seed).shuffle(cell)
    return cell


def sample_per_class(items: Iterable[ImageItem], max_per_class: int | None,
                     seed: int = DEFAULT_SEED) -> list[ImageItem]:
    """At most ``max_per_class`` items of every (group, label), chosen by a seeded shuffle.

    Args:
        items: the dataset's items (any order; unlabelled items form a class of their own).
        max_per_class: the cap per (group, label); None keeps every item.
        seed: seeds ``random.Random``, created afresh for each (group, label).

    Returns:
        The sample, cells in (group, label) order, each in its shuffled order.

    Raises:
        ConfigError: ``max_per_class`` is not an integer >= 1 (or None), or ``seed`` not an integer.
    """
    if max_per_class is not None:
        _check_count("max_per_class", max_per_class)
    _check_seed(seed)
    cells: dict[tuple[str, int], list[ImageItem]] = collections.defaultdict(list)
    for item in items:
        cells[_cell_key(item)].append(item)
    sample: list[ImageItem] = []
    for key in sorted(cells):
        sample.extend(_shuffled(cells[key], seed)[:max_per_class])
    return sample


def stratum_quotas(sizes: Mapping[Any, int], total: int) -> dict[Any, int]:
    """Split ``total`` as evenly as the strata allow; a stratum too small gives its share to the rest.

    The remainder of an uneven split goes to the first strata in sorted order, so the quotas are
    deterministic. Requires ``total <= sum(sizes.values())``.
    """
    quotas: dict[Any, int] = {}
    left = total
    open_ = sorted(sizes)
    while open_:
        share, extra = divmod(left, len(open_))
        small = [s for s in open_ if sizes[s] <= share]
        if not small:
            for i, stratum in enumerate(open_):
                quotas[stratum] = share + (1 if i < extra else 0)
            break
        for stratum in small:
            quotas[stratum] = sizes[stratum]
            left -= sizes[stratum]
        open_ = [s for s in open_ if s not in small]
    return quotas


def _check_available(label: int, available: int, per_class: int) -> None:
    if available < per_class:  # the protocol is never silently changed
        name = "real" if label == 0 else "fake"
        raise InputError(f"--per-label {per_class} asks for {per_class} {name} images, but the dataset has "
                         f"{available}; lower --per-label")


def stratified_per_class(items: Iterable[ImageItem], per_class: int, seed: int = DEFAULT_SEED) -> list[ImageItem]:
    """Exactly ``per_class`` real and ``per_class`` fake items, spread evenly over the strata.

    A stratum is a (group, subgroup) pair: for CNNDetection's training split, the LSUN class
    (``per_class=40000`` over 20 classes takes 2000 real and 2000 fake images of each class).
    Within a stratum, items are chosen as in :func:`sample_per_class`.

    Args:
        items: labelled items (``label`` 0 or 1).
        per_class: images per label over all strata.
        seed: seeds ``random.Random``, created afresh for each (stratum, label).

    Returns:
        The sample, in (group, label, subgroup) order, each stratum in its shuffled order.

    Raises:
        ConfigError: ``per_class`` not an integer >= 1, or ``seed`` not an integer.
        InputError: an unlabelled item, or fewer images of a label than ``per_class`` (the
            protocol is never silently changed).
    """
    _check_count("per_class", per_class)
    _check_seed(seed)
    strata: dict[int, dict[tuple[str, str], list[ImageItem]]] = {0: collections.defaultdict(list),
                                                                 1: collections.defaultdict(list)}
    for item in items:
        if item.label not in (0, 1):
            raise InputError(f"{item.path}: stratified sampling needs labelled images (0_real/1_fake), "
                             f"got label {item.label!r}")
        strata[item.label][(str(item.group or ""), item.subgroup or "")].append(item)
    chosen: list[tuple[tuple[str, int, str], list[ImageItem]]] = []
    for label, by_stratum in strata.items():
        _check_available(label, sum(len(v) for v in by_stratum.values()), per_class)
        quotas = stratum_quotas({k: len(v) for k, v in by_stratum.items()}, per_class)
        for (group, subgroup), members in by_stratum.items():
            chosen.append(((group, label, subgroup), _shuffled(members, seed)[:quotas[(group, subgroup)]]))
    return [item for _, part in sorted(chosen, key=lambda kv: kv[0]) for item in part]


def pairing_users(pairing: Mapping[str, str]) -> dict[str, list[str]]:
    """Real folder -> the groups whose reals it holds (sorted), for folders other groups pair
    with; a folder that also pairs with itself keeps its own reals (it is among its users)."""
    users: dict[str, list[str]] = collections.defaultdict(list)
    for group, source in sorted(pairing.items()):
        if source != group:
            users[source].append(group)
    for source, groups in users.items():
        if pairing.get(source) == source:
            groups.append(source)
            groups.sort()
    return dict(users)


def shuffle_prefix(n: int, count: int | None, seed: int) -> list[int]:
    """The first ``count`` positions (all with None) that :func:`_shuffled` puts first in a cell of
    ``n`` items: ``random.Random(seed).shuffle`` of ``range(n)``, which depends only on ``n`` and
    the seed, done on a packed array (8 bytes a position, freed on return)."""
    order = array.array("q", range(n))
    random.Random(seed).shuffle(order)
    return order[:count].tolist() if count is not None else order.tolist()


class _Cells:
    """Ranks of items within cells, for samplers that read a listing twice: the first pass counts
    each cell and checks that its items come in sorted order (:func:`_item_key`), so that an
    item's rank in the listing is its rank in the sorted cell; the second pass meets each item
    at the same rank again. One key and one count per cell are held."""

    def __init__(self) -> None:
        self.sizes: collections.Counter[Any] = collections.Counter()
        self.last: dict[Any, tuple[str, str, str]] = {}
        self.sorted = True

    def count(self, cell: Any, item: ImageItem) -> None:
        key = _item_key(item)
        if cell in self.last and not self.last[cell] < key:
            self.sorted = False  # e.g. "a-b/x.png" walked after "a/y.png": ranks would differ
        self.last[cell] = key
        self.sizes[cell] += 1


def sample_listing(listing: Callable[[], Iterable[tuple[Any, ImageItem]]], pairing: Mapping[str, str], *,
                   max_per_class: int | None = None, per_class: int | None = None, seed: int = DEFAULT_SEED,
                   unique_paths: bool = True) -> list[ImageItem]:
    """The sampling protocol over a listing read again for each pass, holding only the sample.

    ``listing()`` yields ``(order, item)`` anew each call, with the same items in the same order
    each time (a directory walk, a table): ``order`` sorts the evaluation sample the way the whole
    list would have been (its position, or the dataset's (group, label, path) order). The result
    equals what the list functions give over the whole list: with ``max_per_class``,
    ``[it for it in items if it.path in chosen]`` for the paths :func:`sample_per_class` chooses
    from ``expand_pairing(items, pairing)``; with ``per_class``, :func:`stratified_per_class`.

    Two passes (three when ``unique_paths`` is False: a path listed under two groups is kept
    under both when either is chosen): count each cell, then take the items at the ranks the
    seeded shuffle puts first. That needs each cell's items to come in sorted order; when one
    does not (a folder named like another plus a suffix, ``car`` and ``car-2``), the listing is
    read into a list once and sampled as a list.

    Raises:
        ConfigError, InputError: as :func:`sample_per_class` and :func:`stratified_per_class`.
    """
    if per_class is not None:
        _check_count("per_class", per_class)
    elif max_per_class is not None:
        _check_count("max_per_class", max_per_class)
    _check_seed(seed)
    users = pairing_users(pairing)

    def cells_of(item: ImageItem) -> list[Any]:
        if per_class is not None:
            if item.label not in (0, 1):
                raise InputError(f"{item.path}: stratified sampling needs labelled images (0_real/1_fake), "
                                 f"got label {item.label!r}")
            return [(item.label, (str(item.group or ""), item.subgroup or ""))]
        if item.label == 0 and str(item.group) in users:
            return [(group, 0) for group in users[str(item.group)]]
        return [_cell_key(item)]

    cells = _Cells()
    for _, item in listing():
        for cell in cells_of(item):
            cells.count(cell, item)
    if not cells.sorted:
        listed = list(listing())
        items = [item for _, item in listed]
        if per_class is not None:
            return stratified_per_class(items, per_class, seed)
        by_cell: dict[Any, list[ImageItem]] = collections.defaultdict(list)
        for item in items:  # the cells of expand_pairing(items, pairing), whose copies keep each item's key
            for cell in cells_of(item):
                by_cell[cell].append(item)
        paths = {it.path for cell in by_cell.values() for it in _shuffled(cell, seed)[:max_per_class]}
        return [it for _, it in sorted(((o, it) for o, it in listed if it.path in paths), key=_first)]
    if per_class is not None:
        picks = _stratified_picks(cells.sizes, per_class, seed)
    else:
        picks = {cell: dict.fromkeys(shuffle_prefix(n, max_per_class, seed)) for cell, n in cells.sizes.items()}
    ranks: collections.Counter[Any] = collections.Counter()
    chosen: list[tuple[Any, ImageItem]] = []
    for order, item in listing():
        hit = None
        for cell in cells_of(item):
            rank = ranks[cell]
            ranks[cell] += 1
            if rank in picks[cell]:
                hit = (cell, picks[cell].get(rank)) if hit is None else hit
        if hit is not None:
            chosen.append((order, item) if per_class is None else ((*_stratum_order(hit[0]), hit[1]), item))
    if per_class is None and not unique_paths:
        paths = {item.path for _, item in chosen}
        chosen = [(order, item) for order, item in listing() if item.path in paths]
    return [item for _, item in sorted(chosen, key=_first)]


def _first(pair: tuple[Any, ImageItem]) -> Any:
    return pair[0]


def _stratum_order(cell: tuple[int, tuple[str, str]]) -> tuple[str, int, str]:
    label, (group, subgroup) = cell
    return (group, label, subgroup)


def _stratified_picks(sizes: Mapping[Any, int], per_class: int, seed: int) -> dict[Any, dict[int, int]]:
    """(label, stratum) -> {rank in the sorted stratum: position in the sample} for
    :func:`stratified_per_class`'s quotas (its errors too)."""
    picks: dict[Any, dict[int, int]] = {}
    for label in (0, 1):
        by_stratum = {stratum: n for (lab, stratum), n in sizes.items() if lab == label}
        _check_available(label, sum(by_stratum.values()), per_class)
        for stratum, quota in stratum_quotas(by_stratum, per_class).items():
            ranks = shuffle_prefix(by_stratum[stratum], quota, seed)
            picks[(label, stratum)] = {rank: position for position, rank in enumerate(ranks)}
    return picks


def list_counts(items: Iterable[ImageItem]) -> dict[str, dict[str, int]]:
    """``{group: {"real": n, "fake": n, "unlabelled": n}}`` of a list, groups sorted."""
    names = {0: "real", 1: "fake", None: "unlabelled"}
    counts: dict[str, dict[str, int]] = {}
    for item in items:
        cell = counts.setdefault(str(item.group), {"real": 0, "fake": 0, "unlabelled": 0})
        cell[names[item.label]] += 1
    return dict(sorted(counts.items()))


def save_list(items: Iterable[ImageItem], path: str | Path, params: Mapping[str, Any] | None = None) -> Path:
    """Write the exact list as a CSV manifest, and ``<path>.json`` (same stem) with how it was made.

    The CSV has the columns ``path,label,group,caption,subgroup`` (absolute paths, labels 0/1),
    so ``read_manifest`` / ``--layout manifest`` read it back unchanged. The JSON holds
    ``params`` (e.g. ``{"method": "max_per_class", "max_per_class": 1000, "seed": 0}``), the
    counts per group and the CSV's sha256, to check that the list was not edited since.

    Returns:
        The CSV's path.

    Raises:
        InputError: the files cannot be written.
    """
    items = list(items)
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LIST_COLUMNS)
    for item in items:
        writer.writerow([item.path, "" if item.label is None else item.label, item.group or "",
                         item.caption or "", item.subgroup or ""])
    data = buffer.getvalue().encode("utf-8")
    record = {
        "list": path.name,
        "items": len(items),
        "csv_sha256": hashlib.sha256(data).hexdigest(),
        "params": dict(params or {}),
        "counts": list_counts(items),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        _write_atomic(path.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot write the image list ({exc.strerror or exc})") from exc
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    # a half-written list would silently change what "the evaluated list" means
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def load_list(path: str | Path) -> list[ImageItem]:
    """Items of a list written by :func:`save_list` (or any manifest), in file order.

    Raises:
        InputError: as :func:`tidy_detect.data.inputs.read_manifest`.
    """
    return read_manifest(Path(path))


def load_list_params(path: str | Path) -> dict[str, Any]:
    """The JSON record beside a saved list (see :func:`save_list`).

    Raises:
        InputError: the record is missing or not JSON.
    """
    record = Path(path).with_suffix(".json")
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{record}: cannot read the list's record ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{record}: the list's record is not valid JSON ({exc})") from exc


__all__ = [
    "DEFAULT_MAX_PER_CLASS",
    "DEFAULT_SEED",
    "LIST_COLUMNS",
    "list_counts",
    "load_list",
    "load_list_params",
    "pairing_users",
    "sample_listing",
    "sample_per_class",
    "save_list",
    "shuffle_prefix",
    "stratified_per_class",
    "stratum_quotas",
]
