"""Stores on object storage, against moto's S3 server started on loopback (a stand-in for the S3
protocol only), through the same code users run: the commands with s3:// stores, resume after a
killed run, readers while a writer writes, the writer lease, interrupted compaction, the Ray
engine; and the URI forms (file://, fsspec-only filesystems) and their errors."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("moto.server", reason="the object-storage tests need moto[server] (the test extra)")
s3fs = pytest.importorskip("s3fs", reason="the object-storage tests read stores with pandas through s3fs")

from tidy_detect.cli import app  # noqa: E402
from tidy_detect.config import load_preset  # noqa: E402
from tidy_detect.errors import StoreError  # noqa: E402
from tidy_detect.features.storage import (  # noqa: E402
    LEASE_SECONDS_ENV,
    ObjectLocation,
    StoreLease,
    StoreLocation,
    StorageError,
)
from tidy_detect.features.store import COMPACT_JOURNAL, FeatureStore  # noqa: E402

from tests.conftest import make_tree  # noqa: E402

runner = CliRunner()
DIM = 4
EXTRACTION = {"clip": {"source": "/a/clip", "weights": "w1", "dim": DIM}, "captioner": {"name": "blip2"},
              "grounder": {"name": "none"}, "phrases": {"max_objects": 6}}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket on the local endpoint, and the environment every client finds it through."""
    import botocore.session

    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    client = botocore.session.get_session().create_client("s3")
    bucket = f"tidy-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    def keys(prefix: str = "") -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def body(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    return SimpleNamespace(endpoint=s3_endpoint, env=env, client=client, bucket=bucket, keys=keys, body=body,
                           uri=lambda name: f"s3://{bucket}/{name}")


def _pandas_options(s3) -> dict:
    # a fresh s3fs instance without cached listings, so every read lists what is there now
    return {"client_kwargs": {"endpoint_url": s3.endpoint}, "skip_instance_cache": True, "use_listings_cache": False}


def _polars_options(s3) -> dict:
    return {"aws_endpoint_url": s3.endpoint, "aws_region": "us-east-1", "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing", "aws_allow_http": "true"}


def _row(i: int, rng=np.random.default_rng(0)) -> dict:
    return {"sha256": f"sha{i}", "path": f"/img/{i}.png", "label": i % 2, "group": "g", "width": 10, "height": 8,
            "format": "PNG", "num_bytes": 100, "caption": f"caption {i}", "phrases": ["dog"],
            "object_phrases": ["dog"], "boxes": [[0, 0, 5, 5]], "box_scores": [0.5],
            "global_image": rng.random(DIM).astype(np.float32), "global_text": rng.random(DIM).astype(np.float32),
            "local_images": rng.random((1, DIM)).astype(np.float32),
            "local_texts": rng.random((1, DIM)).astype(np.float32), "local_fallback": False, "error": None,
            "error_kind": None}


def _duckdb_with_httpfs(s3):
    """A DuckDB connection with its httpfs extension loaded from the ``duckdb-extension-httpfs`` wheel
    (the test extra pins the DuckDB release that wheel is built for) and a secret for the endpoint."""
    import duckdb
    import duckdb_extension_httpfs

    wheel = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    extension = wheel / "httpfs.duckdb_extension"
    assert extension.is_file(), f"no httpfs extension for DuckDB {duckdb.__version__} in {wheel.parent}"
    con = duckdb.connect()
    con.execute(f"INSTALL '{extension}'")
    con.execute("LOAD httpfs")
    host = s3.endpoint.removeprefix("http://")
    con.execute(f"""CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1',
                    ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)""")
    return con


def _rows_by_path(store: FeatureStore) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for row in store.rows():
        assert row["path"] not in rows, f"{row['path']} twice"
        rows[row["path"]] = row
    return rows


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


# -- the commands, with every store on S3 ----------------------------------------------------------

