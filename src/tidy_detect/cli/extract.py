"""``tidy-detect extract``: images, folders, manifests or benchmark datasets into a feature store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tidy_detect.cli.app import app, command
from tidy_detect.cli.options import (AllowDtypeOpt, CaptionerDtypeOpt, CaptionerModelOpt, CaptionerOpt, ClipDtypeOpt, ClipOpt, DeviceOpt, DtypeOpt, ExcludeOpt, FailOnErrorOpt, GrounderDtypeOpt, GrounderModelOpt, GrounderOpt, MaxFileMbOpt, NoSpeedupsOpt, PairingOpt, PresetOpt, SplitOpt, _mib, build_extraction_config, extraction_progress, print_extraction_summary)
from tidy_detect.cli.options import CaptionColumnOpt, GroupColumnOpt, ImageColumnOpt, INPUTS_HELP, LabelColumnOpt, source_options


@command(app, "extract",
         example="tidy-detect extract DATA/CNNDetection --layout cnndetection --split train --per-label 40000 --preset paper --out stores/progan-train")
def extract_cmd(
    inputs: List[str] = typer.Argument(..., help=INPUTS_HELP),
    out_dir: str = typer.Option(..., "--out", "-o", help="Feature store (created, or resumed): a folder, or a URI such as s3://bucket/prefix (gs://, hf://, file:// too); credentials from the environment or ~/.aws, never options."),
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
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per model batch (default: 8 on the CPU; on a GPU the largest that fits its free memory, by the per-stage memory model of docs/gpu.md)."),
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
    per_class: Optional[int] = typer.Option(None, "--per-label", "--per-class", min=1, help="Training subsets: exactly N real and N fake images, spread over the dataset's classes (CNNDetection's LSUN categories); the paper: 40000. --per-class is the old name."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    fail_on_error: bool = FailOnErrorOpt,
    max_file_mb: Optional[float] = MaxFileMbOpt,
    exif: str = typer.Option("auto", "--exif", help="EXIF orientation: auto (ignored for benchmark layouts, as the peers read pixels; applied otherwise), apply or ignore."),
    no_speedups: bool = NoSpeedupsOpt,
    devices: Optional[str] = typer.Option(None, "--devices", help="Several devices of this machine, comma-separated (cuda:0,cuda:1): one process per device, each with its own copy of the models, writing one store (cpu,cpu runs two CPU processes). See docs/gpu.md."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="The first N GPUs (cuda:0 ... cuda:N-1), as --devices."),
    static_cache: bool = typer.Option(False, "--static-cache", help="GPU switch: generate captions with a static KV cache where transformers supports it for the captioner (BLIP-2, LLaVA; on CUDA transformers then compiles the decoding step). Same captions; measure it with `tidy-detect bench --device cuda`."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="GPU switch: replay CLIP's image tower from CUDA graphs (one per padded batch size). Same embeddings; measured by `tidy-detect bench --device cuda`."),
    image_column: Optional[str] = ImageColumnOpt,
    label_column: Optional[str] = LabelColumnOpt,
    group_column: Optional[str] = GroupColumnOpt,
    caption_column: Optional[str] = CaptionColumnOpt,
) -> None:
    """Extract captions, objects and CLIP embeddings of images into a feature store.

    A rerun skips images already in the store and redoes files whose content changed since
    (see the README's "Resume"). Exits 8 when no image could be processed, 9 with --fail-on-error
    when any could not.
    """
    from tidy_detect.features.extractor import check_outcome
    from tidy_detect.data.layouts import parse_pairing
    from tidy_detect.distributed.engines import extract_with_engine, ray_options_from_cli

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
                                     global_view=global_view, speedups=False if no_speedups else None)
    config = config.updated(runtime={"devices": _devices(devices, gpus), "static_cache": static_cache or None,
                                     "cuda_graphs": cuda_graphs or None})
    with extraction_progress("extracting") as progress:
        summary = extract_with_engine(engine, inputs, out_dir, config, ray_options=ray_options, limit=limit,
                                      progress=progress, retry_errors=retry_errors, layout=layout, split=split,
                                      exclude=exclude or None, pairing=parse_pairing(pairing or []) or None,
                                      max_per_class=max_per_class, per_class=per_class, seed=seed,
                                      accept_dtype=allow_dtype_mismatch, exif=exif,
                                      source_options=source_options(image_column, label_column, group_column,
                                                                    caption_column))
    print_extraction_summary(summary)
    check_outcome(summary, fail_on_error)


def _devices(devices: Optional[str], gpus: Optional[int]) -> Optional[tuple]:
    """``--devices`` or ``--gpus`` as a tuple of devices (None when neither is given)."""
    from tidy_detect.config import parse_devices
    from tidy_detect.errors import ConfigError

    if devices is not None and gpus is not None:
        raise ConfigError("give --devices or --gpus, not both")
    if gpus is not None:
        return tuple(f"cuda:{k}" for k in range(gpus))
    return parse_devices(devices) if devices is not None else None
