"""``tidy-detect bench --device cuda``: the GPU figures, measured in one run on the device.

Sections (all on real-size architectures with random weights, :mod:`tidy_detect.bench.archs`,
built straight on the device; they run in the order of :data:`GPU_SECTIONS`):

- ``peak``: the dense matmul rate of this GPU in bfloat16, float16 and float32 (8192^3 products
  of random matrices, CUDA events, median of 10 after 3 warm-ups; float32 as PyTorch runs it by
  default, without TF32), so every stage is given as a fraction of the peak of its dtype;
- ``stages``: images/s of each stage as extraction runs it (batched, SDPA, inputs through pinned
  memory), its FLOPs per image (``torch.utils.flop_counter`` on one image) and achieved fraction of
  the peak, its measured peak memory per image beside the memory model's computed one
  (:mod:`tidy_detect.models.memory`);
- ``fast``: one CLIP ViT-L/14 image pass (UniFD's whole cost, the reference) and the global-only
  path (caption + CLIP global pair, no grounding), images/s;
- ``pipeline``: the preset's pipeline end to end (``paper``: BLIP-2 OPT-2.7B + Grounding DINO base
  + CLIP ViT-L/14, 4 objects per image, 20 caption tokens), in the preset's precision (CLIP
  float32) and with CLIP in bfloat16 (the opt-in), against the naive path (one image, crop and text
  at a time, float32, transformers' modules) on the same GPU, each path in its own process;
- ``head``: training the head on 80,000 x 768 features for 50 epochs on the device;
- ``switches``: each GPU switch measured on its stage against the same stage without it (CUDA
  graphs and torch.compile on CLIP's image tower, the static KV cache on captioning), with the
  one-off capture or compile time apart;
- ``targets``: the issue's targets against the figures of this run (never against a guess).

``time_budget`` (seconds) skips what would start after it; skipped sections are listed with why.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tidy_detect.bench.run import (CAPTION_TOKENS, PHRASES, _flops, _stage_call, build_adapter, pipeline_child,
                                   preset_archs, synthetic_images)

# In the order they run: the figures of the targets first, the end-to-end pipeline before the rest.
GPU_SECTIONS = ("peak", "pipeline", "stages", "fast", "head", "switches", "eval")
DEFAULT_GPU_SECTIONS = ("peak", "pipeline", "stages", "fast", "head", "switches")
GPU_STAGES = ("clip-vit-l-14", "blip2-opt-2.7b", "grounding-dino-base")
# What issue 16 asks of one H200, checked against the figures of the same run.
TARGETS = {
    "clip_fraction_of_bf16_peak": 0.5,
    "paper_images_per_second": 100.0,
    "paper_speedup_over_naive": 20.0,
    "global_only_images_per_second": 300.0,
    "head_seconds": 5.0,
}


class Budget:
    """Seconds left of a time budget (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self.skipped: list[dict[str, str]] = []
        self.spent: dict[str, float] = {}
        self._mark = self.started

    def lap(self, section: str) -> None:
        """Add the time since the last lap to ``section``."""
        now = time.perf_counter()
        self.spent[section] = self.spent.get(section, 0.0) + now - self._mark
        self._mark = now

    @property
    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.perf_counter() - self.started)

    def allows(self, what: str, needs: float = 0.0) -> bool:
        left = self.left
        if left is None or left > needs:
            return True
        self.skipped.append({"what": what, "why": f"time budget: {max(left, 0):.0f} s left, about {needs:.0f} s needed"})
        return False


# The code below is written for CUDA devices and runs on the CPU too (without device events and
# memory statistics), so that the tests exercise it there with tiny architectures.

def _sync(device: str) -> None:
    from tidy_detect.models.device import is_cuda

    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def _free_cache(device: str) -> None:
    from tidy_detect.models.device import is_cuda

    gc.collect()
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()


def matmul_peak_cuda(device: str, n: int = 8192, repeats: int = 10, warmup: int = 3) -> dict[str, float]:
    """GFLOP/s of an ``n``^3 matmul per dtype: random matrices, timed with CUDA events (the
    host clock around a synchronised product elsewhere), median of ``repeats`` after ``warmup``
    products. float16 is left out on the CPU."""
    import torch

    from tidy_detect.models.device import is_cuda

    cuda = is_cuda(device)
    peak = {}
    for name in ("bfloat16", "float16", "float32") if cuda else ("bfloat16", "float32"):
        dtype = getattr(torch, name)
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        for _ in range(warmup):
            a @ b
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
        peak[name] = 2 * n ** 3 / float(np.median(times)) / 1e9
        del a, b
    _free_cache(device)
    return peak


