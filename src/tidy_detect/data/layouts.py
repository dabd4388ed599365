"""Benchmark datasets on disk -> labelled image lists.

Each on-disk layout of a benchmark is one registered reader (``LAYOUTS``); ``read_dataset`` turns
a root folder into a :class:`Dataset` whose items carry ``label`` (0 real, 1 fake) and ``group``
(the generator). The layouts, as published:

``cnndetection`` (Wang et al. 2020, ForenSynths)
    training/validation: ``[train|val/]<class>/{0_real,1_fake}/*`` with the 20 LSUN classes
    (``progan_train``); every image is group ``progan`` with ``subgroup`` = the class.
    test (``CNN_synth_testset``): ``[test/]<generator>/{0_real,1_fake}/*`` or
    ``<generator>/<class>/{0_real,1_fake}/*`` (progan, stylegan, stylegan2, cyclegan have class
    folders); group = generator, subgroup = class (or None).
``unifd`` (Ojha et al. 2023, ``diffusion_datasets``)
    one folder per generator holding fakes (in ``1_fake`` or directly), and real folders shared
    between generators (``imagenet``, ``laion``, reals in ``0_real`` or directly). The pairing
    fake folder -> real folder defaults to ``UNIFD_PAIRING`` (guided <-> imagenet, the others
    <-> laion) and can be changed; a folder outside the pairing that has its own ``0_real`` pairs
    with itself.
``diffusionforensics`` (DIRE, Wang et al. 2023)
    ``[images/]<split>/<source>/<generator>/*`` against ``<split>/<source>/real/*``; group =
    ``<source>/<generator>`` (e.g. ``lsun_bedroom/adm``). ``recons/`` and ``dire/`` hold DIRE's
    derived maps, not images to detect, and are not read.
``genimage`` (Zhu et al. 2023)
    ``<generator>/[<sub>/]{train,val}/{ai,nature}/*`` (e.g.
    ``stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/val/ai``); group = generator. Known corrupted
    files are skipped with exclude lists.
``generic``
    any tree with ``0_real``/``1_fake`` folders; group = the first folder under the root that is
    not a label folder (the root's name when label folders sit right under it), subgroup = the
    folders between the group and the label folder.
``manifest``
    a CSV file with ``path`` and optional ``label``, ``group``, ``caption``, ``subgroup`` columns
    (what :func:`tidy_detect.data.sampling.save_list` writes); kept in file order.

Shared reals (UniFD, DiffusionForensics) are listed in ``Dataset.items`` once per generator they
pair with, so that each group holds both classes and evaluation or sampling per group needs no
pairing table; ``Dataset.shared_paths`` names the files listed more than once. A feature store
keeps one row per (content, path), so extraction must list each file once:
``Dataset.extraction_items`` does, with a shared real under the name of its real folder
(``laion``, ``lsun_bedroom/real``), and :func:`expand_pairing` turns such a list (or a store's
rows) back into one item per (image, generator) given ``Dataset.pairing``.

In walked trees a file is an image by its suffix, case-insensitively (``a.v2.final.PNG`` is one);
hidden files and folders are skipped; items are sorted by (group, label, path), so the list does
not depend on the order the file system lists folders in. :func:`open_dataset` gives the same
dataset unlisted: its extraction view is walked as it is iterated (folders and files sorted by
name), which is how a streamed extraction and the sampling protocol read a million-image tree
without holding it.

**Where the tree is.** Every layout reads a local folder, a zip or tar archive (``bench.zip``,
``GenImage.tar.gz``: the members' paths are the tree, and each image's path is its identity
``ARCHIVE!/MEMBER``), or a folder behind a URI (``s3://bucket/CNNDetection``), exactly the same way
(see :mod:`tidy_detect.data.trees`): the same labels, groups, subgroups, pairing and splits.

**Sources without a tree layout.** ``--layout auto`` also takes the inputs whose labels are
written in them rather than in folder names: a Parquet or Arrow file, a ``datasets`` folder or a hub
dataset (layout ``columns``: label, group and caption columns, see :class:`SourceOptions`), and a
zip or tar whose members match no layout but carry WebDataset sidecars (layout ``webdataset``).
Naming a tree layout for them is an error.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from tidy_detect.data import hub, remote, sources, trees
from tidy_detect.data.inputs import LABEL_FOLDERS, ImageItem, InputSummary, collect_inputs, expand_inputs, \
    input_kind, items_from_source, iter_manifest, iter_table_set, normalize_input
from tidy_detect.data.sampling import list_counts, pairing_users
from tidy_detect.data.sources import SourceOptions
from tidy_detect.data.trees import Folder, WalkCounts, subfolders  # noqa: F401  (subfolders: part of this API)
from tidy_detect.errors import ConfigError, InputError, UnknownNameError
from tidy_detect.features.spill import KeySet
from tidy_detect.images import is_image_path

CNNDETECTION_CLASSES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
CNNDETECTION_GENERATORS = (
    "progan", "stylegan", "stylegan2", "biggan", "cyclegan", "stargan", "gaugan", "deepfake",
    "whichfaceisreal", "crn", "imle", "san", "seeingdark",
)
CNNDETECTION_TRAIN_GENERATOR = "progan"  # the training set holds ProGAN fakes only
UNIFD_PAIRING: Mapping[str, str] = {
    "guided": "imagenet",
    "ldm_200": "laion", "ldm_200_cfg": "laion", "ldm_100": "laion",
    "glide_100_27": "laion", "glide_50_27": "laion", "glide_100_10": "laion",
    "dalle": "laion",
}
SPLITS = ("train", "val", "test")
GENIMAGE_SPLITS = ("train", "val")
GENIMAGE_LABELS = {"nature": 0, "ai": 1}
DF_REAL = "real"
DF_IMAGES = "images"

# Reasons counted in Dataset.skipped.
NOT_AN_IMAGE = "not an image"
EXCLUDED = "excluded"
NO_LABEL_FOLDER = "outside a 0_real/1_fake folder"
REALS_IN_FAKE_FOLDER = "in 0_real of a fake folder paired with another real folder"
FAKES_IN_REAL_FOLDER = "in 1_fake of a shared real folder"
REACHED_AGAIN = "folders or files reached again through links"
# Pseudo-layouts: how inputs that carry their own labels were read (not registered tree readers).
COLUMNS = "columns"
WEBDATASET = "webdataset"
SOURCE_LAYOUTS = (COLUMNS, WEBDATASET)


# ---------------------------------------------------------------------------------------------
# The result

@dataclass(frozen=True)
class Dataset:
    """A labelled image list read from one benchmark folder.

    ``items`` hold one entry per (image, group): a real image shared by several generators
    (UniFD, DiffusionForensics) is listed once under each of them. ``pairing`` says, for each
    group, where its reals come from (a folder relative to the folder read; the group itself when
    it has its own). ``skipped`` counts files not listed, by reason; ``notes`` are remarks a user
    should see (an unused real folder, a generator without the chosen split).

    ``items == sorted(expand_pairing(extraction_items(), pairing))`` (by group, label, path).
    """

    name: str
    layout: str
    root: str
    items: tuple[ImageItem, ...]
    split: str | None = None
    pairing: Mapping[str, str] = field(default_factory=dict)
    skipped: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    container: str = "folder"  # folder, zip, tar, tar.gz, parquet, arrow, datasets folder, ... (on s3, ...)

    def __len__(self) -> int:
        return len(self.items)

    def groups(self) -> list[str]:
        """The group names, sorted."""
        return sorted({str(item.group) for item in self.items})

    def counts(self) -> dict[str, dict[str, int]]:
        """``{group: {"real": n, "fake": n, "unlabelled": n}}``, groups sorted."""
        return list_counts(self.items)

    def shared_paths(self) -> dict[str, list[str]]:
        """Files listed under more than one group: path -> the groups, in item order."""
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for item in self.items:
            groups[item.path].append(str(item.group))
        return {path: found for path, found in groups.items() if len(found) > 1}

    def unique_paths(self) -> list[str]:
        """Every listed file once, in item order (what extraction has to decode)."""
        return list(dict.fromkeys(item.path for item in self.items))

    def extraction_items(self) -> list[ImageItem]:
        """Every file once, for a feature store, in item order: a real that a group takes from
        another folder is listed under that folder's name (``pairing[group]``, e.g. ``laion``).

        The store keys rows by (content, path), so listing a file under two groups would keep
        only the first; :func:`expand_pairing` restores the per-generator view.
        """
        items, seen = [], set()
        for item in self.items:
            source = self.pairing.get(str(item.group), item.group)
            if item.label == 0 and source != item.group:
                item = ImageItem(item.path, 0, source, item.caption, item.subgroup)
            if (item.path, item.group) not in seen:
                seen.add((item.path, item.group))
                items.append(item)
        return items


# ---------------------------------------------------------------------------------------------
# Walking folders

class ExcludeList:
    """Files to skip: entries are file names (``x.png``) or relative paths (``val/ai/x.png``).

    A relative path matches when it equals the end of a file's path relative to the dataset root
    at a folder boundary, so a list made relative to one generator folder works from the root too.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.names: set[str] = set()
        self.paths: set[str] = set()
        for raw in entries:
            entry = raw.strip().replace("\\", "/")
            while entry.startswith("./"):
                entry = entry[2:]
            if not entry or entry.startswith("#"):
                continue
            if "/" in entry.strip("/"):
                self.paths.add(entry if entry.startswith("/") else entry.strip("/"))
            else:
                self.names.add(entry.strip("/"))

    @classmethod
    def from_files(cls, files: Iterable[str | Path] | None) -> "ExcludeList":
        """Read exclude-list text files: one entry per line, ``#`` comments and blank lines ignored.

        Raises:
            InputError: a file cannot be read.
        """
        entries: list[str] = []
        for file in files or ():
            path = Path(file).expanduser()
            try:
                entries.extend(path.read_text(encoding="utf-8-sig").splitlines())
            except OSError as exc:
                raise InputError(f"{path}: cannot read the exclude list ({exc.strerror or exc})") from exc
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: the exclude list is not UTF-8 text ({exc.reason})") from exc
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self.names or self.paths)

    def matches(self, path: str, relative: str) -> bool:
        """Whether the file at absolute ``path`` (``relative`` to the dataset root) is excluded."""
        if os.path.basename(path) in self.names or path in self.paths:
            return True
        if not self.paths:
            return False
        parts = relative.split("/")
        return any("/".join(parts[i:]) in self.paths for i in range(len(parts)))


