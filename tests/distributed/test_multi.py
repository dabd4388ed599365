"""The local multi-process engine: a process per device, one store, the local engine's rows.

Run here with two CPU "replicas" (``--devices cpu,cpu``), which is the same code path as one
process per GPU (the GPU run is in tests/models/test_cuda.py)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from tidy_detect.config import load_preset
from tidy_detect.distributed.engines import extract_with_engine
from tidy_detect.distributed.multi import check_devices, worker_config, worker_environment
from tidy_detect.errors import ConfigError, ModelLoadError
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree

pytestmark = pytest.mark.slow


def _rows(path):
    return {r["path"]: r for r in FeatureStore(path).rows()}


def test_two_processes_write_the_store_one_process_writes(tiny_bundle, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"a": 3, "b": 3})
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 2, "num_workers": 1})
    one = extract_with_engine("local", [root], tmp_path / "one", config)
    two = extract_with_engine("local", [root], tmp_path / "two", config.updated(runtime={"devices": ("cpu", "cpu")}))
    assert (two.total, two.processed, two.errors) == (12, 12, 0)
    assert sum(two.device_images.values()) == 12 and set(two.device_images) <= {"0:cpu", "1:cpu"}
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert a.keys() == b.keys()
    for path, row in a.items():
        other = b[path]
        assert (row["caption"], row["object_phrases"], row["boxes"]) == (other["caption"], other["object_phrases"],
                                                                         other["boxes"])
        for key in ("global_image", "global_text", "local_images", "local_texts"):
            np.testing.assert_allclose(row[key], other[key], rtol=1e-5, atol=1e-6)
    store = FeatureStore(tmp_path / "two")
    assert store.config["extraction"] == FeatureStore(tmp_path / "one").config["extraction"]
    run = store.config["runs"][-1]
    assert run["status"] == "completed" and run["devices"] == ["cpu", "cpu"] and len(run["per_device"]) == 2
    assert run["engine"] == "local" and sum(run["device_images"].values()) == 12
    # A rerun resumes as the local engine does: nothing left to do.
    again = extract_with_engine("local", [root], tmp_path / "two", config.updated(runtime={"devices": ("cpu", "cpu")}))
    assert (again.skipped, again.processed) == (12, 0)
    assert one.processed == 12


def test_a_worker_that_cannot_load_its_models_ends_the_run_with_its_error(tiny_bundle, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"a": 1})
    config = load_preset(tiny_bundle / "tiny.toml").updated(models={"clip": str(tmp_path / "missing")},
                                                             runtime={"devices": ("cpu", "cpu")})
    with pytest.raises(ModelLoadError, match=r"^cpu: .*missing"):
        extract_with_engine("local", [root], tmp_path / "store", config)


def test_devices_are_checked_before_any_process_starts():
    with pytest.raises(ConfigError, match="at least two devices"):
        check_devices(["cuda:0"])
    with pytest.raises(ConfigError, match="GPU cuda:1 is listed more than once"):
        check_devices(["cuda:1", "cuda:1"])
    with pytest.raises(ConfigError, match="devices must be cpu, cuda or cuda:N, got 'tpu'"):
        check_devices(["cpu", "tpu"])
    assert check_devices(["cuda:0", "cuda:1", "cpu"]) == ("cuda:0", "cuda:1", "cpu")
    assert worker_environment("cuda:3") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert worker_environment("cpu") == {"CUDA_VISIBLE_DEVICES": ""}


def test_each_worker_sees_its_own_device_as_the_only_one(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"devices": ("cuda:2", "cuda:5")})
    runtime = worker_config(config, "cuda:5").runtime
    assert (runtime.device, runtime.devices) == ("cuda", ())
    assert worker_config(config, "cpu").runtime.device == "cpu"


def test_devices_go_to_the_local_engine_only(tiny_bundle, tmp_path):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"devices": ("cpu", "cpu")})
    with pytest.raises(ConfigError, match="apply to the local engine; with --engine ray"):
        extract_with_engine("ray", [tmp_path], tmp_path / "store", config)


def test_the_command_line_takes_devices_or_gpus_not_both(tmp_path):
    from tidy_detect.cli import app

    runner = CliRunner()
    both = runner.invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "s"), "--devices", "cpu,cpu",
                               "--gpus", "2"])
    assert both.exit_code == 2 and "give --devices or --gpus, not both" in both.output
    bad = runner.invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "s"), "--devices", "cpu,gpu1"])
    assert bad.exit_code == 2 and "got 'gpu1'" in bad.output
    clash = runner.invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "s"), "--device", "cpu",
                                "--devices", "cpu,cpu"])
    assert clash.exit_code == 2 and "were both given" in clash.output


def test_a_streamed_table_is_fed_to_the_workers_a_few_batches_ahead(tiny_bundle, tmp_path, monkeypatch):
    from tests.data.conftest import make_parquet, tree_files
    from tidy_detect.distributed import multi
    from tidy_detect.errors import InputError

    root = tmp_path / "tree"
    make_tree(root, {"a": 5, "b": 5})
    table = make_parquet(tree_files(root), tmp_path / "set.parquet")
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 1, "num_workers": 1,
                                                                     "devices": ("cpu", "cpu")})
    queued, most = [0], [0]
    original_receive = multi._Workers.receive

    def counting_receive(self, timeout):  # batches queued but not yet answered, seen whenever the run waits
        message = original_receive(self, timeout)
        if message[0] == "rows":
            queued[0] -= 1
        return message

    original_start = multi._Workers.__init__

    def counting_start(self, *args, **kwargs):
        original_start(self, *args, **kwargs)
        put = self.tasks.put

        def counting_put(task, *a, **k):
            if task is not None:
                queued[0] += 1
                most[0] = max(most[0], queued[0])
            return put(task, *a, **k)

        self.tasks.put = counting_put

    monkeypatch.setattr(multi._Workers, "receive", counting_receive)
    monkeypatch.setattr(multi._Workers, "__init__", counting_start)
    summary = extract_with_engine("local", [table], tmp_path / "store", config)
    assert (summary.total, summary.processed, summary.errors) == (20, 20, 0)
    assert len(_rows(tmp_path / "store")) == 20
    assert most[0] <= multi._batches_ahead([1, 1], 1) < 20  # never the whole input in the queue
    again = extract_with_engine("local", [table], tmp_path / "store", config)
    assert (again.skipped, again.processed) == (20, 0)

    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(table.read_bytes()[:len(table.read_bytes()) // 2])
    monkeypatch.setattr(multi._Workers, "__init__", lambda *a, **k: pytest.fail("workers started"))
    with pytest.raises(InputError, match="cut.parquet"):
        extract_with_engine("local", [truncated], tmp_path / "other", config)
