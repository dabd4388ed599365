"""``tidy-detect models``: list, make-tiny, verify."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from tidy_detect.cli.app import command, err, models_app, out
from tidy_detect.cli.options import (CaptionerModelOpt, CaptionerOpt, ClipOpt, DeviceOpt, DtypeOpt, GrounderModelOpt, GrounderOpt, NoSpeedupsOpt, PresetOpt, build_extraction_config)


@command(models_app, "list",
         example="tidy-detect models list --format json")
def models_list(
    fmt: str = typer.Option("table", "--format", "-f", help="table, or json (every id in full, for scripts)."),
) -> None:
    """Show registered captioners, grounders, CLIP aliases and presets."""
    from tidy_detect.config import builtin_presets, preset_description
    from tidy_detect.errors import ConfigError
    from tidy_detect.models.registry import CAPTIONERS, CLIP_ALIASES, GROUNDERS, ensure_registered

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json, got {fmt!r}")
    ensure_registered()
    listing = {
        kind: [{"name": c.name, "default_checkpoint": c.default_model, "model_types": list(c.model_types),
                "description": c.description} for c in registry.components()]
        for kind, registry in (("captioners", CAPTIONERS), ("grounders", GROUNDERS))}
    listing["clip_aliases"] = dict(CLIP_ALIASES)
    listing["presets"] = {name: preset_description(path) for name, path in builtin_presets().items()}
    if fmt == "json":
        sys.stdout.write(json.dumps(listing, indent=2) + "\n")
        return

    def table(title: str, *columns: str) -> Table:
        # Ids fold onto a second line rather than being cut, also in a pipe's 80 columns.
        t = Table(title=title, title_justify="left")
        for k, column in enumerate(columns):
            t.add_column(column, style="bold" if k == 0 else None, overflow="fold")
        return t

    for kind, flag in (("captioners", "--captioner"), ("grounders", "--grounder")):
        t = table(f"{kind} ({flag})", "name", "default checkpoint", "handles model_type", "what")
        for c in listing[kind]:
            t.add_row(c["name"], c["default_checkpoint"] or "-", ", ".join(c["model_types"]) or "-", c["description"])
        out.print(t)
    t = table("CLIP (--clip): any Hugging Face CLIP checkpoint; aliases", "alias", "hub id")
    for alias, hub_id in listing["clip_aliases"].items():
        t.add_row(alias, hub_id)
    out.print(t)
    t = table("presets (--preset NAME or a TOML file)", "name", "what")
    for name, description in listing["presets"].items():
        t.add_row(name, description)
    out.print(t)


@command(models_app, "make-tiny",
         example="tidy-detect models make-tiny tiny-models")
def models_make_tiny(
    directory: Path = typer.Argument(..., help="Folder to build the bundle in."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the folder holds a bundle."),
) -> None:
    """Build tiny random-weight versions of every model (no network) and DIR/tiny.toml."""
    from tidy_detect.models.tiny import make_tiny_bundle

    preset = make_tiny_bundle(directory, seed=seed, overwrite=force)
    out.print(f"tiny bundle ready: {directory}\npreset: {preset}  (use --preset {preset})")


@command(models_app, "verify",
         example="tidy-detect models verify --preset paper")
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
    no_speedups: bool = NoSpeedupsOpt,
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
                                     dtype, None, None, speedups=False if no_speedups else None)
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