@pytest.mark.slow
def test_every_store_command_works_at_an_s3_uri_and_matches_a_local_store(s3, tiny_preset, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    make_tree(tmp_path / "tree", {"progan": 3, "dalle": 3})
    common = ["--preset", str(tiny_preset), "--layout", "cnndetection", "--max-per-class", "2",
              "--batch-size", "3", "--workers", "1", "--device", "cpu"]
    uri = s3.uri("stores/cnn")
    _invoke("extract", str(tmp_path / "tree"), "--out", uri, *common)
    _invoke("extract", str(tmp_path / "tree"), "--out", str(tmp_path / "local"), *common)
    keys = s3.keys("stores/cnn/")
    assert {"stores/cnn/config.json", "stores/cnn/inputs.csv", "stores/cnn/inputs.json",
            "stores/cnn/writer.lock"} <= set(keys)
    assert not any(k.endswith(".tmp") for k in keys)  # objects are written under their final names
    remote, local = FeatureStore(uri), FeatureStore(tmp_path / "local")
    assert remote.uri == uri and remote.fingerprint == local.fingerprint
    listed = list(csv.DictReader(io.StringIO(s3.body("stores/cnn/inputs.csv").decode())))
    assert len(listed) == 8 and json.loads(s3.body("stores/cnn/inputs.json"))["params"]["max_per_class"] == 2
    # the same rows as the same images extracted into a local folder
    rows, expected = _rows_by_path(remote), _rows_by_path(local)
    assert sorted(rows) == sorted(expected) and len(rows) == 8
    for path, row in expected.items():
        got = rows[path]
        assert (got["sha256"], got["label"], got["group"], got["caption"]) == \
               (row["sha256"], row["label"], row["group"], row["caption"])
        np.testing.assert_allclose(got["global_image"], row["global_image"], rtol=1e-5, atol=1e-6)
    lease = json.loads(s3.body("stores/cnn/writer.lock"))
    assert lease["released"] and lease["claimed_by"] == "conditional-write"

    # a rerun skips everything and writes no new shard
    shards = s3.keys("stores/cnn/shards/")
    _invoke("extract", str(tmp_path / "tree"), "--out", uri, *common)
    assert s3.keys("stores/cnn/shards/") == shards
    assert [r["processed"] for r in FeatureStore(uri).config["runs"]] == [8, 0]

    info = _invoke("store", "info", uri)
    assert uri in info.output and "8 rows" in info.output and f"{uri}/shards" in info.output
    assert json.loads(_invoke("store", "info", uri, "--json").output)["summary"]["rows"] == 8
    assert "merged" in _invoke("store", "compact", uri).output

    head = tmp_path / "head.safetensors"
    _invoke("train", uri, "--out", str(head), "--epochs", "2", "--hidden", "8", "--val", uri)
    assert json.loads(head.with_suffix(".json").read_text())["training"]["data"]["stores"] == [uri]
    _invoke("eval", uri, "--head", str(head), "--out", str(tmp_path / "eval"), "--no-plots", "--calibrate-on", uri)
    assert uri in (tmp_path / "eval" / "table.md").read_text()
    _invoke("ablate", uri, "--test", uri, "--out", str(tmp_path / "abl"), "--studies", "modality",
            "--no-baselines", "--epochs", "2", "--hidden", "8", "--compare", f"again={uri},{uri}:{uri}")
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["compare"]["again"]["test"] == [uri]
    saved = s3.uri("stores/detected")
    _invoke("detect", str(tmp_path / "tree" / "dalle"), "--head", str(head), "--save-store", saved, "--format", "json",
            "--device", "cpu", "--out", str(tmp_path / "detect.json"))
    assert len(FeatureStore(saved)) == 6
    rob = s3.uri("results/robustness")
    result = _invoke("robustness", str(tmp_path / "tree"), "--head", str(head), "--out", rob, "--only", "jpeg",
                     "--jpeg", "50", "--no-clean", "--layout", "cnndetection", "--max-per-class", "1", "--device", "cpu")
    assert f"{rob}/stores" in result.output
    assert {"results/robustness/robustness.json", "results/robustness/evaluated.csv",
            "results/robustness/stores/jpeg-50/config.json"} <= set(s3.keys("results/"))
    assert len(FeatureStore(f"{rob}/stores/jpeg-50")) == 4

    # other readers, at the URI, with no tidy-detect code
    frame = pd.read_parquet(f"{uri}/shards/", storage_options=_pandas_options(s3))
    assert len(frame) == 8 and frame["path"].is_unique
    assert pl.read_parquet(f"{uri}/shards/*.parquet", storage_options=_polars_options(s3)).height == 8
    # DuckDB with its own S3 reader (httpfs: the extension from PyPI, as it cannot be downloaded here),
    # the glob listed by DuckDB itself
    con = _duckdb_with_httpfs(s3)
    query = f"""select "group", label, count(*) from read_parquet('{uri}/shards/*.parquet')
                where error is null group by all order by all"""
    counts = Counter((row["group"], row["label"]) for row in expected.values())
    assert con.sql(query).fetchall() == sorted((group, label, n) for (group, label), n in counts.items())
    # and through an fsspec filesystem registered with the connection, the way without the extension
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}))
    count = con.sql(f"select count(*) from read_parquet('{uri}/shards/*.parquet') where error is null").fetchall()
    assert count == [(8,)]


