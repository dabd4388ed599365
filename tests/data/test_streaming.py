"""Generic inputs listed one item at a time: each image once across INPUTs, and extraction that
plans and extracts from two listings instead of a list (see iter_inputs, ItemStream, pending_items)."""

from __future__ import annotations

import logging

import pytest

from tidy_detect.data import inputs as inputs_module
from tidy_detect.data.inputs import collect_inputs, iter_inputs
from tidy_detect.data.selection import ItemStream, select_inputs
from tidy_detect.errors import ConfigError
from tidy_detect.features.extractor import Extractor, ExtractionSummary, extract, pending_items
from tidy_detect.features.store import FeatureStore
from tidy_detect.config import load_preset

from tests.conftest import make_tree
from tests.data.conftest import make_parquet, make_saved_dataset, make_zip, tree_files


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imgs"
    make_tree(root, {"gen_a": 3})
    return root


def test_a_streamed_listing_is_the_list_and_is_not_held(tree, tmp_path):
    table = make_parquet(tree_files(tree), tmp_path / "set.parquet")
    listed = iter_inputs([table])
    assert not isinstance(listed, list)
    first = next(listed)  # the first row comes before the rest is listed
    assert first.path.startswith(str(table))
    assert [first, *listed] == collect_inputs([table])


def test_each_image_once_across_inputs_without_remembering_table_rows(tree, tmp_path):
    files = tree_files(tree)
    table = make_parquet(files, tmp_path / "set.parquet")
    archive = make_zip(files, tmp_path / "set.zip")
    rows = collect_inputs([table])
    members = collect_inputs([archive])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(item.path for item in members[:2]) + "\n")

    # the same table twice, a manifest naming members of an archive listed before it, a folder twice
    items = collect_inputs([table, archive, manifest, tree, table, tree])
    paths = [item.path for item in items]
    assert len(paths) == len(set(paths)) == len(rows) + len(members) + len(files)
    # a manifest before the archive: the archive's members it named are not listed twice
    items = collect_inputs([manifest, archive])
    assert [item.path for item in items] == [item.path for item in members[:2]] + \
        [item.path for item in members[2:]]


def _first_of_each(lists):
    """Items of INPUTs listed one by one, concatenated, each path kept where it first comes."""
    out, seen = [], set()
    for items in lists:
        for item in items:
            if item.path not in seen:
                seen.add(item.path)
                out.append(item)
    return out


def test_folders_files_and_manifests_give_each_image_once_in_any_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, {"gen_a": 2, "gen_b": 1})
    make_tree(b, {"gen_c": 2}, seed=1)
    inner = a / "gen_a"
    one = a / "gen_b" / "1_fake" / "img0.png"
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join([str(a / "gen_a/0_real/img1.png"), str(b / "gen_c/1_fake/img0.png"),
                                                str(tmp_path / "elsewhere.png")]) + "\n")
    (tmp_path / "elsewhere.png").write_bytes((a / "gen_a/0_real/img0.png").read_bytes())
    orders = [[a, b], [a, b, a], [a, inner], [inner, a], [a, one], [one, a], [one, one], [a, manifest, b],
              [a, b, manifest], [manifest, a, b], [b, inner, manifest, a, one], [manifest, manifest]]
    for order in orders:
        got = collect_inputs(order)
        assert got == _first_of_each([collect_inputs([name]) for name in order]), order


def test_disjoint_folders_remember_nothing(tmp_path):
    """A generic run over many folders holds one folder's names at a time, not every path it has
    yielded: the memory of listing three folders of 1,500 files each is that of one sub-folder."""
    import tracemalloc

    roots = []
    for name in ("a", "b", "c"):
        for sub in range(15):
            folder = tmp_path / name / f"gen{sub}" / "1_fake"
            folder.mkdir(parents=True)
            for i in range(100):
                (folder / f"image_with_a_long_name_{i:05d}.png").touch()
        roots.append(tmp_path / name)

    def peak(order):
        # the least of three listings: a one-off (an import, a cache, the interpreter's table of
        # interned strings growing, as pathlib interns path parts) is not the listing's memory
        sum(1 for _ in iter_inputs(order))
        peaks = []
        for _ in range(3):
            tracemalloc.start()
            try:
                count = sum(1 for _ in iter_inputs(order))
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        return count, min(peaks)

    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n")
    disjoint, disjoint_peak = peak(roots)
    remembered, remembered_peak = peak([*roots, manifest])  # a later manifest may name any of them
    assert disjoint == remembered == 4500
    # remembering 3,000 paths (the last folder's are never remembered) costs some 850 KB; a walk
    # of disjoint folders holds one sub-folder's names (some 26 KB here)
    assert remembered_peak > disjoint_peak + 400_000, (disjoint_peak, remembered_peak)
    assert disjoint_peak < 150_000, disjoint_peak
    assert inputs_module._repeated_later([(str(roots[1]), "folder"), (str(roots[2]), "folder")]) is not None
    later = inputs_module._repeated_later([(str(roots[1]), "folder")])
    assert not later(str(roots[0] / "gen0/1_fake/image_with_a_long_name_00000.png"))
    assert later(str(roots[1] / "gen0/1_fake/image_with_a_long_name_00000.png"))
    assert inputs_module._repeated_later([]) is None


