"""``tidy-detect detect``: score images with a head and explain each score; the record formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tidy_detect.cli.app import app, command, err, out
from tidy_detect.cli.options import (AllowDtypeOpt, FailOnErrorOpt, NoSpeedupsOpt, extraction_progress)
from tidy_detect.cli.options import CaptionColumnOpt, GroupColumnOpt, ImageColumnOpt, INPUTS_HELP, LabelColumnOpt, source_options


FORMATS = ("table", "json", "jsonl", "csv")


@command(app, "detect",
         example="tidy-detect detect photos/ --head heads/tidy.safetensors --format table")
def detect_cmd(
    inputs: List[str] = typer.Argument(..., help=INPUTS_HELP),
    head: str = typer.Option(..., "--head", help="Head file (.safetensors) from `tidy-detect train` or `calibrate`, or a hub reference ORG/REPO (or ORG/REPO/FILE.safetensors, ORG/REPO@REVISION)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table, json, jsonl or csv (default: from --out, else table)."),
    threshold: float = typer.Option(0.5, "--threshold", help="p_fake above this is 'fake'."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results here instead of stdout."),
    save_store: Optional[str] = typer.Option(None, "--save-store", help="Keep the features in this store (a folder or a URI such as s3://bucket/prefix); images already in it are not extracted again."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Load the head's CLIP from here (same checkpoint)."),
    captioner_model: Optional[str] = typer.Option(None, "--captioner-model", help="Load the head's captioner from here."),
    grounder_model: Optional[str] = typer.Option(None, "--grounder-model", help="Load the head's grounder from here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (each model in the precision the head's features were made in), float32, bfloat16 or float16."),
    allow_dtype_mismatch: bool = AllowDtypeOpt,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per model batch."),
    workers: int = typer.Option(2, "--workers", min=0, help="Image decoding threads."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile CLIP's vision tower (pays off on large runs)."),
    cascade_head: Optional[str] = typer.Option(None, "--cascade-head", help="Fast path: a global-only head (train with --representation global) scores every image first; only uncertain ones get objects and the full head."),
    band: str = typer.Option("0.2,0.8", "--band", help="The cascade's uncertainty band LOW,HIGH on the global head's p_fake."),
    fail_on_error: bool = FailOnErrorOpt,
    no_speedups: bool = NoSpeedupsOpt,
    split: Optional[str] = typer.Option(None, "--split", help="The split of a datasets folder or hf-dataset: input that has several."),
    image_column: Optional[str] = ImageColumnOpt,
    label_column: Optional[str] = LabelColumnOpt,
    group_column: Optional[str] = GroupColumnOpt,
    caption_column: Optional[str] = CaptionColumnOpt,
    provenance_mode: Optional[str] = typer.Option(None, "--provenance", help="What each file declares about its origin, reported beside the score (never in it): full (metadata, C2PA, the Stable Diffusion watermark), metadata (no watermark) or off. Default: TIDY_DETECT_PROVENANCE, else full."),
    c2pa_trust: Optional[Path] = typer.Option(None, "--c2pa-trust", help="PEM file of root certificates a C2PA signer may chain to; only such signatures count as verified. Default: TIDY_DETECT_C2PA_TRUST_ANCHORS."),
) -> None:
    """Score images with a trained head and explain each score (caption, objects, discrepancies).

    Images that cannot be read get a record with their error; the others are scored. Exits 8 when
    no image was found or none could be scored (after writing the records), 9 with --fail-on-error
    when any could not.
    """
    from tidy_detect.data.selection import ItemStream
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
    from tidy_detect.provenance import ProvenanceOptions

    provenance = ProvenanceOptions.from_env(provenance_mode, c2pa_trust)
    # listed as it is read, never held: a folder of a million images costs no list of them
    items = ItemStream(inputs, source_options(image_column, label_column, group_column, caption_column), split)
    total = items.check()
    if not total:
        from tidy_detect.errors import NothingProcessedError

        raise NothingProcessedError(f"no images found in {', '.join(inputs)} (folders are searched for image "
                                    f"suffixes such as .jpg, .png, .webp)")
    detector = Detector.load(head, device=device, dtype=dtype, accept_dtype=allow_dtype_mismatch,
                             batch_size=batch_size, num_workers=workers,
                             threshold=threshold, compile=compile_, cascade_head=cascade_head, band=(low, high),
                             clip=clip, captioner_model=captioner_model, grounder_model=grounder_model,
                             speedups=not no_speedups, provenance=provenance)
    with RecordWriter(fmt, out_file) as records, extraction_progress("detecting") as progress:
        if save_store is not None:
            from tidy_detect.features.extractor import run_extraction
            from tidy_detect.features.store import FeatureStore

            store = FeatureStore.open_for_writing(save_store, detector.extractor.extraction, detector.extractor.dim,
                                                  accept_dtype=allow_dtype_mismatch)
            run_extraction(items, store, detector.extractor, progress=progress)
            for batch in detector.detect_stored(store, (item.path for item in items)):
                records.add(batch)
        else:
            from tidy_detect.features.extractor import ExtractionSummary

            summary = ExtractionSummary(total=total)
            progress(0, total, summary)  # the rate counts from here, not from the first batch
            for batch in detector.detect_items(items, summary):
                records.add(batch)
                progress(records.count, total, summary)
    if detector.cascade is not None:
        c = detector.cascade
        err.print(f"cascade: {c.escalated} of {c.images} images ({c.fraction_escalated:.1%}) were in the band "
                  f"{c.band[0]:g}-{c.band[1]:g} and got objects and the full head", highlight=False)
    check_records(records, fail_on_error)


def check_records(records: "RecordWriter", fail_on_error: bool) -> None:
    """The exit status of `detect`: 8 when nothing was scored, 9 for any error with --fail-on-error."""
    from tidy_detect.errors import InputsFailedError, NothingProcessedError

    if not records.count:
        raise NothingProcessedError("no images found in the inputs given (folders are searched for image "
                                    "suffixes such as .jpg, .png, .webp)")
    if records.errors == records.count:
        raise NothingProcessedError(f"none of the {records.count} images could be scored; first error: "
                                    f"{records.first_error}")
    if fail_on_error and records.errors:
        raise InputsFailedError(f"{records.errors} of the {records.count} images could not be scored (first: "
                                f"{records.first_error}) and --fail-on-error was given")


CSV_COLUMNS = ["path", "sha256", "p_fake", "label", "caption", "global_discrepancy", "n_objects", "top_object",
               "top_object_discrepancy", "objects", "error", "provenance_declares_ai", "provenance_verified",
               "provenance_summary", "provenance"]


class RecordWriter:
    """Detection records in one of FORMATS, written as they come.

    ``jsonl`` and ``csv`` go out a line per record and ``json`` as one array, a record at a time,
    to the file (or stdout), flushed after each batch: a folder of a million images never holds its
    records, and a run stopped half-way keeps every record scored so far (the array is closed even
    then). ``table`` is printed whole at the end, so it keeps its rows: it is for a screenful of
    images; use jsonl or csv for folders. Counts what the exit status and the closing lines need.
    """

    def __init__(self, fmt: str, out_file: Optional[Path]) -> None:
        self.fmt, self.out_file = fmt, out_file
        self.count = self.errors = self.fakes = self.declared = 0
        self.first_error: Optional[str] = None
        self.random_weights = False
        self._table_rows: list = []
        self._handle = None
        self._csv = None

    def __enter__(self) -> "RecordWriter":
        if self.fmt == "table":
            return self
        if self.out_file:
            self.out_file.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.out_file.open("w", encoding="utf-8", newline="")
        else:
            self._handle = sys.stdout
        if self.fmt == "csv":
            import csv

            self._csv = csv.writer(self._handle)
            self._csv.writerow(CSV_COLUMNS)
        elif self.fmt == "json":
            self._handle.write("[")
        return self

    def add(self, records: list) -> None:
        for r in records:
            self._count(r)
            if self.fmt == "table":
                self._table_rows.append(_table_row(r))
            elif self.fmt == "json":
                import textwrap

                self._handle.write(("\n" if self.count == 1 else ",\n") + textwrap.indent(json.dumps(r, indent=2), "  "))
            elif self.fmt == "jsonl":
                self._handle.write(json.dumps(r) + "\n")
            else:
                self._csv.writerow(_csv_row(r))
        if self._handle is not None:
            self._handle.flush()

    def _count(self, r: dict) -> None:
        self.count += 1
        if r["error"]:
            self.errors += 1
            self.first_error = self.first_error or r["error"]
        elif r["label"] == "fake":
            self.fakes += 1
        if (r.get("provenance") or {}).get("declares_ai") is True:
            self.declared += 1
        self.random_weights = self.random_weights or bool(r.get("random_weights"))

    def __exit__(self, *exc: object) -> None:
        if self.fmt == "table":
            self._print_table()
            return
        if self.fmt == "json":
            self._handle.write("\n]\n" if self.count else "]\n")
        if self.out_file:
            self._handle.close()
            err.print(f"wrote {self.count} records to {self.out_file}")
        else:
            self._handle.flush()

    def _print_table(self) -> None:
        table = Table(show_lines=False, title="[yellow]RANDOM-WEIGHT MODELS: verdicts are meaningless[/]"
                      if self.random_weights else None)
        for col in ("image", "verdict", "p_fake", "caption", "most telling object", "global", "provenance"):
            table.add_column(col, overflow="fold")
        for row in self._table_rows:
            table.add_row(*row)
        if self.out_file:
            self.out_file.parent.mkdir(parents=True, exist_ok=True)
            with self.out_file.open("w", encoding="utf-8") as handle:
                Console(file=handle, width=160).print(table)
        else:
            out.print(table)
        err.print(f"{self.count} images: {self.fakes} fake, {self.count - self.fakes - self.errors} real, "
                  f"{self.errors} errors")
        if self.declared:
            err.print(f"provenance: {self.declared} of {self.count} files declare generative AI in their own "
                      f"metadata (see --format json for the evidence; it is not part of the verdict)", highlight=False)
        if self.random_weights:
            err.print("[bold yellow]random weights:[/] these models are the tiny test bundle (or others with random "
                      "weights); the verdicts above mean nothing about the images", highlight=False)


def write_records(records: list, fmt: str, out_file: Optional[Path]) -> None:
    """Print or save detection records in one of FORMATS."""
    with RecordWriter(fmt, out_file) as writer:
        writer.add(records)


def _table_row(r: dict) -> tuple:
    from tidy_detect.detect import top_object
    from tidy_detect.provenance import short_label

    name = Path(r["path"]).name if not r["path"].startswith("<") else r["path"]
    origin = short_label(r.get("provenance"))
    if r["error"]:
        return (name, "[red]error", "-", r["error"], "", "", origin)
    top = top_object(r)
    verdict = "[red]fake" if r["label"] == "fake" else "[green]real"
    caption = r["caption"] if len(r["caption"]) <= 70 else r["caption"][:67] + "..."
    return (name, verdict, f"{r['p_fake']:.3f}", caption,
            f"{top['phrase']} ({top['discrepancy']:.3f})" if top else "-", f"{r['global_discrepancy']:.3f}", origin)


def _csv_row(r: dict) -> list:
    from tidy_detect.detect import top_object

    top = top_object(r)
    return [r["path"], r["sha256"] or "", "" if r["p_fake"] is None else r["p_fake"], r["label"] or "",
            r["caption"] or "", "" if r["global_discrepancy"] is None else r["global_discrepancy"],
            len(r["objects"]), top["phrase"] if top else "", top["discrepancy"] if top else "",
            json.dumps(r["objects"]), r["error"] or "", *_provenance_columns(r.get("provenance"))]


def _provenance_columns(provenance: Optional[dict]) -> list:
    """The CSV columns of a record's provenance: declares_ai and verified as true/false/empty, the
    summary, and the whole record as JSON."""
    if not provenance:
        return ["", "", "", ""]
    declares = provenance.get("declares_ai")
    return ["" if declares is None else str(declares).lower(), str(bool(provenance.get("verified"))).lower(),
            provenance.get("summary") or "", json.dumps(provenance)]