class Walker:
    """Lists the images under folders of one dataset and counts what it skips."""

    def __init__(self, root: Folder, exclude: ExcludeList | None = None) -> None:
        self.root = root.absolute()
        self.exclude = exclude or ExcludeList()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.notes: list[str] = []

    def images(self, folder: Folder) -> Iterator[tuple[str, tuple[str, ...]]]:
        """``(path, folders between folder and the file)`` of every image, sorted; ``path`` is an
        absolute path, an archive identity or a URI (see :mod:`tidy_detect.data.trees`)."""
        counts = WalkCounts()
        for path, parts, name in trees.walk_files(folder.absolute(), counts):
            if not is_image_path(Path(name)):
                self.skipped[NOT_AN_IMAGE] += 1
                continue
            if self.exclude and self.exclude.matches(path, trees.relative_to(path, self.root)):
                self.skipped[EXCLUDED] += 1
                continue
            yield path, parts
        if counts.repeated:
            self.skipped[REACHED_AGAIN] += counts.repeated


def _posix_relative(path: str, root: Folder) -> str:
    return trees.relative_to(path, root)


def _label_position(parts: Sequence[str]) -> tuple[int | None, int]:
    """(label of the nearest label folder, index of the first label folder); (None, -1) if none."""
    label, first = None, -1
    for i, part in enumerate(parts):
        if part in LABEL_FOLDERS:
            label = LABEL_FOLDERS[part]
            first = i if first < 0 else first
    return label, first


