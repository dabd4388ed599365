"""CLI commands of the evaluation half: eval, robustness, ablate, report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from tidy_detect.cli.app import command, err, out
from tidy_detect.cli.options import ExcludeOpt, PairingOpt, SplitOpt
from tidy_detect.cli.options import CaptionColumnOpt, GroupColumnOpt, ImageColumnOpt, INPUTS_HELP, LabelColumnOpt, source_options


def _parse_named(values: Optional[List[str]], option: str) -> dict[str, Path]:
    """``NAME=PATH`` pairs of a repeatable option."""
    from tidy_detect.errors import ConfigError

    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} takes NAME=FILE, got {value!r}")
        named[name] = Path(path)
    return named


def parse_columns(values: Optional[List[str]]) -> dict[str, str]:
    """``LABEL=[LAYOUT:]GROUP`` values of ``--column`` -> ``{label: source}``."""
    from tidy_detect.errors import ConfigError

    chosen = {}
    for value in values or []:
        label, sep, source = value.partition("=")
        if not sep or not label.strip() or not source.strip():
            raise ConfigError(f"--column takes LABEL=GROUP or LABEL=LAYOUT:GROUP (e.g. Deepfakes=whichfaceisreal), "
                              f"got {value!r}")
        chosen[label.strip()] = source.strip()
    return chosen


def parse_seeds(text: Optional[str]) -> list[int]:
    from tidy_detect.errors import ConfigError

    if not text:
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers separated by commas, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add eval, robustness, ablate and report to the CLI."""

    @command(app, "eval",
         example="tidy-detect eval stores/cnn-test --head heads/tidy.safetensors --suite table1 --out results/table1")
    def eval_cmd(
        stores: List[str] = typer.Argument(..., help="Test feature stores: folders or URIs (s3://bucket/prefix, ...)."),
        head: List[str] = typer.Option(..., "--head", help="Head file or hub reference ORG/REPO (or ORG/REPO/FILE.safetensors, ORG/REPO@REVISION); "
                                                           "repeat for several: trained heads (mean ± std over them, "
                                                           "or use {seed} with --seeds) beside one-class heads of "
                                                           "`tidy-detect calibrate`."),
        out_dir: Path = typer.Option(Path("results/eval"), "--out", "-o", help="Results folder."),
        suite: Optional[str] = typer.Option(None, "--suite", help="table1, table2, table3 or a suite TOML file."),
        column: Optional[List[str]] = typer.Option(None, "--column", help="LABEL=[LAYOUT:]GROUP: fill a suite column from another group, e.g. Deepfakes=whichfaceisreal (the paper's footnote) instead of CNNDetection's deepfake; repeatable."),
        threshold: float = typer.Option(0.5, "--threshold", help="ACC threshold on p_fake."),
        calibrate_on: Optional[List[str]] = typer.Option(None, "--calibrate-on", help="Validation store(s) for a calibrated threshold (reported in its own columns); folders or URIs."),
        bootstrap: int = typer.Option(0, "--bootstrap", min=0, help="Bootstrap resamples for 95% intervals (e.g. 1000)."),
        max_per_class: int = typer.Option(1000, "--max-per-class", min=1, help="At most N real and N fake per group and store."),
        all_rows: bool = typer.Option(False, "--all", help="Evaluate every row (no sampling)."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed, reset for every store."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="e.g. 0,1,2: expands {seed} in --head."),
        imports: Optional[List[str]] = typer.Option(None, "--import", help="NAME=CSV of another detector's per-image scores (path,score)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="PR/ROC curves, cosine histogram and t-SNE."),
        cascade_head: Optional[str] = typer.Option(None, "--cascade-head", help="A global-only head: also report the cascade fast path (its accuracy and the fraction escalated), simulated on the stores."),
        band: str = typer.Option("0.2,0.8", "--band", help="The cascade's uncertainty band LOW,HIGH."),
    ) -> None:
        """Evaluate heads on test stores: per-generator ACC/AP/AUC, paper tables, plots."""
        from tidy_detect.evaluate.evaluation import evaluate, write_plots, write_results

        from tidy_detect.errors import ConfigError

        heads = [h.format(seed=s) for h in head for s in parse_seeds(seeds)] if seeds else list(head)
        try:
            low, high = (float(v) for v in band.split(","))
        except ValueError:
            raise ConfigError(f"--band takes LOW,HIGH, got {band!r}") from None
        result = evaluate(heads, stores, threshold=threshold, calibrate_on=calibrate_on or (), bootstrap=bootstrap,
                          max_per_class=None if all_rows else max_per_class, seed=seed, suite=suite,
                          imports=_parse_named(imports, "--import"), cascade_head=cascade_head, band=(low, high),
                          columns=parse_columns(column))
        files = write_results(result, out_dir)
        if plots:
            files.update(write_plots(result, out_dir, seed=seed))
        out.print(files["table.md"].read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
        for name, info in result.info.get("cascade", {}).items():
            out.print(f"{name}: {info['fraction_escalated']:.1%} of images escalated to the full head "
                      f"(band {info['band'][0]:g}-{info['band'][1]:g})", highlight=False)
        err.print(f"results in {out_dir}: " + ", ".join(sorted(p.name for p in files.values())))

    @command(app, "robustness",
         example="tidy-detect robustness DATA/CNN_synth_testset --layout cnndetection --head heads/tidy.safetensors --out results/robustness")
    def robustness_cmd(
        inputs: List[str] = typer.Argument(..., help="Test images. " + INPUTS_HELP),
        head: str = typer.Option(..., "--head", help="Head file or hub reference ORG/REPO (or ORG/REPO/FILE.safetensors, ORG/REPO@REVISION)."),
        out_dir: str = typer.Option("results/robustness", "--out", "-o", help="Results folder or URI (s3://bucket/prefix, ...); the stores go in OUT/stores."),
        noise: Optional[str] = typer.Option(None, "--noise", help="Gaussian noise sigmas on [0,1] (default 0.001,0.005,0.01)."),
        blur: Optional[str] = typer.Option(None, "--blur", help="Gaussian blur sigmas (default 1,2,3)."),
        jpeg: Optional[str] = typer.Option(None, "--jpeg", help="JPEG qualities (default 75,50,25)."),
        resize: Optional[str] = typer.Option(None, "--resize", help="Extra: resize scale factors, e.g. 0.75,0.5."),
        webp: Optional[str] = typer.Option(None, "--webp", help="Extra: WebP qualities, e.g. 75,50."),
        only: Optional[str] = typer.Option(None, "--only", help="Comma-separated kinds to run (default noise,blur,jpeg plus any extra given)."),
        layout: Optional[str] = typer.Option(None, "--layout", help="Read INPUTS as benchmark datasets: auto or a layout (see `datasets layouts`)."),
        split: Optional[str] = SplitOpt,
        exclude: Optional[List[Path]] = ExcludeOpt,
        pairing: Optional[List[str]] = PairingOpt,
        max_per_class: int = typer.Option(1000, "--max-per-class", min=1, help="At most N real and N fake per group."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        threshold: float = typer.Option(0.5, "--threshold", help="ACC threshold."),
        clean: bool = typer.Option(True, "--clean/--no-clean", help="Also evaluate the unperturbed images."),
        device: str = typer.Option("auto", "--device"),
        dtype: str = typer.Option("auto", "--dtype"),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        exif: str = typer.Option("auto", "--exif", help="EXIF orientation: auto (ignored for benchmark layouts, as the peers read pixels; applied otherwise), apply or ignore."),
        no_speedups: bool = typer.Option(False, "--no-speedups", help="Run transformers' own model code instead of tidy-detect's CPU speed-ups (same results, slower). Also TIDY_DETECT_SPEEDUPS=off."),
        image_column: Optional[str] = ImageColumnOpt,
        label_column: Optional[str] = LabelColumnOpt,
        group_column: Optional[str] = GroupColumnOpt,
        caption_column: Optional[str] = CaptionColumnOpt,
    ) -> None:
        """Perturb test images (noise, blur, JPEG, ...), extract, evaluate and plot AP/ACC against severity."""
        from tidy_detect.data.layouts import parse_pairing
        from tidy_detect.data.perturb import parse_levels
        from tidy_detect.data.selection import select_inputs
        from tidy_detect.detect import Detector
        from tidy_detect.errors import ConfigError
        from tidy_detect.evaluate.robustness import run_robustness
        from tidy_detect.sharing import resolve_head

        head = resolve_head(head)  # once, so that the results name the local file
        given = {"noise": noise, "blur": blur, "jpeg": jpeg, "resize": resize, "webp": webp}
        kinds = [k.strip() for k in only.split(",")] if only else \
            ["noise", "blur", "jpeg", *[k for k in ("resize", "webp") if given[k] is not None]]
        unknown = [k for k in kinds if k not in given]
        if unknown:
            raise ConfigError(f"--only: unknown perturbation {unknown[0]!r}; known: {', '.join(given)}")
        perturbations = [p for kind in kinds for p in parse_levels(kind, given[kind])]
        selection = select_inputs(inputs, layout=layout, split=split, exclude=exclude,
                                  pairing=parse_pairing(pairing or []) or None, max_per_class=max_per_class, seed=seed,
                                  source_options=source_options(image_column, label_column, group_column,
                                                                caption_column))
        detector = Detector.load(head, device=device, dtype=dtype, batch_size=batch_size, speedups=not no_speedups)
        from tidy_detect.features.extractor import resolve_exif

        result = run_robustness(head, selection.items, out_dir, perturbations, threshold=threshold,
                                include_clean=clean, pairing=selection.pairing, detector=detector,
                                exif=resolve_exif(exif, bool(selection.datasets)),
                                say=lambda m: err.print(f"• {m}", highlight=False))
        from tidy_detect.features.storage import StoreLocation, join_uri

        out.print(StoreLocation.parse(out_dir).read_text("robustness.md"), markup=False, highlight=False, soft_wrap=True)
        err.print(f"results in {out_dir}; {len(result['stores'])} stores in {join_uri(out_dir, 'stores')}")

    @command(app, "ablate",
         example="tidy-detect ablate stores/progan-train --test stores/cnn-test --out results/ablation")
    def ablate_cmd(
        train: List[str] = typer.Argument(..., help="Training stores: folders or URIs (s3://bucket/prefix, ...)."),
        test: List[str] = typer.Option(..., "--test", help="Test store, a folder or a URI (repeat for several)."),
        out_dir: Path = typer.Option(Path("results/ablation"), "--out", "-o", help="Results folder."),
        studies: str = typer.Option("modality,distance,weights", "--studies", help="Comma-separated: modality, distance, weights."),
        weights: str = typer.Option("1:0,1:0.5,1:1,0.5:1,0:1", "--weights", help="w1:w2 pairs for the weights study."),
        compare: Optional[List[str]] = typer.Option(None, "--compare", help="NAME=TRAIN[,TRAIN...]:TEST[,TEST...] store set trained and tested with the default head (Figs. 6-8)."),
        baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="UniFD linear probe and nearest neighbour on I0."),
        imports: Optional[List[str]] = typer.Option(None, "--import", help="NAME=CSV of another detector's per-image scores (path,score)."),
        max_per_class: int = typer.Option(1000, "--max-per-class", min=1),
        seed: int = typer.Option(0, "--seed", help="Head and sampling seed."),
        epochs: int = typer.Option(50, "--epochs"),
        hidden: int = typer.Option(512, "--hidden"),
        batch_size: int = typer.Option(256, "--batch-size"),
    ) -> None:
        """Modality, distance and w1/w2 ablations, store-set comparisons and UniFD baselines, from stored embeddings."""
        from tidy_detect.errors import ConfigError
        from tidy_detect.evaluate.ablation import run_ablation

        try:
            grid = [tuple(float(v) for v in pair.split(":")) for pair in weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights takes w1:w2 pairs separated by commas, got {weights!r}") from None
        if any(len(pair) != 2 for pair in grid):
            raise ConfigError(f"--weights takes w1:w2 pairs separated by commas, got {weights!r}")
        sets = {}
        for spec in compare or []:
            name, sep, rest = spec.partition("=")
            between = re.search(r":(?!//)", rest)  # the ":" between the lists, not a URI's "scheme://"
            train_part, test_part = (rest[:between.start()], rest[between.end():]) if between else (rest, "")
            if not (sep and between and name and train_part and test_part):
                raise ConfigError(f"--compare takes NAME=TRAIN[,TRAIN]:TEST[,TEST], got {spec!r}")
            sets[name] = (train_part.split(","), test_part.split(","))
        run_ablation(train, test, out_dir, studies=[s.strip() for s in studies.split(",") if s.strip()],
                     weights=grid, compare=sets, baselines=baselines, imports=_parse_named(imports, "--import"),
                     max_per_class=max_per_class, seed=seed, epochs=epochs, hidden=hidden, batch_size=batch_size,
                     say=lambda m: err.print(f"• {m}", highlight=False))
        out.print((out_dir / "ablation.md").read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
        err.print(f"results in {out_dir}")

    @command(app, "report",
         example="tidy-detect report results/table1 results/robustness --out report.html")
    def report_cmd(
        folders: List[Path] = typer.Argument(..., help="Result folders of eval, robustness or ablate."),
        out_file: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
        title: str = typer.Option("tidy-detect report", "--title"),
    ) -> None:
        """One self-contained HTML report (tables, figures, configs) from result folders."""
        from tidy_detect.evaluate.report import build_report

        path = build_report(folders, out_file, title)
        out.print(f"report: {path}")

