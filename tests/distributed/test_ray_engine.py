"""The Ray engine on a local 2-CPU cluster with the tiny bundle: same rows as the local engine,
bad files as error rows, resume, a killed worker, an abandoned driver and a killed driver."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, about its own settings

from tidy_detect.config import RepresentationConfig, load_preset  # noqa: E402
from tidy_detect.data.inputs import ImageItem  # noqa: E402
from tidy_detect.distributed import (  # noqa: E402
    RayNotInstalledError,
    RayOptions,
    extract_ray,
    extract_with_engine,
    ray_options_from_cli,
)
from tidy_detect.distributed.ray_engine import plan_batches  # noqa: E402
from tidy_detect.errors import ConfigError, StoreError, UnknownNameError  # noqa: E402
from tidy_detect.features.extractor import extract  # noqa: E402
from tidy_detect.features.store import FeatureStore  # noqa: E402

from tests.conftest import make_tree  # noqa: E402

# Two half-CPU actors leave a quarter CPU for decode tasks on the 2-CPU cluster; whole CPUs per
# actor would leave decoding no slot at all.
OPTIONS = RayOptions(workers=2, cpus_per_worker=0.5, decode_cpus=0.25)
ONE_WORKER = RayOptions(workers=1, cpus_per_worker=1, decode_cpus=0.25)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tiny_bundle):
    return load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 2, "num_workers": 1})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "tree"
    make_tree(root, {"progan": 2, "dalle": 2}, seed=3)
    (root / "dalle" / "1_fake" / "broken.png").write_text("not an image")
    return root  # 9 images, one of them unreadable


@pytest.fixture(scope="module")
def local_store(config, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    extract([tree], out, config)
    return FeatureStore(out)


@pytest.fixture(scope="module")
def ray_run(cluster, config, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("rayrun") / "store"
    calls = []
    summary = extract_ray([tree], out, config, OPTIONS, progress=lambda done, total, s: calls.append((done, total)))
    return summary, FeatureStore(out), calls


def _wait_until_no_shard_lands(store_path, quiet: float = 3.0, limit: float = 60.0) -> None:
    deadline, last, since = time.monotonic() + limit, None, time.monotonic()
    while time.monotonic() < deadline:
        now = _shards(store_path)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)
    raise AssertionError(f"shards still landing {limit:g} s after the run was abandoned")


def _assert_each_image_once(store: FeatureStore, expected: int) -> None:
    table = pq.read_table(list(store.shards()), columns=["sha256", "path"])  # raw Parquet: no de-duplication
    paths = table["path"].to_pylist()
    assert table.num_rows == expected and len(set(paths)) == expected


def test_same_rows_as_the_local_engine(ray_run, local_store):
    summary, store, calls = ray_run
    assert summary.status == "completed"
    assert (summary.total, summary.processed, summary.errors, summary.skipped) == (9, 8, 1, 0)
    assert calls[0] == (0, 9) and calls[-1] == (9, 9)
    assert store.fingerprint == local_store.fingerprint and store.dim == local_store.dim
    local = {r["path"]: r for r in local_store.rows()}
    remote = {r["path"]: r for r in store.rows()}
    assert remote.keys() == local.keys()
    for path, want in local.items():
        got = remote[path]
        for key in ("sha256", "label", "group", "width", "height", "format", "num_bytes", "caption", "phrases",
                    "object_phrases", "local_fallback", "error_kind"):
            assert got[key] == want[key], (path, key)
        if want["error"] is not None:
            continue
        np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
        for key in ("global_image", "global_text", "local_images", "local_texts"):
            assert np.allclose(np.asarray(got[key], np.float32), np.asarray(want[key], np.float32), atol=1e-4), key
    _assert_each_image_once(store, 9)
    X = store.load(RepresentationConfig()).X
    assert X.shape == (8, store.dim) and np.isfinite(X).all()


def test_bad_file_becomes_an_error_row_and_the_run_is_recorded(ray_run):
    summary, store, _ = ray_run
    rows = {Path(r["path"]).name: r for r in store.rows(["path", "sha256", "error", "error_kind"])}
    broken = rows["broken.png"]
    assert broken["error_kind"] == "unsupported" and "not an image" in broken["error"] and broken["sha256"]
    assert summary.error_kinds == {"unsupported": 1}
    run = store.config["runs"][-1]
    assert run["engine"] == "ray" and run["status"] == "completed" and run["processed"] == 8
    assert run["device"] == "cpu" and run["ray"]["workers"] == 2
    assert sum(summary.workers.values()) == 9


def test_rerun_skips_everything(ray_run, config, tree):
    _, store, _ = ray_run
    shards = sorted(p.name for p in store.shards())
    again = extract_ray([tree], store.path, config, OPTIONS)
    assert (again.status, again.processed, again.skipped, again.errors) == ("completed", 0, 9, 0)
    assert sorted(p.name for p in store.shards()) == shards


def test_a_killed_worker_is_replaced_and_the_run_completes(cluster, config, tmp_path):
    make_tree(tmp_path / "tree", {"gen": 20}, seed=4)  # 40 images
    # One worker, batches of one image: when the first batch is reported, most are still to do,
    # and only the killed worker's replacement can do them.
    config = config.updated(runtime={"batch_size": 1})
    killed = []

    def kill_the_worker(done, total, summary):
        if summary.workers and not killed:
            worker = next(iter(summary.workers))
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
            killed.append(worker)

    summary = extract_ray([tmp_path / "tree"], tmp_path / "store", config, ONE_WORKER, progress=kill_the_worker)
    assert killed and summary.status == "completed"
    assert (summary.processed, summary.errors) == (40, 0)
    assert killed[0] in summary.workers and len(summary.workers) >= 2, summary.workers  # and its replacement
    store = FeatureStore(tmp_path / "store")
    _assert_each_image_once(store, 40)
    assert sorted(r["path"] for r in store.rows(["path"])) == sorted(str(p) for p in (tmp_path / "tree").rglob("*.png"))


DRIVER = textwrap.dedent("""
    import logging, sys
    import ray
    from tidy_detect.config import load_preset
    from tidy_detect.distributed import RayOptions, extract_ray

    ray.init(address=sys.argv[1], logging_level=logging.WARNING)
    config = load_preset(sys.argv[2]).updated(runtime={"batch_size": 1})
    extract_ray([sys.argv[3]], sys.argv[4], config, RayOptions(workers=1, cpus_per_worker=1, decode_cpus=0.25))
