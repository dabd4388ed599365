"""``tidy-detect bench``: speed and memory figures of this machine, measured in one run.

What it measures (all on real-size architectures with random weights, see :mod:`archs`):

- ``peak``: the dense matmul peak of this machine in bfloat16 and float32, measured here, so each
  stage can be given as a fraction of it;
- ``stages``: images/s and achieved GFLOP/s of every model stage as the extractor runs it
  (bfloat16 where the CPU has it, batched, every speed-up of ``models.optimize``); FLOPs are
  counted by ``torch.utils.flop_counter`` on the same inputs;
- ``pipeline``: the full TIDY extraction (CLIP ViT-L/14 + BLIP-large + Grounding DINO base, 4
  objects per image, 20 caption tokens) optimised vs naive (one image and one crop at a time,
  float32, no caches, no speed-ups) on the same images, each path in its own process, at steady
  state;
- ``fast``: the global-only path (no grounding) against one CLIP ViT-L/14 image pass plus captioning;
- ``head``: training the MLP head on 80,000 x 768 features for 50 epochs;
- ``eval``: peak memory of evaluating a 1,000,000-row store, streamed, in a child process.

:mod:`tidy_detect.bench.gpu` is the GPU bench (the same sections on the device, plus the GPU
switches and the issue's targets), built on the functions here. ``preset`` picks the pipeline's
architectures from a preset (``paper``: BLIP-2 OPT-2.7B + Grounding DINO base + CLIP ViT-L/14).

The machine is shared and noisy: compare figures measured in the same run, and medians.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SECTIONS = ("peak", "stages", "pipeline", "fast", "head", "eval")
STAGE_ARCHS = ("clip-vit-l-14", "clip-vit-b-16", "blip-large", "blip2-opt-2.7b", "grounding-dino-base",
               "grounding-dino-tiny", "owlv2-base")
PHRASES = ("dog", "wooden table", "red car", "tree")
CAPTION_TOKENS = 20


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _linear_pointwise_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * int(np.prod(x_shape[:-1])) * int(w_shape[0]) * int(w_shape[1])


def _cpu_attention_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None,
                         **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn``, counted by ``torch.utils.flop_counter``, which does not know two of the
    ops the optimised models run on a CPU: oneDNN's fused linear + activation and the CPU
    flash-attention kernel. Their formulas are added here (2 x rows x in x out for the linear,
    PyTorch's own attention formula for the kernel), so that work is counted too."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _matmul_gflops(n: int, dtype: str, repeats: int) -> float:
    """Median GFLOP/s of an n x n by n x n matmul in ``dtype`` (after one warm-up product)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=a.dtype)
    a @ b
    return 2 * n ** 3 / _median_time(lambda: a @ b, repeats) / 1e9


def matmul_peak(repeats: int = 9) -> dict[str, float]:
    """Best median GFLOP/s of square matmuls (1024-4096) in bfloat16 and float32."""
    return {dtype: max(_matmul_gflops(n, dtype, repeats if n < 4096 else 3) for n in (1024, 2048, 4096))
            for dtype in ("bfloat16", "float32")}


def nearby_peak(dtype: str, repeats: int = 7) -> float:
    """A quick matmul peak (n = 2048) in GFLOP/s, taken beside a stage so its fraction of peak is
    not skewed by the shared machine's speed drifting during the run."""
    return _matmul_gflops(2048, dtype, repeats)


def synthetic_images(n: int, size: int = 256, seed: int = 0) -> list[Any]:
    """Photo-like RGB images (the demo's generator), ``size`` x ``size`` like ProGAN's."""
    from tidy_detect.demo import real_like

    rng = np.random.default_rng(seed)
    return [real_like(rng, size, size) for _ in range(n)]


class FixedPhrases:
    """The same phrases for every caption, so every image has the same number of objects."""

    def __init__(self, phrases: Sequence[str]) -> None:
        self.phrases = list(phrases)

    def extract(self, captions: Sequence[str]) -> list[list[str]]:
        return [list(self.phrases) for _ in captions]

    def describe(self) -> dict[str, Any]:
        return {"fixed_phrases": self.phrases}