def _choose_split(base: Folder, split: str | None, splits: Sequence[str]) -> tuple[Folder, str | None]:
    """The folder of the requested split under ``base`` (or ``base`` when it holds no splits)."""
    present = [s for s in splits if (base / s).is_dir()]
    if split is not None:
        if split in present:
            return base / split, split
        if base.name == split:  # the split folder itself was given
            return base, split
        found = ", ".join(present) or f"none of {', '.join(splits)}"
        raise InputError(f"{base}: no split folder {split!r}; found: {found}")
    if len(present) == 1:
        return base / present[0], present[0]
    if len(present) > 1:
        raise InputError(f"{base}: holds the splits {', '.join(present)}; choose one with --split")
    return base, None


# ---------------------------------------------------------------------------------------------
# Registry

@dataclass
class Found:
    """What a reader returns to ``read_dataset``: its checks done, its files not listed yet.

    ``items`` yields the extraction view (see :meth:`Dataset.extraction_items`) as the tree is
    walked: every file once, a shared real under its real folder's name, in walk order. The
    walker's counts are complete when it is exhausted. ``pairing`` None means each group pairs
    with itself (its groups are known only once walked).
    """

    items: Iterable[ImageItem]
    pairing: dict[str, str] | None
    split: str | None = None
    keep_order: bool = False  # manifests keep the user's order


Reader = Callable[..., Found]


@dataclass(frozen=True)
class Layout:
    """A registered reader: how to recognise its layout and how to read it."""

    name: str
    reader: Reader
    looks_like: Callable[[Folder], bool]
    expects: str  # the tree it reads, for messages and `datasets layouts`
    options: frozenset[str] = frozenset()  # which of "split", "pairing" it takes
    is_file: bool = False


LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, *, looks_like: Callable[[Folder], bool], expects: str,
                    options: Iterable[str] = (), is_file: bool = False) -> Callable[[Reader], Reader]:
    """Function decorator registering a reader ``reader(root, *, split, pairing, walker) -> Found``.

    Auto-detection tries the layouts in registration order, so more specific layouts come first.
    """

    def decorate(reader: Reader) -> Reader:
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is already registered")
        LAYOUTS[name] = Layout(name, reader, looks_like, expects, frozenset(options), is_file)
        return reader

    return decorate


def layout_names() -> list[str]:
    """Registered layout names, in auto-detection order."""
    return list(LAYOUTS)


def get_layout(name: str) -> Layout:
    """The registered layout ``name``.

    Raises:
        UnknownNameError: not registered; the message lists the known names.
    """
    try:
        return LAYOUTS[name]
    except KeyError:
        raise UnknownNameError(f"Unknown layout {name!r}. Known: {', '.join(['auto', *LAYOUTS])}.") from None


# ---------------------------------------------------------------------------------------------
# Readers, in auto-detection order

def _looks_like_manifest(root: Folder) -> bool:
    return isinstance(root, Path) and root.is_file() and root.suffix.lower() == ".csv"


@register_layout("manifest", looks_like=_looks_like_manifest, is_file=True,
                 expects="a CSV file with columns path[,label,group,caption,subgroup]")
def read_manifest_layout(root: Folder, *, split: str | None, pairing: Mapping[str, str] | None,
                         walker: Walker) -> Found:
    def kept() -> Iterator[ImageItem]:
        for item in iter_manifest(root):  # row by row: a manifest of ten million lines is never held
            if walker.exclude and walker.exclude.matches(item.path, _posix_relative(item.path, walker.root)):
                walker.skipped[EXCLUDED] += 1
            else:
                yield item

    # each (path, group) once, at some 16 bytes a row
    rows = KeySet().firsts(kept(), key=lambda item: f"{item.path}\0{item.group}")
    return Found((item for item, new in rows if new), None, keep_order=True)


def _genimage_splits(folder: Folder) -> list[str]:
    return [s for s in GENIMAGE_SPLITS
            if any((folder / s / label).is_dir() for label in GENIMAGE_LABELS)]


def _genimage_bases(root: Folder) -> list[tuple[str, Folder]]:
    """(generator, folder holding train/val) pairs: ``root`` itself, ``<gen>`` or ``<gen>/<sub>``."""
    if _genimage_splits(root):
        return [(root.absolute().name, root)]
    bases = []
    for gen in subfolders(root):
        if gen in LABEL_FOLDERS:
            continue
        if _genimage_splits(root / gen):
            bases.append((gen, root / gen))
            continue
        bases.extend((gen, root / gen / sub) for sub in subfolders(root / gen) if _genimage_splits(root / gen / sub))
    return bases


@register_layout("genimage", looks_like=lambda root: root.is_dir() and bool(_genimage_bases(root)),
                 options=("split",),
                 expects="<generator>/[<sub>/]{train,val}/{ai,nature}/* (GenImage)")
