"""``tidy-detect demo``: the whole pipeline offline on tiny random-weight models."""

from __future__ import annotations

from pathlib import Path

import typer

from tidy_detect.cli.app import app, command, out
from tidy_detect.cli.detect import write_records
from tidy_detect.cli.train import print_train_summary


@command(app, "demo",
         example="tidy-detect demo --out tidy-demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("tidy-demo"), "--out", "-o", help="Folder for models, images, stores, head, results."),
    per_class: int = typer.Option(24, "--per-label", "--per-class", min=2, help="Synthetic images per label (real, fake) and generator."),
    epochs: int = typer.Option(50, "--epochs", help="Head training epochs."),
) -> None:
    """Run the whole pipeline offline on tiny models and synthetic images (about a minute on 2 cores once installed)."""
    from tidy_detect.demo import run_demo

    out.rule("[bold]tidy-detect demo (offline, tiny random-weight models)")
    out.print("[yellow]The tiny models have random weights: the scores below say nothing about real images. "
              "The demo shows the commands, the files and what the outputs look like.[/]")
    result = run_demo(out_dir, per_class=per_class, epochs=epochs, progress=lambda m: out.print(f"• {m}", highlight=False))
    for split, summary in result.summaries.items():
        out.print(f"  extracted {split}: {summary.processed} images ({summary.images_per_second:.1f} images/s), "
                  f"{summary.skipped} already in the store", highlight=False)
    print_train_summary(result.train)
    out.rule("[bold]detection on a few test images")
    write_records(result.records, "table", None)
    out.rule("[bold]where everything is")
    for label, path in [("tiny models + preset", result.preset), ("images", result.out / "images"),
                        ("feature stores", result.out / "stores"), ("head", result.train.path),
                        ("head metadata", result.train.path.with_suffix(".json")), ("detections (JSON)", result.detections)]:
        out.print(f"  {label:22s} {path}", highlight=False)
    out.rule("[bold]the same with the real models (needs their weights, see README)")
    out.print(
        "  tidy-detect extract DATA/CNNDetection --layout cnndetection --split train --per-label 40000 --seed 0 \\\n"
        "      --preset paper --out stores/progan-train --batch-size 16\n"
        "  tidy-detect train stores/progan-train --out heads/tidy.safetensors\n"
        "  tidy-detect detect suspicious/ --head heads/tidy.safetensors --format table", highlight=False)