def _features(threshold: float = 0.0):
    from tidy_detect.config import FeatureConfig

    return FeatureConfig(caption_max_tokens=CAPTION_TOKENS, box_threshold=threshold, text_threshold=threshold)


def build_adapter(kind: str, arch: str, dtype: str, optimize: bool, seed: int = 0, device: str = "cpu",
                  **switches: bool) -> Any:
    """A real adapter (the classes extraction uses) around a random-weight real-size model, on
    ``device``; ``switches``: ``compile``/``cuda_graphs`` for CLIP, ``static_cache`` for a captioner."""
    from tidy_detect.bench.archs import build
    from tidy_detect.models.captioners import Blip2Captioner, BlipCaptioner
    from tidy_detect.models.clip import ClipEncoder
    from tidy_detect.models.grounders import GroundingDinoGrounder, Owlv2Grounder

    # Built straight in the run's dtype: BLIP-2 in float32 and bfloat16 at once would not fit in memory.
    components = build(arch, dtype=dtype, seed=seed, device=device)
    if kind == "clip":
        return ClipEncoder(f"random:{arch}", device=device, dtype=dtype, optimize=optimize, components=components,
                           cache_size=65536 if optimize else 0, compile=switches.get("compile", False),
                           cuda_graphs=switches.get("cuda_graphs", False))
    cls = {"blip-large": BlipCaptioner, "blip2-opt-2.7b": Blip2Captioner, "grounding-dino-base": GroundingDinoGrounder,
           "grounding-dino-tiny": GroundingDinoGrounder, "owlv2-base": Owlv2Grounder}[arch]
    extra = {"static_cache": True} if switches.get("static_cache") else {}
    adapter = cls(arch, f"random:{arch}", features=_features(), device=device, dtype=dtype, optimize=optimize,
                  components=components, **extra)
    if kind == "captioner":
        adapter.min_tokens = CAPTION_TOKENS  # random weights may emit EOS early; fix the work per image
    return adapter


# The bench architecture of each checkpoint a preset may name (bench/archs).
ARCH_OF_CHECKPOINT = {
    "openai/clip-vit-large-patch14": "clip-vit-l-14", "openai/clip-vit-base-patch16": "clip-vit-b-16",
    "Salesforce/blip2-opt-2.7b": "blip2-opt-2.7b", "Salesforce/blip-image-captioning-large": "blip-large",
    "IDEA-Research/grounding-dino-base": "grounding-dino-base", "IDEA-Research/grounding-dino-tiny": "grounding-dino-tiny",
    "google/owlv2-base-patch16-ensemble": "owlv2-base",
}
CPU_PIPELINE = {"clip": "clip-vit-l-14", "captioner": "blip-large", "grounder": "grounding-dino-base"}


def preset_archs(preset: str) -> dict[str, Any]:
    """The bench architectures of a preset's models, and the precision it asks for CLIP:
    ``{"clip": ..., "captioner": ..., "grounder": ... or None, "clip_dtype": ...}``.

    Raises:
        UnknownNameError: an unknown preset.
        ConfigError: a preset naming a checkpoint with no bench architecture (the message lists
            the presets and checkpoints that have one).
    """
    from tidy_detect.config import load_preset
    from tidy_detect.errors import ConfigError
    from tidy_detect.models.components import CAPTIONERS, GROUNDERS

    config = load_preset(preset)
    models = config.models
    captioner = models.captioner_model or CAPTIONERS.get(models.captioner).default_model
    grounder = None if models.grounder == "none" else (models.grounder_model or GROUNDERS.get(models.grounder).default_model)
    found = {"clip": models.clip, "captioner": captioner, "grounder": grounder}
    archs: dict[str, Any] = {}
    for kind, checkpoint in found.items():
        if checkpoint is None:
            archs[kind] = None
            continue
        arch = ARCH_OF_CHECKPOINT.get(checkpoint)
        if arch is None:
            raise ConfigError(f"--preset {preset}: its {kind} {checkpoint!r} has no real-size architecture to bench; "
                              f"the bench has: {', '.join(sorted(ARCH_OF_CHECKPOINT))}")
        archs[kind] = arch
    archs["clip_dtype"] = config.runtime.clip_dtype
    return archs