def read_genimage(root: Folder, *, split: str | None, pairing: Mapping[str, str] | None,
                  walker: Walker) -> Found:
    bases = _genimage_bases(root)
    if not bases:
        raise InputError(f"{root}: no GenImage folders <generator>/[<sub>/]{{train,val}}/{{ai,nature}} found")
    present = sorted({s for _, base in bases for s in _genimage_splits(base)}, key=GENIMAGE_SPLITS.index)
    if split is None:
        if len(present) > 1:
            raise InputError(f"{root}: holds the splits {', '.join(present)}; choose one with --split")
        split = present[0]
    elif split not in present:
        raise InputError(f"{root}: no GenImage split {split!r}; found: {', '.join(present)}")
    folders = []
    for group, base in bases:
        if split not in _genimage_splits(base):
            walker.notes.append(f"{group}: no {split}/ai or {split}/nature folder under {base}; not listed")
            continue
        folders.extend((group, base / split / folder, label) for folder, label in GENIMAGE_LABELS.items()
                       if (base / split / folder).is_dir())
    items = (ImageItem(path, label, group) for group, folder, label in folders
             for path, _ in walker.images(folder))
    return Found(items, {g: g for g, _ in bases}, split)


def _df_sources(base: Folder) -> list[str]:
    """Source folders under a split folder: those holding ``real`` and at least one generator."""
    return [s for s in subfolders(base)
            if DF_REAL in (gens := subfolders(base / s)) and len(gens) > 1]


def _df_base(root: Folder) -> Folder:
    if (root / DF_IMAGES).is_dir() and not any((root / s).is_dir() for s in SPLITS) and not _df_sources(root):
        return root / DF_IMAGES
    return root


def _looks_like_diffusionforensics(root: Folder) -> bool:
    if not root.is_dir():
        return False
    base = _df_base(root)
    return bool(_df_sources(base)) or any(_df_sources(base / s) for s in SPLITS)


@register_layout("diffusionforensics", looks_like=_looks_like_diffusionforensics, options=("split", "pairing"),
                 expects="[images/]<split>/<source>/{real,<generator>...}/* (DiffusionForensics, DIRE)")
def read_diffusionforensics(root: Folder, *, split: str | None, pairing: Mapping[str, str] | None,
                            walker: Walker) -> Found:
    base = _df_base(root)
    if base != root:
        walker.notes.append(f"read {base} (recons/ and dire/ hold DIRE's derived maps, not images to detect)")
    base, split = _choose_split(base, split, SPLITS)
    default = {f"{source}/{gen}": f"{source}/{DF_REAL}"
               for source in subfolders(base) for gen in subfolders(base / source) if gen != DF_REAL}
    if not default:
        raise InputError(f"{base}: no <source>/<generator> folders found (expected e.g. lsun_bedroom/adm "
                         f"beside lsun_bedroom/real)")
    chosen = _merge_pairing(default, pairing, base, "DiffusionForensics generator")
    for group, real in chosen.items():
        if not (base / real).is_dir():
            raise InputError(f"DiffusionForensics: generator {group!r} pairs with the real folder {real!r}, "
                             f"which is not under {base}; pass a pairing, e.g. --pairing {group}=<source>/real")
    return Found(_paired_items(chosen, base, walker), chosen, split)


def _merge_pairing(default: Mapping[str, str], pairing: Mapping[str, str] | None, base: Folder,
                   what: str) -> dict[str, str]:
    """The default pairing with the user's entries on top; every user key must be a fake folder."""
    chosen = dict(default)
    for fake, real in (pairing or {}).items():
        if fake not in default:
            raise InputError(f"pairing names the {what} {fake!r}, which is not under {base}; "
                             f"found: {', '.join(default) or '(none)'}")
        chosen[fake] = str(real).strip("/")
    return chosen


def _paired_items(pairing: Mapping[str, str], base: Folder, walker: Walker) -> Iterator[ImageItem]:
    """Fakes of each group, and the reals of each folder paired with, each folder walked once as
    it is iterated (the extraction view: a shared real under its real folder's name).

    A fake folder holds fakes in ``1_fake`` or directly; when it pairs with itself its reals are
    in ``0_real``, otherwise a ``0_real`` in it is skipped. A shared real folder holds reals in
    ``0_real`` or directly (a ``1_fake`` in it is skipped).

    Raises:
        InputError: a group pairs with another group's fake folder (at once, before any walk).
    """
    for group, real in pairing.items():
        if real in pairing and pairing[real] != real:
            raise InputError(f"{group!r} pairs with {real!r}, which is a fake folder paired with "
                             f"{pairing[real]!r}; pair it with a real folder")
    return _walk_paired(dict(pairing), base, walker)


def _walk_paired(pairing: Mapping[str, str], base: Folder, walker: Walker) -> Iterator[ImageItem]:
    for group, real in pairing.items():
        for path, parts in walker.images(base / group):
            if _label_position(parts)[0] != 0:
                yield ImageItem(path, 1, group)
            elif real == group:
                yield ImageItem(path, 0, group)
            else:
                walker.skipped[REALS_IN_FAKE_FOLDER] += 1
    for real in sorted(set(pairing.values()) - set(pairing)):
        for path, parts in walker.images(base / real):
            if _label_position(parts)[0] == 1:
                walker.skipped[FAKES_IN_REAL_FOLDER] += 1
            else:
                yield ImageItem(path, 0, real)


def _looks_like_unifd(root: Folder) -> bool:
    folders = set(subfolders(root))
    return bool(folders & set(UNIFD_PAIRING)) and bool(folders & set(UNIFD_PAIRING.values()))


@register_layout("unifd", looks_like=_looks_like_unifd, options=("pairing",),
                 expects="<generator>/[1_fake/]* with shared <real>/[0_real/]* (UniFD diffusion_datasets: "
                         + ", ".join(f"{f}->{r}" for f, r in UNIFD_PAIRING.items()) + ")")
