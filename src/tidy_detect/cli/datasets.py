"""``tidy-detect datasets``: list the dataset layouts and inspect a dataset (any input kind).

The package adds the sub-app with ``register(app, command, out)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tidy_detect.cli.options import LayoutOpt, SplitOpt, ExcludeOpt, PairingOpt  # noqa: F401
from tidy_detect.cli.options import CaptionColumnOpt, GroupColumnOpt, ImageColumnOpt, LabelColumnOpt, source_options


def register(app: typer.Typer, command: Callable[..., Any], out: Console) -> typer.Typer:
    """Add the ``datasets`` sub-app to ``app``, its commands wrapped by ``command`` and printing to ``out``."""
    datasets_app = typer.Typer(help="Benchmark dataset layouts: list them, inspect a dataset.",
                               no_args_is_help=True)
    app.add_typer(datasets_app, name="datasets")

    @command(datasets_app, "layouts",
         example="tidy-detect datasets layouts")
    def layouts_cmd() -> None:
        """Show the dataset layouts --layout accepts and the trees they read."""
        from tidy_detect.data.layouts import LAYOUTS

        table = Table(title="dataset layouts (--layout NAME; auto tries them in this order)", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("reads", overflow="fold")
        table.add_column("options")
        for layout in LAYOUTS.values():
            options = ", ".join(f"--{o}" for o in sorted(layout.options)) or "-"
            table.add_row(layout.name, escape(layout.expects), options)
        out.print(table)

    @command(datasets_app, "inspect",
         example="tidy-detect datasets inspect DATA/GenImage --probe 200")
    def inspect_cmd(
        path: str = typer.Argument(..., help="Dataset folder, CSV manifest, zip/tar archive, WebDataset shards "
                                              "(shard-{0000..0099}.tar), Parquet/Arrow file, datasets folder or "
                                              "hf-dataset:ORG/NAME; local or behind s3://, gs://, hf://."),
        layout: str = LayoutOpt,
        split: Optional[str] = SplitOpt,
        exclude: Optional[List[Path]] = ExcludeOpt,
        pairing: Optional[List[str]] = PairingOpt,
        probe: int = typer.Option(0, "--probe", min=0, help="Open N files per class and group to read their "
                                                            "real format (default: file suffixes only)."),
        generator_metadata: int = typer.Option(0, "--generator-metadata", min=0, help="Read the metadata of N files "
                                               "per class and group and count those that declare a generator "
                                               "(C2PA, IPTC/XMP, web-UI text chunks, EXIF); warns when one class "
                                               "carries it far more than the other, a leak a detector can learn."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        image_column: Optional[str] = ImageColumnOpt,
        label_column: Optional[str] = LabelColumnOpt,
        group_column: Optional[str] = GroupColumnOpt,
        caption_column: Optional[str] = CaptionColumnOpt,
    ) -> None:
        """Print the detected layout and, per group, real/fake counts and file formats; warn about format bias."""
        from tidy_detect.data.inspect import inspect_listings
        from tidy_detect.data.layouts import dataset_roots, open_dataset, parse_pairing

        roots = dataset_roots([path])
        pairs = parse_pairing(pairing or []) or None
        options = source_options(image_column, label_column, group_column, caption_column)

        def open_listings() -> list[Any]:  # walked, not held: a million-file tree costs no list
            return [open_dataset(root, layout, split=split, exclude=exclude or None, pairing=pairs, options=options)
                    for root in roots]

        report, chosen = inspect_listings(open_listings, path, probe=probe, metadata=generator_metadata)
        if generator_metadata:
            apply_generator_metadata(report, chosen, generator_metadata)
        if as_json:
            out.print_json(json.dumps(report))
            return
        print_report(report, out)

    return datasets_app


def apply_generator_metadata(report: dict[str, Any], chosen: list[Any], per_cell: int) -> None:
    """Add, per group, the counts of :func:`tidy_detect.provenance.count_generator_metadata` on
    the ``chosen`` items (up to ``per_cell`` per group and class, see
    :func:`tidy_detect.data.inspect.inspect_listings`) to an inspect report, and its warnings to
    the report's warnings. (The dataset code never reads provenance: evaluation must not depend on
    it, so the command line joins the two.)"""
    from tidy_detect.provenance import count_generator_metadata

    counts = count_generator_metadata(chosen)
    for group, entry in report["groups"].items():
        if group in counts["groups"]:
            entry["generator_metadata"] = counts["groups"][group]
    report["generator_metadata_checked"] = per_cell
    report["warnings"].extend(counts.get("warnings", []))


def print_report(report: dict[str, Any], out: Console) -> None:
    """The human-readable form of :func:`tidy_detect.data.inspect.inspect_dataset`'s report."""
    split = f", split {report['split']}" if report["split"] else ""
    out.print(f"[bold]{escape(report['root'])}[/] ({escape(report.get('container', 'folder'))}): layout "
              f"[bold]{report['layout']}[/]{split}; {report['items']} items, "
              f"{report['files']} files ({report['shared_files']} listed under several groups)",
              highlight=False, soft_wrap=True)
    probed = any("probed" in g for g in report["groups"].values())
    table = Table(title="groups", title_justify="left")
    for col in ("group", "real", "fake", "reals from", "real formats", "fake formats"):
        table.add_column(col, justify="right" if col in ("real", "fake") else "left")
    for name, group in report["groups"].items():
        formats = group["probed"] if probed else group["formats"]
        table.add_row(escape(name), str(group["real"]), str(group["fake"]),
                      escape(group["reals_from"]) if group["reals_from"] != name else "(own)",
                      _formats(formats.get("real", {})), _formats(formats.get("fake", {})))
    out.print(table)
    if probed:
        out.print("formats read from the files' headers (--probe); suffixes are in --json")
    if "generator_metadata_checked" in report:
        meta = Table(title=f"generator metadata ({report['generator_metadata_checked']} files per class read)",
                     title_justify="left")
        for col in ("group", "class", "checked", "with metadata", "declares AI", "generators"):
            meta.add_column(col, justify="right" if col in ("checked", "with metadata", "declares AI") else "left")
        for name, group in report["groups"].items():
            for cls, c in (group.get("generator_metadata") or {}).items():
                gens = ", ".join(f"{g} {n}" for g, n in sorted(c.get("generators", {}).items())) or "-"
                meta.add_row(escape(name), cls, str(c["checked"]), str(c["with_metadata"]), str(c["declares_ai"]),
                             escape(gens))
        out.print(meta)
    if report["skipped"]:
        out.print("skipped: " + escape(", ".join(f"{n} {reason}" for reason, n in report["skipped"].items())),
                  highlight=False)
    for note in report["notes"]:
        out.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    for warning in report["warnings"]:
        out.print(f"[yellow]warning:[/] {escape(warning['message'])}", highlight=False, soft_wrap=True)


def _formats(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{fmt} {n / total:.0%}" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"