""")


def _shards(store_path: Path) -> set[str]:
    return {p.name for p in (store_path / "shards").glob("*.parquet")}


@pytest.mark.slow
def test_an_abandoned_run_then_a_killed_driver_then_a_rerun_leave_every_image_once(cluster, config, tiny_preset,
                                                                                    tmp_path):
    make_tree(tmp_path / "tree", {"gen": 20}, seed=5)  # 40 images
    tree, store_path = tmp_path / "tree", tmp_path / "store"
    # One worker and batches of one image, so that work is surely left when the first batch is
    # reported (the worker runs ahead of the driver's reading).
    config, options = config.updated(runtime={"batch_size": 1}), ONE_WORKER

    # 1. The driver stops reading (Ctrl-C in the CLI): the run is abandoned and recorded so.
    calls = []

    def interrupt_after_first_batch(done, total, summary):
        calls.append(done)
        if len(calls) == 2:  # the first call reports the start, the second a finished batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_ray([tree], store_path, config, options, progress=interrupt_after_first_batch)
    store = FeatureStore(store_path)
    assert store.config["runs"][-1]["status"] == "interrupted"
    _wait_until_no_shard_lands(store_path)  # an actor stopped mid-batch may still land the batch it was writing
    kept = len(store)
    assert 1 <= kept < 40  # the reported batch, and any other finished one, was kept
    _assert_each_image_once(store, kept)

    # 2. A driver process (on the same cluster) goes on, and is killed with SIGKILL once it has
    # written a shard of its own.
    before = _shards(store_path)
    log_file = tmp_path / "driver.log"
    with log_file.open("wb") as log:  # a file, not a pipe: a full pipe would stall the driver
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.get_runtime_context().gcs_address,
                                   str(tiny_preset), str(tree), str(store_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _shards(store_path) - before:
            assert driver.poll() is None, log_file.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the driver wrote no shard in 120 s"
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    store = FeatureStore(store_path)
    assert len(store.config["runs"]) == 1  # killed before it could record anything
    finished = len(store)
    assert kept < finished

    # 3. A rerun skips every finished image and does the rest: each image once.
    summary = extract_ray([tree], store_path, config, options)
    assert summary.status == "completed" and summary.skipped >= finished
    assert summary.skipped + summary.processed == 40
    _assert_each_image_once(FeatureStore(store_path), 40)


def test_a_worker_with_other_models_refuses_the_store(cluster, config, tree, tmp_path):
    from tidy_detect.distributed.ray_engine import run_extraction_ray

    other = config.updated(features={"max_objects": 2})  # fingerprinted: rows would not mix
    extract([tree], tmp_path / "store", config, limit=1)
    items = [ImageItem(str(p)) for p in sorted(tree.rglob("*.png"))[1:3]]
    with pytest.raises(StoreError, match="models differ from the store's extraction config.*max_objects"):
        run_extraction_ray(items, FeatureStore(tmp_path / "store"), other, OPTIONS)
    assert FeatureStore(tmp_path / "store").config["runs"][-1]["status"] == "failed"


def test_models_that_do_not_load_fail_before_any_work(cluster, config, tree, tmp_path):
    from tidy_detect.errors import ModelLoadError

    missing = config.updated(models={"clip": str(tmp_path / "no-such-clip")})
    with pytest.raises(ModelLoadError, match="no-such-clip"):
        extract_ray([tree], tmp_path / "store", missing, OPTIONS)
    assert not (tmp_path / "store").exists()


def test_a_store_of_another_config_is_refused_before_any_work(cluster, config, tree, tmp_path):
    extract([tree], tmp_path / "store", config, limit=1)
    with pytest.raises(StoreError, match="different extraction config.*max_objects"):
        extract_ray([tree], tmp_path / "store", config.updated(features={"max_objects": 2}), OPTIONS)


# ---------------------------------------------------------------------------------------------
# Without a cluster

def test_batches_are_cut_from_the_whole_list():
    items = [ImageItem(f"/x/{i}.png") for i in range(7)]
    todo = [items[1], items[4], items[5], items[6], items[6]]
    planned = plan_batches(items + [items[6]], todo, 3)
    assert [(b, [it.path for it in batch]) for b, batch in planned] == [
        (0, ["/x/1.png"]), (1, ["/x/4.png", "/x/5.png"]), (2, ["/x/6.png"])]


def test_a_streamed_input_is_cut_into_the_batches_of_its_list(tmp_path):
    """A re-iterable input (an ItemStream) is planned and cut while it is listed again, into the
    batches a list of the same images gives, so shard names do not depend on how it was read."""
    import hashlib

    from tidy_detect.data.selection import ItemStream
    from tidy_detect.data.sources import read_item
    from tidy_detect.features.extractor import pending_items

    from tests.data.conftest import make_parquet, tree_files

    make_tree(tmp_path / "tree", {"a": 3, "b": 2}, seed=5)
    table = make_parquet(tree_files(tmp_path / "tree"), tmp_path / "t.parquet")
    store = FeatureStore.open_for_writing(tmp_path / "store", {"clip": {"source": "x", "dim": 4}}, 4)
    stream = ItemStream([table])
    listed = list(stream)
    done = [listed[1], listed[5], listed[6]]  # rows the store already holds
    store.write([{"path": it.path, "sha256": hashlib.sha256(read_item(it.path)[0]).hexdigest(), "error": "unreadable",
                  "error_kind": "corrupt", "label": it.label} for it in done])
    want = [(b, [it.path for it in batch]) for b, batch in plan_batches(listed, pending_items(listed, store).todo, 3)]
    plan = pending_items(stream, store)
    assert not isinstance(plan.todo, list)
    got = [(b, [it.path for it in batch]) for b, batch in plan_batches(stream, plan.todo, 3)]
    assert got == want and sum(len(p) for _, p in got) == len(listed) - 3


def test_each_image_is_counted_once_and_finished_batches_are_forgotten():
    from tidy_detect.distributed.ray_engine import _Accounts

    accounts = _Accounts({0: 2, 3: 1})
    assert accounts.first_time(0, "a") and not accounts.first_time(0, "a")  # Ray redid it
    assert accounts.missing() == (2, [0, 3])
    assert accounts.first_time(0, "b") and 0 not in accounts.waiting and not accounts.partial  # complete: dropped
    assert not accounts.first_time(0, "b")
    assert accounts.first_time(3, "c") and accounts.done == 3 and accounts.missing() == (0, [])


def test_every_image_item_field_travels_to_the_workers():
    import dataclasses

    from tidy_detect.distributed.ray_engine import _ITEM_FIELDS

    assert _ITEM_FIELDS == tuple(f.name for f in dataclasses.fields(ImageItem))


def test_unknown_engine_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownNameError, match=r"^Unknown engine 'spark'\. Known: local, ray\.$"):
        extract_with_engine("spark", [tmp_path], tmp_path / "store")
    with pytest.raises(UnknownNameError, match="Known: local, ray"):
        ray_options_from_cli("spark")


def test_ray_options_from_the_command_line():
    assert ray_options_from_cli("local", workers=4) is None  # --workers: decoding threads there
    with pytest.raises(ConfigError, match="--ray-address only applies to --engine ray, got --engine local"):
        ray_options_from_cli("local", address="auto")
    assert ray_options_from_cli("ray", address="auto", workers=3, num_gpus_per_worker=1) == \
        RayOptions(address="auto", workers=3, num_gpus_per_worker=1)
    with pytest.raises(ConfigError, match="Ray options only apply to --engine ray"):
        extract_with_engine("local", [], "x", ray_options=RayOptions())


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ({"num_gpus_per_worker": -1}, "num_gpus_per_worker must be a number >= 0, got -1"),
    ({"num_gpus_per_worker": 1.5}, "num_gpus_per_worker above 1 must be a whole number, got 1.5"),
    ({"cpus_per_worker": 0}, "cpus_per_worker must be > 0 when num_gpus_per_worker is 0"),
    ({"address": ""}, "ray address must be"),
])
def test_invalid_options_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RayOptions(**kwargs)


def test_missing_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(RayNotInstalledError, match=r"pip install 'tidy-detect\[distributed\]'"):
        extract_with_engine("ray", [tmp_path], tmp_path / "store")


def test_a_local_cluster_without_gpus_refuses_gpu_workers(monkeypatch):
    from tidy_detect.distributed.ray_engine import _check_local_resources

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0}

    with pytest.raises(ConfigError, match="2 workers x 1 GPUs need 2 GPUs, but this machine has 0"):
        _check_local_resources(FakeRay, RayOptions(num_gpus_per_worker=1))
    with pytest.raises(ConfigError, match="more than the 2 CPU slots"):
        _check_local_resources(FakeRay, RayOptions(workers=2, cpus_per_worker=1))
    _check_local_resources(FakeRay, OPTIONS)


def test_status_is_json_serialisable(ray_run):
    summary, _, _ = ray_run
    json.dumps(summary.to_dict())


def test_extract_cli_with_the_ray_engine(cluster, tiny_preset, tree, tmp_path):
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(tree), "--out", str(tmp_path / "s"), "--preset", str(tiny_preset),
                                 "--engine", "ray", "--workers", "1", "--cpus-per-worker", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "s")
    assert store.config["runs"][-1]["engine"] == "ray"
    _assert_each_image_once(store, len(list(store.rows(["path"]))))
    bad = runner.invoke(app, ["extract", str(tree), "--out", str(tmp_path / "t"), "--engine", "spark"])
    assert bad.exit_code == 2 and "Unknown engine 'spark'. Known: local, ray." in bad.output
    stray = runner.invoke(app, ["extract", str(tree), "--out", str(tmp_path / "t"), "--ray-address", "auto"])
    assert stray.exit_code == 2


def test_a_replaced_file_is_extracted_again_by_the_ray_engine(cluster, config, tmp_path):
    from PIL import Image

    from tests.conftest import random_image

    paths = make_tree(tmp_path / "tree", {"gen": 2}, seed=8, suffix=".bmp")
    store_path = tmp_path / "store"
    extract_ray([tmp_path / "tree"], store_path, config, OPTIONS)
    target = paths[0]
    stat = target.stat()
    random_image(np.random.default_rng(77), *Image.open(target).size).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    summary = extract_ray([tmp_path / "tree"], store_path, config, OPTIONS)
    assert (summary.changed, summary.processed) == (1, 1)
    rows = [r for r in FeatureStore(store_path).rows(["path", "sha256"]) if r["path"] == str(target)]
    import hashlib

    assert len(rows) == 1 and rows[0]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert len(FeatureStore(store_path)) == 4


def test_a_table_reaches_the_cluster_streamed_with_each_row_once(cluster, config, tmp_path, monkeypatch):
    """Generic inputs go to the cluster without ever being listed as a whole (collect_inputs would
    be): the rows of a table twice over, each once in the store, and a rerun skips them all."""
    import tidy_detect.data.inputs as inputs_module

    from tests.data.conftest import make_parquet, tree_files

    make_tree(tmp_path / "tree", {"a": 2, "b": 1}, seed=6)
    table = make_parquet(tree_files(tmp_path / "tree"), tmp_path / "t.parquet")
    monkeypatch.setattr(inputs_module, "collect_inputs", lambda *a, **k: pytest.fail("listed whole"))
    summary = extract_ray([table, table], tmp_path / "store", config, ONE_WORKER)
    assert (summary.total, summary.processed, summary.errors) == (6, 6, 0)
    _assert_each_image_once(FeatureStore(tmp_path / "store"), 6)
    again = extract_ray([table], tmp_path / "store", config, ONE_WORKER)
    assert (again.total, again.skipped, again.processed) == (6, 6, 0)