def _stage_call(kind: str, adapter: Any, images: list[Any]) -> Callable[[], Any]:
    if kind == "clip":
        return lambda: adapter.encode_global(images)
    if kind == "captioner":
        return lambda: adapter.caption(images)
    return lambda: adapter.ground(images, [list(PHRASES)] * len(images))


def bench_stage(arch: str, images: list[Any], batch_size: int, dtype: str) -> dict[str, Any]:
    """images/s and GFLOP/s of one stage, batched as extraction runs it."""
    kind = "clip" if arch.startswith("clip") else "captioner" if arch.startswith("blip") else "grounder"
    started = time.perf_counter()
    adapter = build_adapter(kind, arch, dtype, optimize=True)
    built = time.perf_counter() - started
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]

    def timed(stage: Any) -> float:
        return sum(_median_time(_stage_call(kind, stage, b), 1) for b in batches)

    _stage_call(kind, adapter, batches[0][:1])()  # warm-up: kernels, caches, lazy inits
    plain = None
    if kind == "clip":
        # The same stage without the MLP speed-ups (QuickGELU folding, fused matmul + activation),
        # to show what they are worth here: timed alternately with the optimised one, medians of 3,
        # so the machine's drift hits both.
        plain = build_adapter(kind, arch, dtype, optimize=False)
        _stage_call(kind, plain, batches[0][:1])()
        optimized_runs, plain_runs = [], []
        for _ in range(3):
            optimized_runs.append(timed(adapter))
            plain_runs.append(timed(plain))
        seconds, plain_seconds = float(np.median(optimized_runs)), float(np.median(plain_runs))
    else:
        seconds = timed(adapter)
    flops = sum(_flops(_stage_call(kind, adapter, b)) for b in batches)
    result = {"arch": arch, "kind": kind, "images": len(images), "batch_size": batch_size, "dtype": dtype,
              "seconds": seconds, "images_per_second": len(images) / seconds,
              "gflop_per_image": flops / len(images) / 1e9,
              "gflops": flops / seconds / 1e9, "build_seconds": built}
    if plain is not None:
        texts = [f"a photo of a {p} next to a {q}" for p in PHRASES for q in PHRASES][:len(images)]
        adapter._cache.clear()
        text_seconds = _median_time(lambda: (adapter._cache.clear(), adapter.encode_texts(texts)), 3)
        result["texts_per_second"] = len(texts) / text_seconds
        result["gflops_plain"] = flops / plain_seconds / 1e9
    return result


def make_extractor(dtype: str, optimize: bool, grounder: str | None, batch_size: int | None,
                   captioner: str = "blip-large", *, device: str = "cpu", clip: str = "clip-vit-l-14",
                   clip_dtype: str | None = None, prepare_ahead: str = "auto", **switches: bool):
    """An Extractor assembled from real-size random-weight adapters (no loading from disk), on
    ``device``; CLIP in ``clip_dtype`` (default: ``dtype``). ``batch_size`` None: chosen for the
    device as extraction chooses it (from the free memory on a GPU)."""
    from tidy_detect.config import ExtractionConfig, RuntimeConfig
    from tidy_detect.features.extractor import Extractor
    from tidy_detect.models.grounders import NoGrounder

    clip_dtype = clip_dtype or dtype
    runtime = RuntimeConfig(device=device, dtype=dtype, clip_dtype=clip_dtype, batch_size=batch_size,
                            prepare_ahead=prepare_ahead, compile=switches.get("compile", False),
                            cuda_graphs=switches.get("cuda_graphs", False),
                            static_cache=switches.get("static_cache", False))
    extractor = Extractor(ExtractionConfig(features=_features(), runtime=runtime))
    extractor.device, extractor.dtype = device, dtype
    extractor.dtypes = {"clip": clip_dtype, "captioner": dtype, "grounder": dtype}
    extractor.clip = build_adapter("clip", clip, clip_dtype, optimize, device=device, **switches)
    extractor.captioner = build_adapter("captioner", captioner, dtype, optimize, device=device, **switches)
    extractor.grounder = (build_adapter("grounder", grounder, dtype, optimize, device=device) if grounder
                          else NoGrounder("none", None, features=_features(), device=device, dtype=dtype))
    extractor.phrases = FixedPhrases(PHRASES if grounder else ())
    extractor.plan_batches()
    return extractor


