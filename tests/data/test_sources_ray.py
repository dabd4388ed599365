"""The Ray engine reads sources through the same identities: its workers, fresh processes that
never listed the inputs, read archive members, table rows (a named image column included) and S3
objects from the identity alone, and write the rows the local engine writes."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")  # the distributed extra
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from tidy_detect.config import load_preset  # noqa: E402
from tidy_detect.data.sources import SourceOptions  # noqa: E402
from tidy_detect.distributed import RayOptions, extract_ray  # noqa: E402
from tidy_detect.features.extractor import extract  # noqa: E402
from tidy_detect.features.store import FeatureStore  # noqa: E402

from tests.conftest import make_tree  # noqa: E402
from tests.data.conftest import make_tar, tree_files  # noqa: E402


@pytest.fixture(scope="module")
def cluster(moto_endpoint):
    import os

    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    # The workers inherit the driver's environment at start: the local S3 endpoint and its test keys.
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=moto_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_ray_workers_read_sources_by_identity(cluster, s3, tiny_bundle, tmp_path):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 2, "num_workers": 1})
    root = tmp_path / "bench"
    make_tree(root, {"progan": 1, "dalle": 1})
    files = tree_files(root)
    pairs = tmp_path / "pairs.parquet"  # the images in a second column: identities FILE!/fake/ROW
    pq.write_table(pa.table({"thumb": [b"x"] * len(files), "fake": [d for _, d in files],
                             "label": [int("1_fake" in n) for n, _ in files],
                             "group": [n.split("/")[0] for n, _ in files]}), pairs)
    options = SourceOptions(image_column="fake")
    remote = s3.put_file("bench.tar.gz", make_tar(files, tmp_path / "bench.tar.gz"))
    for inputs, opts in (([pairs], options), ([remote], None)):
        out = tmp_path / f"ray-{len(opts.named()) if opts else 0}"
        extract(inputs, tmp_path / f"local-{out.name}", config, source_options=opts)
        summary = extract_ray(inputs, out, config, RayOptions(workers=1, cpus_per_worker=1, decode_cpus=0.25),
                              source_options=opts)
        assert (summary.processed, summary.errors) == (4, 0)
        want = {r["sha256"]: r for r in FeatureStore(tmp_path / f"local-{out.name}").rows()}
        got = {r["sha256"]: r for r in FeatureStore(out).rows()}
        assert set(got) == set(want)
        for sha, row in got.items():
            assert (row["path"], row["label"], row["group"]) == (want[sha]["path"], want[sha]["label"],
                                                                  want[sha]["group"])
            assert np.allclose(row["global_image"], want[sha]["global_image"], atol=1e-5)
    assert all("!/fake/" in r["path"] for r in FeatureStore(tmp_path / "ray-1").rows(["path"]))
