"""Each dataset layout reader on a tree made in the exact published layout, traps included."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tidy_detect.data.inputs import InputSummary, collect_inputs
from tidy_detect.data.layouts import (
    EXCLUDED,
    NO_LABEL_FOLDER,
    NOT_AN_IMAGE,
    REALS_IN_FAKE_FOLDER,
    detect_layout,
    expand_pairing,
    get_layout,
    items_for_inputs,
    layout_names,
    parse_pairing,
    read_dataset,
)
from tidy_detect.errors import ConfigError, InputError, UnknownNameError


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 9 % 256, 0, 0)).save(path)
    return path


def _imgs(folder: Path, *names: str) -> None:
    for name in names:
        _img(folder / name)


def _traps(folder: Path) -> None:
    """Files a reader must not list: a non-image and hidden files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "readme.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    _img(folder / ".ipynb_checkpoints" / "copy.png")


def _table(dataset_or_items) -> dict[tuple[str, int], list[str]]:
    """(group, label) -> file names, for exact comparisons."""
    table: dict[tuple[str, int], list[str]] = {}
    for item in getattr(dataset_or_items, "items", dataset_or_items):
        table.setdefault((item.group, item.label), []).append(Path(item.path).name)
    return table


# ---------------------------------------------------------------------------------------------
# CNNDetection

@pytest.fixture
def cnndetection(tmp_path: Path) -> Path:
    root = tmp_path / "CNNDetection"
    _imgs(root / "train" / "airplane" / "0_real", "a.png", "b.v2.final.PNG")
    _imgs(root / "train" / "airplane" / "1_fake", "c.JPEG")
    _imgs(root / "train" / "car" / "0_real", "d.jpg")
    _imgs(root / "train" / "car" / "1_fake", "e.png", "nested/f.png")
    _traps(root / "train" / "car" / "1_fake")
    _imgs(root / "val" / "airplane" / "0_real", "g.png")
    _imgs(root / "val" / "airplane" / "1_fake", "h.png")
    _imgs(root / "test" / "progan" / "airplane" / "0_real", "i.png")
    _imgs(root / "test" / "progan" / "airplane" / "1_fake", "j.png")
    _imgs(root / "test" / "progan" / "bus" / "1_fake", "k.png")
    _imgs(root / "test" / "stylegan" / "bedroom" / "0_real", "l.png")
    _imgs(root / "test" / "stylegan" / "bedroom" / "1_fake", "m.png")
    _imgs(root / "test" / "whichfaceisreal" / "0_real", "n.png", "o.png")
    _imgs(root / "test" / "whichfaceisreal" / "1_fake", "p.tar.gz.png")
    _img(root / "test" / "progan" / "stray.png")  # outside a label folder
    return root


def test_cnndetection_train_split_groups_classes(cnndetection):
    ds = read_dataset(cnndetection, "cnndetection", split="train")
    assert (ds.layout, ds.split, ds.groups()) == ("cnndetection", "train", ["progan"])
    assert _table(ds) == {("progan", 0): ["a.png", "b.v2.final.PNG", "d.jpg"],
                          ("progan", 1): ["c.JPEG", "e.png", "f.png"]}
    assert Counter((i.subgroup, i.label) for i in ds.items) == {("airplane", 0): 2, ("airplane", 1): 1,
                                                                 ("car", 0): 1, ("car", 1): 2}
    assert ds.skipped == {NOT_AN_IMAGE: 1}  # readme.txt; hidden files are not counted
    assert ds.shared_paths() == {}


def test_cnndetection_test_split_generators_and_class_folders(cnndetection):
    ds = read_dataset(cnndetection, split="test")
    assert ds.layout == "cnndetection"
    assert ds.counts() == {"progan": {"real": 1, "fake": 2, "unlabelled": 0},
                           "stylegan": {"real": 1, "fake": 1, "unlabelled": 0},
                           "whichfaceisreal": {"real": 2, "fake": 1, "unlabelled": 0}}
    assert {(i.group, i.subgroup) for i in ds.items} == {("progan", "airplane"), ("progan", "bus"),
                                                         ("stylegan", "bedroom"), ("whichfaceisreal", None)}
    assert ds.skipped == {NO_LABEL_FOLDER: 1}


def test_cnndetection_split_folder_given_directly(cnndetection):
    direct = read_dataset(cnndetection / "val")
    assert direct.layout == "cnndetection"
    assert _table(direct) == {("progan", 0): ["g.png"], ("progan", 1): ["h.png"]}
    assert read_dataset(cnndetection / "val", split="val").items == direct.items


