"""Layouts read as they are walked, and the sampling protocol made in passes over a listing: the
same items, pairing, groups and samples (in the same order) as the whole list gives."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest

from tidy_detect.data.layouts import (SOURCE_LAYOUTS, datasets_for_inputs, expand_pairing, items_for_datasets,
                                      open_dataset, read_dataset)
from tidy_detect.data.sampling import sample_listing, sample_per_class, shuffle_prefix, stratified_per_class
from tidy_detect.data.selection import LayoutStream, select_inputs
from tidy_detect.errors import InputError

from .test_layouts import cnndetection, diffusionforensics, genimage, unifd  # noqa: F401  (fixtures)


def _touch(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # listing never opens a file


def _names(rng: random.Random, n: int, prefix: str) -> list[str]:
    return [f"{prefix}{rng.randrange(10 ** 6):06d}{rng.choice(['.png', '.jpg', '.JPEG'])}" for _ in range(n)]


def _reference(inputs, layout, *, split=None, exclude=None, pairing=None, max_per_class=None, per_class=None,
               seed=0):
    """What selection gave when every dataset was read whole (the list functions)."""
    datasets = datasets_for_inputs(inputs, layout, split=split, exclude=exclude, pairing=pairing)
    items = items_for_datasets(datasets)
    found = {g: r for d in datasets for g, r in d.pairing.items() if g != r}
    groups = {}
    for d in datasets:
        if d.layout not in ("generic", "manifest", *SOURCE_LAYOUTS):
            groups.update({str(i.group): d.layout for i in d.extraction_items()})
    if per_class is not None:
        items = stratified_per_class(items, per_class, seed=seed)
    elif max_per_class is not None:
        chosen = {it.path for it in sample_per_class(expand_pairing(items, found), max_per_class, seed=seed)}
        items = [it for it in items if it.path in chosen]
    return items, found, groups


def _key(item):
    return (item.path, str(item.group), item.label, item.subgroup or "", item.caption or "")


def _same_everywhere(inputs, layout="auto", **options):
    """The streamed selection lists the reference's items; every sample equals it exactly."""
    items, found, groups = _reference(inputs, layout, **options)
    streamed = select_inputs(inputs, layout=layout, stream=True, **options)
    assert isinstance(streamed.items, LayoutStream)
    assert sorted(map(_key, streamed.items)) == sorted(map(_key, items))
    assert (streamed.pairing, streamed.datasets) == (found, groups)
    whole = select_inputs(inputs, layout=layout, **options)
    assert [_key(i) for i in whole.items] == [_key(i) for i in items]  # not streamed: the list as before
    for n in (1, 2, 3, 50):
        for seed in (0, 7):
            want, _, _ = _reference(inputs, layout, max_per_class=n, seed=seed, **options)
            got = select_inputs(inputs, layout=layout, max_per_class=n, seed=seed, **options)
            assert [_key(i) for i in got.items] == [_key(i) for i in want], (n, seed)
            assert got.pairing == found and got.params["max_per_class"] == n
            for limit in (0, 2):
                cut = select_inputs(inputs, layout=layout, max_per_class=n, seed=seed, limit=limit, **options)
                assert [_key(i) for i in cut.items] == [_key(i) for i in want[:limit]]
    return items


def _random_cnndetection(root: Path, rng: random.Random) -> Path:
    for gen in ("progan", "stylegan", "whichfaceisreal"):
        classes = rng.sample(["airplane", "bus", "cat", "car"], 2) if gen != "whichfaceisreal" else [None]
        for cls in classes:
            base = root / "test" / gen / cls if cls else root / "test" / gen
            _touch(base / "0_real", _names(rng, rng.randrange(1, 9), "r"))
            _touch(base / "1_fake", _names(rng, rng.randrange(1, 9), "f"))
    for cls in ("airplane", "bus", "cat"):
        _touch(root / "train" / cls / "0_real", _names(rng, rng.randrange(3, 12), "r"))
        _touch(root / "train" / cls / "1_fake", _names(rng, rng.randrange(3, 12), "f"))
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cnndetection_streams_and_samples_as_the_list(tmp_path, seed):
    root = _random_cnndetection(tmp_path / "CNNDetection", random.Random(seed))
    _same_everywhere([root], "cnndetection", split="test")
    _same_everywhere([root], "auto", split="train")
    for per_class in (1, 4, 9):
        want, _, _ = _reference([root], "cnndetection", split="train", per_class=per_class, seed=seed)
        got = select_inputs([root], layout="cnndetection", split="train", per_class=per_class, seed=seed)
        assert [_key(i) for i in got.items] == [_key(i) for i in want]
    with pytest.raises(InputError, match="asks for 1000 real images, but the dataset has"):
        select_inputs([root], layout="cnndetection", split="train", per_class=1000)


