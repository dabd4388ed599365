"""The ``tidy-detect`` command. Library errors become one clear line and an exit code here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tidy_detect import __version__
from tidy_detect.data.cli_datasets import ExcludeOpt, PairingOpt, SplitOpt
from tidy_detect.errors import EXIT_CODES, TidyError

app = typer.Typer(
    name="tidy-detect",
    help="Detect AI-generated images from the discrepancy between an image and its caption in CLIP space (TIDY).",
    epilog="Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List the available models and presets; build the tiny offline bundle.",
                         no_args_is_help=True)
store_app = typer.Typer(help="Inspect and maintain feature stores.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(store_app, name="store")

out = Console()
err = Console(stderr=True)
_state = {"traceback": False}
log = logging.getLogger("tidy_detect")


def _version(value: bool) -> None:
    if value:
        out.print(f"tidy-detect {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv for debug)."),
    traceback: bool = typer.Option(False, "--traceback", help="Show the full traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["traceback"] = traceback
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    if verbose < 2:
        for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def command(parent: typer.Typer, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose TidyErrors print as one line with the error's exit code."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except TidyError as exc:
                if _state["traceback"]:
                    raise
                err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]; finished work is saved, rerun the same command to go on")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                if _state["traceback"]:
                    raise
                err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                          f"This is a bug in tidy-detect; rerun with --traceback and report the output.",
                          highlight=False, soft_wrap=True)
                raise typer.Exit(70) from None

        return parent.command(*args, **kwargs)(wrapper)

    return decorate


# ---------------------------------------------------------------------------------------------
# Extraction options shared by extract, detect and the rest

def build_extraction_config(preset: Optional[str], clip: Optional[str], captioner: Optional[str],
                            captioner_model: Optional[str], grounder: Optional[str], grounder_model: Optional[str],
                            device: Optional[str], dtype: Optional[str], batch_size: Optional[int],
                            workers: Optional[int], compile_: Optional[bool] = None,
                            max_file_bytes: Optional[int] = None, model_dtypes: Optional[dict] = None,
                            **features: Any):
    """Preset (or the defaults) with the options given on the command line on top.

    ``--dtype`` sets every model's precision (the preset's per-model choices included);
    ``model_dtypes`` (``--clip-dtype`` and the like) then set single models."""
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
                 "compile": compile_, "max_file_bytes": max_file_bytes,
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


def _mib(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value * 1024 * 1024)


@command(app, "extract")
def extract_cmd(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (recursive) or CSV manifests (path,label,group,caption)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Feature store folder (created, or resumed)."),
    preset: Optional[str] = PresetOpt,
    clip: Optional[str] = ClipOpt,
    captioner: Optional[str] = CaptionerOpt,
    captioner_model: Optional[str] = CaptionerModelOpt,
    grounder: Optional[str] = GrounderOpt,
    grounder_model: Optional[str] = GrounderModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    clip_dtype: Optional[str] = ClipDtypeOpt,
    captioner_dtype: Optional[str] = CaptionerDtypeOpt,
    grounder_dtype: Optional[str] = GrounderDtypeOpt,
    allow_dtype_mismatch: bool = AllowDtypeOpt,
    batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Local engine: image decoding threads (default 2). Ray engine: extraction workers, each with its own copy of the models (default 2)."),
    engine: str = typer.Option("local", "--engine", help="Where extraction runs: local (this process) or ray (a Ray cluster; needs the distributed extra, see docs/distributed.md)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray engine: auto (this machine's cluster), HOST:PORT or ray://HOST:10001; unset starts a local cluster."),
    num_gpus_per_worker: Optional[float] = typer.Option(None, "--num-gpus-per-worker", min=0, help="Ray engine: GPUs per extraction worker (default 0; 0.5 lets two share a GPU)."),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker", min=0, help="Ray engine: CPU slots per extraction worker, i.e. torch threads (default 1)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Process at most N images."),
    max_objects: Optional[int] = typer.Option(None, "--max-objects", help="Objects per image (default 6)."),
    box_threshold: Optional[float] = typer.Option(None, "--box-threshold", help="Grounder box threshold."),
    text_threshold: Optional[float] = typer.Option(None, "--text-threshold", help="Grounder phrase threshold (token-max rule only)."),
    grounding_rule: Optional[str] = typer.Option(None, "--grounding-rule", help="How a phrase is scored against a box: span-mean (mean token probability over the phrase, compared with the box threshold: Grounding DINO's phrase grounding and GLIP; default) or token-max (best token probability, with the text threshold)."),
    min_box_size: Optional[float] = typer.Option(None, "--min-box-size", help="Drop boxes whose shorter side is under this many pixels of the original image (default 8; 0 keeps all)."),
    caption_max_tokens: Optional[int] = typer.Option(None, "--caption-max-tokens", help="Longest caption, in tokens."),
    caption_prompt: Optional[str] = typer.Option(None, "--caption-prompt", help="Prompt for the captioner."),
    global_view: Optional[str] = typer.Option(None, "--global-view", help="center-crop (benchmark protocol) or clip."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Redo images recorded as errors before."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile CLIP's vision tower (pays off on large runs; the first batch compiles)."),
    layout: Optional[str] = typer.Option(None, "--layout", help="Read INPUTS as benchmark datasets: auto or a layout (see `datasets layouts`); group = generator."),
    split: Optional[str] = SplitOpt,
    exclude: Optional[List[Path]] = ExcludeOpt,
    pairing: Optional[List[str]] = PairingOpt,
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", min=1, help="Sample at most N real and N fake per generator (evaluation sets; the paper: 1000)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", min=1, help="Sample exactly N real and N fake spread over the classes (training subsets; the paper: 40000)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    fail_on_error: bool = FailOnErrorOpt,
    max_file_mb: Optional[float] = MaxFileMbOpt,
    exif: str = typer.Option("auto", "--exif", help="EXIF orientation: auto (ignored for benchmark layouts, as the peers read pixels; applied otherwise), apply or ignore."),
) -> None:
    """Extract captions, objects and CLIP embeddings of images into a feature store.

    A rerun skips images already in the store and redoes files whose content changed since
    (see the README's "Resume"). Exits 8 when no image could be processed, 9 with --fail-on-error
    when any could not.
    """
    from tidy_detect.features.extractor import check_outcome
    from tidy_detect.data.layouts import parse_pairing
    from tidy_detect.distributed.cli import extract_with_engine, ray_options_from_cli

    ray_options = ray_options_from_cli(engine, address=ray_address, workers=workers,
                                       num_gpus_per_worker=num_gpus_per_worker, cpus_per_worker=cpus_per_worker)
    decode_threads = workers if ray_options is None else None  # with Ray, --workers counts extraction workers
    config = build_extraction_config(preset, clip, captioner, captioner_model, grounder, grounder_model, device,
                                     dtype, batch_size, decode_threads, compile_ or None, _mib(max_file_mb),
                                     {"clip": clip_dtype, "captioner": captioner_dtype, "grounder": grounder_dtype},
                                     max_objects=max_objects,
                                     box_threshold=box_threshold, text_threshold=text_threshold,
                                     grounding_rule=grounding_rule, min_box_size=min_box_size,
                                     caption_max_tokens=caption_max_tokens, caption_prompt=caption_prompt,
                                     global_view=global_view)
    with extraction_progress("extracting") as progress:
        summary = extract_with_engine(engine, inputs, out_dir, config, ray_options=ray_options, limit=limit,
                                      progress=progress, retry_errors=retry_errors, layout=layout, split=split,
                                      exclude=exclude or None, pairing=parse_pairing(pairing or []) or None,
                                      max_per_class=max_per_class, per_class=per_class, seed=seed,
                                      accept_dtype=allow_dtype_mismatch, exif=exif)
    print_extraction_summary(summary)
    check_outcome(summary, fail_on_error)


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


# ---------------------------------------------------------------------------------------------
# train

@command(app, "train")
def train_cmd(
    stores: List[Path] = typer.Argument(..., help="Training feature stores (same extraction config)."),
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
    val: Optional[List[Path]] = typer.Option(None, "--val", help="Validation store(s), scored every epoch."),
    select: str = typer.Option("last", "--select", help="last (paper) or best-val (best validation AP)."),
    balance: bool = typer.Option(False, "--balance", help="Weight the loss by inverse class frequency."),
    precision: str = typer.Option("auto", "--precision", help="Training matmuls: float32, bfloat16, or auto (float32 for float32 CLIP features, the paper's protocol; else bfloat16 where it is fast)."),
) -> None:
    """Train the MLP head on feature stores."""
    from tidy_detect.config import RepresentationConfig

    from tidy_detect.evaluate.commands import parse_seeds

    rep = RepresentationConfig(representation, w1, w2, normalize)
    runs = [(s, out_path.with_name(f"{out_path.with_suffix('').name}-seed{s}.safetensors")) for s in parse_seeds(seeds)]
    for run_seed, run_out in runs or [(seed, out_path)]:
        _train_one(stores, run_out, rep, val, epochs, lr, weight_decay, hidden, batch_size, run_seed, select, balance,
                   precision)
    if runs:
        out.print(f"{len(runs)} heads; evaluate them together with "
                  f"`tidy-detect eval --head {out_path.with_suffix('')}-seed{{seed}}.safetensors --seeds {seeds} STORE...`",
                  highlight=False)


def _train_one(stores: List[Path], out_path: Path, rep: Any, val: Optional[List[Path]], epochs: int, lr: float,
               weight_decay: float, hidden: int, batch_size: int, seed: int, select: str, balance: bool,
               precision: str = "auto") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tidy_detect.training import train_head

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


# ---------------------------------------------------------------------------------------------
# detect

FORMATS = ("table", "json", "jsonl", "csv")


@command(app, "detect")
def detect_cmd(
    inputs: List[str] = typer.Argument(..., help="Images, folders or CSV manifests to score."),
    head: Path = typer.Option(..., "--head", help="Head checkpoint (.safetensors) from `tidy-detect train`."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table, json, jsonl or csv (default: from --out, else table)."),
    threshold: float = typer.Option(0.5, "--threshold", help="p_fake above this is 'fake'."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results here instead of stdout."),
    save_store: Optional[Path] = typer.Option(None, "--save-store", help="Keep the features in this store; images already in it are not extracted again."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Load the head's CLIP from here (same checkpoint)."),
    captioner_model: Optional[str] = typer.Option(None, "--captioner-model", help="Load the head's captioner from here."),
    grounder_model: Optional[str] = typer.Option(None, "--grounder-model", help="Load the head's grounder from here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (each model in the precision the head's features were made in), float32, bfloat16 or float16."),
    allow_dtype_mismatch: bool = AllowDtypeOpt,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per model batch."),
    workers: int = typer.Option(2, "--workers", min=0, help="Image decoding threads."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile CLIP's vision tower (pays off on large runs)."),
    cascade_head: Optional[Path] = typer.Option(None, "--cascade-head", help="Fast path: a global-only head (train with --representation global) scores every image first; only uncertain ones get objects and the full head."),
    band: str = typer.Option("0.2,0.8", "--band", help="The cascade's uncertainty band LOW,HIGH on the global head's p_fake."),
    fail_on_error: bool = FailOnErrorOpt,
) -> None:
    """Score images with a trained head and explain each score (caption, objects, discrepancies).

    Images that cannot be read get a record with their error; the others are scored. Exits 8 when
    no image was found or none could be scored (after writing the records), 9 with --fail-on-error
    when any could not.
    """
    from tidy_detect.data.inputs import collect_inputs
    from tidy_detect.detect import Detector
    from tidy_detect.errors import ConfigError

    fmt = fmt or ({".json": "json", ".jsonl": "jsonl", ".csv": "csv"}.get(out_file.suffix.lower(), "table")
                  if out_file else "table")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        low, high = (float(v) for v in band.split(","))
    except ValueError:
        raise ConfigError(f"--band takes LOW,HIGH, got {band!r}") from None
    if cascade_head is not None and save_store is not None:
        raise ConfigError("--cascade-head skips objects for confident images, so it cannot fill a store of "
                          "full features; drop --save-store or --cascade-head")
    items = collect_inputs(inputs)
    if not items:
        from tidy_detect.errors import NothingProcessedError

        raise NothingProcessedError(f"no images found in {', '.join(inputs)} (folders are searched for image "
                                    f"suffixes such as .jpg, .png, .webp)")
    detector = Detector.load(head, device=device, dtype=dtype, accept_dtype=allow_dtype_mismatch,
                             batch_size=batch_size, num_workers=workers,
                             threshold=threshold, compile=compile_, cascade_head=cascade_head, band=(low, high),
                             clip=clip, captioner_model=captioner_model, grounder_model=grounder_model)
    records = []
    with extraction_progress("detecting") as progress:
        if save_store is not None:
            from tidy_detect.features.extractor import run_extraction
            from tidy_detect.features.store import FeatureStore

            store = FeatureStore.open_for_writing(save_store, detector.extractor.extraction, detector.extractor.dim,
                                                  accept_dtype=allow_dtype_mismatch)
            run_extraction(items, store, detector.extractor, progress=progress)
            rows = store.rows_for_paths(item.path for item in items)
            records = detector.score_rows([rows[item.path] for item in items])
        else:
            from tidy_detect.features.extractor import ExtractionSummary

            summary = ExtractionSummary(total=len(items))
            for batch in detector.detect_items(items, summary):
                records.extend(batch)
                progress(len(records), len(items), summary)
    write_records(records, fmt, out_file)
    if detector.cascade is not None:
        c = detector.cascade
        err.print(f"cascade: {c.escalated} of {c.images} images ({c.fraction_escalated:.1%}) were in the band "
                  f"{c.band[0]:g}-{c.band[1]:g} and got objects and the full head", highlight=False)
    check_records(records, fail_on_error)


def check_records(records: list, fail_on_error: bool) -> None:
    """The exit status of `detect`: 8 when nothing was scored, 9 for any error with --fail-on-error."""
    from tidy_detect.errors import InputsFailedError, NothingProcessedError

    failed = [r for r in records if r.get("error")]
    if not records:
        raise NothingProcessedError("no images found in the inputs given (folders are searched for image "
                                    "suffixes such as .jpg, .png, .webp)")
    if len(failed) == len(records):
        raise NothingProcessedError(f"none of the {len(records)} images could be scored; first error: "
                                    f"{failed[0]['error']}")
    if fail_on_error and failed:
        raise InputsFailedError(f"{len(failed)} of the {len(records)} images could not be scored (first: "
                                f"{failed[0]['error']}) and --fail-on-error was given")


def write_records(records: list, fmt: str, out_file: Optional[Path]) -> None:
    """Print or save detection records in one of FORMATS."""
    from tidy_detect.detect import top_object

    if fmt == "table":
        table = Table(show_lines=False)
        for col in ("image", "verdict", "p_fake", "caption", "most telling object", "global"):
            table.add_column(col, overflow="fold")
        for r in records:
            name = Path(r["path"]).name if not r["path"].startswith("<") else r["path"]
            if r["error"]:
                table.add_row(name, "[red]error", "-", r["error"], "", "")
                continue
            top = top_object(r)
            verdict = "[red]fake" if r["label"] == "fake" else "[green]real"
            caption = r["caption"] if len(r["caption"]) <= 70 else r["caption"][:67] + "..."
            table.add_row(name, verdict, f"{r['p_fake']:.3f}", caption,
                          f"{top['phrase']} ({top['discrepancy']:.3f})" if top else "-", f"{r['global_discrepancy']:.3f}")
        if out_file:
            with out_file.open("w", encoding="utf-8") as handle:
                Console(file=handle, width=160).print(table)
        else:
            out.print(table)
        errors = sum(1 for r in records if r["error"])
        fakes = sum(1 for r in records if r["label"] == "fake")
        err.print(f"{len(records)} images: {fakes} fake, {len(records) - fakes - errors} real, {errors} errors")
        return
    if fmt == "json":
        text = json.dumps(records, indent=2) + "\n"
    elif fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "sha256", "p_fake", "label", "caption", "global_discrepancy", "n_objects",
                         "top_object", "top_object_discrepancy", "objects", "error"])
        for r in records:
            top = top_object(r)
            writer.writerow([r["path"], r["sha256"] or "", "" if r["p_fake"] is None else r["p_fake"], r["label"] or "",
                             r["caption"] or "", "" if r["global_discrepancy"] is None else r["global_discrepancy"],
                             len(r["objects"]), top["phrase"] if top else "", top["discrepancy"] if top else "",
                             json.dumps(r["objects"]), r["error"] or ""])
        text = buffer.getvalue()
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text, encoding="utf-8")
        err.print(f"wrote {len(records)} records to {out_file}")
    else:
        sys.stdout.write(text)


# ---------------------------------------------------------------------------------------------
# demo

@command(app, "demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("tidy-demo"), "--out", "-o", help="Folder for models, images, stores, head, results."),
    per_class: int = typer.Option(24, "--per-class", min=2, help="Synthetic images per class and generator."),
    epochs: int = typer.Option(50, "--epochs", help="Head training epochs."),
) -> None:
    """Run the whole pipeline offline on tiny models and synthetic images (a few minutes on 2 cores)."""
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
        "  tidy-detect extract CNNDetection/train/progan --out stores/progan-train --preset paper\n"
        "  tidy-detect train stores/progan-train --out heads/tidy.safetensors\n"
        "  tidy-detect detect photos/ --head heads/tidy.safetensors --format table", highlight=False)


# ---------------------------------------------------------------------------------------------
# bench

@command(app, "bench")
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


# ---------------------------------------------------------------------------------------------
# models

@command(models_app, "list")
def models_list() -> None:
    """Show registered captioners, grounders, CLIP aliases and presets."""
    from tidy_detect.config import builtin_presets, preset_description
    from tidy_detect.models.registry import CAPTIONERS, CLIP_ALIASES, GROUNDERS, ensure_registered

    ensure_registered()
    for title, registry in (("captioners (--captioner)", CAPTIONERS), ("grounders (--grounder)", GROUNDERS)):
        table = Table(title=title, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("default checkpoint")
        table.add_column("handles model_type")
        table.add_column("what")
        for c in registry.components():
            table.add_row(c.name, c.default_model or "-", ", ".join(c.model_types) or "-", c.description)
        out.print(table)
    table = Table(title="CLIP (--clip): any Hugging Face CLIP checkpoint; aliases", title_justify="left")
    table.add_column("alias", style="bold")
    table.add_column("hub id")
    for alias, hub_id in CLIP_ALIASES.items():
        table.add_row(alias, hub_id)
    out.print(table)
    table = Table(title="presets (--preset NAME or a TOML file)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("what")
    for name, path in builtin_presets().items():
        table.add_row(name, preset_description(path))
    out.print(table)


@command(models_app, "make-tiny")
def models_make_tiny(
    directory: Path = typer.Argument(..., help="Folder to build the bundle in."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the folder holds a bundle."),
) -> None:
    """Build tiny random-weight versions of every model (no network) and DIR/tiny.toml."""
    from tidy_detect.models.tiny import make_tiny_bundle

    preset = make_tiny_bundle(directory, seed=seed, overwrite=force)
    out.print(f"tiny bundle ready: {directory}\npreset: {preset}  (use --preset {preset})")


@command(models_app, "verify")
def models_verify(
    preset: Optional[str] = PresetOpt,
    clip: Optional[str] = ClipOpt,
    captioner: Optional[str] = CaptionerOpt,
    captioner_model: Optional[str] = CaptionerModelOpt,
    grounder: Optional[str] = GrounderOpt,
    grounder_model: Optional[str] = GrounderModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    fmt: str = typer.Option("table", "--format", "-f", help="table or json."),
) -> None:
    """Self-check the configured models on a few annotated public-domain photos (run once after
    downloading the weights): captions name the objects, CLIP ranks the true captions first, the
    grounder's boxes overlap the annotations (IoU >= 0.5), and half precision agrees with float32
    (cosine >= 0.99). Exits 10 when a check fails. On random-weight models (the tiny bundle) the
    semantic checks are reported as "cannot pass: random weights" and only the others decide.
    """
    from tidy_detect.errors import ConfigError, VerificationFailedError
    from tidy_detect.models.verify import run_verification

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json, got {fmt!r}")
    config = build_extraction_config(preset, clip, captioner, captioner_model, grounder, grounder_model, device,
                                     dtype, None, None)
    report = run_verification(config, say=lambda m: err.print(f"• {m}", highlight=False))
    if fmt == "json":
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        print_verify_report(report)
    if not report.passed:
        raise VerificationFailedError(report.summary())


def print_verify_report(report: Any) -> None:
    from tidy_detect.models.verify import FAIL, PASS, RANDOM

    style = {PASS: "green", FAIL: "bold red", RANDOM: "yellow"}
    precisions = ", ".join(f"{role} {dtype}" for role, dtype in report.dtypes.items()) or report.dtype
    table = Table(title=f"models verify on {report.device} ({precisions})", title_justify="left")
    for col in ("check", "photo / model", "measured", "rule", "result"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.check, c.subject, escape(c.measured), escape(c.rule),
                      f"[{style.get(c.status, 'dim')}]{escape(c.status)}[/]")
    out.print(table)
    if report.random_weights:
        by_reason: dict = {}
        for role, reason in report.random_weights.items():
            by_reason.setdefault(reason, []).append(role)
        reasons = "; ".join(f"{', '.join(roles)}: {reason}" for reason, roles in by_reason.items())
        out.print(f"[yellow]random weights[/] ({escape(reasons)}): their semantic checks (caption, clip-rank, "
                  f"grounding) cannot pass and do not count", highlight=False, soft_wrap=True)
    out.print(("[green]" if report.passed else "[bold red]") + escape(report.summary()) + "[/]", highlight=False,
              soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# store

@command(store_app, "info")
def store_info(
    store: Path = typer.Argument(..., help="Feature store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts (rows, errors, labels, groups) and the extraction config of a store."""
    from tidy_detect.features.store import FeatureStore

    fs = FeatureStore(store)
    summary = fs.summary()
    if as_json:
        out.print_json(json.dumps({"summary": summary, "config": fs.config}))
        return
    ex = fs.extraction
    out.print(f"[bold]{store}[/]: {summary['rows']} rows, {summary['errors']} errors, dim {fs.dim}, "
              f"fingerprint {fs.fingerprint}")
    out.print(f"  clip: {ex['clip'].get('source')}  captioner: {ex['captioner'].get('name')} "
              f"({ex['captioner'].get('source')})  grounder: {ex['grounder'].get('name')} "
              f"({ex['grounder'].get('source')})", highlight=False)
    out.print(f"  labels: {summary['labels']}  without objects: {summary['no_objects']}")
    if summary["error_kinds"]:
        out.print(f"  errors by kind: {summary['error_kinds']}")
    table = Table(title="groups", title_justify="left")
    table.add_column("group")
    table.add_column("rows", justify="right")
    for group, count in sorted(summary["groups"].items(), key=lambda kv: str(kv[0])):
        table.add_row(str(group), str(count))
    out.print(table)


@command(store_app, "compact")
def store_compact(store: Path = typer.Argument(..., help="Feature store folder.")) -> None:
    """Merge small shards into larger ones (safe to interrupt)."""
    from tidy_detect.features.store import FeatureStore

    merged = FeatureStore(store).compact()
    out.print(f"merged {merged} shards")


from tidy_detect.data.cli_datasets import register as _register_datasets  # noqa: E402
from tidy_detect.evaluate.commands import register as _register_evaluation  # noqa: E402

from tidy_detect.serve_cli import register as _register_serve  # noqa: E402

_register_datasets(app, command, out)
_register_evaluation(app)
_register_serve(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
