"""Sources read in place: zip, tar.gz, WebDataset shards and Parquet give the rows a folder gives."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidy_detect.config import load_preset
from tidy_detect.data.inputs import collect_inputs
from tidy_detect.data.sources import read_item
from tidy_detect.errors import ImageTooLargeError, InputError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 3, "num_workers": 2})
    return Extractor(config).load()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "bench"
    make_tree(root, {"progan": 2, "dalle": 1})
    return root


def _files(tree):
    return sorted((p.relative_to(tree).as_posix(), p.read_bytes()) for p in tree.rglob("*.png"))


def _zip(tree, path):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in _files(tree):
            archive.writestr(name, data)
    return path


def _tar(path, members, mode="w:gz"):
    with tarfile.open(path, mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _webdataset(tree, path):
    members = []
    for i, (name, data) in enumerate(_files(tree)):
        members += [(f"s{i:03d}.png", data), (f"s{i:03d}.cls", b"1" if "1_fake" in name else b"0"),
                    (f"s{i:03d}.json", json.dumps({"caption": f"sample {i}"}).encode())]
    return _tar(path, members, "w")


def _parquet(tree, path):
    files = _files(tree)
    table = pa.table({
        "image": [{"bytes": data, "path": name.rsplit("/", 1)[-1]} for name, data in files],
        "label": [1 if "1_fake" in name else 0 for name, _ in files],
        "group": [name.split("/")[0] for name, _ in files],
    })
    pq.write_table(table, path, row_group_size=4)
    return path


def _by_content(store):
    return {r["sha256"]: r for r in FeatureStore(store).rows()}


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "parquet"])
def test_a_source_gives_the_rows_of_its_folder(extractor, tree, tmp_path, kind):
    make = {"zip": lambda: _zip(tree, tmp_path / "bench.zip"),
            "tar.gz": lambda: _tar(tmp_path / "bench.tar.gz", _files(tree)),
            "parquet": lambda: _parquet(tree, tmp_path / "bench.parquet")}[kind]
    source = make()
    extract([tree], tmp_path / "folder", extractor=extractor)
    summary = extract([source], tmp_path / "store", extractor=extractor)
    assert (summary.total, summary.processed, summary.errors) == (6, 6, 0)
    want, got = _by_content(tmp_path / "folder"), _by_content(tmp_path / "store")
    assert set(want) == set(got)
    for sha, row in got.items():
        assert row["path"].startswith(f"{source}!/")
        assert (row["label"], row["group"]) == (want[sha]["label"], want[sha]["group"])
        assert np.allclose(row["global_image"], want[sha]["global_image"], atol=1e-5)
        assert np.allclose(row["global_text"], want[sha]["global_text"], atol=1e-5)
    again = extract([source], tmp_path / "store", extractor=extractor)
    assert (again.skipped, again.processed, again.changed) == (6, 0, 0)  # hashed: the archive is "racy"


def test_webdataset_labels_come_from_the_sidecars(tree, tmp_path):
    items = collect_inputs([_webdataset(tree, tmp_path / "shard.tar")])
    assert len(items) == 6 and [i.path.rsplit("!/", 1)[1] for i in items] == [f"s{i:03d}.png" for i in range(6)]
    want = [1 if "1_fake" in name else 0 for name, _ in _files(tree)]
    assert [i.label for i in items] == want and {i.group for i in items} == {"shard"}
    assert [i.caption for i in items] == [f"sample {i}" for i in range(6)]
    data, stat = read_item(items[0].path)
    assert data == _files(tree)[0][1] and stat is not None


def test_bad_member_is_an_error_row_and_the_rest_is_kept(extractor, tree, tmp_path):
    files = _files(tree) + [("progan/1_fake/broken.png", b"not a png")]
    source = _tar(tmp_path / "bad.tar", files, "w")
    summary = extract([source], tmp_path / "store", extractor=extractor)
    assert (summary.processed, summary.errors) == (6, 1)
    rows = {r["path"]: r for r in FeatureStore(tmp_path / "store").rows(["path", "error", "error_kind"])}
    assert rows[f"{source}!/progan/1_fake/broken.png"]["error_kind"] == "unsupported"  # not an image
    again = extract([source], tmp_path / "store", extractor=extractor)
    assert (again.skipped, again.kept_errors, again.processed) == (7, 1, 0)


def test_a_member_over_the_limit_is_refused_unread(tree, tmp_path, monkeypatch):
    source = _zip(tree, tmp_path / "big.zip")
    identity = collect_inputs([source])[0].path
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("the member was read"))
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        read_item(identity, max_bytes=10)


def test_members_are_never_written_and_traversal_names_are_only_names(tree, tmp_path):
    source = _tar(tmp_path / "evil.tar", [("../../escape/1_fake/x.png", _files(tree)[0][1])], "w")
    (item,) = collect_inputs([source])
    assert item.label == 1 and item.group == "escape"
    assert read_item(item.path)[0] == _files(tree)[0][1]
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("suffix", ["zip", "tar.gz", "tar"])
def test_a_truncated_archive_is_an_input_error_or_error_rows(tree, tmp_path, suffix):
    whole = {"zip": lambda p: _zip(tree, p), "tar.gz": lambda p: _tar(p, _files(tree)),
             "tar": lambda p: _tar(p, _files(tree), "w")}[suffix](tmp_path / f"t.{suffix}")
    data = whole.read_bytes()
    whole.write_bytes(data[:len(data) // 2])
    try:
        items = collect_inputs([whole])
    except InputError as exc:
        assert str(whole) in str(exc)
        return
    from tidy_detect.errors import ImageError
    outcomes = []
    for item in items:
        try:
            outcomes.append(len(read_item(item.path)[0]))
        except ImageError as exc:
            outcomes.append(exc.kind)
    assert "corrupt" in outcomes or len(items) < 6


def test_the_command_line_extracts_an_archive(tiny_preset, tree, tmp_path):
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    source = _zip(tree, tmp_path / "bench.zip")
    result = CliRunner().invoke(app, ["extract", str(source), "--out", str(tmp_path / "s"), "--preset",
                                      str(tiny_preset)])
    assert result.exit_code == 0, result.output
    rows = list(FeatureStore(tmp_path / "s").rows(["path", "label", "group", "error"]))
    assert len(rows) == 6 and all(r["error"] is None and r["path"].startswith(f"{source}!/") for r in rows)


@pytest.mark.parametrize("kind", ["parquet", "arrow-stream", "arrow-file"])
def test_tables_map_class_names_and_read_rows_in_any_order(tree, tmp_path, kind):
    from tidy_detect.data.sources import SourceOptions

    files = _files(tree)
    names = {b"huggingface": json.dumps({"info": {"features": {"y": {"names": ["fake", "real"],
                                                                    "_type": "ClassLabel"}}}}).encode()}
    table = pa.table({"pic": [data for _, data in files], "y": [0 if "1_fake" in n else 1 for n, _ in files],
                      "text": [f"c{i}" for i in range(len(files))]}).replace_schema_metadata(names)
    path = tmp_path / ("t.parquet" if kind == "parquet" else "t.arrow")
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=2)
    else:
        with (pa.ipc.new_stream if kind == "arrow-stream" else pa.ipc.new_file)(str(path), table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
    items = collect_inputs([path], options=SourceOptions(label_column="y", caption_column="text"))
    assert [i.label for i in items] == [1 if "1_fake" in n else 0 for n, _ in files]
    assert [i.caption for i in items] == [f"c{i}" for i in range(len(files))] and {i.group for i in items} == {"t"}
    for k in reversed(range(len(files))):
        assert read_item(items[k].path)[0] == files[k][1]
    with pytest.raises(InputError, match="no image column 'nope'"):
        collect_inputs([path], options=SourceOptions(image_column="nope"))


def test_a_rewritten_archive_redoes_only_the_members_that_changed(extractor, tree, tmp_path):
    from tests.conftest import random_image

    source = _zip(tree, tmp_path / "bench.zip")
    extract([source], tmp_path / "store", extractor=extractor)
    files = _files(tree)
    buffer = io.BytesIO()
    random_image(np.random.default_rng(9), 30, 30).save(buffer, "PNG")
    with zipfile.ZipFile(source, "w") as archive:
        for k, (name, data) in enumerate(files):
            archive.writestr(name, buffer.getvalue() if k == 0 else data)
    again = extract([source], tmp_path / "store", extractor=extractor)
    assert (again.hashed, again.changed, again.processed, again.skipped) == (6, 1, 1, 5)