def test_cnndetection_needs_a_split_when_several(cnndetection):
    with pytest.raises(InputError, match="holds the splits train, val, test; choose one with --split"):
        read_dataset(cnndetection, "cnndetection")
    with pytest.raises(InputError, match="no split folder 'tset'; found: train, val, test"):
        read_dataset(cnndetection, "cnndetection", split="tset")


# ---------------------------------------------------------------------------------------------
# UniFD

@pytest.fixture
def unifd(tmp_path: Path) -> Path:
    root = tmp_path / "diffusion_datasets"
    _imgs(root / "guided" / "1_fake", "g1.png", "g2.PNG")
    _imgs(root / "guided" / "0_real", "own.png")  # not used: guided pairs with imagenet
    _imgs(root / "ldm_200" / "1_fake", "l1.png", "l2.v2.png", "l3.png")
    _imgs(root / "dalle", "d1.png", "d2.png")  # fakes straight in the folder
    _imgs(root / "imagenet" / "0_real", "i1.JPEG", "i2.JPEG")
    _imgs(root / "laion" / "0_real", "r1.jpg", "r2.jpg", "r3.jpg")
    _traps(root / "laion" / "0_real")
    return root


def test_unifd_default_pairing(unifd):
    ds = read_dataset(unifd)
    assert ds.layout == "unifd"
    assert ds.pairing == {"dalle": "laion", "guided": "imagenet", "ldm_200": "laion"}
    assert _table(ds) == {
        ("dalle", 0): ["r1.jpg", "r2.jpg", "r3.jpg"], ("dalle", 1): ["d1.png", "d2.png"],
        ("guided", 0): ["i1.JPEG", "i2.JPEG"], ("guided", 1): ["g1.png", "g2.PNG"],
        ("ldm_200", 0): ["r1.jpg", "r2.jpg", "r3.jpg"], ("ldm_200", 1): ["l1.png", "l2.v2.png", "l3.png"],
    }
    shared = ds.shared_paths()
    assert sorted(Path(p).name for p in shared) == ["r1.jpg", "r2.jpg", "r3.jpg"]
    assert all(groups == ["dalle", "ldm_200"] for groups in shared.values())
    assert len(ds.unique_paths()) == len(ds.items) - 3
    assert ds.skipped == {NOT_AN_IMAGE: 1, REALS_IN_FAKE_FOLDER: 1}


def test_unifd_custom_pairing(unifd):
    ds = read_dataset(unifd, "unifd", pairing={"ldm_200": "imagenet", "guided": "guided"})
    table = _table(ds)
    assert table[("ldm_200", 0)] == ["i1.JPEG", "i2.JPEG"]
    assert table[("guided", 0)] == ["own.png"]  # paired with itself: its own 0_real
    assert table[("dalle", 0)] == ["r1.jpg", "r2.jpg", "r3.jpg"]
    assert REALS_IN_FAKE_FOLDER not in ds.skipped


def test_unifd_pairing_errors(unifd):
    with pytest.raises(InputError, match="pairing names the fake folder 'sdxl', which is not under"):
        read_dataset(unifd, "unifd", pairing={"sdxl": "laion"})
    with pytest.raises(InputError, match="'ldm_200' pairs with the real folder 'coco', which is not under"):
        read_dataset(unifd, "unifd", pairing={"ldm_200": "coco"})
    _img(unifd / "sdxl" / "1_fake" / "s.png")
    with pytest.raises(InputError, match=r"folder 'sdxl' is not in the pairing .* --pairing sdxl=laion"):
        read_dataset(unifd, "unifd")
    assert _table(read_dataset(unifd, "unifd", pairing={"sdxl": "laion"}))[("sdxl", 1)] == ["s.png"]


def test_unifd_unused_real_folder_is_noted(unifd):
    import shutil

    shutil.rmtree(unifd / "guided")
    ds = read_dataset(unifd, "unifd")
    assert "guided" not in ds.groups()
    assert any("'imagenet' pairs with no fake folder" in note for note in ds.notes)


# ---------------------------------------------------------------------------------------------
# DiffusionForensics