def test_paired_layouts_stream_and_sample_as_the_list(unifd, diffusionforensics, genimage, tmp_path):  # noqa: F811
    rng = random.Random(3)
    _touch(unifd / "laion" / "0_real", _names(rng, 30, "x"))
    _touch(unifd / "ldm_200" / "1_fake", _names(rng, 20, "y"))
    _same_everywhere([unifd], "unifd")
    _same_everywhere([unifd], "unifd", pairing={"ldm_200": "imagenet", "guided": "guided"})
    _same_everywhere([diffusionforensics], "diffusionforensics", split="test")
    _same_everywhere([diffusionforensics / "images" / "test"], pairing={"imagenet/sdv1": "lsun_bedroom/real"})
    _same_everywhere([genimage], "genimage", split="val")
    _same_everywhere([unifd, genimage / "Midjourney"], "auto")  # two datasets, two layouts


def test_a_real_folder_paired_with_itself_and_with_others_keeps_both(tmp_path):
    """A generator folder whose own 0_real another generator pairs with: its reals belong to both."""
    base = tmp_path / "DiffusionForensics" / "test" / "lsun_bedroom"
    _touch(base / "real", ["b1.png"])
    _touch(base / "adm" / "1_fake", ["a1.png"])
    _touch(base / "adm" / "0_real", ["own1.png", "own2.png"])
    _touch(base / "ddpm", ["d1.png"])
    root = tmp_path / "DiffusionForensics"
    pairing = {"lsun_bedroom/adm": "lsun_bedroom/adm", "lsun_bedroom/ddpm": "lsun_bedroom/adm"}
    ds = read_dataset(root, "diffusionforensics", pairing=pairing)
    reals = sorted((i.group, Path(i.path).name) for i in ds.items if i.label == 0)
    assert reals == [("lsun_bedroom/adm", "own1.png"), ("lsun_bedroom/adm", "own2.png"),
                     ("lsun_bedroom/ddpm", "own1.png"), ("lsun_bedroom/ddpm", "own2.png")]
    assert sorted(expand_pairing(ds.extraction_items(), ds.pairing), key=_key) == sorted(ds.items, key=_key)
    _same_everywhere([root], "diffusionforensics", pairing=pairing)


def test_walk_order_unlike_sorted_order_falls_back_to_the_list(tmp_path, monkeypatch):
    """``car`` is walked before ``car-2`` but sorts after it as a path; the sample is still the
    list's (read whole once)."""
    rng = random.Random(5)
    root = tmp_path / "tree"
    for group in ("car", "car-2", "car.b"):
        _touch(root / "gen" / group / "0_real", _names(rng, 6, "r"))
        _touch(root / "gen" / group / "1_fake", _names(rng, 6, "f"))
        _touch(root / group / "1_fake", _names(rng, 4, "f"))
        _touch(root / group / "0_real", ["a.png", "z.png"])
        _touch(root / group / "0_real" / "sub", ["b.png"])  # a sub-folder walked after the files
    _same_everywhere([root], "generic")
    from tidy_detect.data import sampling

    whole, shuffled = [], sampling._shuffled
    monkeypatch.setattr(sampling, "_shuffled", lambda *a: whole.append(1) or shuffled(*a))
    stream = LayoutStream([root], "generic")
    sample_listing(stream.keyed, {}, max_per_class=2)
    assert whole  # read into a list, each cell sorted and shuffled as a list
    whole.clear()
    sample_listing(LayoutStream([root / "gen"], "generic").keyed, {}, max_per_class=2)  # cells in sorted order
    assert whole == []