# -- resume after a killed run ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_keeping_its_shards_and_each_image_once(s3, tiny_preset, tmp_path):
    paths = make_tree(tmp_path / "tree", {"a": 6, "b": 6}, seed=2)  # 24 images, 12 batches of 2
    uri = s3.uri("killed")
    command = [sys.executable, "-m", "tidy_detect.cli", "extract", str(tmp_path / "tree"), "--out", uri,
               "--preset", str(tiny_preset), "--batch-size", "2", "--workers", "1", "--device", "cpu"]
    with (tmp_path / "first.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 180
        while len(s3.keys("killed/shards/")) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)  # dies holding its lease, perhaps in the middle of an upload
        process.wait()
    before = {key: s3.body(key) for key in s3.keys("killed/shards/")}
    done = FeatureStore(uri)
    kept = _rows_by_path(done)
    assert 0 < len(kept) < len(paths), (tmp_path / "first.log").read_text()[-2000:]
    lease = json.loads(s3.body("killed/writer.lock"))
    assert lease["pid"] == process.pid and not lease.get("released")  # still "held" by the dead process

    # rerun at once: the lease of a dead process on this host is taken over without waiting for it
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    store = FeatureStore(uri)
    rows = _rows_by_path(store)
    assert sorted(rows) == sorted(str(p) for p in paths)  # each image exactly once
    last = store.config["runs"][-1]
    assert last["status"] == "completed" and last["processed"] == len(paths) - len(kept)
    for path, row in kept.items():  # the finished shards' rows were kept, not redone
        np.testing.assert_array_equal(rows[path]["global_image"], row["global_image"])
    assert all(isinstance(v, bytes) and v[:4] == b"PAR1" for v in before.values())


# -- readers while a writer writes -----------------------------------------------------------------

def test_readers_never_see_half_a_shard_while_a_writer_writes(s3):
    import pandas as pd
    import polars as pl

    uri = s3.uri("live")
    store = FeatureStore.open_for_writing(uri, EXTRACTION, DIM)
    per_shard, shards = 3, 16
    finished = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with store.writing():
                for k in range(shards):
                    store.write([_row(k * per_shard + i) for i in range(per_shard)])
                    time.sleep(0.03)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
        finally:
            finished.set()

    duck = _duckdb_with_httpfs(s3)
    duck.execute("SET enable_http_metadata_cache = false")  # list the shards anew on every query
    seen = []
    writer = threading.Thread(target=write)
    writer.start()
    while not finished.is_set() or len(seen) < 3:
        reader = FeatureStore(uri)
        table = reader.table(["sha256", "path", "global_image", "local_images"])
        frame = pd.read_parquet(f"{uri}/shards/", storage_options=_pandas_options(s3)) \
            if reader.shards() else pd.DataFrame({"path": []})
        polars_rows = pl.read_parquet(f"{uri}/shards/*.parquet", storage_options=_polars_options(s3)).height \
            if reader.shards() else 0
        duckdb_rows = duck.sql(f"select count(*) from read_parquet('{uri}/shards/*.parquet')").fetchone()[0] \
            if reader.shards() else 0
        for n in (table.num_rows, len(frame), polars_rows, duckdb_rows):
            assert n % per_shard == 0, n  # whole shards only
        assert table["global_image"].null_count == 0 and table["local_images"].null_count == 0
        assert len(set(table["path"].to_pylist())) == table.num_rows
        seen.append(table.num_rows)
        if finished.is_set() and len(seen) >= 3:
            break
    writer.join()
    assert not failures, failures
    assert any(0 < n < per_shard * shards for n in seen), seen  # some reads happened mid-way
    assert len(FeatureStore(uri)) == per_shard * shards


