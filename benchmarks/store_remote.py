"""What a store on object storage costs against a local one: writing shards, the resume index,
loading a representation, compacting.

    python benchmarks/store_remote.py                          # a local folder vs moto's S3 server on loopback
    python benchmarks/store_remote.py --uri s3://BUCKET/bench  # vs a real bucket (credentials as usual)

Rows are random, with real-size embeddings (768-d, a few objects each), written the way a run
writes them: one shard per model batch, then one compaction. moto is a Python stand-in for the S3
protocol, so its figures measure the protocol's round trips on loopback, not S3's latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

from tidy_detect.config import RepresentationConfig
from tidy_detect.features.store import FeatureStore

DIM = 768
EXTRACTION = {"clip": {"source": "bench", "dim": DIM}, "captioner": {"name": "bench"}, "grounder": {"name": "bench"}}


def rows(start: int, count: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(start, start + count):
        n = int(rng.integers(1, 6))
        out.append({"sha256": f"{i:064x}", "path": f"/data/img{i}.png", "label": i % 2, "group": "g",
                    "width": 256, "height": 256, "format": "PNG", "num_bytes": 100_000, "caption": "a photo",
                    "phrases": ["a dog"] * n, "object_phrases": ["a dog"] * n, "boxes": [[0, 0, 9, 9]] * n,
                    "box_scores": [0.5] * n, "global_image": rng.random(DIM, dtype=np.float32),
                    "global_text": rng.random(DIM, dtype=np.float32),
                    "local_images": rng.random((n, DIM), dtype=np.float32),
                    "local_texts": rng.random((n, DIM), dtype=np.float32), "local_fallback": False,
                    "error": None, "error_kind": None})
    return out


def measure(where: str, shards: int, batch: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    batches = [rows(k * batch, batch, rng) for k in range(shards)]
    times = {}
    store = FeatureStore.open_for_writing(where, EXTRACTION, DIM)
    started = time.perf_counter()
    with store.writing():
        for part in batches:
            store.write(part)
    times["write shards (s)"] = time.perf_counter() - started
    started = time.perf_counter()
    index = FeatureStore(where).index()
    times["open + resume index (s)"] = time.perf_counter() - started
    assert len(index) == shards * batch
    started = time.perf_counter()
    loaded = FeatureStore(where).load(RepresentationConfig("both"))
    times["load 'both' (s)"] = time.perf_counter() - started
    assert len(loaded) == shards * batch
    started = time.perf_counter()
    FeatureStore(where).compact()
    times["compact (s)"] = time.perf_counter() - started
    started = time.perf_counter()
    FeatureStore(where).load(RepresentationConfig("both"))
    times["load after compaction (s)"] = time.perf_counter() - started
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", help="object-storage prefix to measure (default: moto's S3 server on loopback)")
    parser.add_argument("--shards", type=int, default=100, help="shards written (one per model batch)")
    parser.add_argument("--batch", type=int, default=8, help="rows per shard")
    args = parser.parse_args()
    server = None
    uri = args.uri
    if uri is None:
        import botocore.session
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        botocore.session.get_session().create_client("s3").create_bucket(Bucket="bench")
        uri = "s3://bench/store"
    else:
        uri = f"{uri.rstrip('/')}/{uuid.uuid4().hex[:8]}"
    folder = tempfile.mkdtemp(prefix="tidy-bench-")
    try:
        local = measure(os.path.join(folder, "store"), args.shards, args.batch)
        remote = measure(uri, args.shards, args.batch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if server is not None:
            server.stop()
    print(f"{args.shards} shards x {args.batch} rows, {DIM}-d; remote: {uri}" + (" (moto)" if server else ""))
    print(f"{'':28s} {'local':>9s} {'remote':>9s} {'ratio':>7s}")
    for name in local:
        print(f"{name:28s} {local[name]:9.3f} {remote[name]:9.3f} {remote[name] / max(local[name], 1e-9):7.1f}")


if __name__ == "__main__":
    main()