def test_a_datasets_folder_and_one_of_its_files_give_each_row_once(tree, tmp_path):
    saved = make_saved_dataset(tree_files(tree), tmp_path / "saved")
    arrow = sorted(saved.glob("*.arrow"))
    assert len(arrow) > 1
    whole = collect_inputs([saved])
    for order in ([saved, arrow[0]], [arrow[0], saved]):
        paths = [item.path for item in collect_inputs(order)]
        assert sorted(paths) == sorted(item.path for item in whole)


def test_split_without_a_dataset_is_refused_before_listing(tree, monkeypatch):
    listed = []
    monkeypatch.setattr(inputs_module, "walk_folder", lambda *a, **k: listed.append(a) or iter(()))
    with pytest.raises(ConfigError, match="--split"):
        next(iter_inputs([tree], split="train"))
    assert listed == []


def test_an_item_stream_lists_anew_each_time_and_stops_at_the_limit(tree, tmp_path):
    table = make_parquet(tree_files(tree), tmp_path / "set.parquet", row_group_size=2)
    selection = select_inputs([table, tree], stream=True, limit=4)
    stream = selection.items
    assert isinstance(stream, ItemStream)
    assert list(stream) == list(stream) == collect_inputs([table])[:4]
    assert stream.summary.images == 4
    assert isinstance(select_inputs([table], stream=True, max_per_class=1).items, list)  # sampling needs the list
    (tree / "gen_a" / "notes.txt").write_text("not an image")
    stream = select_inputs([tree], stream=True).items
    assert len(list(stream)) == 6 and stream.summary.ignored_files == 1


class _Listing:
    """A re-iterable input that counts how often it is listed."""

    def __init__(self, items):
        self.items, self.passes = list(items), 0

    def __iter__(self):
        self.passes += 1
        yield from self.items


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4, "num_workers": 2})
    return Extractor(config).load()


def test_extract_lists_a_streamed_input_to_check_plan_and_extract_never_as_a_list(extractor, tree, tmp_path,
                                                                                      monkeypatch):
    table = make_parquet(tree_files(tree), tmp_path / "set.parquet", row_group_size=2)
    calls = []
    original = inputs_module.iter_inputs

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(inputs_module, "iter_inputs", counting)
    store = tmp_path / "store"
    summary = extract([table], store, extractor=extractor)
    assert len(calls) == 3  # checking before the models load, planning, extracting: never a list
    assert (summary.total, summary.processed, summary.skipped) == (6, 6, 0)
    assert sorted(FeatureStore(store).index()) == sorted(item.path for item in collect_inputs([table]))
    calls.clear()
    again = extract([table, table], store, extractor=extractor)  # the same table twice is one table
    assert (again.total, again.processed, again.skipped) == (6, 0, 6) and len(calls) == 3


def test_a_streamed_plan_matches_a_listed_plan(extractor, tree, tmp_path):
    items = collect_inputs([tree])
    store_path = tmp_path / "store"
    extract([tree], store_path, extractor=extractor, limit=4)
    store = FeatureStore(store_path)
    listed_summary, streamed_summary = ExtractionSummary(), ExtractionSummary()
    listed = pending_items(items, store, summary=listed_summary)
    listing = _Listing(items)
    streamed = pending_items(listing, store, summary=streamed_summary)
    assert isinstance(listed.todo, list) and not isinstance(streamed.todo, list)
    assert listing.passes == 1
    assert list(streamed.todo) == listed.todo == items[4:]
    assert listing.passes == 2
    assert (streamed_summary.total, streamed_summary.skipped) == (listed_summary.total, listed_summary.skipped) \
        == (6, 4)
    assert streamed.known_content == listed.known_content and len(streamed.known_content) == 4