@pytest.fixture
def diffusionforensics(tmp_path: Path) -> Path:
    root = tmp_path / "DiffusionForensics"
    test = root / "images" / "test"
    _imgs(test / "lsun_bedroom" / "real", "b1.png", "b2.png", "b3.png")
    _imgs(test / "lsun_bedroom" / "adm", "a1.png", "a2.final.PNG")
    _imgs(test / "lsun_bedroom" / "ddpm", "d1.png")
    _imgs(test / "imagenet" / "real" / "n01440764", "n1.JPEG", "n2.JPEG")  # reals in class folders
    _imgs(test / "imagenet" / "sdv1", "s1.png", "s2.png")
    _traps(test / "imagenet" / "sdv1")
    _imgs(root / "images" / "train" / "lsun_bedroom" / "real", "t1.png")
    _imgs(root / "images" / "train" / "lsun_bedroom" / "adm", "t2.png")
    _imgs(root / "recons" / "test" / "lsun_bedroom" / "adm", "a1.png")  # DIRE's maps: never read
    _imgs(root / "dire" / "test" / "lsun_bedroom" / "adm", "a1.png")
    return root


def test_diffusionforensics_pairs_reals_of_each_source(diffusionforensics):
    ds = read_dataset(diffusionforensics, split="test")
    assert (ds.layout, ds.split) == ("diffusionforensics", "test")
    assert ds.pairing == {"imagenet/sdv1": "imagenet/real", "lsun_bedroom/adm": "lsun_bedroom/real",
                          "lsun_bedroom/ddpm": "lsun_bedroom/real"}
    assert _table(ds) == {
        ("imagenet/sdv1", 0): ["n1.JPEG", "n2.JPEG"], ("imagenet/sdv1", 1): ["s1.png", "s2.png"],
        ("lsun_bedroom/adm", 0): ["b1.png", "b2.png", "b3.png"], ("lsun_bedroom/adm", 1): ["a1.png", "a2.final.PNG"],
        ("lsun_bedroom/ddpm", 0): ["b1.png", "b2.png", "b3.png"], ("lsun_bedroom/ddpm", 1): ["d1.png"],
    }
    assert all("/images/test/" in item.path for item in ds.items)
    assert len(ds.shared_paths()) == 3
    assert ds.skipped == {NOT_AN_IMAGE: 1}


def test_diffusionforensics_split_choice_and_custom_pairing(diffusionforensics):
    with pytest.raises(InputError, match="holds the splits train, test; choose one"):
        read_dataset(diffusionforensics, "diffusionforensics")
    train = read_dataset(diffusionforensics / "images" / "train" / "..", split="train")
    assert _table(train) == {("lsun_bedroom/adm", 0): ["t1.png"], ("lsun_bedroom/adm", 1): ["t2.png"]}
    ds = read_dataset(diffusionforensics / "images" / "test", pairing={"imagenet/sdv1": "lsun_bedroom/real"})
    assert _table(ds)[("imagenet/sdv1", 0)] == ["b1.png", "b2.png", "b3.png"]
    with pytest.raises(InputError, match="pairing names the DiffusionForensics generator 'lsun_bedroom/sd'"):
        read_dataset(diffusionforensics, split="test", pairing={"lsun_bedroom/sd": "lsun_bedroom/real"})


# ---------------------------------------------------------------------------------------------
# GenImage

@pytest.fixture
def genimage(tmp_path: Path) -> Path:
    root = tmp_path / "GenImage"
    sd = root / "stable_diffusion_v_1_4" / "imagenet_ai_0419_sdv4"
    _imgs(sd / "val" / "ai", "x1.png", "x2.v2.final.PNG", "corrupt.png")
    _imgs(sd / "val" / "nature", "n1.JPEG", "bad.JPEG", "nested/n2.jpeg")
    _imgs(sd / "train" / "ai", "t1.png")
    _imgs(sd / "train" / "nature", "t2.JPEG")
    mj = root / "Midjourney"  # no extra nesting level
    _imgs(mj / "val" / "ai", "m1.png", "corrupt.png")
    _imgs(mj / "val" / "nature", "m2.JPEG")
    _traps(mj / "val" / "ai")
    return root


