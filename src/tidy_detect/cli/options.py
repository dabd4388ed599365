"""What several commands share: the extraction options, the config they build, progress and summaries."""

from __future__ import annotations

from typing import Any, Callable, Optional

import typer
from rich.table import Table

from tidy_detect.cli.app import err, out

LayoutOpt = typer.Option("auto", "--layout", help="auto, cnndetection, unifd, diffusionforensics, genimage, "
                                                   "generic or manifest (see `datasets layouts`).")
SplitOpt = typer.Option(None, "--split", help="train, val or test, for layouts with splits.")
ExcludeOpt = typer.Option(None, "--exclude", help="Exclude list: a text file of file names or relative paths "
                                                  "to skip (e.g. known corrupted files). Repeatable.")
PairingOpt = typer.Option(None, "--pairing", help="FAKE=REAL: the real folder a fake folder pairs with "
                                                  "(unifd, diffusionforensics). Repeatable.")
INPUTS_HELP = ("Image files, folders (recursive), CSV manifests, zip/tar archives, WebDataset shards (brace "
               "patterns: shard-{0000..0099}.tar), Parquet/Arrow files, datasets folders or hf-dataset:ORG/NAME; "
               "local, or behind s3://, gs://, hf:// URIs (credentials from the environment).")
ImageColumnOpt = typer.Option(None, "--image-column", help="Tables (Parquet, Arrow, datasets): the image column "
                              "(default: image or img, else the first column of image structs or bytes). WebDataset: "
                              "the image extension to take (jpg, png).")
LabelColumnOpt = typer.Option(None, "--label-column", help="Tables: the label column (default: label, if present; "
                              "0/1, real/fake or ClassLabel names). WebDataset: the .json field (default: .cls, "
                              "else the field label). A column named here must exist.")
GroupColumnOpt = typer.Option(None, "--group-column", help="Tables: the group column, e.g. the generator (default: "
                              "group, if present, else the dataset's name). WebDataset: the .json field.")
CaptionColumnOpt = typer.Option(None, "--caption-column", help="Tables: the caption column (default: caption, if "
                                "present). WebDataset: the .json field (default: .txt, else the field caption).")


def source_options(image: Optional[str], label: Optional[str], group: Optional[str], caption: Optional[str]) -> Any:
    """The :class:`~tidy_detect.data.sources.SourceOptions` of the column options (None when none is given)."""
    if image is None and label is None and group is None and caption is None:
        return None
    from tidy_detect.data.sources import SourceOptions

    return SourceOptions(image_column=image, label_column=label, group_column=group, caption_column=caption)


def build_extraction_config(preset: Optional[str], clip: Optional[str], captioner: Optional[str],
                            captioner_model: Optional[str], grounder: Optional[str], grounder_model: Optional[str],
                            device: Optional[str], dtype: Optional[str], batch_size: Optional[int],
                            workers: Optional[int], compile_: Optional[bool] = None,
                            max_file_bytes: Optional[int] = None, model_dtypes: Optional[dict] = None,
                            speedups: Optional[bool] = None, **features: Any):
    """Preset (or the defaults) with the options given on the command line on top.

    ``--dtype`` sets every model's precision (the preset's per-model choices included);
    ``model_dtypes`` (``--clip-dtype`` and the like) then set single models; ``speedups`` False
    (``--no-speedups``) turns the models' speed-ups off, None keeps the preset's choice."""
    from tidy_detect.config import ExtractionConfig, load_preset

    config = load_preset(preset) if preset else ExtractionConfig()
    if captioner is not None and captioner_model is None and captioner != config.models.captioner:
        # a new captioner without a model: its own default checkpoint, not the preset's
        config = _replace_models(config, captioner=captioner, captioner_model=None)
    if grounder is not None and grounder_model is None and grounder != config.models.grounder:
        config = _replace_models(config, grounder=grounder, grounder_model=None)
    return config.updated(
        models={"clip": clip, "captioner": captioner, "captioner_model": captioner_model, "grounder": grounder,
                "grounder_model": grounder_model},
        features=features,
        runtime={"device": device, "dtype": dtype, "batch_size": batch_size, "num_workers": workers,
                 "compile": compile_, "max_file_bytes": max_file_bytes, "speedups": speedups,
                 **{f"{kind}_dtype": (model_dtypes or {}).get(kind) or dtype for kind in ("clip", "captioner", "grounder")}},
    )


def _replace_models(config: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, models=dataclasses.replace(config.models, **changes))


