"""gs:// inputs and stores, against a GCS emulator (``gcp-storage-emulator``, the test extra) that the
tests start on loopback as a stand-in for the protocol only, reached the way users reach one:
``STORAGE_EMULATOR_HOST``.

The emulator runs in its own process: pyarrow's GCS filesystem makes its first request for an
opened object while holding the GIL, so a server thread in the test's own process could never
answer it."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("gcp_storage_emulator", reason="the gs:// tests need gcp-storage-emulator (the test extra)")

from tidy_detect.cli import app  # noqa: E402
from tidy_detect.config import load_preset  # noqa: E402
from tidy_detect.data.inputs import collect_inputs  # noqa: E402
from tidy_detect.data.layouts import read_dataset  # noqa: E402
from tidy_detect.data.remote import GCS_EMULATOR_ENV  # noqa: E402
from tidy_detect.data.sources import read_item  # noqa: E402
from tidy_detect.errors import InputError, StoreError  # noqa: E402
from tidy_detect.features.extractor import Extractor, extract  # noqa: E402
from tidy_detect.features.store import FeatureStore  # noqa: E402

from tests.conftest import make_tree  # noqa: E402
from tests.data.conftest import Bucket, _free_port, item_view, make_parquet, make_saved_dataset, make_shards, \
    make_tar, make_zip, tree_files  # noqa: E402

BUCKET = "tidy-gcs"
runner = CliRunner()


@pytest.fixture(scope="module")
def emulator():
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    import pyarrow.fs as pafs

    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{port}", scheme="http",
                            retry_time_limit=datetime.timedelta(seconds=2))
    deadline = time.monotonic() + 60
    while True:  # until the server answers
        try:
            fs.get_file_info(BUCKET)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the GCS emulator did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    yield endpoint, fs
    process.kill()
    process.wait()


class Gcs(Bucket):
    """A fresh prefix in the emulator's bucket: uploads (put_file and put_tree as the S3 bucket's),
    and listings of it."""

    def __init__(self, fs, prefix: str) -> None:
        self.fs, self.prefix = fs, prefix

    def uri(self, key: str = "") -> str:
        return f"gs://{BUCKET}/{self.prefix}/{key}".rstrip("/")

    def put(self, key: str, data: bytes) -> str:
        with self.fs.open_output_stream(f"{BUCKET}/{self.prefix}/{key}", compression=None) as out:
            out.write(data)
        return self.uri(key)

    def keys(self, key: str = "") -> list[str]:
        import pyarrow.fs as pafs

        base = f"{BUCKET}/{self.prefix}/{key}".rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(BUCKET) + len(self.prefix) + 2:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture
def gcs(emulator, monkeypatch):
    endpoint, fs = emulator
    monkeypatch.setenv(GCS_EMULATOR_ENV, endpoint)
    return Gcs(fs, uuid.uuid4().hex[:12])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs") / "bench"
    make_tree(root, {"progan": 2, "dalle": 1})
    return root



def _sources(tree: Path, tmp_path: Path) -> dict[str, Path]:
    files = tree_files(tree)
    return {"zip": make_zip(files, tmp_path / "bench.zip"),
            "tar.gz": make_tar(files, tmp_path / "bench.tar.gz"),
            "parquet": make_parquet(files, tmp_path / "bench.parquet")}


def test_every_input_kind_on_gcs_lists_and_reads_as_on_disk(gcs, tree, tmp_path):
    folder = gcs.put_tree("data/bench", tree)
    assert item_view(collect_inputs([folder]), folder) == item_view(collect_inputs([tree]), str(tree))
    for kind, local in _sources(tree, tmp_path).items():
        uri = gcs.put_file(f"sources/{local.name}", local)
        want, got = collect_inputs([local]), collect_inputs([uri])
        assert item_view(got, uri) == item_view(want, str(local)) and len(got) == 6, kind
        for a, b in zip(reversed(want), reversed(got)):  # ranged reads, out of order
            assert read_item(b.path)[0] == read_item(a.path)[0], (kind, b.path)
    files = tree_files(tree)
    saved = gcs.put_tree("hf/bench", make_saved_dataset(files, tmp_path / "saved"))
    assert [read_item(i.path)[0] for i in collect_inputs([saved])] == [d for _, d in files]
    make_shards(files, tmp_path / "shards", per_shard=4)
    gcs.put_tree("wds", tmp_path / "shards")
    assert len(collect_inputs([gcs.uri("wds/shard-{0000..0001}.tar")])) == 6


def test_a_layout_reads_an_archive_on_gcs_as_on_disk(gcs, tmp_path):
    root = tmp_path / "CNNDetection"
    make_tree(root / "test" / "progan" / "cat", {"": 1}, seed=3)
    make_tree(root / "test" / "biggan", {"": 1}, seed=4)
    uri = gcs.put_file("CNNDetection.zip", make_zip(tree_files(root), tmp_path / "CNNDetection.zip"))
    want, got = read_dataset(root, "auto", split="test"), read_dataset(uri, "auto", split="test")
    assert got.layout == "cnndetection" and got.container == "zip on gs"
    assert sorted((i.path.split("!/", 1)[1], i.label, i.group, i.subgroup) for i in got.items) == \
        sorted((i.path[len(str(root)) + 1:], i.label, i.group, i.subgroup) for i in want.items)


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 2, "num_workers": 2})
    return Extractor(config).load()


def _rows(store) -> dict[str, dict]:
    return {r["sha256"]: r for r in FeatureStore(store).rows() if r["error"] is None}


@pytest.mark.slow
def test_a_store_on_gcs_holds_the_rows_of_a_local_one_and_resumes(gcs, extractor, tree, tmp_path, tiny_preset):
    extract([tree], tmp_path / "local", extractor=extractor)
    want = _rows(tmp_path / "local")
    files = tree_files(tree)
    first = gcs.put_file("in/first.parquet", make_parquet(files[:4], tmp_path / "first.parquet"))
    second = gcs.put_file("in/second.parquet", make_parquet(files[4:], tmp_path / "second.parquet"))
    uri = gcs.uri("stores/bench")
    summary = extract([first], uri, extractor=extractor)
    assert (summary.processed, summary.errors) == (4, 0)
    shards = gcs.keys("stores/bench/shards")
    assert shards and not any(k.endswith(".tmp") for k in gcs.keys())
    # the next run skips the first run's images and adds the rest
    again = extract([first, second], uri, extractor=extractor)
    assert (again.skipped, again.processed) == (4, 2)
    store = FeatureStore(uri)
    assert store.uri == uri and len(store) == 6
    got = _rows(uri)
    assert set(got) == set(want)
    for sha, row in got.items():
        assert row["path"].startswith(f"gs://{BUCKET}/")
        assert (row["label"], row["group"]) == (want[sha]["label"], want[sha]["group"])
        np.testing.assert_allclose(row["global_image"], want[sha]["global_image"], atol=1e-5)
    assert extract([first, second], uri, extractor=extractor).processed == 0

    info = runner.invoke(app, ["store", "info", uri, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["summary"]["rows"] == 6
    head = tmp_path / "head.safetensors"
    trained = runner.invoke(app, ["train", uri, "--out", str(head), "--epochs", "2", "--hidden", "8"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(head.with_suffix(".json").read_text())["training"]["data"]["stores"] == [uri]


def test_a_bad_emulator_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(GCS_EMULATOR_ENV, "ftp://127.0.0.1:1")
    with pytest.raises(InputError, match="STORAGE_EMULATOR_HOST must be"):
        collect_inputs(["gs://bucket/data"])
    with pytest.raises(StoreError, match="STORAGE_EMULATOR_HOST must be"):
        FeatureStore("gs://bucket/stores/x")
