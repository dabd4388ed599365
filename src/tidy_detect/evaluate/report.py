"""One self-contained HTML report from result folders (eval, robustness, ablate).

Tables come from each folder's JSON, figures are embedded as base64 PNG, and the configs that
produced the numbers (head metadata, stores' extraction configs, sampling) are included as
key/value tables, so the file can be mailed or archived on its own.

Made to be read at a glance: a wide table scrolls inside its own box (the page itself never
scrolls sideways), every figure has a "how to read this" line, and a banner at the top says when
a head or store behind the numbers was made with random-weight models (the tiny test bundle),
whose numbers mean nothing.
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
# Wide tables scroll inside .table-wrap (overflow-x:auto, max-width:100%) so the page never scrolls
# sideways; long words (store paths, digests) break anywhere outside the data tables.
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}h3{margin-top:1.6rem}
h1,h2,h3,p,li,summary,figcaption{overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%;margin:.6rem 0}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}td{background:#fff}tr:nth-child(even) td{background:#fafafa}
.table-wrap>table th:first-child,.table-wrap>table td:first-child{position:sticky;left:0;box-shadow:1px 0 0 #ccc}
.missing{color:#999;font-style:italic}img{max-width:100%;border:1px solid #eee;margin:.4rem 0}
figure{margin:1rem 0}figcaption{max-width:60rem}.how{color:#333;font-size:.85rem;margin:.1rem 0}
details{margin:.5rem 0}summary{cursor:pointer}
table.kv{font-size:.8rem;margin:.3rem 0}table.kv th,table.kv td{text-align:left;vertical-align:top;white-space:normal;overflow-wrap:anywhere}
table.kv th{background:#f7f7f7;font-weight:600;white-space:nowrap}table.kv table.kv{margin:0;width:100%}
table.kv tr:nth-child(even) td{background:none}
.note{color:#555;font-size:.85rem}
.random-weights{border:2px solid #b26a00;background:#fff4de;color:#4a2f00;border-radius:6px;padding:.6rem 1rem;margin:1rem 0}
.random-weights ul{margin:.3rem 0 0;padding-left:1.2rem;font-size:.85rem}
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
    """A data table (cells already HTML) in its own horizontally scrolling box."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='table-wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _image(path: Path, alt: str) -> str:
    from tidy_detect.evaluate.plots import how_to_read

    data = base64.b64encode(path.read_bytes()).decode()
    how = how_to_read(path)
    reading = f"<p class='how'>{_e(how)}</p>" if how else ""
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{reading}<span class="note">{_e(alt)}</span></figcaption></figure>')


# A list of plain values longer than this is shown as its first items and a count.
_LIST_SHOWN = 24


def _value_html(value: Any) -> str:
    """A config value as HTML: nested dicts as nested key/value tables, lists of plain values on one line."""
    if isinstance(value, dict):
        return _kv_table(value) if value else '<span class="missing">(none)</span>'
    if isinstance(value, (list, tuple)):
        if not value:
            return '<span class="missing">(none)</span>'
        if all(isinstance(v, dict) for v in value):
            return "".join(_kv_table(v) for v in value)
        shown = ", ".join(_plain(v) for v in value[:_LIST_SHOWN])
        more = f" … ({len(value)} in all)" if len(value) > _LIST_SHOWN else ""
        return _e(shown + more)
    if value is None:
        return '<span class="missing">–</span>'
    return _e(_plain(value))


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _inline(value: Any) -> str:
    """A small config inline, for a sentence: ``key: value, key (key: value, ...)``."""
    if isinstance(value, dict):
        return ", ".join(f"{key} ({_inline(item)})" if isinstance(item, dict) and item else f"{key}: {_inline(item)}"
                         for key, item in value.items()) or "(none)"
    return _plain(value) if value is not None else "–"


