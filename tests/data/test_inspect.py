"""Dataset inspection: counts and formats per group, the format-bias warning, the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from tidy_detect.cli.datasets import register
from tidy_detect.data.inspect import format_from_suffix, inspect_dataset, probe_format
from tidy_detect.data.layouts import read_dataset


def _img(path: Path, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format=fmt)


def _tree(root: Path) -> Path:
    for i in range(5):
        _img(root / "biased" / "0_real" / f"r{i}.JPEG")  # real JPEG vs fake PNG
        _img(root / "biased" / "1_fake" / f"f{i}.v2.png")
        _img(root / "mixed" / "0_real" / f"r{i}{'.jpg' if i % 2 else '.png'}")
        _img(root / "mixed" / "1_fake" / f"f{i}{'.png' if i % 2 else '.jpg'}")
        _img(root / "disguised" / "0_real" / f"r{i}.png", fmt="JPEG")  # JPEG data behind .png names
        _img(root / "disguised" / "1_fake" / f"f{i}.png")
    return root


def test_format_names():
    assert [format_from_suffix(p) for p in ("a.JPG", "b.v2.jpeg", "c.PNG", "d.webp", "e.xyz", "f")] == \
        ["JPEG", "JPEG", "PNG", "WEBP", "XYZ", "NONE"]


def test_counts_formats_and_warning_by_suffix(tmp_path):
    report = inspect_dataset(read_dataset(_tree(tmp_path / "ds")))
    assert report["layout"] == "generic" and report["items"] == 30 and report["files"] == 30
    biased = report["groups"]["biased"]
    assert (biased["real"], biased["fake"], biased["reals_from"]) == (5, 5, "biased")
    assert biased["formats"] == {"fake": {"PNG": 5}, "real": {"JPEG": 5}}
    assert report["groups"]["mixed"]["formats"] == {"fake": {"JPEG": 3, "PNG": 2}, "real": {"JPEG": 2, "PNG": 3}}
    assert [w["group"] for w in report["warnings"]] == ["biased"]
    message = report["warnings"][0]["message"]
    assert "real images are 100% JPEG but fake images are 100% PNG (by file suffix)" in message
    assert "learn the file format instead of the fakeness" in message
    json.dumps(report)  # plain data


def test_probing_reads_the_real_format(tmp_path):
    root = _tree(tmp_path / "ds")
    assert probe_format(root / "disguised" / "0_real" / "r0.png") == "JPEG"
    (root / "mixed" / "1_fake" / "broken.png").write_bytes(b"not an image")
    report = inspect_dataset(read_dataset(root), probe=3)
    assert report["groups"]["disguised"]["probed"] == {"fake": {"PNG": 3}, "real": {"JPEG": 3}}
    assert report["groups"]["disguised"]["formats"]["real"] == {"PNG": 5}
    assert sum(report["groups"]["mixed"]["probed"]["fake"].values()) == 3
    assert sorted(w["group"] for w in report["warnings"]) == ["biased", "disguised"]


def test_no_warning_when_one_class_is_not_mostly_another_format(tmp_path):
    root = tmp_path / "ds"
    for i in range(10):
        _img(root / "g" / "0_real" / f"r{i}.jpg")
        _img(root / "g" / "1_fake" / f"f{i}{'.png' if i < 5 else '.jpg'}")  # half PNG: not "mostly"
    assert inspect_dataset(read_dataset(root))["warnings"] == []


def test_shared_reals_and_subgroups_in_report(tmp_path):
    root = tmp_path / "diffusion_datasets"
    for name in ("a.png", "b.png"):
        _img(root / "ldm_200" / "1_fake" / name)
        _img(root / "glide_100_10" / "1_fake" / name)
        _img(root / "laion" / "0_real" / name.replace(".png", ".jpg"))
    report = inspect_dataset(read_dataset(root))
    assert report["items"] == 8 and report["files"] == 6 and report["shared_files"] == 2
    assert report["groups"]["ldm_200"]["reals_from"] == "laion"
    train = tmp_path / "train"
    _img(train / "cat" / "0_real" / "x.png")
    _img(train / "cat" / "1_fake" / "y.png")
    _img(train / "dog" / "1_fake" / "z.png")
    assert inspect_dataset(read_dataset(train))["groups"]["progan"]["subgroups"] == {
        "cat": {"real": 1, "fake": 1, "unlabelled": 0}, "dog": {"real": 0, "fake": 1, "unlabelled": 0}}


def test_cli_inspect_and_layouts(tmp_path):
    from tidy_detect.cli import command, out

    app = typer.Typer()
    app.command("noop")(lambda: None)  # a second command keeps `datasets` a sub-command
    register(app, command, out)
    runner = CliRunner()
    root = _tree(tmp_path / "ds")
    result = runner.invoke(app, ["datasets", "inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert "layout generic" in result.output and "warning:" in result.output
    result = runner.invoke(app, ["datasets", "inspect", str(root), "--json", "--probe", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["groups"]["disguised"]["probed"]["real"] == {"JPEG": 2}
    result = runner.invoke(app, ["datasets", "inspect", str(root), "--layout", "nope"])
    assert result.exit_code == 2 and "Unknown layout 'nope'. Known: auto," in result.output
    result = runner.invoke(app, ["datasets", "layouts"])
    assert result.exit_code == 0 and "diffusionforensics" in result.output


def test_every_input_kind_is_inspected(tmp_path):
    from tests.conftest import make_tree
    from tests.data.conftest import make_parquet, make_saved_dataset, make_shards, make_tar, make_zip, tree_files
    from tidy_detect.cli import command, out
    from tidy_detect.data.layouts import datasets_for_inputs, merge_datasets
    from tidy_detect.data.sources import SourceOptions

    root = tmp_path / "bench"
    make_tree(root, {"progan": 3, "dalle": 2})
    files = tree_files(root)
    want = {"dalle": (2, 2), "progan": (3, 3)}
    cases = {  # input -> (layout, container, options)
        str(make_parquet(files, tmp_path / "bench.parquet")): ("columns", "parquet", None),
        str(make_saved_dataset(files, tmp_path / "saved")): ("columns", "datasets folder",
                                                             SourceOptions(group_column="generator")),
        make_shards(files, tmp_path / "shards", per_shard=4): ("webdataset", "3 × tar", None),
        str(make_zip(files, tmp_path / "bench.zip")): ("cnndetection", "zip", None),
        str(make_tar(files, tmp_path / "bench.tar.gz")): ("cnndetection", "tar.gz", None),
    }
    for path, (layout, container, options) in cases.items():
        dataset = merge_datasets(datasets_for_inputs([path], "auto", options=options), path)
        report = inspect_dataset(dataset, probe=2)
        assert (report["layout"], report["container"], report["items"]) == (layout, container, 10), path
        assert {g: (v["real"], v["fake"]) for g, v in report["groups"].items()} == want, path
        assert all(v["probed"] == {"real": {"PNG": 2}, "fake": {"PNG": 2}} for v in report["groups"].values()), path
        json.dumps(report)
    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app, command, out)
    result = CliRunner().invoke(app, ["datasets", "inspect", str(tmp_path / "saved"), "--group-column", "generator",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["container"] == "datasets folder" and set(report["groups"]) == {"dalle", "progan"}
    assert any("--probe" in note for note in report["notes"])  # table rows have no suffixes
    result = CliRunner().invoke(app, ["datasets", "inspect", str(tmp_path / "saved"), "--label-column", "nope"])
    assert result.exit_code == 3 and "no column 'nope' (--label-column)" in result.output


def test_cli_counts_generator_metadata_per_class(tmp_path):
    """`--generator-metadata N` reads the files' metadata (a web UI's `parameters` text chunk on
    the fakes here) and warns that the classes differ by it."""
    from PIL import PngImagePlugin

    from tidy_detect.cli import command, out

    root = tmp_path / "leaky"
    for label, folder in ((0, "0_real"), (1, "1_fake")):
        (root / "gen" / folder).mkdir(parents=True)
        for i in range(4):
            info = PngImagePlugin.PngInfo()
            if label == 1:
                info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                                            "Size: 32x32, Model: sd15")
            Image.new("RGB", (32, 32), (i * 40, 90, 200)).save(root / "gen" / folder / f"{i}.png", pnginfo=info)
    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app, command, out)
    result = CliRunner().invoke(app, ["datasets", "inspect", str(root), "--json", "--generator-metadata", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    counts = report["groups"]["gen"]["generator_metadata"]
    assert counts["fake"]["checked"] == 3 and counts["fake"]["with_metadata"] == 3
    assert counts["real"]["checked"] == 3 and counts["real"]["with_metadata"] == 0
    assert any("provenance metadata" in w["message"] for w in report["warnings"])
    table = CliRunner().invoke(app, ["datasets", "inspect", str(root), "--generator-metadata", "3"])
    assert table.exit_code == 0 and "generator metadata" in table.output, table.output


def _listed_metadata_sample(items, per_cell: int, seed: int = 0) -> list:
    """How the generator-metadata sample is drawn from a whole list (the order of its checks)."""
    import collections
    import random

    cells = collections.defaultdict(list)
    for item in items:
        cells[(str(item.group), item.label)].append(item)
    chosen = []
    for key in sorted(cells, key=str):
        members = sorted({i.path: i for i in cells[key]}.values(), key=lambda i: i.path)
        chosen.extend(random.Random(seed).sample(members, min(per_cell, len(members))))
    return chosen


def test_a_walked_inspection_reports_what_the_list_reports(tmp_path, monkeypatch):
    """`datasets inspect` walks its input (twice when it probes) instead of holding it: for every
    kind of tree, the report and the metadata sample are the list's, probing included."""
    from tests.conftest import make_tree
    from tests.data.conftest import make_parquet, make_shards, make_zip, tree_files
    from tidy_detect.data.inspect import inspect_listings
    from tidy_detect.data.layouts import dataset_roots, datasets_for_inputs, merge_datasets, open_dataset

    bench = tmp_path / "bench"
    make_tree(bench, {"progan": 4, "dalle": 3})
    diffusion = tmp_path / "diffusion_datasets"
    for name in ("a.png", "b.png", "c.JPEG"):
        _img(diffusion / "ldm_200" / "1_fake" / name)
        _img(diffusion / "glide_100_10" / "1_fake" / name)
        _img(diffusion / "laion" / "0_real" / name.replace(".png", ".jpg"))
    unsorted = tmp_path / "unsorted"  # "car-2/" sorts before "car/x" but is walked after it
    for sub in ("car", "car-2"):
        for i in range(3):
            _img(unsorted / "gen" / "1_fake" / sub / f"{i}.png")
            _img(unsorted / "gen" / "0_real" / sub / f"{i}.jpg", fmt="JPEG")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,group\n" + "".join(
        f"bench/progan/{c}/img{i}.png,{c[0]},{g}\n" for g in ("one", "two") for c in ("0_real", "1_fake")
        for i in (3, 1, 2)))
    files = tree_files(bench)
    cases = [(str(_tree(tmp_path / "ds")), "auto", None), (str(bench), "auto", None), (str(bench), "generic", None),
             (str(diffusion), "auto", None), (str(diffusion), "auto", {"ldm_200": "laion"}),
             (str(unsorted), "generic", None), (str(manifest), "auto", None),
             (str(make_parquet(files, tmp_path / "bench.parquet")), "auto", None),
             (make_shards(files, tmp_path / "shards", per_shard=4), "auto", None),
             (str(make_zip(files, tmp_path / "bench.zip")), "auto", None)]
    for path, layout, pairing in cases:
        datasets = merge_datasets(datasets_for_inputs([path], layout, pairing=pairing), path)
        for probe, metadata in ((0, 0), (2, 0), (0, 2), (3, 5), (50, 1)):
            want = inspect_dataset(datasets, probe=probe)
            opened = []

            def open_listings():
                opened.append(1)
                return [open_dataset(root, layout, pairing=pairing) for root in dataset_roots([path])]

            report, chosen = inspect_listings(open_listings, path, probe=probe, metadata=metadata)
            assert report == want, (path, probe)
            assert json.dumps(report) == json.dumps(want)  # the same keys in the same order
            assert chosen == _listed_metadata_sample(datasets.items, metadata), (path, metadata)
            assert len(opened) == (2 if probe or metadata else 1)


def test_the_cli_inspection_walks_and_never_reads_the_list(tmp_path, monkeypatch):
    from tidy_detect.cli import command, out
    from tidy_detect.data import layouts

    monkeypatch.setattr(layouts, "read_dataset", lambda *a, **k: pytest.fail("the dataset was read whole"))
    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app, command, out)
    root = _tree(tmp_path / "ds")
    result = CliRunner().invoke(app, ["datasets", "inspect", str(root), "--json", "--probe", "2",
                                      "--generator-metadata", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["groups"]["disguised"]["probed"]["real"] == {"JPEG": 2}
    assert report["generator_metadata_checked"] == 2
    assert report["groups"]["biased"]["generator_metadata"]["real"]["checked"] == 2