def test_inputs_that_change_between_the_listings_are_counted_and_said(extractor, tree, tmp_path, caplog):
    items = collect_inputs([tree])
    store = FeatureStore.open_for_writing(tmp_path / "store", extractor.extraction, extractor.dim)
    listing = _Listing(items[:3])
    summary = ExtractionSummary()
    plan = pending_items(listing, store, summary=summary)
    listing.items = items  # three files appeared after planning
    with caplog.at_level(logging.WARNING):
        assert list(plan.todo) == items
    assert summary.total == 6 and "held 3 images when the run was planned and 6 when" in caplog.text


def test_an_item_stream_asks_what_its_inputs_are_once(tree, tmp_path, monkeypatch):
    table = make_parquet(tree_files(tree), tmp_path / "set.parquet")
    asked = []
    original = inputs_module.input_kind
    monkeypatch.setattr(inputs_module, "input_kind", lambda text: asked.append(text) or original(text))
    stream = select_inputs([table, tree], stream=True).items
    assert list(stream) == list(stream) == list(stream)
    assert asked == [str(table), str(tree)]  # a brace pattern over remote shards is expanded once, not per listing


def test_extract_with_a_layout_walks_the_tree_and_samples_without_listing_it_whole(extractor, tmp_path, monkeypatch):
    """A layout run walks its tree (never read_dataset's whole list), and a sampled one stores
    exactly the list the whole listing samples, saved as inputs.csv in the same order."""
    from tidy_detect.data import layouts
    from tidy_detect.data.sampling import load_list

    root = tmp_path / "bench"
    make_tree(root, {"gen_a": 3, "gen_b": 2})
    expected = select_inputs([root], layout="generic").items  # the whole list (before it streamed)
    sampled = select_inputs([root], layout="generic", max_per_class=2, seed=1).items
    opened = []
    original = layouts.open_dataset
    monkeypatch.setattr(layouts, "read_dataset", lambda *a, **k: pytest.fail("the tree was read whole"))
    monkeypatch.setattr(layouts, "open_dataset", lambda *a, **k: opened.append(a[0]) or original(*a, **k))
    store = tmp_path / "store"
    summary = extract([root], store, extractor=extractor, layout="generic")
    assert (summary.total, summary.processed) == (10, 10) and len(opened) == 3  # check, plan, extract
    rows = [(r["path"], r["label"], r["group"]) for r in FeatureStore(store).rows(["path", "label", "group"])]
    assert sorted(rows) == sorted((i.path, i.label, i.group) for i in expected)
    opened.clear()
    other = tmp_path / "sampled"
    summary = extract([root], other, extractor=extractor, layout="generic", max_per_class=2, seed=1)
    assert summary.processed == len(sampled) == 8 and len(opened) == 3  # pairing, count, take
    assert [(i.path, i.label, i.group) for i in load_list(other / "inputs.csv")] == \
        [(i.path, i.label, i.group) for i in sampled]


def test_a_manifest_is_read_row_by_row(tmp_path):
    """A manifest input is read as it is listed: its first row comes before a bad later row is
    reached, and a stream over it is refused by its check, naming the line."""
    from tidy_detect.data.inputs import iter_manifest, read_manifest
    from tidy_detect.errors import InputError

    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\na.png,1\nb.png,0\nc.png,maybe\n")
    rows = iter_manifest(manifest)
    first = next(rows)
    assert (first.path, first.label) == (str(tmp_path / "a.png"), 1)
    assert next(rows).path == str(tmp_path / "b.png")
    with pytest.raises(InputError, match="line 4"):
        next(rows)
    with pytest.raises(InputError, match="line 4"):
        read_manifest(manifest)
    with pytest.raises(InputError, match="line 4"):
        select_inputs([manifest], stream=True)
    manifest.write_text("path,label\na.png,1\nb.png,0\n")
    stream = select_inputs([manifest], stream=True).items
    assert isinstance(stream, ItemStream) and [i.path for i in stream] == [str(tmp_path / "a.png"),
                                                                          str(tmp_path / "b.png")]
