"""``tidy-detect bench``: this machine's speed and memory on real-size architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tidy_detect.cli.app import app, command, err, out


@command(app, "bench",
         example="tidy-detect bench --device cuda --preset paper --time-budget 300 --out gpu.json",
         epilog="On the CPU: tidy-detect bench --sections peak,stages --out bench.json")
def bench_cmd(
    sections: Optional[str] = typer.Option(None, "--sections",
                                           help="Comma-separated. CPU: peak, stages, pipeline, fast, head, eval (default all). GPU: peak, pipeline, stages, fast, head, switches, eval (default all but eval; they run in that order)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Architectures for the stages section (default: all on the CPU; the paper preset's three on a GPU; see bench/archs)."),
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Images per stage and pipeline run (default 8 on the CPU, 256 on a GPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Batch size of the optimised runs (default 8 on the CPU; on a GPU what extraction chooses from the free memory)."),
    eval_rows: int = typer.Option(1_000_000, "--eval-rows", min=1, help="Rows of the synthetic store the eval section streams."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 for the optimised runs (default: the automatic choice; on a GPU the captioner's and grounder's, CLIP is measured in both)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or cuda:N (auto: a GPU when one is visible)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="The pipeline's models from a preset (paper: BLIP-2 OPT-2.7B + Grounding DINO base + CLIP ViT-L/14; default on the CPU: BLIP-large instead of BLIP-2, on a GPU: paper)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", min=1, help="GPU: seconds; what would start later is skipped and listed in the figures."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the figures as JSON."),
) -> None:
    """Measure this machine: matmul peak, per-stage speed, optimised vs naive pipeline, fast path,
    head training and evaluation memory (real-size architectures, random weights, offline). On a
    GPU also the GPU switches and the targets of docs/gpu.md, against this run's own figures."""
    from tidy_detect.bench.archs import arch_names
    from tidy_detect.bench.run import SECTIONS, format_report, run_bench
    from tidy_detect.errors import ConfigError
    from tidy_detect.models.device import is_cuda
    from tidy_detect.models.loading import resolve_device

    device = resolve_device(device)
    gpu = is_cuda(device)
    if gpu:
        from tidy_detect.bench.gpu import DEFAULT_GPU_SECTIONS, GPU_SECTIONS, format_gpu_report

        known, default = GPU_SECTIONS, DEFAULT_GPU_SECTIONS
    elif device == "cpu":
        known, default = SECTIONS, SECTIONS
    else:
        raise ConfigError(f"--device: the bench runs on cpu or cuda[:N], got {device!r}")
    chosen = [x.strip() for x in sections.split(",") if x.strip()] if sections else list(default)
    unknown = [x for x in chosen if x not in known]
    if unknown:
        raise ConfigError(f"--sections: unknown section {unknown[0]!r}; known: {', '.join(known)}")
    archs = [x.strip() for x in stages.split(",")] if stages else (None if gpu else arch_names())
    bad = [a for a in archs or () if a not in arch_names()]
    if bad:
        raise ConfigError(f"--stages: unknown architecture {bad[0]!r}; known: {', '.join(arch_names())}")
    say = lambda m: err.print(f"• {m}", highlight=False)  # noqa: E731
    if gpu:
        from tidy_detect.bench.gpu import run_gpu_bench

        report = run_gpu_bench(chosen, images=images or 256, batch_size=batch_size, stages=archs, dtype=dtype,
                               say=say, device=device, preset=preset or "paper", time_budget=time_budget,
                               eval_rows=eval_rows, checkpoint=out_file)
        text = format_gpu_report(report)
    else:
        report = run_bench(chosen, images=images or 8, batch_size=batch_size or 8, stages=archs, eval_rows=eval_rows,
                           dtype=dtype, say=say, preset=preset)
        text = format_report(report)
    out.print(text, markup=False, highlight=False, soft_wrap=True)
    if out_file:
        out_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        err.print(f"figures written to {out_file}")