def test_overlapping_roots_list_each_image_once(tmp_path):
    rng = random.Random(8)
    root = tmp_path / "tree"
    for group in ("a", "b"):
        _touch(root / group / "0_real", _names(rng, 5, "r"))
        _touch(root / group / "1_fake", _names(rng, 5, "f"))
    items = _same_everywhere([root, root / "a"], "generic")
    assert len({(i.path, i.group) for i in items}) == len(items)
    stream = LayoutStream([root, root / "a"], "generic")
    assert not stream.unique_paths and len(list(stream)) == len(items)
    assert LayoutStream([root / "a", root / "b"], "generic").unique_paths


def test_an_archive_streams_as_its_tree(cnndetection, tmp_path):  # noqa: F811
    archive = tmp_path / "cnn.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(cnndetection.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(cnndetection).as_posix())
    _same_everywhere([archive], "cnndetection", split="test")
    folder = select_inputs([cnndetection], layout="cnndetection", split="test", stream=True)
    zipped = select_inputs([archive], layout="cnndetection", split="test", stream=True)
    assert sorted((i.path.split("/test/")[-1], i.label, i.group) for i in folder.items) == \
        sorted((i.path.split("/test/")[-1], i.label, i.group) for i in zipped.items)


def test_the_stream_walks_as_it_is_read(tmp_path):
    """The first image comes before later folders are listed: a file added meanwhile to a later
    folder is in the same pass; nothing was listed ahead."""
    root = tmp_path / "tree"
    _touch(root / "a" / "0_real", ["a1.png"])
    _touch(root / "z" / "1_fake", ["z1.png"])
    listing = open_dataset(root, "generic")
    items = iter(listing.items)
    first = next(items)
    assert Path(first.path).name == "a1.png"
    _touch(root / "z" / "1_fake", ["z2.png"])
    assert [Path(i.path).name for i in items] == ["z1.png", "z2.png"]
    stream = select_inputs([root], layout="generic", stream=True).items
    assert stream.check() == 3 and [Path(i.path).name for i in stream] == ["a1.png", "z1.png", "z2.png"]
    limited = select_inputs([root], layout="generic", stream=True, limit=1)
    assert [Path(i.path).name for i in limited.items] == ["a1.png"]


def test_stream_errors_come_from_the_check(tmp_path):
    root = tmp_path / "tree"
    _touch(root / "a" / "0_real", ["notes.txt"])
    with pytest.raises(InputError, match="no images found for layout 'generic'"):
        select_inputs([root], layout="generic", stream=True)
    with pytest.raises(InputError, match="no such file or folder"):
        select_inputs([tmp_path / "missing"], layout="auto", stream=True)


def test_sampling_reads_the_listing_twice_and_holds_only_the_sample():
    rng = random.Random(11)
    from tidy_detect.data.inputs import ImageItem

    items = [ImageItem(f"/d/{g}/{lab}/{i:05d}.png", lab, g, None, f"s{i % 3}")
             for g in ("a", "b") for lab in (0, 1) for i in sorted(rng.sample(range(10 ** 5), 400))]
    calls = []

    def listing():
        calls.append(1)
        return enumerate(items)

    for n in (1, 10, 399, 400, 1000):
        calls.clear()
        got = sample_listing(listing, {}, max_per_class=n, seed=3)
        want = {it.path for it in sample_per_class(items, n, seed=3)}
        assert got == [it for it in items if it.path in want] and len(calls) == 2
    calls.clear()
    assert sample_listing(listing, {}, per_class=300, seed=4) == stratified_per_class(items, 300, seed=4)
    assert len(calls) == 2


@pytest.mark.parametrize("n", [0, 1, 2, 5, 31, 1000])
def test_shuffle_prefix_is_the_shuffle_of_the_sorted_cell(n):
    for seed in (0, 1, 12345):
        cell = list(range(n))
        random.Random(seed).shuffle(cell)
        assert shuffle_prefix(n, None, seed) == cell
        assert shuffle_prefix(n, 3, seed) == cell[:3]
