#!/usr/bin/env python
"""Throughput of the two extraction engines, local and Ray, on the same images in one run.

Writes ``--images`` synthetic images (half real-like, half fake-like, about ``--image-size`` pixels
a side), then extracts them with the local engine and with the Ray engine into two fresh stores,
and reports for each:

- ``wall``: the whole call, loading the models (and, for Ray, starting the local cluster, the
  probe and the actors) included;
- ``run images/s``: the engines' own summary (images / run seconds; for Ray this still includes
  the actors loading their models);
- ``steady images/s``: the rate between 10 % and 90 % of the images done, i.e. once every model
  is loaded and the pipeline is full, which is what matters for a million images.

By default the models are the tiny random-weight bundle built here (offline); ``--preset`` takes
any preset, e.g. real-size architectures, whose compute does not depend on the weights.

    python benchmarks/extract_engines.py                          # 64 images, tiny bundle, 2 Ray workers
    python benchmarks/extract_engines.py --images 256 --workers 2 --cpus-per-worker 1
    python benchmarks/extract_engines.py --preset paper --device cuda --num-gpus-per-worker 1 --workers 4

Needs the ``distributed`` extra. On a shared machine, compare the engines of one run rather than
numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="synthetic images to extract (default 64)")
    parser.add_argument("--image-size", type=int, default=256, help="mean side of the images (default 256)")
    parser.add_argument("--preset", help="preset name or TOML file (default: the tiny bundle, built here)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model batch, both engines (default 8)")
    parser.add_argument("--device", default="auto", help="--device of both engines (default auto)")
    parser.add_argument("--decode-threads", type=int, default=2, help="local engine: decoding threads (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="Ray engine: extraction actors (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray engine: CPUs per actor (default 1)")
    parser.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="Ray engine: GPUs per actor (default 0)")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--engines", default="local,ray", help="local, ray or local,ray (default)")
    parser.add_argument("--work", type=Path, help="folder for the bundle, images and stores "
                                                  "(default: a temporary folder, removed at the end)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.images < 1 or args.image_size < 16 or args.batch_size < 1:
        parser.error("--images and --batch-size must be >= 1 and --image-size >= 16")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ("local", "ray") for e in args.engines):
        parser.error(f"--engines takes local, ray or local,ray; got {','.join(args.engines)!r}")
    return args


def write_images(root: Path, count: int, size: int) -> Path:
    """``root/bench/{0_real,1_fake}/NNNNN.png``, sizes within +-25 % of ``size``, seeded."""
    import numpy as np

    from tidy_detect.demo import fake_like, real_like

    rng = np.random.default_rng(0)
    for i in range(count):
        label = "0_real" if i % 2 == 0 else "1_fake"
        width, height = (int(v) for v in rng.integers(int(size * 0.75), int(size * 1.25) + 1, 2))
        image = real_like(rng, width, height) if label == "0_real" else fake_like(rng, width, height, "gan")
        folder = root / "bench" / label
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
    return root / "bench"


class Clock:
    """A progress callback that keeps (time, images done) after every batch."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int, summary: Any) -> None:
        self.points.append((time.perf_counter(), done - summary.skipped))

    def steady(self) -> float:
        """Images/s between 10 % and 90 % of the images done: no model loading, no pipeline fill."""
        if not self.points:
            return float("nan")
        total = self.points[-1][1]
        low = next(p for p in self.points if p[1] >= 0.1 * total)
        high = next(p for p in self.points if p[1] >= 0.9 * total)
        return (high[1] - low[1]) / (high[0] - low[0]) if high[0] > low[0] else float("nan")


def run_engine(name: str, run: Callable[[Clock], Any]) -> dict[str, Any]:
    clock = Clock()
    started = time.perf_counter()
    summary = run(clock)
    wall = time.perf_counter() - started
    if summary.status != "completed" or summary.errors:
        raise SystemExit(f"{name}: run {summary.status} with {summary.errors} errors: {summary.error_examples[:3]}")
    return {"engine": name, "images": summary.processed, "wall_s": round(wall, 2), "run_s": round(summary.seconds, 2),
            "run_images_per_s": round(summary.images_per_second, 3), "steady_images_per_s": round(clock.steady(), 3),
            "stage_seconds": summary.to_dict()["stage_seconds"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tidy_detect.config import load_preset
    from tidy_detect.distributed import RayOptions, extract_ray
    from tidy_detect.features.extractor import extract
    from tidy_detect.models.tiny import make_tiny_bundle

    work = args.work or Path(tempfile.mkdtemp(prefix="tidy-bench-engines-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        preset = args.preset or make_tiny_bundle(work / "tiny", seed=0)
        config = load_preset(preset).updated(runtime={"batch_size": args.batch_size, "device": args.device,
                                                      "num_workers": args.decode_threads})
        images = write_images(work / "images", args.images, args.image_size)
        options = RayOptions(address=args.ray_address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                             num_gpus_per_worker=args.num_gpus_per_worker)
        runs = {
            "local": lambda clock: extract([images], work / "store-local", config, progress=clock),
            "ray": lambda clock: extract_ray([images], work / "store-ray", config, options, progress=clock),
        }
        results = []
        for name in args.engines:
            shutil.rmtree(work / f"store-{name}", ignore_errors=True)
            print(f"extracting {args.images} images with the {name} engine ...", file=sys.stderr, flush=True)
            results.append(run_engine(name, runs[name]))
        print(f"{args.images} images of ~{args.image_size} px, batch size {args.batch_size}, preset "
              f"{Path(str(preset)).name}; ray: {args.workers} workers x {args.cpus_per_worker:g} CPU / "
              f"{args.num_gpus_per_worker:g} GPU, local: {args.decode_threads} decode threads")
        print(f"{'engine':8s}{'wall s':>9s}{'run s':>9s}{'run img/s':>11s}{'steady img/s':>14s}")
        for r in results:
            print(f"{r['engine']:8s}{r['wall_s']:9.1f}{r['run_s']:9.1f}{r['run_images_per_s']:11.2f}"
                  f"{r['steady_images_per_s']:14.2f}")
        if len(results) == 2:
            local, ray = results
            ratio = {k: ray[k] / local[k] if local[k] and not math.isnan(local[k]) else float("nan")
                     for k in ("run_images_per_s", "steady_images_per_s")}
            print(f"ray / local: run {ratio['run_images_per_s']:.2f}x, steady {ratio['steady_images_per_s']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                            indent=2) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
