"""``tidy-detect bench``: this machine's speed and memory on real-size architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tidy_detect.cli.app import app, command, err, out


@command(app, "bench",
         example="tidy-detect bench --sections peak,stages --out bench.json")
def bench_cmd(
    sections: str = typer.Option("peak,stages,pipeline,fast,head,eval", "--sections",
                                 help="Comma-separated: peak, stages, pipeline, fast, head, eval."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Architectures for the stages section (default: all; see bench/archs)."),
    images: int = typer.Option(8, "--images", min=1, help="Images per stage and pipeline run."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch size of the optimised runs."),
    eval_rows: int = typer.Option(1_000_000, "--eval-rows", min=1, help="Rows of the synthetic store the eval section streams."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 for the optimised runs (default: the automatic choice)."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the figures as JSON."),
) -> None:
    """Measure this machine: matmul peak, per-stage speed, optimised vs naive pipeline, fast path,
    head training and evaluation memory (real-size architectures, random weights, offline)."""
    from tidy_detect.bench.archs import arch_names
    from tidy_detect.bench.run import SECTIONS, format_report, run_bench
    from tidy_detect.errors import ConfigError

    chosen = [x.strip() for x in sections.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in SECTIONS]
    if unknown:
        raise ConfigError(f"--sections: unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    archs = [x.strip() for x in stages.split(",")] if stages else arch_names()
    bad = [a for a in archs if a not in arch_names()]
    if bad:
        raise ConfigError(f"--stages: unknown architecture {bad[0]!r}; known: {', '.join(arch_names())}")
    report = run_bench(chosen, images=images, batch_size=batch_size, stages=archs, eval_rows=eval_rows, dtype=dtype,
                       say=lambda m: err.print(f"• {m}", highlight=False))
    out.print(format_report(report), markup=False, highlight=False, soft_wrap=True)
    if out_file:
        out_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        err.print(f"figures written to {out_file}")
