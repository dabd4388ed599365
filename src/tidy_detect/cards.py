"""Model cards: the README.md a hub repository shows for a head, ready for ``hf upload``.

YAML front matter the hub reads (``library_name``, ``tags``, ``license``, ``base_model``,
``pipeline_tag``), built with ``huggingface_hub.ModelCardData``; then what the head is, how to use
it, its training data, its extraction config, its metrics and its limits, all from the head's own
metadata (plus an evaluation's ``metrics.json`` if given). Local model folders and store paths
appear by their last name only: a card is written to be published.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from tidy_detect.errors import ConfigError, InputError
from tidy_detect.sharing import DEFAULT_FILENAME, LIBRARY_NAME, resolve_head

CARD_TAGS = ("tidy-detect", "ai-generated-image-detection", "image-forensics", "clip")


def _hub_id(source: Any) -> str | None:
    """``source`` when it is a hub model id (``owner/name``), not a local folder."""
    if not isinstance(source, str) or source.startswith(("/", ".", "~")) or source.count("/") != 1 \
            or Path(source).exists():
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _model_name(source: Any) -> str:
    """A model source as a card may show it: a hub id as it is, a local folder by its name only
    (its full path says nothing to a reader and may be private)."""
    if source is None:
        return "none"
    return _hub_id(source) or f"a local folder named {Path(str(source)).name!r}"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) or value != value else f"{value * 100:.2f}"


def read_eval_metrics(path: str | Path) -> dict[str, Any]:
    """An evaluation's ``metrics.json`` (from ``tidy-detect eval``), checked for what a card uses.

    Raises:
        InputError: unreadable, not JSON, or not an evaluation's metrics.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the evaluation metrics ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(f"{path}: the evaluation metrics are not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != "evaluation" or not isinstance(data.get("groups"), dict) \
            or not isinstance(data.get("mean"), dict):
        raise InputError(f"{path}: not the metrics.json of `tidy-detect eval` (it needs kind \"evaluation\", "
                         f"groups and mean); pass RESULTS/metrics.json of an eval run")
    return data


def _front_matter(meta: dict[str, Any], license: str, kind: str) -> Any:
    from huggingface_hub import ModelCardData

    extraction = meta.get("extraction") or {}
    sources = [(extraction.get(role) or {}).get("source") for role in ("clip", "captioner", "grounder")]
    bases = [b for b in map(_hub_id, sources) if b]
    tags = [*CARD_TAGS, *(["one-class", "training-free"] if kind == "one-class" else [])]
    return ModelCardData(library_name=LIBRARY_NAME, license=license, tags=tags, pipeline_tag="image-classification",
                         base_model=list(dict.fromkeys(bases)) or None)


_SCORES = {
    "global": "1 − cos(image embedding, caption embedding), the dissimilarity real images show less of than "
              "generated ones",
    "local": "the distance between each grounded object's crop and its phrase, averaged over the caption's objects",
    "both": "the global and the objects' distances together",
}


def _describe(meta: dict[str, Any], kind: str) -> list[str]:
    rep = meta.get("representation") or {}
    head = meta["head"]
    if kind == "one-class":
        return [
            "A **training-free, one-class** detector: it saw no generated image. Its score is the discrepancy "
            f"between an image and its caption in CLIP space (`{rep.get('kind')}`: "
            f"{_SCORES.get(rep.get('kind'), '')}), "
            f"and its threshold was set on {head['calibration_rows']} real images only, for a false-positive rate of "
            f"{head['fpr']:.2%} on real images like those.",
            "",
            f"`p_fake` is 0.5 exactly at the threshold ({head['threshold']:.6g}) and grows with the discrepancy; it "
            "ranks images but is not a calibrated probability.",
        ]
    return [
        "A two-layer MLP head (TIDY) over the image–text discrepancy representation "
        f"`{rep.get('kind')}` (w1 = {rep.get('w1')}, w2 = {rep.get('w2')}, L2-normalised embeddings: "
        f"{rep.get('normalize')}), {head.get('n_features')} → {head.get('hidden')} → 2, trained "
        f"{head.get('epochs')} epochs (AdamW, lr {head.get('lr')}, weight decay {head.get('weight_decay')}, "
        f"seed {head.get('seed')}). `p_fake = softmax(logits)[1]`; images with `p_fake > 0.5` are called fake.",
    ]


