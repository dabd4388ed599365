"""Sources read in place: zip, tar.gz, WebDataset shards and Parquet give the rows a folder gives."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidy_detect.config import load_preset
from tidy_detect.data.inputs import collect_inputs
from tidy_detect.data.sources import SourceOptions, read_item
from tidy_detect.errors import ImageTooLargeError, InputError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree
from tests.data.conftest import make_parquet, make_tar, make_zip, tree_files


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
    return tree_files(tree, (".png",))


def _zip(tree, path):
    return make_zip(_files(tree), path)


def _tar(path, members, mode="w:gz"):
    return make_tar(members, path, mode)


def _webdataset(tree, path):
    members = []
    for i, (name, data) in enumerate(_files(tree)):
        members += [(f"s{i:03d}.png", data), (f"s{i:03d}.cls", b"1" if "1_fake" in name else b"0"),
                    (f"s{i:03d}.json", json.dumps({"caption": f"sample {i}"}).encode())]
    return _tar(path, members, "w")


def _parquet(tree, path):
    return make_parquet(_files(tree), path)


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


@pytest.mark.parametrize("suffix", ["zip", "tar.gz", "tar", "parquet", "arrow"])
@pytest.mark.parametrize("keep", [0.3, 0.6, "boundary"])
def test_a_truncated_source_is_refused_whole_before_extraction(tree, tmp_path, suffix, keep):
    whole = {"zip": lambda p: _zip(tree, p), "tar.gz": lambda p: _tar(p, _files(tree)),
             "tar": lambda p: _tar(p, _files(tree), "w"), "parquet": lambda p: _parquet(tree, p),
             "arrow": lambda p: _arrow_stream(tree, p)}[suffix](tmp_path / f"t.{suffix}")
    data = whole.read_bytes()
    if keep == "boundary":  # cut where a member ends: the listing alone cannot see it
        cut = {"tar": 512 + 512 * -(-len(_files(tree)[0][1]) // 512)}.get(suffix, len(data) - 8)
    else:
        cut = int(len(data) * keep)
    whole.write_bytes(data[:cut])
    with pytest.raises(InputError, match="truncated") as caught:
        collect_inputs([whole])
    assert str(whole) in str(caught.value)
    with pytest.raises(InputError):
        extract([whole], tmp_path / "store")  # refused before any model loads or store is made
    assert not (tmp_path / "store").exists()


def _arrow_stream(tree, path):
    files = _files(tree)
    table = pa.table({"image": [data for _, data in files], "label": [1 if "1_fake" in n else 0 for n, _ in files]})
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return path


def test_a_damaged_zip_member_is_an_error_row(extractor, tree, tmp_path):
    source = _zip(tree, tmp_path / "bench.zip")
    data = bytearray(source.read_bytes())
    info = zipfile.ZipFile(source).infolist()[2]
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start:start + 16] = bytes(16)  # inside the member's data: its CRC no longer matches
    source.write_bytes(bytes(data))
    summary = extract([source], tmp_path / "store", extractor=extractor)
    assert (summary.processed, summary.errors) == (5, 1)
    rows = {r["path"]: r for r in FeatureStore(tmp_path / "store").rows(["path", "error", "error_kind"])}
    bad = rows[f"{source}!/{info.filename}"]
    assert bad["error_kind"] == "corrupt" and "CRC" in bad["error"]


def test_webdataset_columns_name_json_fields_and_the_image_extension(tree, tmp_path):
    members = []
    for i, (name, data) in enumerate(_files(tree)):
        members += [(f"s{i:03d}.png", data), (f"s{i:03d}.seg.png", data), (f"s{i:03d}.cls", b"0"),
                    (f"s{i:03d}.json", json.dumps({"is_fake": int("1_fake" in name), "model": name.split("/")[0],
                                                   "prompt": f"p{i}"}).encode())]
    shard = _tar(tmp_path / "shard.tar", members, "w")
    assert len(collect_inputs([shard])) == 12  # both images of every sample, labelled by .cls
    options = SourceOptions(image_column="png", label_column="is_fake", group_column="model",
                            caption_column="prompt")
    items = collect_inputs([shard], options=options)
    assert [i.path.rsplit("!/", 1)[1] for i in items] == [f"s{i:03d}.png" for i in range(6)]
    assert [(i.label, i.group, i.caption) for i in items] == [
        (1 if "1_fake" in n else 0, n.split("/")[0], f"p{k}") for k, (n, _) in enumerate(_files(tree))]
    with pytest.raises(InputError, match=r"no sample has the field 'label2' \(--label-column\).*fields there: "
                                         r"is_fake, model, prompt"):
        collect_inputs([shard], options=SourceOptions(label_column="label2"))
    with pytest.raises(InputError, match=r"no image member with the extension 'jpg'.*there: png, seg.png"):
        collect_inputs([shard], options=SourceOptions(image_column="jpg"))


def test_a_second_image_column_is_part_of_the_identity(tree, tmp_path):
    from tidy_detect.data import sources

    files = _files(tree)
    table = pa.table({"real": [d for _, d in files], "fake": [d[::-1] for _, d in files]})
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path, row_group_size=2)
    default = collect_inputs([path])
    chosen = collect_inputs([path], options=SourceOptions(image_column="fake"))
    assert default[3].path == f"{path}!/3" and chosen[3].path == f"{path}!/fake/3"
    sources._cache.clear()  # a fresh process (a Ray worker) reads the identity alone
    assert read_item(chosen[3].path)[0] == files[3][1][::-1] and read_item(default[3].path)[0] == files[3][1]
    with pytest.raises(InputError, match="holds int64, not images"):
        pq.write_table(pa.table({"image": [b"x"], "n": [1]}), tmp_path / "n.parquet")
        collect_inputs([tmp_path / "n.parquet"], options=SourceOptions(image_column="n"))


def test_a_packed_folder_reads_as_the_folder(tree, tmp_path):
    want = [(i.label, i.group) for i in collect_inputs([tree])]
    packed = _tar(tmp_path / "bench.tar.gz", [(f"bench/{n}", d) for n, d in _files(tree)])
    assert [(i.label, i.group) for i in collect_inputs([packed])] == want
    other = _tar(tmp_path / "other.tar.gz", [(f"bench/{n}", d) for n, d in _files(tree)])
    assert {i.group for i in collect_inputs([other])} == {"bench"}  # a folder of another name is a group


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


def test_a_row_without_bytes_or_path_is_an_error_row(tmp_path):
    from tidy_detect.errors import ImageNotFoundError

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b"abc", "path": "a.png"}, {"bytes": None, "path": ""}, None],
                                        type=image)})
    pq.write_table(table, tmp_path / "t.parquet")
    items = collect_inputs([tmp_path / "t.parquet"])
    assert read_item(items[0].path)[0] == b"abc"
    with pytest.raises(ImageNotFoundError, match="the image column is empty"):
        read_item(items[1].path)
    with pytest.raises(ImageNotFoundError, match="the image column is empty"):
        read_item(items[2].path)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_row_holding_only_a_path_is_the_file_it_names(extractor, tree, tmp_path, kind):
    """A ``datasets`` cache of local image files keeps ``{"bytes": None, "path": ...}``: such a
    row is read from the file (absolute as it is, relative from the table's folder), with its own
    stat for resume; a path to nothing is an error row naming it; rows with bytes are unchanged."""
    files = _files(tree)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "rel.png").write_bytes(files[1][1])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": files[0][1], "path": "kept.png"}, {"bytes": None, "path": "imgs/rel.png"},
             {"bytes": None, "path": str(tree / files[2][0])}, {"bytes": None, "path": "imgs/gone.png"}]
    table = pa.table({"image": pa.array(cells, type=image), "label": ["real", "fake", "fake", "real"]})
    path = tmp_path / f"t.{kind}"
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=1)  # groups all-bytes, all-missing: told by the statistics
    else:
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table, max_chunksize=3)
    items = collect_inputs([path])
    assert [i.path for i in items] == [f"{path}!/0", str(tmp_path / "imgs" / "rel.png"), str(tree / files[2][0]),
                                       str(tmp_path / "imgs" / "gone.png")]
    assert [i.label for i in items] == [0, 1, 1, 0]
    store = tmp_path / "store"
    summary = extract([path], store, extractor=extractor)
    assert (summary.processed, summary.failed) == (3, 1)
    rows = {r["path"]: r for r in FeatureStore(store).rows()}
    import hashlib

    assert rows[str(tmp_path / "imgs" / "rel.png")]["sha256"] == hashlib.sha256(files[1][1]).hexdigest()
    assert "gone.png" in rows[str(tmp_path / "imgs" / "gone.png")]["error"]
    again = extract([path], store, extractor=extractor)
    assert (again.processed, again.skipped) == (0, 4)


def test_mixed_parquet_row_groups_read_only_their_bytes_column_once(tmp_path, monkeypatch):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": b"x" if i % 3 else None, "path": f"p{i}.png"} for i in range(12)]
    pq.write_table(pa.table({"image": pa.array(cells, type=image)}), tmp_path / "t.parquet", row_group_size=6)
    calls = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: calls.append(i) or original(self, i, **kw))
    items = collect_inputs([tmp_path / "t.parquet"])
    assert [i.path for i in items] == [str(tmp_path / f"p{i}.png") if i % 3 == 0 else f"{tmp_path / 't.parquet'}!/{i}"
                                       for i in range(12)]
    assert calls == [0, 1]


@pytest.mark.slow
def test_an_untouched_source_is_skipped_without_reading_a_byte(extractor, tree, tmp_path):
    import time

    sources = [_zip(tree, tmp_path / "bench.zip"), _parquet(tree, tmp_path / "bench.parquet")]
    time.sleep(2.1)  # older than the racy window: the stat read is the stat to trust
    for source in sources:
        store = tmp_path / f"store-{source.suffix[1:]}"
        extract([source], store, extractor=extractor)
        again = extract([source], store, extractor=extractor)
        assert (again.skipped, again.hashed, again.processed) == (6, 0, 0)
        rows = FeatureStore(store).rows(["path", "num_bytes"])
        assert all(r["num_bytes"] == len(read_item(r["path"])[0]) for r in rows)  # the member's size, not the file's
        source.touch()  # touched, same content: hashed, found unchanged, restat'ed
        again = extract([source], store, extractor=extractor)
        assert (again.hashed, again.changed, again.processed) == (6, 0, 0)


def test_a_tar_gz_read_out_of_order_by_threads_stays_one_pass(tmp_path):
    """Decoding threads reach the archive's lock out of order: a member just behind the stream's
    position is served from the bytes it holds, not by decompressing the archive again from its
    start (which at a million members would be quadratic)."""
    from tidy_detect.data import sources

    rng = np.random.default_rng(3)
    members = [(f"m{i:04d}.bin", rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()) for i in range(400)]  # 8 MB
    path = _tar(tmp_path / "t.tar.gz", members)
    items = [sources.make_identity(path, name) for name, _ in members]
    container = sources._container(str(path))
    opened = []
    original = container.cursors.open_cursor
    container.cursors.open_cursor = lambda: opened.append(1) or original()
    for k in range(0, len(items), 2):  # pairs swapped: k+1 first, then k
        for j in (k + 1, k):
            assert read_item(items[j])[0] == members[j][1]
    assert len(opened) == 1
    for k in (399, 350, 10, 11, 398):  # far behind: a second stream; the first is kept, not dropped
        assert read_item(items[k])[0] == members[k][1]
    assert len(opened) == 2 and len(container.cursors.cursors) == 2


def test_cursors_drop_the_least_recently_used_one():
    from tidy_detect.data import sources

    made = []

    class Cursor:
        def __init__(self, at):
            self.at, self.closed = at, False
            made.append(self)

        def close(self):
            self.closed = True

    cursors = sources._Cursors(lambda: Cursor(0), lambda c: c.at)
    for target in range(sources._CURSORS):
        cursors.at_or_before(target).at = 100 + target  # each ahead of the next target: a new one each time
    assert len(made) == sources._CURSORS
    assert cursors.at_or_before(103) is made[3]  # the nearest behind, now the most recent
    cursors.at_or_before(5)  # none behind: the least recently used (made[0]) goes, not the one at 100+
    assert made[0].closed and not any(c.closed for c in made[1:]) and len(cursors.cursors) == sources._CURSORS


def test_a_member_read_error_carries_its_containers_stat(tree, tmp_path):
    import os

    from tidy_detect.data import sources
    from tidy_detect.errors import ImageNotFoundError

    source = _zip(tree, tmp_path / "bench.zip")
    with pytest.raises(ImageNotFoundError) as caught:
        sources.read_member(str(source), "nope.png")
    assert caught.value.stat.mtime_ns == os.stat(source).st_mtime_ns
    with pytest.raises(ImageNotFoundError, match="the archive is gone") as caught:
        sources.read_member(str(tmp_path / "gone.zip"), "a.png")
    assert caught.value.stat is None


def test_read_ahead_hands_over_items_errors_and_closes_what_it_reads():
    import threading
    import time

    from tidy_detect.data import sources

    def items():
        yield from (1, 2)
        raise ValueError("cut")

    ahead = sources._ReadAhead(items())
    assert [next(ahead), next(ahead)] == [1, 2]
    with pytest.raises(ValueError, match="cut"):
        next(ahead)
    assert list(ahead) == []

    closed = threading.Event()
    endless = sources._ReadAhead(iter(int, 1), depth=2, closer=closed.set)  # never ends by itself
    assert next(endless) == 0
    endless.close()
    assert closed.wait(5)
    time.sleep(0.3)
    assert not endless._thread.is_alive()
