"""Folder trees that dataset layouts and folder walks read: a local folder, the members of a zip or
tar archive, or the objects under a URI prefix (``s3://bucket/CNNDetection``).

A local folder is a :class:`pathlib.Path`, walked with :func:`walk_tree`. The others are a
:class:`Tree` built from a flat list of file names (an archive's members, an object store's keys)
and read through :class:`Node`, which offers the part of ``Path`` the layouts use (``/``, ``name``,
``parent``, ``is_dir``, ``is_file``, ``exists``). :func:`subfolders` and :func:`walk_files` take
either, so a layout reads ``bench.zip`` exactly as it reads the unpacked ``bench/``: the same
names, sorted the same way, hidden names skipped the same way. Only the paths of the images differ:
``ARCHIVE!/MEMBER`` for a member (see :mod:`tidy_detect.data.sources`), the object's URI for a
remote file.

An archive made by packing a folder (``zip -r X.zip X``, ``tar czf X.tar.gz X``), whose members all
sit under one folder named like the archive, reads as that folder: ``X.zip`` and ``X/`` give the
same dataset.

Local folders are walked with :func:`walk_tree`: symbolic links to folders and files are followed,
but every real folder is entered once and every real file listed once (by device and inode), so a
link back to a parent folder (a loop) or a second link to the same data never hangs a walk or
lists an image twice.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Union

from tidy_detect.data import remote, sources
from tidy_detect.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class WalkCounts:
    """What :func:`walk_tree` left out, and why."""

    folder_loops: int = 0  # folders already entered (a link back up, or a second link to them)
    repeated_files: int = 0  # files already listed under another name (a link or a hard link)

    @property
    def repeated(self) -> int:
        return self.folder_loops + self.repeated_files


def walk_tree(root: str | Path, counts: WalkCounts | None = None) -> Iterator[tuple[str, tuple[str, ...], list[str]]]:
    """``(folder, its parts relative to root, visible file names)`` for every folder under ``root``.

    Sorted (folders and files by name), hidden names skipped. Links are followed, but each real
    folder is entered once and each real file listed once: identity is ``(st_dev, st_ino)``, so a
    loop of links ends where it first comes back, and a file reached by two names keeps the first
    one in walk order. A file that cannot be stat'ed (a dangling link) is listed as it is; reading
    it later gives its error row.

    Memory does not grow with the number of plain files: only the identities of folders, of files
    with several hard links and of link targets are kept. A plain file (one link, not a symbolic
    link) has one name, in one real folder, so a symbolic link to it repeats it exactly when that
    folder has been walked already (or is being walked, and the real name sorts first); else the
    link's target is remembered, and the real name is skipped if the walk reaches it later.
    """
    counts = counts if counts is not None else WalkCounts()
    base = str(root)
    seen_folders: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()  # hard-linked files and link targets listed so far
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        try:
            st = os.stat(dirpath)
            identity = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity is not None and identity in seen_folders:
            counts.folder_loops += 1
            log.info("%s: already walked (a link to a folder seen before); not entered again", dirpath)
            dirnames[:] = []
            continue
        if identity is not None:
            seen_folders.add(identity)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, base)
        parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        names = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                fst = os.lstat(path)
                link = stat.S_ISLNK(fst.st_mode)
                if link:
                    fst = os.stat(path)
            except OSError:
                names.append(name)
                continue
            key = (fst.st_dev, fst.st_ino)
            if key in seen_files or (link and fst.st_nlink == 1
                                     and _listed_already(path, name, identity, seen_folders)):
                counts.repeated_files += 1
                continue
            if link or fst.st_nlink > 1:
                seen_files.add(key)
            names.append(name)
        yield dirpath, parts, names


def _listed_already(link: str, name: str, folder: tuple[int, int] | None,
                    walked: set[tuple[int, int]]) -> bool:
    """Whether the walk has listed the target of the symbolic link ``link`` (named ``name``, in
    the folder being walked, ``folder``) under the target's own name: the target has one name,
    so that happened if its folder was walked before, or is this folder and the name sorts first."""
    real = os.path.realpath(link)
    real_name = os.path.basename(real)
    if real_name.startswith("."):
        return False
    try:
        parent = os.stat(os.path.dirname(real))
    except OSError:
        return False
    where = (parent.st_dev, parent.st_ino)
    if where == folder:
        return real_name < name
    return where in walked


class Tree:
    """A read-only folder tree made from file names relative to its root (``a/0_real/x.png``).

    Args:
        display: what the root is called in messages and item paths (``/data/bench.zip``,
            ``s3://bucket/CNNDetection``).
        name: the root folder's name (an archive's name without its suffix).
        files: the file names; hidden names (a part starting with ``.``) are left out, as in a
            folder walk, and ``.``/``..``/empty parts are dropped.
        separator: between ``display`` and a file's name in its path (``!/`` in an archive).
        kind: what the tree is, for reports (``zip``, ``tar.gz``, ``s3 folder``).
    """

    def __init__(self, display: str, name: str, files: Iterable[str], separator: str, kind: str) -> None:
        self.display, self.name, self.separator, self.kind = display, name, separator, kind
        self.folders: dict[str, tuple[set[str], list[str]]] = {"": (set(), [])}
        self.paths: dict[str, str] = {}  # clean relative name -> the name as the source stores it
        for raw in files:
            parts = [p for p in PurePosixPath(raw).parts if p not in ("/", ".", "..")]
            if not parts or any(p.startswith(".") for p in parts):
                continue
            folder = ""
            for part in parts[:-1]:
                child = f"{folder}/{part}" if folder else part
                self.folders[folder][0].add(part)
                self.folders.setdefault(child, (set(), []))
                folder = child
            clean = "/".join(parts)
            if clean not in self.paths and clean not in self.folders:
                self.folders[folder][1].append(parts[-1])
                self.paths[clean] = raw

    def path_of(self, rel: str) -> str:
        """The item path (identity) of the file ``rel``."""
        return f"{self.display}{self.separator}{self.paths.get(rel, rel)}"

    def root(self) -> "Node":
        return Node(self, "")


class Node:
    """A folder or file of a :class:`Tree`, with the subset of ``pathlib.Path`` layouts use."""

    __slots__ = ("tree", "rel")

    def __init__(self, tree: Tree, rel: str) -> None:
        self.tree, self.rel = tree, rel.strip("/")

    def __truediv__(self, name: str) -> "Node":
        name = str(name).strip("/")
        return Node(self.tree, f"{self.rel}/{name}" if self.rel else name)

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1] if self.rel else self.tree.name

    @property
    def parent(self) -> "Node":
        return Node(self.tree, self.rel.rpartition("/")[0]) if self.rel else self

    def is_dir(self) -> bool:
        return self.rel in self.tree.folders

    def is_file(self) -> bool:
        return self.rel in self.tree.paths

    def exists(self) -> bool:
        return self.is_dir() or self.is_file()

    def absolute(self) -> "Node":
        return self

    def expanduser(self) -> "Node":
        return self

    def __str__(self) -> str:
        return f"{self.tree.display}{self.tree.separator}{self.rel}" if self.rel else self.tree.display

    def __repr__(self) -> str:
        return f"Node({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and other.tree is self.tree and other.rel == self.rel

    def __hash__(self) -> int:
        return hash((id(self.tree), self.rel))


Folder = Union[Path, Node]


def subfolders(folder: Folder) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted (empty when it is not a folder).

    Raises:
        InputError: a local folder that cannot be listed.
    """
    if isinstance(folder, Node):
        found = folder.tree.folders.get(folder.rel)
        return sorted(found[0]) if found else []
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from exc