# -- one writer at a time: the lease ---------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_until_the_lease_expires(s3, monkeypatch, caplog):
    monkeypatch.setenv(LEASE_SECONDS_ENV, "3")
    uri = s3.uri("leased")
    first = FeatureStore.open_for_writing(uri, EXTRACTION, DIM)
    first.lock.acquire()
    assert first.lock.mode == "conditional-write"
    second = FeatureStore(uri)
    host = socket.gethostname()
    with pytest.raises(StoreError, match=rf"another process is writing to this store \(pid {os.getpid()} on {host}"):
        second.lock.acquire()
    with pytest.raises(StoreError, match="another process is writing"):
        second.compact()
    claimed = json.loads(s3.body("leased/writer.lock"))
    time.sleep(4)  # longer than the lease: the heartbeat renewed it
    renewed = json.loads(s3.body("leased/writer.lock"))
    assert renewed["token"] == claimed["token"] and renewed["expires"] > claimed["expires"]
    with pytest.raises(StoreError, match="another process is writing"):
        second.lock.acquire()

    # the holder stalls (its heartbeat stops, as in a frozen process): once the lease expires,
    # the second writer takes over, and the first learns it before its next write
    first.lock._stop.set()
    first.lock._thread.join()
    time.sleep(3.5)
    with caplog.at_level(logging.INFO, logger="tidy_detect.features.storage"):
        second.lock.acquire()
    assert "taking over the writer lease" in caplog.text
    with pytest.raises(StoreError, match="lost its lease"):
        first.write([_row(0)])
    first.lock._renew()  # a late heartbeat finds the lease is someone else's (If-Match fails)
    assert "taken over" in first.lock._lost
    second.write([_row(1)])
    first.lock.release()  # releases nothing that is not its own
    assert json.loads(s3.body("leased/writer.lock"))["token"] == second.lock._record["token"]
    second.lock.release()
    assert json.loads(s3.body("leased/writer.lock"))["released"]
    third = FeatureStore(uri)
    with third.writing():  # a released lease is free at once
        third.write([_row(2)])
    assert len(third) == 2


def test_a_lease_of_another_host_is_honoured_until_its_expiry(s3, monkeypatch):
    uri = s3.uri("elsewhere")
    store = FeatureStore.open_for_writing(uri, EXTRACTION, DIM)
    soon = time.time() + 2.5
    import datetime as dt

    expires = dt.datetime.fromtimestamp(soon, dt.timezone.utc).isoformat(timespec="milliseconds")
    s3.client.put_object(Bucket=s3.bucket, Key="elsewhere/writer.lock", Body=json.dumps(
        {"pid": 1, "host": "node-7", "since": "2026-01-01T00:00:00+00:00", "command": "tidy-detect extract ...",
         "token": "x", "expires": expires}).encode())
    with pytest.raises(StoreError, match=r"pid 1 on node-7 .*its lease runs to"):
        store.lock.acquire()
    with pytest.raises(StoreError, match="pid 1 on node-7"):
        store.lock.acquire(wait=0.5)
    store.lock.acquire(wait=10)  # waits for the expiry, then takes over
    assert json.loads(s3.body("elsewhere/writer.lock"))["pid"] == os.getpid()
    store.lock.release()


def test_without_conditional_writes_the_lease_is_claimed_by_reading_back(s3):
    location = StoreLocation.parse(s3.uri("readback"))
    first, second = StoreLease(location, seconds=5, conditional=False), StoreLease(location, seconds=5,
                                                                                  conditional=False)
    assert first.mode == "read-back"
    first.acquire()
    with pytest.raises(StoreError, match="another process is writing"):
        second.acquire()
    first.release()
    second.acquire()
    assert json.loads(s3.body("readback/writer.lock"))["claimed_by"] == "read-back"
    second.release()


def test_an_unusable_lease_setting_is_a_clear_error(s3, monkeypatch):
    store = FeatureStore.open_for_writing(s3.uri("badlease"), EXTRACTION, DIM)
    monkeypatch.setenv(LEASE_SECONDS_ENV, "soon")
    assert len(FeatureStore(s3.uri("badlease"))) == 0  # readers take no lease
    with pytest.raises(StoreError, match=f"{LEASE_SECONDS_ENV} must be a number of seconds >= 2, got 'soon'"):
        store.lock.acquire()
    result = runner.invoke(app, ["store", "compact", s3.uri("badlease")])
    assert result.exit_code == 6 and f"{LEASE_SECONDS_ENV} must be" in result.output


# -- compaction: the commit record ------------------------------------------------------------------