def read_unifd(root: Folder, *, split: str | None, pairing: Mapping[str, str] | None, walker: Walker) -> Found:
    folders = subfolders(root)
    for fake in pairing or {}:
        if fake not in folders:
            raise InputError(f"pairing names the fake folder {fake!r}, which is not under {root}; "
                             f"folders there: {', '.join(folders) or '(none)'}")
    wanted = {**UNIFD_PAIRING, **{f: str(r).strip("/") for f, r in (pairing or {}).items()}}
    real_folders = {r for f, r in wanted.items() if r != f}
    chosen: dict[str, str] = {}
    for fake in folders:
        if fake in real_folders or fake in LABEL_FOLDERS:
            continue
        real = wanted.get(fake)
        if real is None:
            if not any(True for _ in Walker(root).images(root / fake)):
                walker.notes.append(f"folder {fake!r} holds no images; not listed")
                continue
            if not (root / fake / "0_real").is_dir():
                raise InputError(f"UniFD: folder {fake!r} is not in the pairing and holds no 0_real folder, so "
                                 f"its fakes have no reals; pass a pairing, e.g. --pairing {fake}=laion "
                                 f"(pairing now: {', '.join(f'{f}->{r}' for f, r in wanted.items())})")
            real = fake
        if real != fake and real not in folders:
            raise InputError(f"UniFD: fake folder {fake!r} pairs with the real folder {real!r}, which is not "
                             f"under {root} (folders there: {', '.join(folders)}); pass a pairing, e.g. "
                             f"--pairing {fake}=<real folder>")
        chosen[fake] = real
    if not chosen:
        raise InputError(f"{root}: no UniFD fake folders found (expected some of: {', '.join(UNIFD_PAIRING)})")
    for real in sorted(real_folders & set(folders) - set(chosen.values())):
        walker.notes.append(f"real folder {real!r} pairs with no fake folder present; not listed")
    return Found(_paired_items(chosen, root, walker), chosen)


def _looks_like_cnndetection(root: Folder) -> bool:
    if not root.is_dir():
        return False
    known = set(CNNDETECTION_CLASSES) | set(CNNDETECTION_GENERATORS)
    for base in [root, *(root / s for s in SPLITS if (root / s).is_dir())]:
        for name in subfolders(base):
            if name in known and _has_label_folder(base / name, depth=2):
                return True
    return False


def _has_label_folder(folder: Folder, depth: int) -> bool:
    names = subfolders(folder)
    if any(n in LABEL_FOLDERS for n in names):
        return True
    return depth > 1 and any(_has_label_folder(folder / n, depth - 1) for n in names)


def _is_class_split(base: Folder) -> bool:
    """A training/validation split: every folder is an LSUN class (no generator folders)."""
    names = subfolders(base)
    return bool(names) and all(n in CNNDETECTION_CLASSES for n in names)


@register_layout("cnndetection", looks_like=_looks_like_cnndetection, options=("split",),
                 expects="[train|val/]<class>/{0_real,1_fake}/* or [test/]<generator>/[<class>/]{0_real,1_fake}/* "
                         "(CNNDetection / ForenSynths)")
def read_cnndetection(root: Folder, *, split: str | None, pairing: Mapping[str, str] | None,
                      walker: Walker) -> Found:
    base, split = _choose_split(root, split, SPLITS)
    class_group = CNNDETECTION_TRAIN_GENERATOR if _is_class_split(base) else None
    return Found(_label_folder_items(base, walker, class_group), None, split)


def _label_folder_items(base: Folder, walker: Walker, class_group: str | None = None) -> Iterator[ImageItem]:
    """Images in ``0_real``/``1_fake`` folders under ``base``, grouped by the folders above them.

    With ``class_group``, every image belongs to that group and the first folder is its subgroup
    (a training split of class folders); otherwise the first folder is the group and the folders
    down to the label folder are the subgroup.
    """
    fallback = base.absolute().name
    for path, parts in walker.images(base):
        label, first = _label_position(parts)
        if label is None:
            walker.skipped[NO_LABEL_FOLDER] += 1
            continue
        above = parts[:first]
        if class_group is not None:
            group, subgroup = class_group, "/".join(above) or None
        else:
            group, subgroup = (above[0] if above else fallback), "/".join(above[1:]) or None
        yield ImageItem(path, label, group, None, subgroup)


def _looks_like_generic(root: Folder) -> bool:
    return root.is_dir() and (root.name in LABEL_FOLDERS or _has_label_folder(root, depth=4))


@register_layout("generic", looks_like=_looks_like_generic,
                 expects="any tree with 0_real/1_fake folders: [<group>/[<subgroup>/...]]{0_real,1_fake}/*")
def read_generic(root: Folder, *, split: str | None, pairing: Mapping[str, str] | None, walker: Walker) -> Found:
    if root.name in LABEL_FOLDERS:  # a label folder given itself: the label is the root's name
        group, label = root.absolute().parent.name, LABEL_FOLDERS[root.name]
        return Found((ImageItem(path, label, group) for path, _ in walker.images(root)), None)
    return Found(_label_folder_items(root, walker), None)


# ---------------------------------------------------------------------------------------------
# Entry points