def _loaded(images: list[Any], first: int = 0) -> list[Any]:
    from tidy_detect.images import LoadedImage

    return [LoadedImage(im, f"{k:064x}", im.width, im.height, "PNG", 0) for k, im in enumerate(images, first)]


def run_optimized(extractor: Any, images: list[Any], first: int = 0) -> float:
    """Seconds for the batched extractor over ``images`` (as ``tidy-detect extract`` runs it:
    batches of its resolved size, each batch's inputs prepared during the previous one where the
    extractor prepares ahead); ``first`` numbers the images (their names and content hashes) from
    there."""
    from tidy_detect.data.inputs import ImageItem
    from tidy_detect.features.extractor import with_prepared

    loaded = _loaded(images, first)
    items = [ImageItem(f"/bench/{k}.png") for k in range(first, first + len(images))]
    size = extractor.batch_size
    batches = [[(item, image, 0.0) for item, image in zip(items[i:i + size], loaded[i:i + size])]
               for i in range(0, len(items), size)]
    started = time.perf_counter()
    for batch, prepared in with_prepared(extractor, iter(batches)):
        extra = {"prepared": prepared} if prepared is not None else {}
        extractor.process([b[0] for b in batch], [b[1] for b in batch], **extra)
    _synchronize(extractor.device)
    return time.perf_counter() - started


def _synchronize(device: str) -> None:
    from tidy_detect.models.device import is_cuda

    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def run_naive(extractor: Any, images: list[Any]) -> float:
    """Seconds for the naive path: every image, crop and text through the models one at a time."""
    from tidy_detect.views import crop_box

    started = time.perf_counter()
    for image in images:
        (caption,) = extractor.captioner.caption([image])
        (phrases,) = extractor.phrases.extract([caption])
        (detections,) = extractor.grounder.ground([image], [phrases])
        extractor.clip.encode_global([image])
        extractor.clip.encode_texts([caption])
        for d in detections:
            extractor.clip.encode_crops([crop_box(image, d.box)])
            extractor.clip.encode_texts([d.phrase])
    return time.perf_counter() - started


def pipeline_run(mode: str, images: int, batch_size: int | None, dtype: str, device: str = "cpu",
                 archs: dict[str, Any] | None = None, clip_dtype: str | None = None) -> dict[str, Any]:
    """One path of the pipeline comparison, as its own process runs it (see :func:`bench_pipeline`).

    ``archs``: ``{"clip", "captioner", "grounder"}`` architectures (default: CLIP ViT-L/14,
    BLIP-large, Grounding DINO base); ``clip_dtype``: CLIP's precision on the optimised path
    (default ``dtype``). The naive path is float32, one image, crop and text at a time.

    Raises:
        ValueError: an unknown mode.
    """
    import torch

    if mode not in ("optimized", "naive"):
        raise ValueError(f"mode must be 'optimized' or 'naive', got {mode!r}")
    archs = {**CPU_PIPELINE, **(archs or {})}
    torch.set_flush_denormal(True)
    pictures = synthetic_images(images)
    models = {"clip": archs["clip"], "captioner": archs["captioner"], "grounder": archs["grounder"]}
    if mode == "optimized":
        extractor = make_extractor(dtype, True, models["grounder"], batch_size, models["captioner"], device=device,
                                   clip=models["clip"], clip_dtype=clip_dtype)
        # Throughput as in a long run: each path first does two units of its own work (batches,
        # or single images for the naive path) on other images, so kernels are initialised and
        # the process has grown to its working set (the optimised one's allocator stops taking
        # page faults after its second batch), while the text cache holds nothing of the
        # measured images. On a GPU one batch does it (kernels and allocator blocks are ready).
        warm_up = synthetic_images((1 if device != "cpu" else 2) * extractor.batch_size, seed=1)
        run_optimized(extractor, warm_up, first=len(pictures))
        extractor.clip._cache.clear()
        extractor.stage_seconds = {k: 0.0 for k in extractor.stage_seconds}
        _reset_peak(device)
        seconds = run_optimized(extractor, pictures)
        stages = {k: round(v, 3) for k, v in extractor.stage_seconds.items() if v}
        used = extractor.batch_size
    else:
        extractor = make_extractor("float32", False, models["grounder"], 1, models["captioner"], device=device,
                                   clip=models["clip"])
        run_naive(extractor, synthetic_images(2, seed=1))
        _reset_peak(device)
        seconds, stages, used = run_naive(extractor, pictures), {}, 1
        _synchronize(device)
    return {"seconds": seconds, "stage_seconds": stages, "peak_rss_mb": _peak_rss_mb(), "batch_size": used,
            "peak_device_mb": _peak_device_mb(device), "archs": models,
            "dtypes": dict(extractor.dtypes)}