def walk_files(folder: Folder, counts: WalkCounts | None = None) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """``(path, folders between folder and the file, file name)`` of every visible file under
    ``folder``: folders depth first, each folder's files and sub-folders sorted by name (the
    order of :func:`walk_tree`). ``path`` is a local path, an archive identity or a URI."""
    if not isinstance(folder, Node):
        for dirpath, parts, names in walk_tree(folder, counts):
            for name in names:
                yield os.path.join(dirpath, name), parts, name
        return
    tree = folder.tree

    def visit(rel: str, parts: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], str]]:
        subs, names = tree.folders[rel]
        for name in sorted(names):
            yield tree.path_of(f"{rel}/{name}" if rel else name), parts, name
        for sub in sorted(subs):
            yield from visit(f"{rel}/{sub}" if rel else sub, (*parts, sub))

    if folder.rel in tree.folders:
        yield from visit(folder.rel, ())


def relative_to(path: str, root: Folder) -> str:
    """The POSIX path of a walked file relative to ``root`` (what exclude lists match)."""
    if isinstance(root, Node):
        prefix = str(root) + (root.tree.separator if not root.rel else "/")
        return path[len(prefix):] if path.startswith(prefix) else path
    return os.path.relpath(path, root).replace(os.sep, "/")


def archive_tree(path: str) -> Tree:
    """The tree of a zip or tar archive's members (local path or URI).

    Raises:
        InputError: the archive cannot be listed (see :func:`tidy_detect.data.sources.archive_members`).
    """
    return Tree(path, sources.source_stem(path), sources.archive_members(path), sources.SEPARATOR,
                sources.container_kind(path) or "archive")