def test_genimage_both_nesting_levels_and_exclude_lists(genimage, tmp_path):
    exclude = tmp_path / "corrupted.txt"
    exclude.write_text("# known corrupted files\ncorrupt.png\n\n"
                       "imagenet_ai_0419_sdv4/val/nature/bad.JPEG\n./stable_diffusion_v_1_4/missing.png\n")
    ds = read_dataset(genimage, split="val", exclude=[exclude])
    assert (ds.layout, ds.split) == ("genimage", "val")
    assert _table(ds) == {
        ("Midjourney", 0): ["m2.JPEG"], ("Midjourney", 1): ["m1.png"],
        ("stable_diffusion_v_1_4", 0): ["n1.JPEG", "n2.jpeg"],
        ("stable_diffusion_v_1_4", 1): ["x1.png", "x2.v2.final.PNG"],
    }
    assert ds.skipped == {EXCLUDED: 3, NOT_AN_IMAGE: 1}
    assert len(read_dataset(genimage, split="val")) == 9


def test_genimage_split_rules(genimage):
    with pytest.raises(InputError, match="holds the splits train, val; choose one with --split"):
        read_dataset(genimage, "genimage")
    ds = read_dataset(genimage, "genimage", split="train")
    assert _table(ds) == {("stable_diffusion_v_1_4", 0): ["t2.JPEG"], ("stable_diffusion_v_1_4", 1): ["t1.png"]}
    assert any("Midjourney: no train/ai or train/nature" in note for note in ds.notes)
    one = read_dataset(genimage / "Midjourney", split="val")  # one generator folder given itself
    assert one.groups() == ["Midjourney"] and len(one) == 3


# ---------------------------------------------------------------------------------------------
# Generic and manifest

def test_generic_tree(tmp_path):
    root = tmp_path / "mine"
    _imgs(root / "a" / "0_real", "x.png")
    _imgs(root / "a" / "street" / "1_fake", "y.v1.PNG")
    _imgs(root / "b" / "1_fake", "z.JPEG")
    _img(root / "loose.png")
    _traps(root / "b" / "1_fake")
    ds = read_dataset(root)
    assert ds.layout == "generic"
    assert [(Path(i.path).name, i.label, i.group, i.subgroup) for i in ds.items] == [
        ("x.png", 0, "a", None), ("y.v1.PNG", 1, "a", "street"), ("z.JPEG", 1, "b", None)]
    assert ds.skipped == {NO_LABEL_FOLDER: 1, NOT_AN_IMAGE: 1}
    label_folder = read_dataset(root / "b" / "1_fake")
    assert [(i.label, i.group) for i in label_folder.items] == [(1, "b")]


def test_manifest_layout_keeps_file_order(tmp_path):
    _imgs(tmp_path / "imgs", "a.png", "b.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,group,subgroup\nimgs/b.png,1,g,cat\nimgs/a.png,0,g,\nimgs/b.png,1,g,cat\n")
    ds = read_dataset(manifest)
    assert ds.layout == "manifest" and ds.name == "list"
    assert [(Path(i.path).name, i.label, i.subgroup) for i in ds.items] == [("b.png", 1, "cat"), ("a.png", 0, None)]


def test_a_manifest_layout_is_read_row_by_row_each_row_once(tmp_path, monkeypatch):
    from tidy_detect.data import inputs as inputs_module
    from tidy_detect.data.layouts import open_dataset
    from tidy_detect.data.selection import select_inputs
    from tidy_detect.features.spill import KeySet

    _imgs(tmp_path / "imgs", *(f"{i}.png" for i in range(40)))
    manifest = tmp_path / "list.csv"
    lines = [f"imgs/{i % 25}.png,{i % 2},g{i % 25 % 3}" for i in range(60)]  # 35 repeats of 25 rows
    manifest.write_text("path,label,group\n" + "\n".join(lines) + "\n")
    monkeypatch.setattr(inputs_module, "read_manifest", lambda *a: pytest.fail("the manifest was read whole"))
    monkeypatch.setattr(KeySet, "BUFFER", 4)  # the repeats are found in sorted runs too
    listing = open_dataset(manifest, "manifest")
    rows = iter(listing.items)
    first = next(rows)
    assert Path(first.path).name == "0.png" and not isinstance(listing.items, list)
    items = [first, *rows]
    assert [Path(i.path).name for i in items] == [f"{i}.png" for i in range(25)]
    streamed = list(select_inputs([manifest], layout="manifest", stream=True).items)
    assert streamed == items == list(read_dataset(manifest, "manifest").items)


# ---------------------------------------------------------------------------------------------
# Detection, registry, errors, extraction inputs