def _reset_peak(device: str) -> None:
    from tidy_detect.models.device import is_cuda

    if is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def _peak_device_mb(device: str) -> float | None:
    from tidy_detect.models.device import is_cuda

    if not is_cuda(device):
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) / 2 ** 20


_PIPELINE_CHILD = """
import json, sys
from tidy_detect.bench.run import pipeline_run
print(json.dumps(pipeline_run(**json.loads(sys.argv[1]))))
"""


def pipeline_child(timeout: float | None = None, **spec: Any) -> dict[str, Any]:
    """:func:`pipeline_run` in a fresh Python process; its JSON result.

    Raises:
        RuntimeError: the child failed (its last lines of output are in the message) or ran past
            ``timeout`` seconds.
    """
    try:
        out = subprocess.run([sys.executable, "-c", _PIPELINE_CHILD, json.dumps(spec)], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the pipeline run {spec.get('mode')} took more than {timeout:.0f} s") from None
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"the pipeline run {spec.get('mode')} failed (exit {out.returncode}):\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pipeline(images: list[Any], batch_size: int | None, dtype: str, device: str = "cpu",
                   archs: dict[str, Any] | None = None, naive_images: int | None = None,
                   clip_dtype: str | None = None, timeout: float | None = None) -> dict[str, Any]:
    """The full pipeline, optimised vs naive, on the same images (the naive path on the first
    ``naive_images`` of them when given: it is the slow one; rates are compared per image).

    Each path runs in a fresh process, as a user's run would: the optimised one with everything
    tidy-detect does when it loads models (process-wide settings included, such as the
    allocator's, see :func:`tidy_detect.models.optimize.reuse_freed_memory`), the naive one with
    none of it, and neither inherits the other's memory state."""
    archs = {**CPU_PIPELINE, **{k: v for k, v in (archs or {}).items() if k in CPU_PIPELINE}}
    count = {"optimized": len(images), "naive": min(naive_images or len(images), len(images))}
    results = {}
    for mode in ("optimized", "naive"):
        results[mode] = pipeline_child(timeout, mode=mode, images=count[mode], batch_size=batch_size, dtype=dtype,
                                       device=device, archs=archs, clip_dtype=clip_dtype)
    optimized, naive = results["optimized"]["seconds"], results["naive"]["seconds"]
    optimized_rate, naive_rate = count["optimized"] / optimized, count["naive"] / naive
    return {"images": len(images), "naive_images": count["naive"], "objects_per_image": len(PHRASES),
            "caption_tokens": CAPTION_TOKENS, "archs": archs, "device": device,
            "dtypes": results["optimized"]["dtypes"], "batch_size": results["optimized"]["batch_size"],
            "optimized_seconds": optimized, "optimized_images_per_second": optimized_rate,
            "optimized_stage_seconds": results["optimized"]["stage_seconds"],
            "optimized_peak_rss_mb": results["optimized"]["peak_rss_mb"],
            "optimized_peak_device_mb": results["optimized"]["peak_device_mb"], "naive_seconds": naive,
            "naive_images_per_second": naive_rate, "naive_peak_rss_mb": results["naive"]["peak_rss_mb"],
            "naive_peak_device_mb": results["naive"]["peak_device_mb"], "speedup": optimized_rate / naive_rate}


