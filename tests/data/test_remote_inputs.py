"""Inputs behind URIs: every input kind on a local S3 endpoint (moto on loopback) reads as it does
on disk, through pyarrow's S3 filesystem with the credentials of the environment; fsspec
filesystems (hf://, memory://) through pyarrow's FSSpecHandler."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from tidy_detect.config import load_preset
from tidy_detect.data import remote, sources
from tidy_detect.data.inputs import collect_inputs
from tidy_detect.data.layouts import read_dataset
from tidy_detect.data.sources import SourceOptions, read_item, stat_item
from tidy_detect.errors import ImageNotFoundError, ImageTooLargeError, InputError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore
from tidy_detect.images import FileStat

from tests.conftest import make_tree, random_image
from tests.data.conftest import item_view, make_parquet, make_saved_dataset, make_shards, make_tar, make_zip, \
    tree_files


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote") / "bench"
    make_tree(root, {"progan": 2, "dalle": 1})
    return root



def test_a_folder_on_s3_lists_and_reads_as_on_disk(s3, tree):
    uri = s3.put_tree("data/bench", tree)
    items = collect_inputs([uri])
    local = collect_inputs([tree])
    assert item_view(items, uri) == item_view(local, str(tree))
    assert all(i.path.startswith("s3://") for i in items)
    data, stat = read_item(items[0].path)
    assert data == open(local[0].path, "rb").read()
    assert stat.size == len(data) and stat.inode == 0 and stat.ctime_ns in (stat.mtime_ns, -1)
    assert stat_item(items[0].path) == FileStat(stat.size, stat.mtime_ns, stat.mtime_ns, 0)
    assert sources.is_identity(items[0].path)


def _kinds(tree, tmp_path):
    files = tree_files(tree)
    arrow = tmp_path / "bench.arrow"
    table = pa.table({"image": [d for _, d in files], "label": [int("1_fake" in n) for n, _ in files]})
    with pa.ipc.new_file(str(arrow), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return {
        "zip": make_zip(files, tmp_path / "bench.zip"),
        "tar": make_tar(files, tmp_path / "bench.tar", "w"),
        "tar.gz": make_tar(files, tmp_path / "bench.tar.gz"),
        "parquet": make_parquet(files, tmp_path / "bench.parquet"),
        "arrow": arrow,
    }


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "parquet", "arrow"])
def test_each_source_on_s3_gives_the_items_and_bytes_of_the_local_file(s3, tree, tmp_path, kind):
    local = _kinds(tree, tmp_path)[kind]
    uri = s3.put_file(f"sources/{local.name}", local)
    want, got = collect_inputs([local]), collect_inputs([uri])
    assert item_view(got, uri) == item_view(want, str(local)) and len(got) == 6
    for a, b in zip(reversed(want), reversed(got)):  # out of order too
        assert read_item(b.path)[0] == read_item(a.path)[0]
    assert stat_item(got[0].path).inode == 0


def test_datasets_folders_and_shard_patterns_on_s3(s3, tree, tmp_path):
    files = tree_files(tree)
    saved = s3.put_tree("hf/bench", make_saved_dataset(files, tmp_path / "bench"))
    options = SourceOptions(group_column="generator")
    local = collect_inputs([tmp_path / "bench"], options=options)
    got = collect_inputs([saved], options=options)
    assert [(i.label, i.group) for i in got] == [(i.label, i.group) for i in local]
    assert [read_item(i.path)[0] for i in got] == [d for _, d in files]
    pattern = make_shards(files, tmp_path / "shards", per_shard=4)
    s3.put_tree("wds", tmp_path / "shards")
    remote_pattern = s3.uri("wds/shard-{0000..0001}.tar")
    assert item_view(collect_inputs([remote_pattern]), s3.uri("wds")) == \
        item_view(collect_inputs([pattern]), str(tmp_path / "shards"))


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_a_layout_reads_a_tree_on_s3_as_on_disk(s3, tmp_path, container):
    root = tmp_path / "CNNDetection"
    make_tree(root / "test" / "progan" / "cat", {"": 1}, seed=3)
    make_tree(root / "test" / "biggan", {"": 1}, seed=4)
    uri = s3.put_tree("CNNDetection", root) if container == "folder" else \
        s3.put_file("CNNDetection.zip", make_zip(tree_files(root), tmp_path / "CNNDetection.zip"))
    want, got = read_dataset(root, "auto", split="test"), read_dataset(uri, "auto", split="test")
    assert got.layout == "cnndetection" and got.split == "test"
    strip = (lambda p: p.split("!/", 1)[1]) if container == "zip" else (lambda p: p[len(uri) + 1:])
    assert sorted((strip(i.path), i.label, i.group, i.subgroup) for i in got.items) == \
        sorted((i.path[len(str(root)) + 1:], i.label, i.group, i.subgroup) for i in want.items)
    assert got.container == ("s3 folder" if container == "folder" else "zip on s3")


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4, "num_workers": 2})
    return Extractor(config).load()


def _rows(store):
    return {r["sha256"]: r for r in FeatureStore(store).rows() if r["error"] is None}


@pytest.mark.slow
def test_extraction_from_s3_gives_the_rows_of_the_folder_and_resumes(s3, extractor, tree, tmp_path):
    extract([tree], tmp_path / "folder", extractor=extractor)
    want = _rows(tmp_path / "folder")
    inputs = [s3.put_tree("tree/bench", tree),
              s3.put_file("p/bench.parquet", make_parquet(tree_files(tree), tmp_path / "bench.parquet")),
              s3.put_file("z/bench.tar.gz", make_tar(tree_files(tree), tmp_path / "bench.tar.gz"))]
    for n, uri in enumerate(inputs):
        store = tmp_path / f"s3-{n}"
        summary = extract([uri], store, extractor=extractor)
        assert (summary.processed, summary.errors) == (6, 0)
        got = _rows(store)
        assert set(got) == set(want)
        for sha, row in got.items():
            assert row["path"].startswith(uri)
            assert (row["label"], row["group"]) == (want[sha]["label"], want[sha]["group"])
            assert np.allclose(row["global_image"], want[sha]["global_image"], atol=1e-5)
        again = extract([uri], store, extractor=extractor)
        assert (again.skipped, again.processed, again.changed) == (6, 0, 0)
    # an object replaced under the same key is seen (size and mtime) and redone, the rest skipped
    first = sorted(p for p in tree.rglob("*.png"))[0]
    key = f"tree/bench/{first.relative_to(tree).as_posix()}"
    other = io.BytesIO()
    random_image(np.random.default_rng(7), 40, 30).save(other, "PNG")
    s3.put(key, other.getvalue())
    again = extract([inputs[0]], tmp_path / "s3-0", extractor=extractor)
    assert (again.changed, again.processed) == (1, 1)


def test_remote_errors_are_error_rows_and_limits_hold_before_reading(s3, tree, tmp_path, monkeypatch):
    files = tree_files(tree)
    uri = s3.put("x/big.png", files[0][1])
    with monkeypatch.context() as patched, pytest.raises(ImageTooLargeError, match="over the limit of 100 bytes"):
        patched.setattr(remote, "open_stream", lambda *a: pytest.fail("the object was read"))
        read_item(uri, max_bytes=100)
    with pytest.raises(ImageNotFoundError, match="no such object"):
        read_item(s3.uri("x/gone.png"))
    zipped = s3.put_file("x/bench.zip", make_zip(files, tmp_path / "bench.zip"))
    item = collect_inputs([zipped])[0]
    with pytest.raises(ImageTooLargeError):
        read_item(item.path, max_bytes=10)


def test_truncated_remote_archives_are_refused(s3, tree, tmp_path):
    for local in (make_zip(tree_files(tree), tmp_path / "t.zip"), make_tar(tree_files(tree), tmp_path / "t.tar", "w"),
                  make_tar(tree_files(tree), tmp_path / "t.tar.gz")):
        uri = s3.put(f"cut/{local.name}", local.read_bytes()[:len(local.read_bytes()) // 2])
        with pytest.raises(InputError, match="truncated") as caught:
            collect_inputs([uri])
        assert uri in str(caught.value)


def test_credentials_and_options_never_come_in_a_uri(s3):
    with pytest.raises(InputError, match="credentials do not belong in a URI") as caught:
        collect_inputs([f"s3://AKIAEXAMPLE:s3cr3t@{s3.name}/x.zip"])
    assert "s3cr3t" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
    with pytest.raises(InputError, match="options in a URI"):
        collect_inputs([f"s3://{s3.name}/x.zip?endpoint_override=localhost:1"])
    with pytest.raises(InputError, match="no such file or folder"):
        collect_inputs([s3.uri("nothing/here")])


def test_unknown_schemes_say_what_is_supported():
    with pytest.raises(InputError, match=r"unknown or unavailable filesystem nosuchfs://.*supported: s3://, gs://, "
                                         r"hf://, file://"):
        collect_inputs(["nosuchfs://bucket/x.zip"])


def test_fsspec_filesystems_are_read_through_pyarrow(tree, tmp_path):
    """hf:// goes through HfFileSystem, which needs the hub; fsspec's memory:// takes the same
    PyFileSystem(FSSpecHandler(...)) path offline."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in sorted(p for p in tree.rglob("*.png")):
        memory.pipe(f"/tidy-test/bench/{path.relative_to(tree).as_posix()}", path.read_bytes())
    memory.pipe("/tidy-test/bench.parquet", make_parquet(tree_files(tree), tmp_path / "bench.parquet").read_bytes())
    try:
        got = collect_inputs(["memory://tidy-test/bench"])
        assert item_view(got, "memory://tidy-test/bench") == item_view(collect_inputs([tree]), str(tree))
        assert read_item(got[0].path)[0] == open(collect_inputs([tree])[0].path, "rb").read()
        table = collect_inputs(["memory://tidy-test/bench.parquet"])
        assert [read_item(i.path)[0] for i in table] == [d for _, d in tree_files(tree)]
    finally:
        memory.rm("/tidy-test", recursive=True)