def remote_tree(uri: str) -> Tree:
    """The tree of the objects under a URI prefix; their stats are remembered for resume.

    Raises:
        InputError: the prefix cannot be listed.
    """
    base = uri.rstrip("/")
    files = [obj.uri[len(base) + 1:] for obj in remote.list_files(base)]
    return Tree(base, remote.base_name(base), files, "/", f"{remote.scheme_of(base)} folder")


def open_tree(root: str | Path, *, descend: bool = True) -> Folder:
    """The folder a layout or a walk reads for an INPUT: a local folder (as a ``Path``), a zip /
    tar archive, or a folder behind a URI (as the root :class:`Node` of its tree).

    With ``descend``, an archive whose members all sit under one folder named like the archive
    opens at that folder (see the module docstring).

    Raises:
        InputError: no such file, folder or prefix; a file that is neither an archive nor a folder;
            an archive that cannot be listed.
    """
    text = str(root)
    if remote.is_uri(text):
        if sources.container_kind(text) in ("zip", "tar", "tar.gz") and sources.is_source_file(text):
            tree = archive_tree(text)
        elif remote.is_dir(text):
            tree = remote_tree(text)
        else:
            raise InputError(f"{text}: no such folder or archive")
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            return path
        if not path.exists():
            raise InputError(f"{text}: no such file or folder")
        if sources.container_kind(path) not in ("zip", "tar", "tar.gz"):
            return path  # a file: the layouts that read files (manifest) take it as it is
        tree = archive_tree(str(path.absolute()))
    node = tree.root()
    if descend and tree.separator == sources.SEPARATOR:
        subs, files = tree.folders[""]
        if not files and len(subs) == 1 and next(iter(subs)) == tree.name:
            node = node / tree.name
    return node


def kind_of(root: Folder) -> str:
    """``folder``, ``zip``, ``tar``, ``tar.gz``, ``s3 folder``, ... for reports."""
    return root.tree.kind if isinstance(root, Node) else ("folder" if root.is_dir() else "file")


__all__ = [
    "Folder",
    "Node",
    "Tree",
    "WalkCounts",
    "archive_tree",
    "kind_of",
    "open_tree",
    "relative_to",
    "remote_tree",
    "subfolders",
    "walk_files",
    "walk_tree",
]
