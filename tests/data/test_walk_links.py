"""Folder walks over random trees of symbolic and hard links: the walk lists exactly what a walk
that remembers every file's identity lists (each real file once, under its first name in walk
order), while remembering only hard-linked files and link targets."""

from __future__ import annotations

import os
import random

import pytest

from tidy_detect.data import trees
from tidy_detect.data.trees import WalkCounts, walk_tree


def _walk_remembering_everything(base: str) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """The walk's contract written plainly: every file's identity kept."""
    out, seen_folders, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        try:
            st = os.stat(dirpath)
            identity = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity is not None and identity in seen_folders:
            dirnames[:] = []
            continue
        if identity is not None:
            seen_folders.add(identity)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, base)
        names = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            try:
                fst = os.stat(os.path.join(dirpath, name))
            except OSError:
                names.append(name)
                continue
            key = (fst.st_dev, fst.st_ino)
            if key in seen_files:
                continue
            seen_files.add(key)
            names.append(name)
        out.append((dirpath, () if rel == "." else tuple(rel.split(os.sep)), names))
    return out


def _random_tree(root, rng: random.Random) -> None:
    folders = [root]
    for i in range(rng.randint(2, 6)):
        parent = rng.choice(folders)
        folder = parent / rng.choice([f"d{i}", f".h{i}", f"e{i}"])
        folder.mkdir(exist_ok=True)
        folders.append(folder)
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    files = []
    for i in range(rng.randint(3, 12)):
        folder = rng.choice(folders + [outside])
        path = folder / rng.choice([f"f{i}.png", f".g{i}.png", f"a{i}.png", f"z{i}.png"])
        path.write_bytes(bytes([i]))
        files.append(path)
    for i in range(rng.randint(0, 10)):
        folder = rng.choice(folders)
        name = folder / rng.choice([f"l{i}.png", f"b{i}.png", f"y{i}.png", f".k{i}.png"])
        if name.exists() or name.is_symlink():
            continue
        kind = rng.random()
        if kind < 0.5 and files:
            os.symlink(rng.choice(files), name)  # a file link, anywhere (inside, outside, hidden)
        elif kind < 0.65 and files:
            os.link(rng.choice(files), name)  # a hard link
        elif kind < 0.75:
            os.symlink(folder / "missing.png", name)  # dangling
        elif kind < 0.9:
            os.symlink(rng.choice(folders + [outside]), folder / f"fl{i}")  # a folder link (loops too)
        elif files:
            os.symlink(os.path.relpath(rng.choice(files), folder), name)  # relative
    if rng.random() < 0.3:
        files_in = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        if files_in:  # a chain: a link to a link
            first = folder / "chain1.png"
            if not first.exists() and not first.is_symlink():
                os.symlink(rng.choice(files_in), first)
                second = rng.choice(folders) / "chain0.png"
                if not second.exists() and not second.is_symlink():
                    os.symlink(first, second)


@pytest.mark.parametrize("seed", range(60))
def test_the_walk_lists_what_remembering_every_file_lists(tmp_path, seed):
    root = tmp_path / "root"
    root.mkdir()
    _random_tree(root, random.Random(seed))
    counts = WalkCounts()
    assert list(walk_tree(str(root), counts)) == _walk_remembering_everything(str(root))


def test_plain_files_are_not_remembered(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    for i in range(50):
        (root / "a" / f"{i}.png").write_bytes(b"x")
    os.link(root / "a" / "1.png", root / "a" / "hard.png")
    os.symlink(root / "a" / "7.png", root / "a" / "0link.png")  # sorts before its target
    os.symlink(root / "a" / "3.png", root / "a" / "zlink.png")  # after it: a repeat
    sizes = []
    real_set = set

    class Watched(real_set):
        def add(self, key):
            super().add(key)
            sizes.append(len(self))

    monkeypatch.setattr(trees, "set", Watched, raising=False)
    counts = WalkCounts()
    [(_, _, names)] = list(walk_tree(str(root / "a"), counts))
    assert "0link.png" in names and "7.png" not in names and "zlink.png" not in names
    assert len(names) == 50 and counts.repeated_files == 3  # hard.png, 7.png, zlink.png
    assert max(sizes) == 2  # the hard-linked file and the link target, never the 48 others