def test_an_interrupted_compaction_on_s3_is_finished_by_the_next_writer(s3, monkeypatch):
    import pandas as pd

    uri = s3.uri("compact")
    store = FeatureStore.open_for_writing(uri, EXTRACTION, DIM)
    for i in range(6):
        store.write([_row(i)])
    old = s3.keys("compact/shards/")
    # a crash after the merged shard was written, before the old ones were deleted
    with monkeypatch.context() as patch:
        patch.setattr(FeatureStore, "_recover_compaction", lambda self: None)
        assert store.compact(target_rows=100) == 6
    assert len(s3.keys("compact/shards/")) == 7 and "compact/" + COMPACT_JOURNAL in s3.keys("compact/")
    journal = json.loads(s3.body("compact/" + COMPACT_JOURNAL))
    assert sorted(journal["replaced"]) == sorted(k.rsplit("/", 1)[1] for k in old)
    # while a writer holds the store, readers leave its journal alone and see each row once
    with store.writing():
        reader = FeatureStore(uri)
        assert len(reader) == 6 and len(reader.shards()) == 7
        assert len(pd.read_parquet(f"{uri}/shards/", storage_options=_pandas_options(s3))) == 12  # raw: both
    # the next open with the store free finishes it
    finished = FeatureStore(uri)
    assert len(finished.shards()) == 1 and len(finished) == 6
    assert "compact/" + COMPACT_JOURNAL not in s3.keys("compact/")

    # a crash after the commit record, before the merged shard: the old shards stay, nothing lost
    for i in range(6, 9):
        finished.write([_row(i)])

    def failing_upload(self, name, table):
        raise StorageError(f"{self.child(name)}: writing failed (connection reset)")

    with monkeypatch.context() as patch:
        patch.setattr(ObjectLocation, "write_parquet", failing_upload)
        with pytest.raises(StoreError, match="connection reset"):
            finished.compact(target_rows=100)
    assert "compact/" + COMPACT_JOURNAL in s3.keys("compact/")
    reopened = FeatureStore(uri)
    assert len(reopened) == 9 and len(reopened.shards()) == 4
    assert "compact/" + COMPACT_JOURNAL not in s3.keys("compact/")
    assert reopened.compact(target_rows=100) == 4 and len(reopened.shards()) == 1 and len(reopened) == 9


def test_update_and_remove_rewrite_shards_on_s3(s3):
    store = FeatureStore.open_for_writing(s3.uri("rewrite"), EXTRACTION, DIM)
    store.write([_row(0), _row(1)])
    store.write([_row(2)])
    assert store.remove_paths(["/img/2.png"]) == 1 and len(store.shards()) == 1
    assert store.remove_paths(["/img/1.png"]) == 1
    assert set(store.index()) == {"/img/0.png"} and len(store.shards()) == 1


# -- the Ray engine writes its shards to S3 ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, about its own settings
def test_the_ray_engine_writes_a_store_on_s3_without_a_shared_filesystem(s3, tiny_bundle, tmp_path):
    ray = pytest.importorskip("ray")
    from tidy_detect.distributed import RayOptions, extract_ray

    paths = make_tree(tmp_path / "tree", {"progan": 2}, seed=5)  # 4 images
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 2, "num_workers": 1})
    uri = s3.uri("ray/store")
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    # the workers find the endpoint and credentials the way a cluster's pods would: in their environment
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": dict(s3.env)})
    try:
        summary = extract_ray([tmp_path / "tree"], uri, config,
                              RayOptions(workers=1, cpus_per_worker=1, decode_cpus=0.25))
    finally:
        ray.shutdown()
    assert summary.status == "completed" and summary.processed == 4 and summary.store == uri
    store = FeatureStore(uri)
    assert sorted(_rows_by_path(store)) == sorted(str(p) for p in paths)
    assert store.config["runs"][-1]["engine"] == "ray"
    assert any(k.startswith("ray/store/shards/part-") for k in s3.keys("ray/store/"))


# -- URI forms and their errors ---------------------------------------------------------------------

def test_file_uris_are_local_stores_and_fsspec_filesystems_work_too(tmp_path):
    local = FeatureStore.open_for_writing(f"file://{tmp_path / 'viafile'}", EXTRACTION, DIM)
    assert local.is_local and local.path == tmp_path / "viafile" and local.lock.__class__.__name__ == "StoreLock"
    local.write([_row(0)])
    assert len(FeatureStore(tmp_path / "viafile")) == 1

    uri = f"memory://tidy-tests/{uuid.uuid4().hex}/store"  # fsspec's, which pyarrow has no filesystem for
    store = FeatureStore.open_for_writing(uri, EXTRACTION, DIM)
    assert not store.is_local and store.lock.mode == "read-back"
    with store.writing():
        for i in range(3):
            store.write([_row(i)])
        assert store.compact(target_rows=100) == 3
    reopened = FeatureStore(uri)
    assert len(reopened) == 3 and len(reopened.shards()) == 1 and reopened.shards()[0].startswith(f"{uri}/shards/")