def detect_layout(root: str | Path | Folder) -> str:
    """The layout of ``root`` (a folder, a zip / tar archive, or a folder URI), for ``--layout auto``.

    The rules, tried in this order (the first that holds wins):

    1. ``manifest``: ``root`` is a ``.csv`` file.
    2. ``genimage``: ``root``, ``root/<gen>`` or ``root/<gen>/<sub>`` holds ``{train,val}/{ai,nature}``.
    3. ``diffusionforensics``: ``root``, ``root/<split>``, ``root/images`` or
       ``root/images/<split>`` holds a source folder with ``real`` beside another folder.
    4. ``unifd``: ``root`` holds one of the UniFD fake folders (guided, ldm_200, ...) and one of
       the real folders (imagenet, laion).
    5. ``cnndetection``: ``root`` or ``root/{train,val,test}`` holds a folder named after a
       CNNDetection generator or LSUN class with ``0_real``/``1_fake`` one or two levels below.
    6. ``generic``: a ``0_real``/``1_fake`` folder within four levels (or ``root`` is one).

    Raises:
        InputError: ``root`` does not exist, or matches no rule.
    """
    path = root if isinstance(root, trees.Node) else trees.open_tree(_root_text(root))
    for layout in LAYOUTS.values():
        if layout.looks_like(path):
            return layout.name
    raise InputError(f"{root}: cannot tell its dataset layout (no 0_real/1_fake, ai/nature or real/<generator> "
                     f"folders found); pass --layout, one of: {', '.join(LAYOUTS)}")


def _root_text(root: str | Path) -> str:
    return normalize_input(root)


@dataclass
class Listing:
    """One dataset opened by :func:`open_dataset`: layout chosen, options and folders checked,
    files not listed yet. ``items`` yields its extraction view once (see :class:`Found`);
    :func:`read_dataset` makes it a :class:`Dataset`, a streamed run
    (:class:`~tidy_detect.data.selection.LayoutStream`) walks it as it extracts.
    """

    name: str
    layout: str
    root: str
    items: Iterable[ImageItem]
    split: str | None
    pairing: dict[str, str] | None  # None: every group pairs with itself
    walker: Walker | None  # tree layouts: what the walk skipped, and notes
    container: str
    keep_order: bool  # manifests and tables: file order, not (group, label, path)
    expects: str = ""  # the tree a layout reads, for the error when it finds nothing

    @property
    def skipped(self) -> dict[str, int]:
        return dict(sorted(self.walker.skipped.items())) if self.walker else {}

    @property
    def notes(self) -> tuple[str, ...]:
        """What the walk noted (folders it did not list, and why): complete once ``items`` ends."""
        return tuple(self.walker.notes) if self.walker else ()

    def empty_error(self) -> InputError:
        """The error for a listing that yielded nothing."""
        if self.walker is None:
            return InputError(f"{self.root}: holds no rows")
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.walker.skipped.items()))
        return InputError(f"{self.root}: no images found for layout {self.layout!r} (expected {self.expects})"
                          + (f"; skipped: {skipped}" if skipped else ""))

    def pairing_of(self, groups: Iterable[str]) -> dict[str, str]:
        """The pairing, sorted; without one, each of ``groups`` (those listed) with itself."""
        pairing = self.pairing if self.pairing is not None else {g: g for g in groups}
        return dict(sorted(pairing.items()))

    def dataset(self, listed: Sequence[ImageItem]) -> Dataset:
        """The :class:`Dataset` of what ``items`` yielded (``listed``, after the walk)."""
        if not listed:
            raise self.empty_error()
        pairing = self.pairing_of({str(item.group) for item in listed})
        items = tuple(listed) if self.keep_order else tuple(sorted(expand_pairing(listed, pairing), key=_item_order))
        return Dataset(self.name, self.layout, self.root, items, self.split, pairing, self.skipped, self.notes,
                       self.container)


def read_dataset(root: str | Path, layout: str = "auto", split: str | None = None,
                 exclude: Iterable[str | Path] | None = None, pairing: Mapping[str, str] | None = None,
                 options: SourceOptions | None = None) -> Dataset:
    """Read a benchmark folder (or a CSV manifest, an archive, a table) into a :class:`Dataset`.

    Args:
        root: the dataset folder (see the module docstring for each layout's tree), a zip / tar
            archive holding that tree, either behind a URI (``s3://bucket/CNNDetection``), a CSV
            file for ``manifest``; with ``auto`` also a Parquet / Arrow file, a ``datasets``
            folder, a hub dataset ``hf-dataset:ORG/NAME`` (layout ``columns``) or WebDataset
            shards (layout ``webdataset``).
        layout: a registered layout name, or ``auto`` (:func:`detect_layout`).
        split: ``train``/``val``/``test`` for layouts with splits, or the split of a
            ``datasets`` dataset; needed when the root holds several, and an error for layouts
            without splits.
        exclude: exclude-list files (one file name or relative path per line) of images to skip.
        pairing: fake folder -> real folder, on top of the layout's default (``unifd``,
            ``diffusionforensics`` only).
        options: the columns of tables and fields of WebDataset samples (``columns``,
            ``webdataset``).

    Returns:
        The dataset; items sorted by (group, label, path), except a manifest's and a table's, kept
        in file order.

    Raises:
        UnknownNameError: an unknown layout (the message lists the known ones).
        ConfigError: ``split``/``pairing``/``exclude`` given to a layout that does not take it.
        InputError: a missing root, a tree that does not fit the layout, a tree layout named for
            a table, a bad pairing, an unreadable exclude list, or no images found.
    """
    listing = open_dataset(root, layout, split, exclude, pairing, options)
    return listing.dataset(list(listing.items))