def bench_fast_path(images: list[Any], batch_size: int | None, dtype: str, device: str = "cpu",
                    captioner: str = "blip-large", clip_dtype: str | None = None) -> dict[str, Any]:
    """Global-only extraction against one CLIP ViT-L/14 image pass plus captioning; the CLIP
    image pass alone (UniFD's whole cost) is also given as images/s."""
    extractor = make_extractor(dtype, True, None, batch_size, captioner, device=device, clip_dtype=clip_dtype)
    size = extractor.batch_size
    warm = (1 if device != "cpu" else 2) * size
    run_optimized(extractor, synthetic_images(warm, seed=1), first=len(images))  # warm-up, as above
    extractor.clip._cache.clear()
    fast = run_optimized(extractor, images)
    batches = [images[i:i + size] for i in range(0, len(images), size)]
    caption = sum(_median_time(lambda b=b: extractor.captioner.caption(b), 1) for b in batches)
    clip = sum(_median_time(lambda b=b: extractor.clip.encode_global(b), 1) for b in batches)
    return {"images": len(images), "batch_size": size, "dtypes": dict(extractor.dtypes), "captioner": captioner,
            "global_only_seconds": fast, "global_only_images_per_second": len(images) / fast,
            "caption_seconds": caption, "clip_image_seconds": clip,
            "clip_image_images_per_second": len(images) / clip, "ratio": fast / (caption + clip)}


def bench_head(rows: int = 80_000, dim: int = 768, epochs: int = 50, device: str = "cpu") -> dict[str, Any]:
    """Wall time of training the head on random features of the paper's size, on ``device``
    (the features start in host memory, as ``tidy-detect train`` has them)."""
    from tidy_detect.head import DiscrepancyHead

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, dim)).astype(np.float32)
    y = rng.integers(0, 2, rows)
    X[y == 1] += 0.05
    head = DiscrepancyHead(epochs=epochs, device=device)
    started = time.perf_counter()
    head.fit(X, y)
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"rows": rows, "dim": dim, "epochs": epochs, "seconds": seconds, "precision": head.precision_,
            "seconds_per_epoch": seconds / epochs, "device": device}


def write_synthetic_store(path: Path, rows: int, dim: int = 768, shard_rows: int = 50_000, seed: int = 0) -> Path:
    """A store of ``rows`` random rows (no objects, so the local columns are empty lists) written
    straight as Arrow shards: building a million row dicts would measure Python, not the store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tidy_detect.features.store import FeatureStore, store_schema

    extraction = {"clip": {"weights": "synthetic", "dim": dim}, "captioner": {"name": "synthetic"},
                  "grounder": {"name": "none"}, "phrases": {"max_objects": 0}}
    store = FeatureStore.open_for_writing(path, extraction, dim)
    schema = store_schema(dim)
    rng = np.random.default_rng(seed)
    store.shard_dir.mkdir(exist_ok=True)
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        labels = rng.integers(0, 2, n)
        vectors = [pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * dim).astype(np.float32)), dim)
                   for _ in range(2)]
        empty_lists = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)),
                                               pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), dim))
        columns = {
            "sha256": pa.array([f"{start + i:064x}" for i in range(n)]),
            "path": pa.array([f"/synthetic/{start + i:07d}.png" for i in range(n)]),
            "label": pa.array(labels.astype(np.int8)), "group": pa.array([f"gen{(start + i) % 16}" for i in range(n)]),
            "global_image": vectors[0], "global_text": vectors[1],
            "local_images": empty_lists, "local_texts": empty_lists,
            "local_fallback": pa.array(np.ones(n, bool)),
        }
        arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema]
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), store.shard_dir / f"part-{start:09d}.parquet",
                       compression="none")
    return path


# The child reports VmHWM (its own address space's high-water mark): ru_maxrss would include the
# parent's size at fork time, which Linux carries across exec.
_EVAL_CHILD = """
import json, sys, time
from tidy_detect.evaluate.evaluation import evaluate
started = time.perf_counter()
result = evaluate([sys.argv[1]], [sys.argv[2]], max_per_class=None)
seconds = time.perf_counter() - started
name = result.info["head_names"][0]
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "rows_scored": int(len(result.scores[0])),
                  "groups": len(result.groups[name]), "peak_rss_mb": hwm / 1024}))
