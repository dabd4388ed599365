#!/usr/bin/env python
"""Where Grounding DINO spends its time, per part of the model, as the extractor runs it.

Builds the real-size architecture with random weights (offline, from the bench configs; compute
does not depend on the weights), grounds ``--images`` synthetic 256 px images (upscaled to 800 px
by the processor, like ProGAN's) with four phrases each, batched, and prints seconds per image
for the Swin backbone, the encoder (with its deformable, fusion and text layers), the decoder and
the rest, after one batch of warm-up. ``--plain`` times transformers' own modules (no tidy-detect
speed-ups) for comparison; ``--ops`` adds PyTorch's profiler table of the costliest operators.

    python benchmarks/grounding_profile.py                       # base, bfloat16 where the CPU has it, 8 images
    python benchmarks/grounding_profile.py --arch grounding-dino-tiny --images 4 --ops
    python benchmarks/grounding_profile.py --plain --dtype float32 --images 2

On a shared machine, compare runs made one after the other, and more than once.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from typing import Any


def _timed_parts(model: Any) -> dict[str, float]:
    """Forward hooks that add each part's wall time to the returned dict."""
    totals: dict[str, float] = collections.defaultdict(float)
    inner = model.model
    parts = {"backbone": [inner.backbone], "text backbone": [inner.text_backbone], "encoder": [inner.encoder],
             "decoder": [inner.decoder],
             "encoder: deformable layers": [layer.deformable_layer for layer in inner.encoder.layers],
             "encoder: fusion layers": [layer.fusion_layer for layer in inner.encoder.layers],
             "encoder: text layers": [layer.text_enhancer_layer for layer in inner.encoder.layers]}
    for name, modules in parts.items():
        for module in modules:
            started: list[float] = []
            module.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter()))
            module.register_forward_hook(
                lambda *_, s=started, n=name: totals.__setitem__(n, totals[n] + time.perf_counter() - s.pop()))
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="grounding-dino-base", choices=["grounding-dino-base", "grounding-dino-tiny"])
    parser.add_argument("--images", type=int, default=8, help="images in the timed batch (default 8)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CPUs with native bf16), float32, bfloat16")
    parser.add_argument("--plain", action="store_true", help="transformers' modules, without tidy-detect's speed-ups")
    parser.add_argument("--ops", action="store_true", help="also print the profiler's costliest operators")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")

    import torch

    from tidy_detect.bench.run import PHRASES, build_adapter, synthetic_images
    from tidy_detect.models.loading import resolve_dtype

    from tidy_detect.errors import TidyError

    torch.set_flush_denormal(True)
    try:
        dtype = resolve_dtype(args.dtype, "cpu")
    except TidyError as error:
        parser.error(f"--dtype: {error}")
    grounder = build_adapter("grounder", args.arch, dtype, optimize=not args.plain)
    phrases = [list(PHRASES)] * args.images
    grounder.ground(synthetic_images(args.images, seed=1), phrases)  # warm-up on other images
    totals = _timed_parts(grounder.model)
    images = synthetic_images(args.images)
    started = time.perf_counter()
    grounder.ground(images, phrases)
    total = time.perf_counter() - started
    per_image = {name: seconds / args.images for name, seconds in totals.items()}
    inside = sum(per_image[k] for k in ("backbone", "text backbone", "encoder", "decoder"))
    per_image["rest (projections, heads, pre/post-processing)"] = total / args.images - inside
    if args.json:
        print(json.dumps({"arch": args.arch, "dtype": dtype, "optimized": not args.plain, "images": args.images,
                          "seconds_per_image": total / args.images, "parts": per_image}))
    else:
        print(f"{args.arch}, {dtype}, {'plain' if args.plain else 'optimised'}, batch of {args.images}: "
              f"{total / args.images:.3f} s per image")
        for name, seconds in per_image.items():
            print(f"  {name:48s} {seconds:.3f} s/image")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            grounder.ground(images, phrases)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
