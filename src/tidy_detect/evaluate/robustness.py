"""Robustness sweeps (paper Fig. 3): extract perturbed copies of a test set, score, plot.

Every perturbation level gets its own store, named by the perturbation (``stores/jpeg-75``), so a
sweep is resumable and each store can be reused by ``eval``. The results folder may be a URI
(``s3://bucket/prefix``): the stores are then written there directly, and the result files are
written locally first and uploaded at the end. The images are sampled once (at most
``max_per_class`` per class and group, seeded) and the same list goes through every level.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from tidy_detect.data.inputs import ImageItem
from tidy_detect.data.perturb import Perturbation
from tidy_detect.evaluate.evaluation import evaluate, markdown_table


def run_robustness(head_path: str | Path, items: Sequence[ImageItem], out: str | Path,
                   perturbations: Sequence[Perturbation], *, threshold: float = 0.5, include_clean: bool = True,
                   pairing: dict[str, str] | None = None, detector: Any = None, say: Callable[[str], None] | None = None,
                   progress: Callable[..., None] | None = None, exif: str = "apply") -> dict[str, Any]:
    """Extract and evaluate every perturbation level; write robustness.{json,csv,md} and plots.

    Args:
        head_path: the head to evaluate (its extraction config is used for every store).
        items: the images (already sampled); they are saved to ``evaluated.csv``.
        pairing: generator -> real folder, for datasets whose reals are shared (UniFD).
        perturbations: levels to sweep, in order of increasing severity per kind.
        detector: a loaded ``Detector`` for this head, to reuse its models.
        exif: ``apply`` or ``ignore`` the EXIF orientation (benchmark layouts: ``ignore``).

    Returns:
        The results dict written to robustness.json.

    Raises:
        StoreError: a store cannot be written (or the results not uploaded) at ``out``; and what
            extraction and evaluation raise.
    """
    from tidy_detect.features.storage import StoreLocation, join_uri

    location = StoreLocation.parse(out if isinstance(out, Path) else str(out))
    if location.is_local:
        return _run(head_path, items, location.path, location.path / "stores", perturbations, threshold, include_clean,
                    pairing, detector, say, progress, exif)
    with tempfile.TemporaryDirectory(prefix="tidy-robustness-") as folder:
        payload = _run(head_path, items, Path(folder), join_uri(location.uri, "stores"), perturbations, threshold,
                       include_clean, pairing, detector, say, progress, exif)
        location.upload_folder(Path(folder))
    return payload


def _run(head_path: str | Path, items: Sequence[ImageItem], out: Path, stores_at: str | Path,
         perturbations: Sequence[Perturbation], threshold: float, include_clean: bool, pairing: dict[str, str] | None,
         detector: Any, say: Callable[[str], None] | None, progress: Callable[..., None] | None,
         exif: str) -> dict[str, Any]:
    """The sweep: result files in the local folder ``out``, stores under ``stores_at``."""
    from tidy_detect.data.sampling import save_list
    from tidy_detect.features.storage import join_uri
    from tidy_detect.detect import Detector
    from tidy_detect.evaluate import plots
    from tidy_detect.features.extractor import extract_items
    from tidy_detect.head import json_safe

    say = say or (lambda message: None)
    out.mkdir(parents=True, exist_ok=True)
    save_list(items, out / "evaluated.csv")
    detector = detector or Detector.load(head_path)
    levels: list[Perturbation | None] = ([None] if include_clean else []) + list(perturbations)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    clean: dict[str, Any] | None = None
    stores = {}
    for perturbation in levels:
        name = perturbation.name if perturbation else "clean"
        store = join_uri(stores_at, name)
        say(f"{name}: extracting {len(items)} images into {store}")
        extract_items(items, store, detector.extractor, perturbation=perturbation, pairing=pairing, progress=progress,
                      exif=exif)
        result = evaluate([head_path], [store], threshold=threshold, max_per_class=None)
        (head_name,) = result.info["head_names"]
        entry = {"store": str(store), **result.means[head_name], "groups": result.groups[head_name]}
        stores[name] = str(store)
        if perturbation is None:
            clean = entry
        else:
            by_kind.setdefault(perturbation.kind, []).append({"level": perturbation.level, **entry})
    payload = {"kind": "robustness", "head": str(head_path), "images": len(items), "threshold": threshold,
               "clean": clean, "perturbations": by_kind, "stores": stores}
    (out / "robustness.json").write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n",
                                         encoding="utf-8")
    rows = [["clean", "", *(_pct(clean, m) for m in ("ap", "acc", "real_acc", "fake_acc"))]] if clean else []
    for kind, points in by_kind.items():
        rows += [[kind, f"{p['level']:g}", *(_pct(p, m) for m in ("ap", "acc", "real_acc", "fake_acc"))] for p in points]
    header = ["perturbation", "level", "AP", "ACC", "real ACC", "fake ACC"]
    with (out / "robustness.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    (out / "robustness.md").write_text(
        f"# Robustness of {head_path}\n\n{len(items)} images; mean over groups, in %.\n\n"
        + markdown_table(header, rows) + "\n", encoding="utf-8")
    if by_kind:
        plots.robustness_curves(by_kind, clean, out / "robustness_ap.png", metric="ap")
        plots.robustness_curves(by_kind, clean, out / "robustness_acc.png", metric="acc")
    return payload


def _pct(entry: dict[str, Any] | None, metric: str) -> str:
    value = (entry or {}).get(metric)
    return "–" if value is None else f"{value * 100:.2f}"