def _training_section(meta: dict[str, Any], kind: str) -> list[str]:
    training = meta.get("training") or {}
    data = training.get("data") or {}
    if not data:
        return ["The head records no training data summary."]
    stores = [Path(str(s)).name for s in data.get("stores", [])]
    lines = [f"Feature stores: {', '.join(f'`{s}`' for s in stores) or 'not recorded'}."]
    groups = data.get("groups") or {}
    if groups:
        rows = [[g, c.get("real", 0), c.get("fake", 0)] for g, c in sorted(groups.items())]
        rows.append(["**all**", data.get("real", 0), data.get("fake", 0)])
        header = ["group", "real", "fake (ignored)" if kind == "one-class" else "fake"]
        lines += ["", _table(header, rows)]
    skipped = [f"{data.get('skipped_errors', 0)} rows with errors",
               f"{data.get('skipped_unlabeled', 0)} without a label"]
    if kind == "one-class":
        skipped.append(f"{data.get('fake', 0)} fake rows ignored")
    lines += ["", "Skipped: " + ", ".join(skipped) + f"; {data.get('without_objects', 0)} rows had no grounded "
              "object (their local distance is the global one)."]
    calibration = training.get("calibration")
    if kind == "one-class" and isinstance(calibration, dict):
        lines += ["", f"The real rows were split by content hash (seed {calibration.get('seed')}): "
                      f"{calibration.get('calibration_rows')} set the threshold, {calibration.get('held_out_rows')} "
                      "were held out to measure the false-positive rate it reaches."]
    return lines


def _settings(section: dict[str, Any], names: dict[str, str]) -> str:
    """The recorded settings of one model, those that are set, as ``label value`` pairs."""
    shown = [f"{label} {section[key]!r}" if key == "prompt" else f"{label} {section[key]}"
             for key, label in names.items() if section.get(key) not in (None, "")]
    return ", ".join(shown) or "–"


def _extraction_section(meta: dict[str, Any]) -> list[str]:
    ex = meta.get("extraction") or {}
    clip, cap, grd, phr = (ex.get(k) or {} for k in ("clip", "captioner", "grounder", "phrases"))
    rows = [
        ["CLIP", _model_name(clip.get("source")),
         _settings(clip, {"dim": "dim", "global_view": "view", "view_size": "view size", "dtype": "dtype"}),
         clip.get("weights")],
        ["captioner", f"{cap.get('name')} ({_model_name(cap.get('source'))})",
         _settings(cap, {"max_tokens": "max tokens", "num_beams": "beams", "dtype": "dtype", "prompt": "prompt"}),
         cap.get("weights")],
        ["grounder", f"{grd.get('name')} ({_model_name(grd.get('source'))})",
         _settings(grd, {"box_threshold": "box threshold", "text_threshold": "text threshold",
                         "grounding_rule": "rule", "min_box_size": "min box", "dtype": "dtype"}), grd.get("weights")],
        ["phrases", f"spaCy {phr['spacy_model']}" if phr.get("spacy_model") else "spaCy",
         _settings(phr, {"max_objects": "max objects", "spacy_version": "spaCy version"}), None],
    ]
    return ["Detection runs these models and settings again; `tidy-detect` refuses others (a model's weights are "
            "checked by fingerprint).", "", _table(["part", "model", "settings", "weights fingerprint"], rows),
            "", f"Extraction fingerprint: `{meta.get('fingerprint')}`."]


def _metrics_section(meta: dict[str, Any], kind: str, evaluation: Mapping[str, Any] | None, name: str) -> list[str]:
    lines: list[str] = []
    recorded = meta.get("metrics") or {}
    if kind == "one-class" and recorded:
        rows = []
        for split in ("calibration", "held_out"):
            m = recorded.get(split) or {}
            if m:
                ci = m.get("fpr_ci")
                rows.append([split.replace("_", "-"), m.get("n"), _pct(m.get("fpr")),
                             f"{_pct(ci[0])}–{_pct(ci[1])}" if isinstance(ci, list) and len(ci) == 2 else "–"])
        if rows:
            lines += ["False-positive rate on real images (%), target "
                      f"{_pct(meta['head']['fpr'])}:", "", _table(["real rows", "n", "FPR", "95% interval"], rows)]
    elif recorded:
        rows = [[split, m.get("n"), _pct(m.get("acc")), _pct(m.get("real_acc")), _pct(m.get("fake_acc")),
                 _pct(m.get("ap"))] for split, m in recorded.items() if isinstance(m, dict)]
        lines += ["Recorded at training (%):", "", _table(["split", "n", "ACC", "real ACC", "fake ACC", "AP"], rows)]
    if evaluation is not None:
        info = evaluation.get("info") or {}
        groups = sorted({g for table in evaluation["groups"].values() for g in table})
        stores = [Path(str(s)).name for s in info.get("stores", [])]
        lines += ["", f"Evaluation (`tidy-detect eval` on {', '.join(f'`{s}`' for s in stores) or 'its stores'}; "
                      f"at most {(info.get('sampling') or {}).get('max_per_class')} images per class and group, "
                      f"threshold {evaluation.get('threshold')}):"]
        for metric, title in (("ap", "AP"), ("acc", "ACC")):
            rows = []
            for detector, table in evaluation["groups"].items():
                label = f"**{detector}** (this head)" if detector == name else detector
                rows.append([label, *[_pct((table.get(g) or {}).get(metric)) for g in groups],
                             _pct((evaluation["mean"].get(detector) or {}).get(metric))])
            lines += ["", f"{title} (%):", "", _table(["detector", *groups, "mean"], rows)]
    return lines or ["No metrics are recorded; evaluate the head with `tidy-detect eval` and pass its metrics.json "
                     "with `--metrics`."]