def _kind(arch: str) -> str:
    return "clip" if arch.startswith("clip") else "captioner" if arch.startswith("blip") else "grounder"


def _memory_of(adapter: Any, kind: str) -> Any:
    memory = adapter.memory()
    return memory["clip image"] if kind == "clip" else memory


def stage_batch(adapter: Any, kind: str, device: str, images: int) -> int:
    """The pass size extraction would choose for this stage from the free memory (at most
    ``images``; the CPU's 8 off a GPU)."""
    from tidy_detect.config import CPU_BATCH_SIZE
    from tidy_detect.models.device import memory_info
    from tidy_detect.models.memory import plan_batches

    info = memory_info(device)
    if info is None:
        return max(1, min(images, CPU_BATCH_SIZE))
    name = "clip image" if kind == "clip" else kind
    plan = plan_batches({name: _memory_of(adapter, kind)}, info[0])
    return max(1, min(images, plan[name]))


def _memory_stats(device: str) -> Any:
    from tidy_detect.models.device import is_cuda

    if not is_cuda(device):
        return None
    import torch

    return torch.cuda


def bench_stage_cuda(arch: str, images: list[Any], dtype: str, device: str, batch_size: int | None = None,
                     repeats: int = 3, **switches: bool) -> dict[str, Any]:
    """images/s, FLOPs and memory of one stage on the device, batched as extraction runs it:
    each batch's inputs prepared and on the device beforehand (extraction makes them during the
    previous batch), so the time is the stage's own; ``inline_images_per_second`` is the same
    stage with its preprocessing in the timed loop."""
    kind = _kind(arch)
    started = time.perf_counter()
    adapter = build_adapter(kind, arch, dtype, optimize=True, device=device, **switches)
    built = time.perf_counter() - started
    batch = batch_size or stage_batch(adapter, kind, device, len(images))
    adapter.max_batch = batch  # one pass per batch, as extraction sets it
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    calls = [_prepared_call(kind, adapter, b, device) for b in batches]

    def run_all(inline: bool = False) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for b, call in zip(batches, calls):
            (_stage_call(kind, adapter, b) if inline else call)()
        _sync(device)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    calls[0]()  # warm-up: kernels, handles, graph capture or compile
    _sync(device)
    warmup = time.perf_counter() - t0
    inline = run_all(inline=True)
    seconds = float(np.median([run_all() for _ in range(repeats)]))
    flops = _flops(_stage_call(kind, adapter, images[:1]))
    stats = _memory_stats(device)
    measured = None
    if stats is not None:
        stats.empty_cache()
        before = stats.memory_allocated(device)
        stats.reset_peak_memory_stats(device)
        _stage_call(kind, adapter, batches[0])()
        _sync(device)
        measured = (stats.max_memory_allocated(device) - before) / len(batches[0]) / 2 ** 20
    computed = _memory_of(adapter, kind).per_item
    result = {"arch": arch, "kind": kind, "dtype": dtype, "images": len(images), "batch_size": batch,
              "seconds": seconds, "images_per_second": len(images) / seconds,
              "inline_images_per_second": len(images) / inline, "gflop_per_image": flops / 1e9,
              "gflops": flops * len(images) / seconds / 1e9, "build_seconds": built, "warmup_seconds": warmup,
              "memory_per_image_mib_measured": measured,
              "memory_per_image_mib_computed": computed / 2 ** 20, "switches": {k: v for k, v in switches.items() if v},
              "attention": getattr(adapter.model.config, "_attn_implementation", None)}
    del adapter
    _free_cache(device)
    return result


SWITCHES = {  # name: (architecture, dtype, switch, seconds it may need: compiling is the slow part)
    "clip_cuda_graphs": ("clip-vit-l-14", "bfloat16", {"cuda_graphs": True}, 60.0),
    "caption_static_cache": ("blip2-opt-2.7b", "bfloat16", {"static_cache": True}, 240.0),
    "clip_compile": ("clip-vit-l-14", "bfloat16", {"compile": True}, 180.0),
}


