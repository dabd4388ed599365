"""``tidy-detect calibrate`` (a one-class head from real images only) and ``tidy-detect head card``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from tidy_detect.cli.app import CONTEXT, command, err, out

head_app = typer.Typer(help="Share heads: write a model card for the Hugging Face hub.", no_args_is_help=True,
                       context_settings=CONTEXT)


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` and the ``head`` group to the CLI."""
    app.add_typer(head_app, name="head")

    @command(app, "calibrate",
             example="tidy-detect calibrate stores/real-photos --real-only --fpr 0.05 --out heads/one-class.safetensors")
    def calibrate_cmd(
        stores: List[str] = typer.Argument(..., help="Feature stores (same extraction config; folders or URIs); only their real rows are used."),
        out_path: Path = typer.Option(..., "--out", "-o", help="Head file to write (HEAD.safetensors + HEAD.json)."),
        fpr: float = typer.Option(0.05, "--fpr", help="Target false-positive rate on real images, in (0, 0.5)."),
        real_only: bool = typer.Option(False, "--real-only", help="Ignore the stores' fake rows (counted in the head); without it a store holding fakes is refused."),
        representation: str = typer.Option("global", "--representation", help="global (1 - cos of image and caption), local (the objects' mean distance) or both."),
        local: bool = typer.Option(False, "--local", help="Same as --representation local."),
        held_out: float = typer.Option(0.25, "--held-out", help="Fraction of the real images (by content) kept out of calibration to measure the FPR reached."),
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration / held-out split."),
    ) -> None:
        """A one-class head that needs no fake images: the image-caption discrepancy, thresholded on reals.

        The threshold is set on real rows only, at --fpr; held-out real rows measure the
        false-positive rate it reaches. detect, eval and serve use the head like a trained one.
        """
        from tidy_detect.calibrate import calibrate_one_class
        from tidy_detect.config import RepresentationConfig
        from tidy_detect.errors import ConfigError

        if local and representation not in ("global", "local"):
            raise ConfigError(f"--local means --representation local; it cannot go with --representation "
                              f"{representation}")
        rep = RepresentationConfig("local" if local else representation)
        result = calibrate_one_class(stores, out_path, fpr=fpr, representation=rep, held_out=held_out, seed=seed,
                                     real_only=real_only)
        data, head = result.data, result.head
        out.print(f"[bold]one-class head saved:[/] {result.path}", highlight=False)
        table = Table(title="real rows", title_justify="left")
        for col in ("group", "real", "fake (ignored)"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for group, counts in sorted(data.groups.items()):
            table.add_row(group, str(counts["real"]), str(counts["fake"]))
        table.add_row("[bold]all", f"[bold]{data.real}", f"[bold]{data.fake}")
        out.print(table)
        out.print(f"skipped: {data.skipped_errors} rows with errors, {data.skipped_unlabeled} without a label")
        out.print(f"score: {rep.kind} discrepancy; threshold {head.threshold_:.6g} (p_fake 0.5), scale "
                  f"{head.scale_:.4g}", highlight=False)
        for name, m in (("calibration", result.calibration), ("held-out", result.held_out)):
            low, high = m["fpr_ci"]
            out.print(f"{name:11s}  n={m['n']}  FPR={m['fpr']:.2%} (95% {low:.2%}-{high:.2%}; target {fpr:.2%})",
                      highlight=False)
        out.print(f"time: {result.seconds:.1f} s;  metadata: {result.path.with_suffix('.json')}", highlight=False)


@command(head_app, "card",
         example="tidy-detect head card heads/tidy.safetensors --metrics results/table1/metrics.json --repo my-lab/tidy-progan --out README.md")
def card_cmd(
    head: str = typer.Argument(..., help="Head file, or hub reference ORG/REPO (or ORG/REPO/FILE.safetensors, ORG/REPO@REVISION)."),
    out_file: Path = typer.Option(Path("README.md"), "--out", "-o", help="Model card to write."),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="metrics.json of a `tidy-detect eval` run to include."),
    license_: str = typer.Option("unknown", "--license", help="Hub license id for the front matter (mit, apache-2.0, cc-by-nc-4.0, ...); mind the training data's and the base models' licences."),
    repo: Optional[str] = typer.Option(None, "--repo", help="The hub repository ORG/NAME it goes to (for the usage lines)."),
    filename: str = typer.Option("head.safetensors", "--filename", help="The head's file name in the repository (head.safetensors loads as ORG/REPO)."),
    name: Optional[str] = typer.Option(None, "--name", help="The head's detector name in --metrics (default: the file's stem, as eval names it)."),
) -> None:
    """Write a model card (README.md with hub front matter) for a head, ready for `hf upload`."""
    from tidy_detect.cards import model_card
    from tidy_detect.sharing import resolve_head

    path = model_card(head, out_file, metrics=metrics, license=license_, repo_id=repo, filename=filename, name=name)
    target = repo or "ORG/REPO"
    out.print(f"[bold]model card:[/] {path}", highlight=False)
    err.print("upload with:\n"
              f"  hf upload {target} {resolve_head(head)} {filename}\n"
              f"  hf upload {target} {path} README.md", highlight=False, soft_wrap=True)
