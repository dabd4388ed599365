"""``tidy-detect train``: the MLP head on feature stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from tidy_detect.cli.app import app, command, err, out


@command(app, "train",
         example="tidy-detect train stores/progan-train --out heads/tidy.safetensors")
def train_cmd(
    stores: List[str] = typer.Argument(..., help="Training feature stores (same extraction config): folders or URIs (s3://bucket/prefix, ...)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (HEAD.safetensors + HEAD.json)."),
    representation: str = typer.Option("both", "--representation", help="both, global, local, image or text."),
    w1: float = typer.Option(1.0, "--w1", help="Weight of the global distance D_g."),
    w2: float = typer.Option(1.0, "--w2", help="Weight of the local distance D_l."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise embeddings first."),
    epochs: int = typer.Option(50, "--epochs", help="Training epochs (paper: 50)."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (paper: 1e-3)."),
    weight_decay: float = typer.Option(1e-3, "--weight-decay", help="AdamW weight decay (paper: 1e-3)."),
    hidden: int = typer.Option(512, "--hidden", help="Hidden layer width."),
    batch_size: int = typer.Option(256, "--batch-size", help="Examples per step."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and shuffling."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="e.g. 0,1,2: one head per seed, saved as OUT-seedN.safetensors."),
    val: Optional[List[str]] = typer.Option(None, "--val", help="Validation store(s), scored every epoch (folders or URIs)."),
    select: str = typer.Option("last", "--select", help="last (paper) or best-val (best validation AP)."),
    balance: bool = typer.Option(False, "--balance", help="Weight the loss by inverse class frequency."),
    precision: str = typer.Option("auto", "--precision", help="Training matmuls: float32, bfloat16, or auto (float32 for float32 CLIP features, the paper's protocol; else bfloat16 where it is fast)."),
) -> None:
    """Train the MLP head on feature stores."""
    from tidy_detect.config import RepresentationConfig

    from tidy_detect.cli.evaluate import parse_seeds

    rep = RepresentationConfig(representation, w1, w2, normalize)
    runs = [(s, out_path.with_name(f"{out_path.with_suffix('').name}-seed{s}.safetensors")) for s in parse_seeds(seeds)]
    for run_seed, run_out in runs or [(seed, out_path)]:
        _train_one(stores, run_out, rep, val, epochs, lr, weight_decay, hidden, batch_size, run_seed, select, balance,
                   precision)
    if runs:
        out.print(f"{len(runs)} heads; evaluate them together with "
                  f"`tidy-detect eval --head {out_path.with_suffix('')}-seed{{seed}}.safetensors --seeds {seeds} STORE...`",
                  highlight=False)


def _train_one(stores: List[str], out_path: Path, rep: Any, val: Optional[List[str]], epochs: int, lr: float,
               weight_decay: float, hidden: int, batch_size: int, seed: int, select: str, balance: bool,
               precision: str = "auto") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tidy_detect.training import open_stores, train_head

    open_stores(stores)  # a missing or unreadable store fails here, before a progress bar is drawn
    progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=err)
    with progress:
        task = progress.add_task("train", total=epochs, info="")

        def on_epoch(record: dict) -> None:
            info = f"loss {record['loss']:.4f}"
            if "val_loss" in record:
                info += f"  val loss {record['val_loss']:.4f}  val AP {record['val_ap']:.4f}"
            progress.update(task, completed=record["epoch"], info=info)

        result = train_head(stores, out_path, representation=rep, val_paths=val or (), on_epoch=on_epoch,
                            hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                            seed=seed, select=select, balance=balance, precision=precision)
    print_train_summary(result)


def print_train_summary(result: Any) -> None:
    data = result.data
    out.print(f"[bold]head saved:[/] {result.path}", highlight=False)
    table = Table(title="training data", title_justify="left")
    for col in ("group", "real", "fake"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for group, counts in sorted(data.groups.items()):
        table.add_row(group, str(counts["real"]), str(counts["fake"]))
    table.add_row("[bold]all", f"[bold]{data.real}", f"[bold]{data.fake}")
    out.print(table)
    skipped = f"skipped: {data.skipped_errors} rows with errors, {data.skipped_unlabeled} without a label"
    out.print(f"{skipped}; {data.without_objects} rows had no grounded object (D_l = D_g)")
    for split, m in result.metadata["metrics"].items():
        out.print(f"{split:5s}  n={m['n']}  loss={m['loss']:.4f}  ACC={m['acc']:.4f} (real {m['real_acc']:.4f}, "
                  f"fake {m['fake_acc']:.4f})  AP={m['ap']:.4f}", highlight=False)
    head = result.metadata["head"]
    out.print(f"epoch kept: {head['chosen_epoch']} of {head['epochs']} ({head['select']});  "
              f"time: {result.seconds:.1f} s;  metadata: {result.path.with_suffix('.json')}")