def _prepared_call(kind: str, adapter: Any, images: list[Any], device: str) -> Callable[[], Any]:
    """The stage's call on ``images`` with its inputs prepared and sent to the device now (the
    adapters' own ``prepare``; OWLv2 has none and preprocesses in the call)."""
    from tidy_detect.models.device import to_device

    if kind == "clip":
        pixels = to_device(adapter.prepare_global(images), device).ready()["clip_global"]
        return lambda: adapter.encode_global(images, prepared=pixels)
    if kind == "captioner":
        inputs = to_device(adapter.prepare(images), device).ready()
        return lambda: adapter.caption(images, prepared=inputs)
    if not hasattr(adapter, "prepare"):
        return _stage_call(kind, adapter, images)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:  # as extraction prepares them
        tensors, groups = adapter.prepare(images, pool.map)
    prepared = (to_device(tensors, device).ready(), groups)
    return lambda: adapter.ground(images, [list(PHRASES)] * len(images), prepared=prepared)


def bench_switches(images: list[Any], device: str, batch_size: int | None, budget: Budget,
                   say: Callable[[str], None], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Each GPU switch of :data:`SWITCHES` (``names``: some of them) on its stage, against the
    stage without it (same images, same run). A switch that fails is recorded with its error."""
    found: dict[str, Any] = {}
    plain: dict[tuple[str, str], dict[str, Any]] = {}
    for name in names or SWITCHES:
        arch, dtype, switch, needs = SWITCHES[name]
        if not budget.allows(f"switches.{name}", needs):
            continue
        say(f"switch {name}: {arch} ({dtype}) with and without")
        try:
            if (arch, dtype) not in plain:
                plain[(arch, dtype)] = bench_stage_cuda(arch, images, dtype, device, batch_size, repeats=3)
            on = bench_stage_cuda(arch, images, dtype, device, batch_size, repeats=3, **switch)
        except Exception as exc:  # noqa: BLE001 - a switch that fails is a finding, not the end of the bench
            found[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        off = plain[(arch, dtype)]
        found[name] = {"arch": arch, "dtype": dtype, "off_images_per_second": off["images_per_second"],
                       "on_images_per_second": on["images_per_second"],
                       "speedup": on["images_per_second"] / off["images_per_second"],
                       "on_warmup_seconds": on["warmup_seconds"], "off_warmup_seconds": off["warmup_seconds"]}
    return found


def computed_memory(dtype: str = "bfloat16", clip_dtype: str = "float32") -> dict[str, Any]:
    """The memory model's bytes per item for the paper preset's models, from their configs
    alone (no weights, no device): the table of docs/gpu.md. Labelled as computed."""
    import transformers

    from tidy_detect.bench.archs import arch_spec
    from tidy_detect.models import memory

    def config(name: str) -> Any:
        spec = arch_spec(name)
        return getattr(transformers, spec["class"]).config_class(**spec["config"])

    spec = arch_spec("grounding-dino-base")["processor"]
    rows = {
        "clip image (ViT-L/14, one view or crop)": memory.clip_image(config("clip-vit-l-14"), clip_dtype),
        "clip text (ViT-L/14, one caption or phrase)": memory.clip_text(config("clip-vit-l-14"), clip_dtype),
        "caption (BLIP-2 OPT-2.7B, one image)": memory.captioner(config("blip2-opt-2.7b"), "blip-2", dtype,
                                                                  new_tokens=30),
        "ground (Grounding DINO base, one image)": memory.grounding_dino(
            config("grounding-dino-base"), dtype, height=spec["shortest_edge"], width=spec["longest_edge"],
            text_tokens=32),
    }
    return {name: value.to_dict() for name, value in rows.items()}


def _gpu_machine(device: str) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    from tidy_detect.models.device import is_cuda
    from tidy_detect.models.optimize import speedups_enabled

    found = {"device": device, "gpu": None, "gpu_memory_gib": None, "multiprocessors": None,
             "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
             "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
             "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32), "speedups": speedups_enabled()}
    if is_cuda(device):
        properties = torch.cuda.get_device_properties(torch.device(device))
        found.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2 ** 30,
                     multiprocessors=properties.multi_processor_count)
    return found


def run_gpu_bench(sections: Sequence[str] | None = None, *, images: int | None = None, batch_size: int | None = None,
                  stages: Sequence[str] | None = None, dtype: str | None = None,
                  say: Callable[[str], None] | None = None, device: str = "cuda", preset: str = "paper",
                  time_budget: float | None = None, eval_rows: int = 1_000_000,
                  naive_images: int = 16, head: tuple[int, int, int] = (80_000, 768, 50),
                  switches: Sequence[str] | None = None, peak_size: int = 8192,
                  checkpoint: Path | None = None) -> dict[str, Any]:
    """The GPU bench (see the module docstring); returns every figure.

    Args:
        sections: of :data:`GPU_SECTIONS` (default :data:`DEFAULT_GPU_SECTIONS`).
        images: images per stage and per optimised pipeline run (default 256).
        batch_size: None: each stage's pass size as extraction chooses it from the free memory.
        stages: architectures of the stages section (default: the paper preset's three).
        dtype: the captioner's and grounder's precision (default bfloat16); CLIP is measured in
            float32 (the default policy) and bfloat16 (the opt-in).
        preset: the pipeline's models (:func:`tidy_detect.bench.run.preset_archs`).
        time_budget: seconds; what would start after it is skipped and listed.
        naive_images: images of the naive pipeline path (it is the slow one).
        head: (rows, dim, epochs) of the head section; switches: names of :data:`SWITCHES`;
        peak_size: the side of the peak's matmuls (the tests make all of these small).
        checkpoint: a JSON file the figures so far are written to after each section (with
            ``"partial": true``), so a run stopped by a time limit still leaves them.

    A section that fails is recorded under ``errors`` with its message; the others still run.

    Written for CUDA devices; ``device="cpu"`` runs the same code without device events and
    memory statistics (how the tests exercise it with tiny architectures).

    Raises:
        ConfigError: an unavailable device, an unknown section, or a preset without bench
            architectures.
    """
    import torch

    from tidy_detect.errors import ConfigError
    from tidy_detect.models.device import is_cuda
    from tidy_detect.models.loading import resolve_device

    device = resolve_device(device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    sections = tuple(sections or DEFAULT_GPU_SECTIONS)
    unknown = [s for s in sections if s not in GPU_SECTIONS]
    if unknown:
        raise ConfigError(f"--sections: unknown section {unknown[0]!r} for a GPU; known: {', '.join(GPU_SECTIONS)}")
    say = say or (lambda message: None)
    dtype = dtype or "bfloat16"
    archs = preset_archs(preset)
    budget = Budget(time_budget)
    if is_cuda(device):
        torch.cuda.set_device(torch.device(device))
    report: dict[str, Any] = {"machine": _gpu_machine(device), "preset": preset, "archs": archs,
                              "caption_tokens": CAPTION_TOKENS, "objects_per_image": len(PHRASES)}
    count = images or 256
    pictures = synthetic_images(count)
    report["errors"] = {}

    def peak_section() -> None:
        say(f"matmul peak ({peak_size}^3 products per dtype)")
        report["peak"] = matmul_peak_cuda(device, n=peak_size)

    def fast_section() -> None:
        from tidy_detect.bench.run import bench_fast_path

        say("UniFD's CLIP ViT-L/14 image pass, and the global-only path")
        report["fast"] = {}
        for clip_dtype in ("float32", "bfloat16"):
            report["fast"][f"clip_{clip_dtype}"] = bench_fast_path(pictures, batch_size, dtype, device=device,
                                                                   captioner=archs["captioner"], clip_dtype=clip_dtype)
            _free_cache(device)

    def stages_section() -> None:
        report["stages"] = {}
        plan = [(arch, d) for arch in (stages or GPU_STAGES)
                for d in (("float32", "bfloat16") if arch.startswith("clip") else (dtype,))]
        for arch, stage_dtype in plan:
            if not budget.allows(f"stages.{arch}@{stage_dtype}", 20):
                continue
            say(f"stage {arch} ({stage_dtype})")
            try:
                report["stages"][f"{arch}@{stage_dtype}"] = bench_stage_cuda(arch, pictures, stage_dtype, device,
                                                                             batch_size)
            except Exception as exc:  # noqa: BLE001 - one stage's failure is recorded; the others still run
                report["errors"][f"stages.{arch}@{stage_dtype}"] = _describe(exc)
                _free_cache(device)

    def pipeline_section() -> None:
        report["pipeline"] = _pipeline(pictures, batch_size, dtype, device, archs, naive_images, budget, say)

    def head_section() -> None:
        from tidy_detect.bench.run import bench_head

        rows, dim, epochs = head
        say(f"head training: {rows:,} x {dim}, {epochs} epochs, on the device")
        report["head"] = bench_head(rows, dim, epochs, device=device)

    def switches_section() -> None:
        report["switches"] = bench_switches(pictures, device, batch_size, budget, say, switches)

    def eval_section() -> None:
        from tidy_detect.bench.run import bench_eval

        say(f"evaluation of a {eval_rows:,}-row store, streamed (child process, CPU)")
        report["eval"] = bench_eval(eval_rows)

    runs = {"peak": (peak_section, 0.0), "fast": (fast_section, 30.0), "stages": (stages_section, 0.0),
            "pipeline": (pipeline_section, 0.0), "head": (head_section, 15.0), "switches": (switches_section, 0.0),
            "eval": (eval_section, 60.0)}
    for name in GPU_SECTIONS:  # in this order whatever the order asked: the targets' figures first
        if name not in sections:
            continue
        run, needs = runs[name]
        if needs and not budget.allows(name, needs):
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - a failed section is a finding; the bench goes on
            report["errors"][name] = _describe(exc)
            _free_cache(device)
        budget.lap(name)
        if checkpoint is not None:
            _write_json(checkpoint, {**report, "partial": True})
    _fractions(report)
    report["targets"] = targets(report)
    report["section_seconds"] = {k: round(v, 1) for k, v in budget.spent.items()}
    report["budget"] = {"seconds": time_budget, "used_seconds": time.perf_counter() - budget.started,
                        "skipped": budget.skipped}
    return report


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"[:2000]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _pipeline(pictures: list[Any], batch_size: int | None, dtype: str, device: str, archs: dict[str, Any],
              naive_images: int, budget: Budget, say: Callable[[str], None]) -> dict[str, Any]:
    runs = {"optimized": ("optimized", archs.get("clip_dtype") or "float32", len(pictures)),
            "optimized_clip_bfloat16": ("optimized", "bfloat16", len(pictures)),
            "naive": ("naive", "float32", min(naive_images, len(pictures)))}
    found: dict[str, Any] = {"archs": {k: archs[k] for k in ("clip", "captioner", "grounder")}}
    models = found["archs"]
    for name, (mode, clip_dtype, count) in runs.items():
        if not budget.allows(f"pipeline.{name}", 60):
            continue
        say(f"pipeline {name}: {models['clip']} ({clip_dtype}) + {models['captioner']} + {models['grounder']}, "
            f"{count} images")
        left = budget.left
        try:
            result = pipeline_child(timeout=None if left is None else max(left, 60), mode=mode, images=count,
                                    batch_size=batch_size, dtype=dtype, device=device, archs=models,
                                    clip_dtype=clip_dtype)
        except RuntimeError as exc:
            found[name] = {"error": str(exc)}
            continue
        result["images"] = count
        result["images_per_second"] = count / result["seconds"]
        found[name] = result
    naive = found.get("naive", {}).get("images_per_second")
    for name in ("optimized", "optimized_clip_bfloat16"):
        rate = found.get(name, {}).get("images_per_second")
        if rate and naive:
            found[name]["speedup_over_naive"] = rate / naive
    return found


def _fractions(report: dict[str, Any]) -> None:
    peak = report.get("peak")
    if not peak:
        return
    for result in report.get("stages", {}).values():
        result["fraction_of_peak"] = result["gflops"] / peak[result["dtype"]]


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against this run's figures; a target whose figure was not measured
    (skipped, failed) says so instead of passing or failing."""

    def check(name: str, value: float | None, higher_is_better: bool = True) -> dict[str, Any]:
        goal = TARGETS[name]
        if value is None:
            return {"target": goal, "measured": None, "met": None, "note": "not measured in this run"}
        met = value >= goal if higher_is_better else value <= goal
        return {"target": goal, "measured": value, "met": bool(met)}

    clip = report.get("stages", {}).get("clip-vit-l-14@bfloat16", {})
    pipeline = report.get("pipeline", {})
    best = max((pipeline.get(name, {}) for name in ("optimized", "optimized_clip_bfloat16")),
               key=lambda r: r.get("images_per_second") or 0.0, default={})
    fast = max((report.get("fast") or {}).values(), key=lambda r: r.get("global_only_images_per_second") or 0.0,
               default={})
    global_only = fast.get("global_only_images_per_second")
    head = report.get("head", {})
    found = {
        "clip_fraction_of_bf16_peak": check("clip_fraction_of_bf16_peak", clip.get("fraction_of_peak")),
        "paper_images_per_second": check("paper_images_per_second", best.get("images_per_second")),
        "paper_speedup_over_naive": check("paper_speedup_over_naive", best.get("speedup_over_naive")),
        "global_only_images_per_second": check("global_only_images_per_second", global_only),
        "head_seconds": check("head_seconds", head.get("seconds"), higher_is_better=False),
    }
    if best:
        found["paper_images_per_second"]["clip_dtype"] = best.get("dtypes", {}).get("clip")
    if fast:
        found["global_only_images_per_second"]["clip_dtype"] = fast.get("dtypes", {}).get("clip")
    return found


def format_gpu_report(report: dict[str, Any]) -> str:
    """The GPU figures as Markdown (for docs/gpu.md and the issue notes)."""
    m = report["machine"]
    where = (f"GPU: {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, {m['multiprocessors']} SMs)" if m.get("gpu")
             else f"device: {m['device']} ({m.get('cpu')})")
    lines = [f"{where}, torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, {m['cpus']} CPUs; "
             f"TF32 {'on' if m['tf32_matmul'] else 'off'}. Random-weight architectures; preset {report['preset']}, "
             f"{report['objects_per_image']} objects/image, {report['caption_tokens']} caption tokens."]
    peak = report.get("peak")
    if peak:
        lines.append("Matmul peak measured in this run: " + ", ".join(f"{name} {value / 1e3:.3g} TFLOP/s"
                                                                     for name, value in peak.items()) + ".")
    if report.get("stages"):
        lines += ["", "| stage | dtype | batch | images/s | images/s, preprocessing inline | GFLOP/image | TFLOP/s | "
                      "of peak | MiB/image measured | MiB/image computed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["stages"].values():
            frac = f"{r['fraction_of_peak']:.0%}" if "fraction_of_peak" in r else "–"
            measured, inline = r["memory_per_image_mib_measured"], r.get("inline_images_per_second")
            lines.append(f"| {r['arch']} | {r['dtype']} | {r['batch_size']} | {r['images_per_second']:.1f} | "
                         f"{'–' if inline is None else f'{inline:.1f}'} | {r['gflop_per_image']:.3g} | {r['gflops'] / 1e3:.3g} | {frac} | "
                         f"{'–' if measured is None else f'{measured:.1f}'} | {r['memory_per_image_mib_computed']:.1f} |")
    for name, r in (report.get("fast") or {}).items():
        lines.append(f"Global-only path ({name}): {r['global_only_images_per_second']:.1f} images/s; one CLIP image "
                     f"pass alone: {r['clip_image_images_per_second']:.1f} images/s.")
    pipeline = report.get("pipeline") or {}
    for name in ("optimized", "optimized_clip_bfloat16", "naive"):
        r = pipeline.get(name)
        if not r:
            continue
        if "error" in r:
            lines.append(f"Pipeline {name}: failed ({r['error'].splitlines()[0]}).")
            continue
        extra = f", {r['speedup_over_naive']:.1f}x the naive path" if "speedup_over_naive" in r else ""
        lines.append(f"Pipeline {name} ({r['dtypes'].get('clip')} CLIP, batch {r['batch_size']}): "
                     f"{r['images_per_second']:.1f} images/s{extra}.")
    head = report.get("head")
    if head:
        lines.append(f"Head training {head['rows']:,} x {head['dim']}, {head['epochs']} epochs ({head['precision']}, "
                     f"{head['device']}): {head['seconds']:.2f} s.")
    for name, r in (report.get("switches") or {}).items():
        if "error" in r:
            lines.append(f"Switch {name}: failed ({r['error']}).")
        else:
            lines.append(f"Switch {name}: {r['off_images_per_second']:.1f} -> {r['on_images_per_second']:.1f} "
                         f"images/s ({r['speedup']:.2f}x; warm-up {r['on_warmup_seconds']:.1f} s).")
    if report.get("targets"):
        lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
        for name, t in report["targets"].items():
            value = "not measured" if t["measured"] is None else f"{t['measured']:.3g}"
            met = "–" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {name} | {t['target']:g} | {value} | {met} |")
    for name, message in (report.get("errors") or {}).items():
        lines.append(f"Failed: {name} ({message}).")
    skipped = report.get("budget", {}).get("skipped")
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in skipped) + ".")
    return "\n".join(lines)
