"""One self-contained HTML report from result folders (eval, robustness, ablate).

Tables come from each folder's JSON, figures are embedded as base64 PNG, and the configs that
produced the numbers (head metadata, stores' extraction configs, sampling) are included, so the
file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any, Sequence

from tidy_detect.errors import InputError

KINDS = {"metrics.json": "evaluation", "robustness.json": "robustness", "ablation.json": "ablation"}
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}h3{margin-top:1.6rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.missing{color:#999;font-style:italic}img{max-width:100%;border:1px solid #eee;margin:.4rem 0}
details{margin:.5rem 0}pre{background:#f6f6f6;padding:.6rem;overflow:auto;font-size:.75rem;max-height:30rem}
.note{color:#555;font-size:.85rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: Any) -> str:
    if value is None:
        return '<span class="missing">–</span>'
    if isinstance(value, (int, float)):
        return f"{value * 100:.2f}"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"><figcaption class="note">{_e(alt)}</figcaption></figure>'


def _config_block(title: str, data: Any) -> str:
    return f"<details><summary>{_e(title)}</summary><pre>{_e(json.dumps(data, indent=2))}</pre></details>"


def _group_rows(groups: dict[str, dict[str, Any]], mean: dict[str, Any]) -> list[list[str]]:
    rows = []
    for group, m in [*sorted(groups.items()), ("mean", mean)]:
        rows.append([_e(group), _e(m.get("n_real", "")), _e(m.get("n_fake", "")),
                     *[_pct(m.get(k)) for k in ("acc", "real_acc", "fake_acc", "ap", "auc")]])
    return rows


def _evaluation(folder: Path, data: dict[str, Any]) -> str:
    from tidy_detect.evaluate.evaluation import load_suite

    info = data.get("info", {})
    parts = [f"<p class='note'>Stores: {_e(', '.join(info.get('stores', [])))}. Sampling: "
             f"{_e(info.get('sampling'))}. Threshold {_e(data.get('threshold'))}"
             + (f"; calibrated threshold {_e(data.get('calibrated_threshold'))}" if data.get("calibrated_threshold") else "")
             + ".</p>"]
    suite_name = info.get("suite")
    if suite_name:
        suite = load_suite(suite_name)
        resolved = info.get("suite_columns")
        if resolved:  # what evaluation resolved, with --column choices and the stores' datasets
            columns = [(label, entry.get("group")) for label, entry in resolved.items()]
        else:  # results written before columns were recorded
            columns = suite.match(sorted({g for t in data["groups"].values() for g in t}))
        for metric in suite.metrics:
            rows = []
            for name, table in data["groups"].items():
                cells = ['<span class="missing">missing</span>' if g is None else _pct(table.get(g, {}).get(metric))
                         for _, g in columns]
                present = [table[g][metric] for _, g in columns if g and table.get(g, {}).get(metric) is not None]
                avg = _pct(sum(present) / len(present)) if present else _pct(None)
                rows.append([_e(name), *cells, avg])
            parts.append(f"<h3>{_e(suite.description or suite.name)}: {metric.upper()} (%)</h3>")
            parts.append(_table(["detector", *[c for c, _ in columns], "Avg."], rows))
        if resolved:
            filled = "; ".join(f"{label}: {entry.get('group') or 'missing'}"
                               + (f" ({', '.join(entry['datasets'])})" if entry.get("datasets") else "")
                               for label, entry in resolved.items())
            parts.append(f"<p class='note'>Columns filled by: {_e(filled)}.</p>")
    header = ["group", "real", "fake", "ACC", "real ACC", "fake ACC", "AP", "AUC"]
    for name, groups in data["groups"].items():
        parts.append(f"<h3>Per group: {_e(name)} (%)</h3>")
        parts.append(_table(header, _group_rows(groups, data["mean"].get(name, {}))))
    for png in sorted(folder.rglob("*.png")):
        parts.append(_image(png, str(png.relative_to(folder))))
    for head in info.get("heads", []):
        meta_path = Path(head).with_suffix(".json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            parts.append(_config_block(f"head {head}: representation, head options, training data, extraction config",
                                       {k: meta.get(k) for k in ("representation", "head", "training", "metrics",
                                                                 "extraction", "package_version")}))
    parts.append(_config_block("evaluation settings", info))
    return "\n".join(parts)


def _robustness(folder: Path, data: dict[str, Any]) -> str:
    header = ["perturbation", "level", "AP", "ACC", "real ACC", "fake ACC"]
    rows = []
    if data.get("clean"):
        c = data["clean"]
        rows.append(["clean", "", *[_pct(c.get(k)) for k in ("ap", "acc", "real_acc", "fake_acc")]])
    for kind, points in data.get("perturbations", {}).items():
        for p in points:
            rows.append([_e(kind), _e(f"{p['level']:g}"), *[_pct(p.get(k)) for k in ("ap", "acc", "real_acc", "fake_acc")]])
    parts = [f"<p class='note'>Head {_e(data.get('head'))}; {_e(data.get('images'))} images; mean over groups.</p>",
             _table(header, rows)]
    for png in sorted(folder.glob("*.png")):
        parts.append(_image(png, png.name))
    parts.append(_config_block("stores", data.get("stores")))
    return "\n".join(parts)


def _ablation(folder: Path, data: dict[str, Any]) -> str:
    parts = [f"<p class='note'>Train: {_e(', '.join(data.get('train', [])))}; test: {_e(', '.join(data.get('test', [])))}; "
             f"head options {_e(data.get('head'))}; sampling {_e(data.get('sampling'))}. AP (%).</p>"]
    blocks = [*data.get("studies", {}).items()]
    if data.get("baselines"):
        blocks.append(("baselines", data["baselines"]))
    if data.get("compare"):
        blocks.append(("compare", data["compare"]))
    for title, block in blocks:
        groups = sorted({g for r in block.values() for g in r["groups"]})
        rows = [[_e(name), *[_pct(r["groups"].get(g, {}).get("ap")) for g in groups], _pct(r["mean"].get("ap"))]
                for name, r in block.items()]
        parts += [f"<h3>{_e(title)}</h3>", _table(["variant", *groups, "mean"], rows)]
        png = folder / f"ablation_{title}.png"
        if png.is_file():
            parts.append(_image(png, png.name))
    return "\n".join(parts)


RENDERERS = {"evaluation": _evaluation, "robustness": _robustness, "ablation": _ablation}


def build_report(folders: Sequence[str | Path], out: str | Path, title: str = "tidy-detect report") -> Path:
    """Write one HTML file covering every result folder given.

    Raises:
        InputError: a folder that holds none of metrics.json, robustness.json, ablation.json.
    """
    from tidy_detect import __version__

    sections = []
    for folder in map(Path, folders):
        found = [(name, kind) for name, kind in KINDS.items() if (folder / name).is_file()]
        if not found:
            raise InputError(f"{folder}: not a results folder (no {', '.join(KINDS)}); make one with "
                             f"`tidy-detect eval`, `robustness` or `ablate`")
        for name, kind in found:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            sections.append(f"<h2>{_e(kind.capitalize())}: {_e(folder)}</h2>\n{RENDERERS[kind](folder, data)}")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class='note'>Generated {stamp} by tidy-detect {__version__}.</p>{''.join(sections)}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