def open_dataset(root: str | Path, layout: str = "auto", split: str | None = None,
                 exclude: Iterable[str | Path] | None = None, pairing: Mapping[str, str] | None = None,
                 options: SourceOptions | None = None) -> Listing:
    """:func:`read_dataset` up to the walk: everything it checks is checked here, and the
    :class:`Listing`'s ``items`` walk the tree (or read the table) as they are iterated, holding
    nothing; a tree that yields no image raises when it ends (:meth:`Listing.empty_error`).

    Raises:
        As :func:`read_dataset`.
    """
    text = root if isinstance(root, trees.Node) else _root_text(root)
    kind = "folder" if isinstance(text, trees.Node) else input_kind(text)
    if kind in ("hub", "datasets") or (kind == "source" and sources.container_kind(text) in ("parquet", "arrow")):
        if layout != "auto":
            raise InputError(f"{root}: a table ({_kind_name(text, kind)}), whose labels are in its columns; "
                             f"--layout {layout} reads folder trees: use --layout auto, or drop --layout")
        return _columns_listing(text, kind, split, exclude, pairing, options)
    if kind == "missing":
        raise InputError(f"{root}: no such file or folder")
    path = text if isinstance(text, trees.Node) else trees.open_tree(text)
    if layout == "auto":
        try:
            name = detect_layout(path)
        except InputError:
            if isinstance(path, trees.Node) and path.tree.separator == sources.SEPARATOR:
                found = _webdataset(path, split, exclude, pairing, options)
                if found is not None:
                    return found
            raise
    else:
        name = layout
    spec = get_layout(name)
    for option, value in (("split", split), ("pairing", pairing)):
        if value and option not in spec.options:
            users = [n for n, lay in LAYOUTS.items() if option in lay.options]
            raise ConfigError(f"{option} is used only by the layouts {', '.join(users)}; "
                              f"got {option}={value!r} for layout {name!r}")
    if spec.is_file and not path.is_file():
        raise InputError(f"{root}: the {name} layout reads a file ({spec.expects}), got a folder")
    if not spec.is_file and not path.is_dir():
        raise InputError(f"{root}: the {name} layout reads a folder ({spec.expects}), got a file")
    walker = Walker(path.parent if spec.is_file else path, ExcludeList.from_files(exclude))
    found = spec.reader(path, split=split, pairing=pairing, walker=walker)
    return Listing(
        name=path.absolute().name if not spec.is_file else path.stem,
        layout=name,
        root=str(path.absolute()),
        items=found.items,
        split=found.split,
        pairing=found.pairing,
        walker=walker,
        container=_container_name(path),
        keep_order=found.keep_order,
        expects=spec.expects,
    )


def _kind_name(text: str, kind: str) -> str:
    if kind == "hub":
        return "hub dataset"
    if kind == "datasets":
        return "datasets folder"
    return sources.container_kind(text) or kind


def _container_name(path: Folder) -> str:
    kind = trees.kind_of(path)
    where = remote.scheme_of(str(path)) if isinstance(path, trees.Node) and remote.is_uri(str(path)) else None
    return f"{kind} on {where}" if where and "folder" not in kind else kind


def _no_tree_options(root: object, layout: str, exclude: Iterable[str | Path] | None,
                     pairing: Mapping[str, str] | None) -> None:
    if pairing:
        raise ConfigError(f"pairing is used only by the layouts unifd, diffusionforensics; {root} is read as "
                          f"{layout} (labels written in it)")
    if exclude:
        raise ConfigError(f"exclude lists name files of a folder tree; {root} is read as {layout} (rows or "
                          f"samples with their own labels): filter it before, or read a tree layout")


def _columns_listing(text: str, kind: str, split: str | None, exclude: Iterable[str | Path] | None,
                     pairing: Mapping[str, str] | None, options: SourceOptions | None) -> Listing:
    _no_tree_options(text, COLUMNS, exclude, pairing)
    if kind in ("hub", "datasets"):
        found = hub.table_set(text, split)
        assert found is not None  # input_kind said it is one
        items: Iterable[ImageItem] = iter_table_set(found, options)
        name, chosen, container = found.name, found.split, found.kind
    else:
        if split:
            raise ConfigError(f"split chooses a split of a layout or a datasets dataset; {text} is one table")
        items, name, chosen = items_from_source(text, options), sources.source_stem(text), None
        container = sources.container_kind(text) or "table"
    if remote.is_uri(text):
        container = f"{container} on {remote.scheme_of(text)}"
    root = text if remote.is_uri(text) or hub.is_hub_id(text) else os.path.abspath(text)
    return Listing(name, COLUMNS, root, items, chosen, None, None, container, keep_order=True)


def _webdataset(path: trees.Node, split: str | None, exclude: Iterable[str | Path] | None,
                pairing: Mapping[str, str] | None, options: SourceOptions | None) -> Listing | None:
    """An archive no tree layout fits, read by its WebDataset sidecars; None when no member has a
    sidecar label (then it is unlabelled, and the layout error stands)."""
    archive = path.tree.display
    if not any(i.label is not None for i in items_from_source(archive, options)):  # stops at the first label
        return None
    _no_tree_options(archive, WEBDATASET, exclude, pairing)
    if split:
        raise ConfigError(f"split is used only by layouts with splits; {archive} is read as webdataset")
    return Listing(sources.source_stem(archive), WEBDATASET, archive, items_from_source(archive, options), None,
                   None, None, _container_name(path), keep_order=True)


def merge_datasets(datasets: Sequence[Dataset], root: str) -> Dataset:
    """One dataset of several read alike (the shards of a brace pattern): items in order, skipped
    counts summed; the layout and container of the first, with the count of files read.

    Raises:
        InputError: no datasets, or datasets read with different layouts.
    """
    if not datasets:
        raise InputError(f"{root}: nothing to read")
    if len(datasets) == 1:
        return datasets[0]
    layouts = sorted({d.layout for d in datasets})
    if len(layouts) > 1:
        raise InputError(f"{root}: its files are read with different layouts ({', '.join(layouts)}); inspect "
                         f"them one by one")
    skipped: collections.Counter[str] = collections.Counter()
    for dataset in datasets:
        skipped.update(dataset.skipped)
    first = datasets[0]
    pairing = {k: v for d in datasets for k, v in d.pairing.items()}
    return Dataset(first.name, first.layout, root, tuple(i for d in datasets for i in d.items), first.split,
                   dict(sorted(pairing.items())), dict(sorted(skipped.items())),
                   tuple(n for d in datasets for n in d.notes), f"{len(datasets)} × {first.container}")