PresetOpt = typer.Option(None, "--preset", help="Preset name (see `models list`) or TOML file with the model choice.")
ClipOpt = typer.Option(None, "--clip", help="CLIP: alias (vit-l-14, vit-b-16), hub id or local folder.")
CaptionerOpt = typer.Option(None, "--captioner", help="Captioner: blip2, blip, llava, provided; or a hub id / folder.")
CaptionerModelOpt = typer.Option(None, "--captioner-model", help="Captioner checkpoint: hub id or local folder.")
GrounderOpt = typer.Option(None, "--grounder", help="Grounder: grounding-dino, owlv2, none; or a hub id / folder.")
GrounderModelOpt = typer.Option(None, "--grounder-model", help="Grounder checkpoint: hub id or local folder.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option(None, "--dtype", help="Every model's precision: auto, float32, bfloat16 or float16 (default: CLIP float32, the others auto).")
ClipDtypeOpt = typer.Option(None, "--clip-dtype", help="CLIP's precision (default float32: the features the peers compute).")
CaptionerDtypeOpt = typer.Option(None, "--captioner-dtype", help="The captioner's precision (default: --dtype).")
GrounderDtypeOpt = typer.Option(None, "--grounder-dtype", help="The grounder's precision (default: --dtype).")
AllowDtypeOpt = typer.Option(False, "--allow-dtype-mismatch",
                             help="Use a store or head whose features were made in another precision (refused otherwise).")
BatchOpt = typer.Option(None, "--batch-size", min=1, help="Images per model batch (default 8).")
WorkersOpt = typer.Option(None, "--workers", min=0, help="Image decoding threads (default 2).")
FailOnErrorOpt = typer.Option(False, "--fail-on-error",
                              help="Exit with code 9 if any input could not be processed (default: only when none could, code 8).")
MaxFileMbOpt = typer.Option(None, "--max-file-mb", min=0.001,
                            help="Largest image file read, in MiB (default 512); larger files become error rows before they are read.")
NoSpeedupsOpt = typer.Option(False, "--no-speedups",
                             help="Run transformers' own model code instead of tidy-detect's CPU speed-ups (same results, slower; for checking or debugging). Also TIDY_DETECT_SPEEDUPS=off.")


def _mib(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value * 1024 * 1024)


class extraction_progress:
    """A rich progress bar fed by the extractor's ``progress(done, total, summary)`` callback."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("errors: {task.fields[errors]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
        self.description = description
        self.task: Any = None

    def __enter__(self) -> Callable[[int, int, Any], None]:
        self.progress.start()
        return self.update

    def update(self, done: int, total: int, summary: Any) -> None:
        import time

        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, rate="", errors=0)
            self._t0, self._done0 = time.perf_counter(), done
        elapsed = time.perf_counter() - self._t0
        rate = (done - self._done0) / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.task, completed=done, total=total, rate=f"{rate:.2f} img/s", errors=summary.errors)

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


def print_extraction_summary(summary: Any) -> None:
    table = Table(title=f"extraction {summary.status}: {summary.store}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("images given", str(summary.total))
    table.add_row("extracted now", str(summary.processed))
    table.add_row("already in store (skipped)", str(summary.skipped - summary.kept_errors))
    if summary.changed:
        table.add_row("changed since extracted (redone)", str(summary.changed))
    table.add_row("same content as another image (copied)", str(summary.copied))
    table.add_row("errors", str(summary.errors))
    if summary.kept_errors:
        table.add_row("errors kept from earlier runs (unchanged files)", str(summary.kept_errors))
    if summary.label_conflicts:
        table.add_row("same content as another image with another label", str(summary.label_conflicts))
    if summary.ignored_files:
        table.add_row("non-image files ignored in folders", str(summary.ignored_files))
    if getattr(summary, "workers", None):
        table.add_row("Ray workers (stage times below are summed over them)", str(len(summary.workers)))
    table.add_row("wall time", f"{summary.seconds:.1f} s")
    table.add_row("throughput", f"{summary.images_per_second:.2f} images/s")
    for stage, seconds in summary.stage_seconds.items():
        table.add_row(f"  {stage}", f"{seconds:.2f} s")
    out.print(table)
    if summary.errors:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(summary.error_kinds.items()))
        out.print(f"[yellow]{summary.errors} image(s) could not be processed[/] ({kinds}); they are recorded "
                  f"in the store with their error. First ones:", highlight=False)
        for path, message in summary.error_examples[:10]:
            out.print(f"  - {message}", highlight=False, soft_wrap=True)
    if summary.kept_errors:
        out.print(f"[yellow]{summary.kept_errors} image(s) failed in an earlier run and are unchanged[/]; their "
                  f"error rows are kept (`--retry-errors` redoes them; `tidy-detect store info` counts them by kind)",
                  highlight=False)
    if summary.label_conflicts:
        out.print(f"[yellow]{summary.label_conflicts} image(s) have the same content as another image with a "
                  f"different label[/] (a mislabelled manifest, or a real image among the fakes?):", highlight=False)
        for path, other in summary.label_conflict_examples[:10]:
            out.print(f"  - {path} = {other}", highlight=False, soft_wrap=True)