"""


def bench_eval(rows: int = 1_000_000, workdir: Path | None = None) -> dict[str, Any]:
    """Peak memory (and time) of evaluating a ``rows``-row store, in a fresh child process."""
    from tidy_detect.head import DiscrepancyHead

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = write_synthetic_store(Path(tmp) / "store", rows)
        rng = np.random.default_rng(1)
        head = DiscrepancyHead(epochs=1, hidden=64).fit(rng.normal(size=(256, 768)).astype(np.float32),
                                                       rng.integers(0, 2, 256))
        meta = {"representation": {"kind": "both", "w1": 1.0, "w2": 1.0, "normalize": True},
                "extraction": json.loads((store / "config.json").read_text())["extraction"]}
        head_path = head.save(Path(tmp) / "head.safetensors", meta)
        store_bytes = sum(p.stat().st_size for p in (store / "shards").glob("*.parquet"))
        out = subprocess.run([sys.executable, "-c", _EVAL_CHILD, str(head_path), str(store)], check=True,
                             capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "store_gb": store_bytes / 1e9, **result}


def run_bench(sections: Sequence[str] = SECTIONS, *, images: int = 8, batch_size: int = 8,
              stages: Sequence[str] = STAGE_ARCHS, eval_rows: int = 1_000_000, dtype: str | None = None,
              say: Callable[[str], None] | None = None, preset: str | None = None) -> dict[str, Any]:
    """Run the chosen sections on the CPU; returns every figure (also what ``tidy-detect bench``
    prints). ``preset`` takes the pipeline's architectures from a preset (:func:`preset_archs`);
    GPUs have :func:`tidy_detect.bench.gpu.run_gpu_bench`.

    Raises:
        ConfigError: a preset without bench architectures.
    """
    import torch

    from tidy_detect.models.loading import resolve_dtype
    from tidy_detect.models.optimize import speedups_enabled

    archs = preset_archs(preset) if preset else None
    batch_size = batch_size or 8
    say = say or (lambda message: None)
    torch.set_flush_denormal(True)
    dtype = dtype or resolve_dtype("auto", "cpu")
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "dtype": dtype,
                                          "speedups": speedups_enabled()}}
    pictures = synthetic_images(images)
    if "peak" in sections:
        say("matmul peak (bfloat16, float32)")
        report["peak"] = matmul_peak()
    if "stages" in sections:
        report["stages"] = {}
        for arch in stages:
            say(f"stage {arch}")
            before = nearby_peak(dtype)
            result = bench_stage(arch, pictures if "blip2" not in arch else pictures[:4], batch_size, dtype)
            result["nearby_peak"] = max(before, nearby_peak(dtype))
            result["fraction_of_nearby_peak"] = result["gflops"] / result["nearby_peak"]
            report["stages"][arch] = result
            gc.collect()  # free this stage's model before the next one is built
    if "pipeline" in sections:
        chosen = {**CPU_PIPELINE, **{k: v for k, v in (archs or {}).items() if k in CPU_PIPELINE}}
        say(f"pipeline: optimised vs naive ({chosen['clip']} + {chosen['captioner']} + {chosen['grounder']}, "
            f"{len(PHRASES)} objects)")
        report["pipeline"] = bench_pipeline(pictures, batch_size, dtype, archs=archs)
    if "fast" in sections:
        say("fast path: global only vs CLIP image pass + captioning")
        report["fast"] = bench_fast_path(pictures, batch_size, dtype,
                                         captioner=(archs or CPU_PIPELINE)["captioner"])
    if "head" in sections:
        say("head training: 80,000 x 768, 50 epochs")
        report["head"] = bench_head()
    if "eval" in sections:
        say(f"evaluation of a {eval_rows:,}-row store, streamed (child process)")
        report["eval"] = bench_eval(eval_rows)
    if "peak" in report:
        # The machine is shared: measure the peak again at the end and keep the better of the two,
        # so a busy moment cannot inflate the fractions below.
        again = matmul_peak()
        report["peak"] = {k: max(v, again[k]) for k, v in report["peak"].items()}
    if "peak" in report and "stages" in report:
        for result in report["stages"].values():
            result["fraction_of_peak"] = result["gflops"] / report["peak"][result["dtype"]]
            if "gflops_plain" in result:
                result["fraction_of_peak_plain"] = result["gflops_plain"] / report["peak"][result["dtype"]]
    report["peak_rss_mb"] = _peak_rss_mb()
    return report


def format_report(report: dict[str, Any]) -> str:
    """The figures as Markdown (for the README and the issue notes)."""
    lines = [f"Machine: {report['machine']['cpus']} CPUs, torch {report['machine']['torch']} "
             f"({report['machine']['torch_threads']} threads), stages in {report['machine']['dtype']}.",
             "Plain / naive = the models as `--no-speedups` (TIDY_DETECT_SPEEDUPS=off) runs them: transformers' "
             "own code." + ("" if report["machine"].get("speedups", True) else
                            " TIDY_DETECT_SPEEDUPS=off was set for this run: the optimised figures are plain too.")]
    if "peak" in report:
        p = report["peak"]
        lines.append(f"Matmul peak measured in this run: bfloat16 {p['bfloat16']:.0f} GFLOP/s, "
                     f"float32 {p['float32']:.0f} GFLOP/s.")
    if "stages" in report:
        lines += ["", "| stage | batch | images/s | GFLOP/image | GFLOP/s | of run's peak | of peak beside it |",
                  "|---|---|---|---|---|---|---|"]
        for arch, r in report["stages"].items():
            frac = f"{r['fraction_of_peak']:.0%}" if "fraction_of_peak" in r else "–"
            extra = f" (texts: {r['texts_per_second']:.1f}/s)" if "texts_per_second" in r else ""
            if "fraction_of_peak_plain" in r:
                frac += f" (without MLP speed-ups: {r['fraction_of_peak_plain']:.0%})"
            lines.append(f"| {arch} | {r['batch_size']} | {r['images_per_second']:.2f}{extra} | "
                         f"{r['gflop_per_image']:.0f} | {r['gflops']:.0f} | {frac} | "
                         f"{r['fraction_of_nearby_peak']:.0%} ({r['nearby_peak']:.0f}) |")
    if "pipeline" in report:
        r = report["pipeline"]
        lines += ["", f"Full pipeline ({r['images']} images, {r['objects_per_image']} objects, {r['caption_tokens']} "
                      f"caption tokens): optimised {r['optimized_images_per_second']:.3f} images/s, naive "
                      f"{r['naive_images_per_second']:.3f} images/s: **{r['speedup']:.1f}x**. "
                      f"Optimised stage seconds: {r['optimized_stage_seconds']}. Peak memory: optimised "
                      f"{r['optimized_peak_rss_mb']:.0f} MB, naive {r['naive_peak_rss_mb']:.0f} MB (each in its own "
                      f"process)."]
    if "fast" in report:
        r = report["fast"]
        lines.append(f"Global-only path: {r['global_only_seconds']:.2f} s vs CLIP image pass + captioning "
                     f"{r['clip_image_seconds'] + r['caption_seconds']:.2f} s: **{r['ratio']:.2f}x**.")
    if "head" in report:
        r = report["head"]
        lines.append(f"Head training {r['rows']:,} x {r['dim']}, {r['epochs']} epochs ({r['precision']}): "
                     f"**{r['seconds']:.1f} s**.")
    if "eval" in report:
        r = report["eval"]
        lines.append(f"Evaluation of a {r['rows']:,}-row store ({r['store_gb']:.1f} GB): {r['seconds']:.1f} s, "
                     f"peak memory **{r['peak_rss_mb']:.0f} MB**.")
    lines.append(f"Peak memory of this benchmark process: {report['peak_rss_mb']:.0f} MB.")
    return "\n".join(lines)