def test_a_file_uri_is_the_local_path(tree):
    assert collect_inputs([f"file://{tree}"]) == collect_inputs([tree])


def test_inspect_reports_the_container_of_remote_inputs(s3, tree, tmp_path):
    from tidy_detect.data.inspect import inspect_dataset

    uri = s3.put_file("i/bench.tar.gz", make_tar(tree_files(tree), tmp_path / "bench.tar.gz"))
    report = inspect_dataset(read_dataset(uri), probe=2)
    assert report["container"] == "tar.gz on s3" and report["layout"] == "cnndetection"
    assert report["groups"]["progan"]["probed"] == {"fake": {"PNG": 2}, "real": {"PNG": 2}}


def test_the_stat_of_an_object_read_is_the_stat_resume_compares(s3, tree, tmp_path):
    import time

    files = tree_files(tree)
    plain = s3.put("st/a.png", files[0][1])
    member = collect_inputs([s3.put_file("st/bench.zip", make_zip(files, tmp_path / "bench.zip"))])[0].path
    time.sleep(2.1)  # past the racy window
    for path in (plain, member):
        data, stat = read_item(path)
        assert stat.size == len(data) and stat.ctime_ns == stat.mtime_ns and stat.inode == 0
        assert stat_item(path, stat) == stat


def test_a_table_on_s3_whose_rows_hold_paths_reads_the_objects_beside_it(s3, tree, tmp_path):
    files = tree_files(tree)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": "imgs/a.png"}, {"bytes": None, "path": "../up.png"},
             {"bytes": None, "path": "/home/someone/b.png"}, {"bytes": files[0][1], "path": "c.png"}]
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array(cells, type=image)}), tmp_path / "t.parquet")
    uri = s3.put_file("data/t.parquet", tmp_path / "t.parquet")
    s3.put("data/imgs/a.png", files[1][1])
    s3.put("up.png", files[2][1])
    items = collect_inputs([uri])
    assert [i.path for i in items] == [s3.uri("data/imgs/a.png"), s3.uri("up.png"), f"{uri}!/2", f"{uri}!/3"]
    assert read_item(items[0].path)[0] == files[1][1] and read_item(items[1].path)[0] == files[2][1]
    with pytest.raises(ImageNotFoundError, match=r"only a path: '/home/someone/b.png'"):
        read_item(items[2].path)  # another machine's file: not followed
    assert read_item(items[3].path)[0] == files[0][1]


