import pytest
from PIL import Image

from tidy_detect.data.inputs import InputSummary, collect_inputs, read_manifest
from tidy_detect.errors import InputError


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def test_folder_labels_groups_and_traps(tmp_path):
    root = tmp_path / "test"
    _img(root / "progan" / "airplane" / "0_real" / "a.png")
    _img(root / "progan" / "airplane" / "1_fake" / "b.v2.final.PNG")  # several dots, upper case
    _img(root / "dalle" / "1_fake" / "c.JPEG")
    _img(root / "loose.jpg")
    (root / "dalle" / "1_fake" / "readme.txt").write_text("not an image")
    (root / "dalle" / "1_fake" / ".hidden.png").write_bytes(b"")
    summary = InputSummary()
    items = collect_inputs([root], summary)
    by_name = {p.split("/")[-1]: it for it in items for p in [it.path]}
    assert set(by_name) == {"a.png", "b.v2.final.PNG", "c.JPEG", "loose.jpg"}
    assert (by_name["a.png"].label, by_name["a.png"].group) == (0, "progan")
    assert (by_name["b.v2.final.PNG"].label, by_name["b.v2.final.PNG"].group) == (1, "progan")
    assert (by_name["c.JPEG"].label, by_name["c.JPEG"].group) == (1, "dalle")
    assert (by_name["loose.jpg"].label, by_name["loose.jpg"].group) == (None, "test")
    assert summary.ignored_files == 1 and summary.images == 4


def test_label_folders_right_under_input_group_is_input_name(tmp_path):
    root = tmp_path / "stylegan"
    _img(root / "0_real" / "x.png")
    _img(root / "1_fake" / "y.png")
    items = collect_inputs([root])
    assert [(it.label, it.group) for it in items] == [(0, "stylegan"), (1, "stylegan")]


def test_nearest_label_folder_wins(tmp_path):
    _img(tmp_path / "d" / "0_real" / "1_fake" / "z.png")
    assert collect_inputs([tmp_path / "d"])[0].label == 1


def test_manifest(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,group,caption\nimgs/a.png,fake,gen1,a dog on a table\n"
                        f"{tmp_path / 'imgs' / 'b.png'},0,,\n")
    items = read_manifest(manifest)
    assert items[0].path == str(tmp_path / "imgs" / "a.png")
    assert (items[0].label, items[0].group, items[0].caption) == (1, "gen1", "a dog on a table")
    assert (items[1].label, items[1].group, items[1].caption) == (0, None, None)
    assert collect_inputs([manifest]) == items


def test_manifest_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,1\n")
    with pytest.raises(InputError, match="needs a 'path' column; found columns: file, label"):
        read_manifest(bad)
    bad.write_text("path,label\na.png,maybe\n")
    with pytest.raises(InputError, match=r"bad.csv, line 2: label must be 0, 1, real or fake .* got 'maybe'"):
        read_manifest(bad)
    bad.write_text("path,label\n,1\n")
    with pytest.raises(InputError, match="line 2: the 'path' value is empty"):
        read_manifest(bad)


def test_missing_input(tmp_path):
    with pytest.raises(InputError, match="nope: no such file or folder"):
        collect_inputs([tmp_path / "nope"])


def test_duplicates_kept_once(tmp_path):
    p = _img(tmp_path / "a.png")
    assert len(collect_inputs([p, p, tmp_path])) == 1