def test_store_locations_are_checked_with_clear_errors(s3, tmp_path):
    with pytest.raises(StoreError, match=r"looks like a URI with one '/' after its scheme; pathlib.Path turns"):
        FeatureStore(Path("s3://bucket/store"))
    with pytest.raises(StoreError, match=r"s3:/bucket/store: looks like a URI .*write two, as in 's3://bucket/"):
        FeatureStore.open_for_writing("s3:/bucket/store", EXTRACTION, DIM)
    assert not Path("s3:").exists()
    with pytest.raises(StoreError, match=r"no filesystem for nosuch:// .*known: s3://"):
        FeatureStore("nosuch://bucket/store")
    with pytest.raises(StoreError, match=r"not a feature store"):
        FeatureStore(s3.uri("nothing-here"))
    with pytest.raises(StoreError, match=r"bucket 'no-such-bucket-here' does not exist"):
        FeatureStore.open_for_writing("s3://no-such-bucket-here/store", EXTRACTION, DIM)
    s3.client.put_object(Bucket=s3.bucket, Key="taken/notes.txt", Body=b"hello")
    with pytest.raises(StoreError, match=r"exists and is not an empty folder or a feature store"):
        FeatureStore.open_for_writing(s3.uri("taken"), EXTRACTION, DIM)
    remote = FeatureStore.open_for_writing(s3.uri("ok"), EXTRACTION, DIM)
    with pytest.raises(StoreError, match=r"is on object storage and has no local path"):
        remote.path
    result = runner.invoke(app, ["store", "info", s3.uri("nothing-here")])
    assert result.exit_code == 6 and f"{s3.uri('nothing-here')}: not a feature store" in result.output
    s3.client.put_object(Bucket=s3.bucket, Key="ok/shards/part-bad.parquet", Body=b"PAR1 garbage")
    result = runner.invoke(app, ["store", "info", s3.uri("ok")])
    assert result.exit_code == 6 and f"{s3.uri('ok')}/shards/part-bad.parquet: unreadable shard" in result.output


def test_a_writer_aborts_the_uploads_a_killed_writer_left(s3, caplog):
    """A writer killed mid-upload leaves an unfinished multipart upload, which S3 keeps (and bills)
    until it is aborted: the next writer to hold the lease aborts those older than a lease period."""
    code = ("import os, pyarrow.fs as f\n"
            "fs = f.S3FileSystem(endpoint_override=os.environ['AWS_ENDPOINT_URL'], scheme='http', region='us-east-1')\n"
            f"s = fs.open_output_stream('{s3.bucket}/killed/shards/part-x.parquet')\n"
            "s.write(b'x' * 6_000_000)\ns.flush()\nos._exit(9)\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **s3.env})
    s3.client.create_multipart_upload(Bucket=s3.bucket, Key="elsewhere/part-y.parquet")  # not under the store

    def uploads(prefix):
        return [u["Key"] for u in s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])]

    assert uploads("killed/") == ["killed/shards/part-x.parquet"]
    store = FeatureStore.open_for_writing(s3.uri("killed"), EXTRACTION, DIM)  # moto dates every upload 2010
    with caplog.at_level(logging.INFO, logger="tidy_detect.features.storage"), store.writing():
        store.write([_row(0)])
    assert uploads("killed/") == [] and uploads("elsewhere/") == ["elsewhere/part-y.parquet"]
    assert "aborted 1 unfinished upload" in caplog.text and len(FeatureStore(s3.uri("killed"))) == 1


def test_only_uploads_older_than_the_cutoff_are_stale():
    import datetime as dt

    from tidy_detect.features.storage import stale_upload

    cutoff = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert stale_upload(dt.datetime(2026, 12, 1, 11, 59, tzinfo=dt.timezone.utc), cutoff)
    assert not stale_upload(dt.datetime(2026, 12, 1, 12, 1, tzinfo=dt.timezone.utc), cutoff)
    assert not stale_upload(dt.datetime(2026, 12, 1, 13, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))), cutoff)
    assert stale_upload(dt.datetime(2026, 12, 1, 11, 0), cutoff)  # naive: UTC