def _limitations(kind: str, random: list[str]) -> list[str]:
    lines = [
        "- Intended for screening and research: a score is evidence to weigh, not proof. Decide nothing about a "
        "person or a publication from it alone.",
        "- Accuracy holds for images like those it was trained or calibrated on. New generators, heavy compression, "
        "resizing, crops and screenshots move the scores; measure on your own data (`tidy-detect eval`, "
        "`tidy-detect robustness`) before relying on it.",
        "- The verdict depends on the caption: a captioner that describes an image badly raises its discrepancy, "
        "real or not.",
    ]
    if kind == "one-class":
        lines.append("- The false-positive rate is set on real images only; how many generated images it catches "
                     "was not part of calibration and must be measured.")
    if random:
        lines.insert(0, f"- **Made with random-weight models ({', '.join(random)}): its scores mean nothing.** It "
                        f"tests software, not detection.")
    return lines


def model_card(head: str | Path, out: str | Path, *, metrics: str | Path | None = None, license: str = "unknown",
               repo_id: str | None = None, filename: str = DEFAULT_FILENAME, name: str | None = None) -> Path:
    """Write a model card (README.md) for a head, ready to upload beside it to a hub repository.

    Args:
        head: a head reference (local file or hub; see :func:`resolve_head`).
        out: the README.md to write.
        metrics: an evaluation's ``metrics.json`` to include (the head's detector row is marked).
        license: the hub license id for the front matter (``mit``, ``apache-2.0``, ``cc-by-nc-4.0``,
            ...; default ``unknown``).
        repo_id: the repository it will be uploaded to, for the usage lines (default ``ORG/REPO``,
            to be replaced by the reader).
        filename: the head's file name in the repository (``head.safetensors`` loads as ``ORG/REPO``).
        name: the detector's name in the evaluation's results (default: the head file's stem, as
            ``tidy-detect eval`` names it).

    Returns:
        the path written.

    Raises:
        CheckpointError: an unreadable head; InputError: unreadable metrics; ConfigError: a bad
            repository id or file name.
    """
    from huggingface_hub import ModelCard

    from tidy_detect.detect import random_weight_models
    from tidy_detect.head import read_metadata

    path = resolve_head(head)
    meta = read_metadata(path)
    kind = meta["head"].get("kind", "mlp")
    if repo_id is not None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise ConfigError(f"--repo must be a hub repository id ORG/NAME, got {repo_id!r} ({exc})") from None
    if not filename.endswith(".safetensors") or filename.startswith("/"):
        raise ConfigError(f"--filename must be a relative path ending in .safetensors, got {filename!r}")
    evaluation = read_eval_metrics(metrics) if metrics is not None else None
    name = name or path.stem
    random = random_weight_models(meta.get("extraction") or {})
    reference = (repo_id or "ORG/REPO") + ("" if filename == DEFAULT_FILENAME else f"/{filename}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    title = "one-class, training-free" if kind == "one-class" else "trained MLP"
    body = [f"# {name}: a tidy-detect head ({title})", ""]
    if random:
        body += [f"> **Warning: made with random-weight models ({', '.join(random)}).** Every score this head gives "
                 f"is meaningless; it exists to test software.", ""]
    body += [*_describe(meta, kind), "",
             "## How to use", "",
             "```bash",
             "pip install tidy-detect",
             f"tidy-detect detect photos/ --head {reference} --format table",
             f"tidy-detect serve --head {reference}",
             "```", "",
             "```python",
             "from tidy_detect.detect import Detector",
             "",
             f'detector = Detector.load("{reference}")',
             'records = detector.predict(["photo.jpg"])  # p_fake, label, caption, objects, discrepancies',
             "```", "",
             f"The head file is `{filename}` (sha256 `{digest}`). It is downloaded once into the Hugging Face cache "
             "and used offline after (`HF_HUB_OFFLINE=1`). Detection loads the models below, from the hub or from "
             "local copies (`--clip`, `--captioner-model`, `--grounder-model`).", "",
             "## Training data", "", *_training_section(meta, kind), "",
             "## Extraction config", "", *_extraction_section(meta), "",
             "## Metrics", "", *_metrics_section(meta, kind, evaluation, name), "",
             "## Intended use and limitations", "", *_limitations(kind, random), "",
             f"Head written by tidy-detect {meta.get('package_version')} on {meta.get('created')}.", ""]
    card = ModelCard(f"---\n{_front_matter(meta, license, kind).to_yaml()}\n---\n\n" + "\n".join(body))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    card.save(out)
    return out