def test_detect_layout_rules(cnndetection, unifd, diffusionforensics, genimage, tmp_path):
    assert detect_layout(cnndetection) == "cnndetection"
    assert detect_layout(cnndetection / "train") == "cnndetection"
    assert detect_layout(unifd) == "unifd"
    assert detect_layout(diffusionforensics) == "diffusionforensics"
    assert detect_layout(diffusionforensics / "images" / "test") == "diffusionforensics"
    assert detect_layout(genimage) == "genimage"
    assert detect_layout(genimage / "Midjourney") == "genimage"
    _imgs(tmp_path / "other" / "x" / "y" / "1_fake", "a.png")
    assert detect_layout(tmp_path / "other") == "generic"
    (tmp_path / "m.csv").write_text("path\na.png\n")
    assert detect_layout(tmp_path / "m.csv") == "manifest"
    _imgs(tmp_path / "flat", "a.png")
    with pytest.raises(InputError, match="cannot tell its dataset layout .* pass --layout, one of: manifest"):
        detect_layout(tmp_path / "flat")
    with pytest.raises(InputError, match="nope: no such file or folder"):
        read_dataset(tmp_path / "nope")


def test_registry_and_option_errors(unifd, cnndetection):
    assert set(layout_names()) == {"cnndetection", "unifd", "diffusionforensics", "genimage", "generic", "manifest"}
    with pytest.raises(UnknownNameError, match=r"^Unknown layout 'wang2020'. Known: auto, manifest, genimage, "):
        get_layout("wang2020")
    with pytest.raises(UnknownNameError, match="Unknown layout 'x'"):
        read_dataset(unifd, "x")
    with pytest.raises(ConfigError, match="split is used only by the layouts genimage, diffusionforensics, "
                                          "cnndetection; got split='test' for layout 'unifd'"):
        read_dataset(unifd, "unifd", split="test")
    with pytest.raises(ConfigError, match="pairing is used only by the layouts diffusionforensics, unifd"):
        read_dataset(cnndetection, "cnndetection", split="test", pairing={"a": "b"})
    (cnndetection / "empty" / "1_fake").mkdir(parents=True)
    with pytest.raises(InputError, match=r"empty: no images found for layout 'generic' \(expected any tree"):
        read_dataset(cnndetection / "empty", "generic")
    with pytest.raises(InputError, match="no GenImage folders"):
        read_dataset(cnndetection / "test", "genimage")
    with pytest.raises(InputError, match="missing.txt: cannot read the exclude list"):
        read_dataset(unifd, exclude=[unifd / "missing.txt"])
    assert parse_pairing(["ldm_200=laion", " dalle = imagenet "]) == {"ldm_200": "laion", "dalle": "imagenet"}
    with pytest.raises(ConfigError, match="--pairing must be FAKE_FOLDER=REAL_FOLDER, got 'ldm_200'"):
        parse_pairing(["ldm_200"])


def test_items_for_inputs_list_each_file_once(unifd, cnndetection):
    assert items_for_inputs([cnndetection / "train"]) == collect_inputs([cnndetection / "train"])
    with pytest.raises(ConfigError, match="need a dataset layout"):
        items_for_inputs([unifd], split="test")
    summary = InputSummary()
    items = items_for_inputs([unifd, unifd], "auto", summary=summary)  # the same root twice: read once
    dataset = read_dataset(unifd)
    assert items == dataset.extraction_items()
    assert summary.images == 12 and summary.ignored_files == 1
    assert len({i.path for i in items}) == len(items) == len(dataset.unique_paths())
    assert _table(items) == {
        ("dalle", 1): ["d1.png", "d2.png"], ("guided", 1): ["g1.png", "g2.PNG"],
        ("imagenet", 0): ["i1.JPEG", "i2.JPEG"], ("laion", 0): ["r1.jpg", "r2.jpg", "r3.jpg"],
        ("ldm_200", 1): ["l1.png", "l2.v2.png", "l3.png"]}
    both = items_for_inputs([unifd, cnndetection / "train"], "auto")
    assert Counter(i.group for i in both) == {"dalle": 2, "guided": 2, "imagenet": 2, "laion": 3, "ldm_200": 3,
                                              "progan": 6}


def test_expand_pairing_restores_the_per_generator_view(unifd, diffusionforensics, genimage):
    for dataset in (read_dataset(unifd), read_dataset(diffusionforensics, split="test"),
                    read_dataset(genimage, split="val")):
        once = dataset.extraction_items()
        expanded = expand_pairing(once, dataset.pairing)
        assert sorted(expanded, key=lambda i: (i.group, i.label, i.path)) == list(dataset.items)
    assert expand_pairing(once, {}) == once
