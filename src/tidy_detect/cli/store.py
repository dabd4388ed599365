"""``tidy-detect store``: inspect and compact feature stores."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from tidy_detect.cli.app import command, out, store_app


@command(store_app, "info",
         example="tidy-detect store info stores/progan-train")
def store_info(
    store: str = typer.Argument(..., help="Feature store: a folder or a URI (s3://bucket/prefix, gs://, hf://, file://)."),
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
    out.print(f"  shards: {fs.shards_uri} ({len(fs.shards())} Parquet files)", highlight=False)
    if summary["error_kinds"]:
        out.print(f"  errors by kind: {summary['error_kinds']}")
    table = Table(title="groups", title_justify="left")
    table.add_column("group")
    table.add_column("rows", justify="right")
    for group, count in sorted(summary["groups"].items(), key=lambda kv: str(kv[0])):
        table.add_row(str(group), str(count))
    out.print(table)


@command(store_app, "compact",
         example="tidy-detect store compact stores/progan-train")
def store_compact(store: str = typer.Argument(..., help="Feature store: a folder or a URI (s3://bucket/prefix, ...).")) -> None:
    """Merge small shards into larger ones (safe to interrupt)."""
    from tidy_detect.features.store import FeatureStore

    merged = FeatureStore(store).compact()
    out.print(f"merged {merged} shards")