def _kv_table(data: dict[str, Any]) -> str:
    """Key/value rows, one per key, in the recorded order; nested dicts nest."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in data.items())
    return f"<table class='kv'><tbody>{rows}</tbody></table>"


def _config_block(title: str, data: Any) -> str:
    body = _kv_table(data) if isinstance(data, dict) and data else _value_html(data)
    return f"<details><summary>{_e(title)}</summary><div class='table-wrap'>{body}</div></details>"


# -- random weights ------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # moved or deleted since: the report is still written
    return data if isinstance(data, dict) else None


def _head_metadata(head: str) -> dict[str, Any] | None:
    """A head's metadata: its ``.json`` twin, else the head file's own header (a head from the hub
    cache has no twin); None when neither can be read any more."""
    meta = _read_json(Path(head).with_suffix(".json"))
    if meta is not None:
        return meta
    from tidy_detect.errors import TidyError
    from tidy_detect.head import read_metadata

    try:
        return read_metadata(head, pipeline=False)
    except TidyError:
        return None


def _recorded_extractions(kind: str, folder: Path, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what, extraction config) of every head and store a result names that can still be read."""
    heads: list[str] = []
    stores: list[str] = []
    if kind == "evaluation":
        info = data.get("info", {})
        heads, stores = list(info.get("heads", [])), list(info.get("stores", []))
    elif kind == "robustness":
        heads = [data["head"]] if data.get("head") else []
        stores = list((data.get("stores") or {}).values())
    elif kind == "ablation":
        stores = [*data.get("train", []), *data.get("test", [])]
        for block in (data.get("compare") or {}).values():
            stores += [*block.get("train", []), *block.get("test", [])]
        heads = [str(p.with_suffix(".safetensors")) for p in sorted((folder / "heads").glob("*.json"))]
    found = []
    for head in dict.fromkeys(map(str, heads)):
        meta = _head_metadata(head)
        if meta and isinstance(meta.get("extraction"), dict):
            found.append((f"head {head}", meta["extraction"]))
    for store in dict.fromkeys(map(str, stores)):
        config = _read_json(Path(store) / "config.json")
        if config and isinstance(config.get("extraction"), dict):
            found.append((f"store {store}", config["extraction"]))
    return found


def random_weight_sources(kind: str, folder: str | Path, data: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The heads and stores behind one result that were made with random-weight models, with the
    roles ("clip", "captioner", "grounder") that had them (``random_weights: true`` as recorded by
    the models' ``describe()``)."""
    from tidy_detect.detect import random_weight_models

    return [(what, roles) for what, extraction in _recorded_extractions(kind, Path(folder), data)
            if (roles := random_weight_models(extraction))]


_RANDOM_SHOWN = 12


def _random_banner(found: list[tuple[str, list[str]]]) -> str:
    items = "".join(f"<li>{_e(what)}: {_e(', '.join(roles))}</li>" for what, roles in found[:_RANDOM_SHOWN])
    if len(found) > _RANDOM_SHOWN:
        items += f"<li>… and {len(found) - _RANDOM_SHOWN} more</li>"
    return ("<div class='random-weights' role='alert'><strong>Random weights: these numbers mean nothing.</strong> "
            "Heads or stores in these results were made with models with random weights (the tiny test bundle of "
            "<code>tidy-detect models make-tiny</code>); they test the code paths, not the method. Extract with "
            f"real models to get real numbers.<ul>{items}</ul></div>")


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
             f"{_e(_inline(info.get('sampling')))}. Threshold {_e(data.get('threshold'))}"
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
    from tidy_detect.evaluate.evaluation import one_class_note

    for name, summary in (info.get("one_class") or {}).items():
        parts.append(f"<p class='note'>{_e(one_class_note(name, summary))}. Its p_fake is 0.5 at that threshold "
                     f"and ranks images, but no fake image set it: read its real ACC against the target.</p>")
    header = ["group", "real", "fake", "ACC", "real ACC", "fake ACC", "AP", "AUC"]
    for name, groups in data["groups"].items():
        parts.append(f"<h3>Per group: {_e(name)} (%)</h3>")
        parts.append(_table(header, _group_rows(groups, data["mean"].get(name, {}))))
    for png in sorted(folder.rglob("*.png")):
        parts.append(_image(png, str(png.relative_to(folder))))
    for head in info.get("heads", []):
        meta = _head_metadata(head)
        if meta is not None:
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
             f"head options: {_e(_inline(data.get('head')))}; sampling: {_e(_inline(data.get('sampling')))}. "
             "AP (%).</p>"]
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
    random_found: list[tuple[str, list[str]]] = []
    for folder in map(Path, folders):
        found = [(name, kind) for name, kind in KINDS.items() if (folder / name).is_file()]
        if not found:
            raise InputError(f"{folder}: not a results folder (no {', '.join(KINDS)}); make one with "
                             f"`tidy-detect eval`, `robustness` or `ablate`")
        for name, kind in found:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            found = random_weight_sources(kind, folder, data)
            random_found += [f for f in found if f not in random_found]
            note = ("<p class='random-weights'>Made with random-weight models (see the top of the page): "
                    "the numbers below mean nothing.</p>") if found else ""
            sections.append(f"<h2>{_e(kind.capitalize())}: {_e(folder)}</h2>\n{note}{RENDERERS[kind](folder, data)}")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class='note'>Generated {stamp} by tidy-detect {__version__}.</p>"
            f"{_random_banner(random_found) if random_found else ''}{''.join(sections)}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