def test_a_manifest_on_s3_names_objects_beside_it_and_anywhere(s3, tree, tmp_path):
    files = tree_files(tree)
    s3.put("sets/imgs/a.png", files[0][1])
    s3.put("other/b.png", files[1][1])
    local = tree / files[2][0]
    manifest = ("path,label,group\n"
                "imgs/a.png,fake,gen\n"
                f"{s3.uri('other/b.png')},real,\n"
                f"{local},real,here\n")
    uri = s3.put("sets/list.csv", manifest.encode("utf-16"))  # what a spreadsheet saves as "Unicode text"
    items = collect_inputs([uri])
    assert [(i.path, i.label, i.group) for i in items] == [
        (s3.uri("sets/imgs/a.png"), 1, "gen"), (s3.uri("other/b.png"), 0, None), (str(local), 0, "here")]
    assert read_item(items[0].path)[0] == files[0][1]
    s3.put("sets/up.csv", b"path\n../../x.png\n")
    with pytest.raises(InputError, match=r"line 2: the path '../../x.png' leads out of the bucket"):
        collect_inputs([s3.uri("sets/up.csv")])
    s3.put("sets/bad.csv", b"file\nx.png\n")
    with pytest.raises(InputError, match="a manifest needs a 'path' column"):
        collect_inputs([s3.uri("sets/bad.csv")])
