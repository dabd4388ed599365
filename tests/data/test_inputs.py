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


# -- links, loops, hostile files and encodings --------------------------------------------------

def test_symlink_loops_end_and_no_file_is_listed_twice(tmp_path):
    import os

    root = tmp_path / "tree"
    _img(root / "gen" / "0_real" / "a.png")
    _img(root / "gen" / "1_fake" / "b.png")
    os.symlink(root, root / "gen" / "0_real" / "loop")  # a link back to an ancestor
    os.symlink(root / "gen", root / "gen" / "1_fake" / "again")  # a second one, elsewhere
    os.symlink(root / "gen" / "0_real" / "a.png", root / "gen" / "1_fake" / "link-to-a.png")  # a file link
    summary = InputSummary()
    items = collect_inputs([root], summary)  # used to hang, or list a.png dozens of times
    assert sorted(os.path.basename(i.path) for i in items) == ["a.png", "b.png"]
    assert summary.repeated_links >= 3


def test_layouts_and_inspect_survive_link_loops(tmp_path):
    import os

    from tidy_detect.data.inspect import inspect_dataset
    from tidy_detect.data.layouts import REACHED_AGAIN, read_dataset

    root = tmp_path / "CNN_synth_testset"
    _img(root / "biggan" / "0_real" / "a.png")
    _img(root / "biggan" / "1_fake" / "b.png")
    os.symlink(root, root / "biggan" / "1_fake" / "up")
    dataset = read_dataset(root, "cnndetection")
    assert len(dataset.items) == 2 and dataset.skipped[REACHED_AGAIN] >= 1
    report = inspect_dataset(dataset, probe=2)
    assert report  # counted, probed, finished


def test_fifo_in_a_tree_is_an_error_row_not_a_hang(tmp_path):
    import os

    from tidy_detect.data.inspect import UNREADABLE, probe_format

    root = tmp_path / "tree"
    _img(root / "gen" / "0_real" / "a.png")
    os.mkfifo(root / "gen" / "0_real" / "pipe.png")
    items = collect_inputs([root])
    assert len(items) == 2  # listed; reading it gives its error row (tests/features)
    assert probe_format(root / "gen" / "0_real" / "pipe.png") == UNREADABLE


def test_utf16_manifest_is_read(tmp_path):
    _img(tmp_path / "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\na.png,fake\n", encoding="utf-16")  # with its byte-order mark
    items = read_manifest(manifest)
    assert [(i.path, i.label) for i in items] == [(str(tmp_path / "a.png"), 1)]


def test_manifest_in_another_encoding_is_a_clear_error(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_bytes("path,label\ncaf\xe9.png,0\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8 text.*save it as UTF-8"):
        read_manifest(manifest)