def _item_order(item: ImageItem) -> tuple[str, int, str]:
    return (str(item.group), -1 if item.label is None else item.label, item.path)


def expand_pairing(items: Iterable[ImageItem], pairing: Mapping[str, str]) -> list[ImageItem]:
    """One item per (image, generator): reals grouped under a real folder that generators pair
    with are repeated under each of those generators (sorted); everything else passes unchanged.

    Args:
        items: e.g. ``Dataset.extraction_items()``, or items built from a feature store's rows.
        pairing: group -> real folder (``Dataset.pairing``); entries mapping a group to itself
            change nothing.

    Returns:
        The expanded items, in input order (the copies of one real next to each other).
    """
    users = pairing_users(pairing)
    return [copy for item in items for copy in expand_item(item, users)]


def expand_item(item: ImageItem, users: Mapping[str, list[str]]) -> list[ImageItem]:
    """The items of one extraction item in the per-generator view (see :func:`expand_pairing`;
    ``users`` from :func:`~tidy_detect.data.sampling.pairing_users`)."""
    if item.label == 0 and str(item.group) in users:
        return [ImageItem(item.path, 0, group, item.caption, item.subgroup) for group in users[str(item.group)]]
    return [item]


def dataset_roots(inputs: Iterable[str | Path]) -> list[str]:
    """The roots :func:`datasets_for_inputs` reads: brace patterns expanded, local paths made
    absolute, each once, in order."""
    return list(dict.fromkeys(text if remote.is_uri(text) or hub.is_hub_id(text) else os.path.abspath(text)
                              for text in expand_inputs(inputs)))


def datasets_for_inputs(inputs: Iterable[str | Path], layout: str, *, split: str | None = None,
                        exclude: Iterable[str | Path] | None = None, pairing: Mapping[str, str] | None = None,
                        options: SourceOptions | None = None) -> list[Dataset]:
    """:func:`read_dataset` of every INPUT (each root once, brace patterns expanded), with the
    same options."""
    roots = dataset_roots(inputs)
    return [read_dataset(root, layout, split=split, exclude=exclude, pairing=pairing, options=options)
            for root in roots]


def items_for_inputs(inputs: Iterable[str | Path], layout: str | None = None, *, split: str | None = None,
                     exclude: Iterable[str | Path] | None = None, pairing: Mapping[str, str] | None = None,
                     summary: InputSummary | None = None, options: SourceOptions | None = None) -> list[ImageItem]:
    """Image items for extraction from a command's INPUTs: generic walking, or benchmark layouts.

    With ``layout=None`` this is :func:`tidy_detect.data.inputs.collect_inputs` (files, folders,
    manifests, archives, tables, datasets; ``split`` then only chooses the split of ``datasets``
    inputs, and ``exclude``/``pairing`` must be unset). Otherwise every INPUT is read with
    :func:`read_dataset` and their ``extraction_items()`` are concatenated: each file once (per
    group), shared reals under their real folder's name (see :func:`expand_pairing`).

    Raises:
        ConfigError, UnknownNameError, InputError: as :func:`read_dataset`, and when dataset
        options are given without a layout.
    """
    summary = summary if summary is not None else InputSummary()
    if layout is None:
        if exclude or pairing:
            raise ConfigError("exclude and pairing need a dataset layout (--layout auto or a name)")
        return collect_inputs(inputs, summary, options, split)
    datasets = datasets_for_inputs(inputs, layout, split=split, exclude=exclude, pairing=pairing, options=options)
    return items_for_datasets(datasets, summary)


def items_for_datasets(datasets: Iterable[Dataset], summary: InputSummary | None = None) -> list[ImageItem]:
    """The ``extraction_items()`` of several datasets, concatenated, each (path, group) once;
    ``summary`` (when given) gets the image count and the non-image files seen."""
    items: list[ImageItem] = []
    seen: set[tuple[str, str | None]] = set()
    for dataset in datasets:
        if summary is not None:
            summary.ignored_files += dataset.skipped.get(NOT_AN_IMAGE, 0)
        for item in dataset.extraction_items():
            if (item.path, item.group) not in seen:
                seen.add((item.path, item.group))
                items.append(item)
    if summary is not None:
        summary.images = len(items)
    return items


def parse_pairing(values: Iterable[str]) -> dict[str, str]:
    """``["ldm_200=laion", ...]`` (the ``--pairing`` option) -> ``{"ldm_200": "laion"}``.

    Raises:
        ConfigError: a value that is not ``FAKE=REAL`` with both sides non-empty.
    """
    pairing = {}
    for value in values:
        fake, sep, real = value.partition("=")
        if not sep or not fake.strip() or not real.strip():
            raise ConfigError(f"--pairing must be FAKE_FOLDER=REAL_FOLDER, got {value!r}")
        pairing[fake.strip()] = real.strip()
    return pairing


__all__ = [
    "CNNDETECTION_CLASSES",
    "CNNDETECTION_GENERATORS",
    "Dataset",
    "ExcludeList",
    "LAYOUTS",
    "Layout",
    "Listing",
    "UNIFD_PAIRING",
    "COLUMNS",
    "SOURCE_LAYOUTS",
    "WEBDATASET",
    "dataset_roots",
    "datasets_for_inputs",
    "detect_layout",
    "expand_item",
    "expand_pairing",
    "get_layout",
    "items_for_datasets",
    "items_for_inputs",
    "layout_names",
    "merge_datasets",
    "open_dataset",
    "parse_pairing",
    "read_dataset",
    "register_layout",
]
