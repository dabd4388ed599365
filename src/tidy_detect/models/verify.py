"""A self-check of the configured models on a few annotated photos (`tidy-detect models verify`).

Run once after downloading the real weights, before spending GPU-days on extraction. The photos
(public domain or CC0, see ``verify_data/LICENSES.md``) come with hand-made annotations: a true
caption, the words a right caption may use, and the main object's phrase and box. The checks:

- ``caption``: the captioner's caption of each photo names one of its expected words;
- ``clip-rank``: CLIP ranks the photo's true caption above the others' and a few unrelated ones;
- ``grounding``: the grounder's box for the main object's phrase overlaps the annotated box;
- ``precision``: CLIP's embeddings in float32 and in the device's half precision agree;
- ``load`` / ``run``: every model loads, runs and gives outputs of the expected shape.

The first three are *semantic*: they need trained weights. A model recognised as random-weight
(the tiny bundle of ``tidy-detect models make-tiny``, see :func:`random_weights_reason`) still
runs them, and its values are reported, but their status is ``cannot pass: random weights``,
which is not a failure. So on the tiny bundle the verdict, and the command's exit code, rest on
the checks that do not need trained weights (loading, running, precision agreement): exit 0
means the code paths work, and the table says that nothing about the weights was verified.

The check functions are pure (captions, similarities, boxes, embeddings in, :class:`CheckResult`
out); :func:`verify_models` runs the adapters and :func:`run_verification` loads them the way
extraction does (:meth:`tidy_detect.features.extractor.Extractor.load`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tidy_detect.errors import InputError, ModelLoadError

DATA_DIR = Path(__file__).with_name("verify_data")
ANNOTATIONS = "annotations.json"

IOU_THRESHOLD = 0.5
# Why 0.99: rounding to bfloat16 keeps about 3 significant digits per value (float16 about 4);
# such rounding errors are small and unbiased, so the embeddings of a healthy half path are
# expected to stay at cosine 0.999 or above even through a ViT-L's 24 layers. What breaks a half
# path (float16 overflow to inf/NaN, a layer left in another dtype, a kernel wrong in half) moves
# them far more, so 0.99 leaves a margin of ten times the expected rounding on one side while
# still catching those on the other. The max |difference| is reported beside it, not judged.
MIN_COSINE = 0.99

PASS = "pass"
FAIL = "fail"
RANDOM = "cannot pass: random weights"
NOT_APPLICABLE = "not applicable"
STATUSES = (PASS, FAIL, RANDOM, NOT_APPLICABLE)

# Below this width (the largest hidden size / d_model / embed_dim anywhere in a config) no
# released CLIP, captioner or grounder exists: all have layers 256 wide or more (most 768+). The
# tiny bundle's widest is 64 (its Swin's last stage: embed_dim 8 doubled over 4 stages).
TINY_WIDTH = 128
_WIDTH_KEYS = ("hidden_size", "d_model", "embed_dim")


@dataclass(frozen=True)
class Photo:
    """One annotated photo: ``box`` is ``(x0, y0, x1, y1)`` in the shipped file's pixels."""

    name: str
    path: Path
    width: int
    height: int
    licence: str
    source: str
    caption: str
    expected_words: tuple[str, ...]
    phrase: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class PhotoSet:
    photos: tuple[Photo, ...]
    unrelated_captions: tuple[str, ...]


def load_photos(folder: str | Path = DATA_DIR) -> PhotoSet:
    """The photos and annotations in ``folder/annotations.json``, checked.

    Raises:
        InputError: the file is missing or unreadable, or an annotation is incomplete or its box
            does not lie inside its image.
    """
    folder = Path(folder)
    file = folder / ANNOTATIONS
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{file}: cannot read the verification annotations ({exc})") from None
    photos = []
    for k, entry in enumerate(data.get("photos", [])):
        where = f"{file}: photo {k}"
        try:
            main = entry["main_object"]
            photo = Photo(name=str(entry["name"]), path=folder / entry["file"], width=int(entry["width"]),
                          height=int(entry["height"]), licence=str(entry["licence"]), source=str(entry["source"]),
                          caption=str(entry["caption"]),
                          expected_words=tuple(str(w).lower() for w in entry["expected_words"]),
                          phrase=str(main["phrase"]), box=tuple(float(v) for v in main["box"]))  # type: ignore
            x0, y0, x1, y1 = photo.box
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: incomplete annotation ({type(exc).__name__}: {exc})") from None
        if not (0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height):
            raise InputError(f"{where} ({photo.name}): box must be x0 < x1 <= width, y0 < y1 <= height inside "
                             f"the {photo.width}x{photo.height} image, got {list(photo.box)}")
        if not photo.expected_words or not photo.caption.strip() or not photo.phrase.strip():
            raise InputError(f"{where} ({photo.name}): caption, expected_words and phrase must not be empty")
        photos.append(photo)
    if len(photos) < 2:
        raise InputError(f"{file}: the ranking check needs at least 2 photos, found {len(photos)}")
    return PhotoSet(tuple(photos), tuple(str(c) for c in data.get("unrelated_captions", [])))


# ---------------------------------------------------------------------------------------------
# Results

@dataclass
class CheckResult:
    """One row of the report.

    ``measured`` and ``rule`` are for people; ``values`` holds the same numbers for machines.
    """

    check: str
    subject: str
    status: str
    measured: str
    rule: str
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "subject": self.subject, "status": self.status, "measured": self.measured,
                "rule": self.rule, "values": self.values}


@dataclass
class VerifyReport:
    """Every check's result, the models checked and which of them have random weights."""

    checks: list[CheckResult]
    models: dict[str, Any] = field(default_factory=dict)
    random_weights: dict[str, str] = field(default_factory=dict)  # role -> why it looks random
    device: str = ""
    dtype: str = ""
    dtypes: dict[str, str] = field(default_factory=dict)  # per model, where extraction chooses them so
    seconds: float = 0.0

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.failed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def semantic_verified(self) -> bool:
        """Whether any check that needs trained weights could be judged (none is, on the tiny bundle)."""
        return any(c.check in SEMANTIC_CHECKS and c.status in (PASS, FAIL) for c in self.checks)

    def summary(self) -> str:
        """One line: the verdict and, on failure, which checks failed."""
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in STATUSES}
        line = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if self.failures:
            names = ", ".join(f"{c.check} ({c.subject})" for c in self.failures)
            return f"model verification failed: {names}; {line}"
        if not self.semantic_verified:
            return (f"model verification passed, but only for loading, running and precision: {line} "
                    f"(nothing checked what the weights learned)")
        return f"model verification passed: {line}"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "semantic_checks_verified": self.semantic_verified,
                "device": self.device, "dtype": self.dtype, "dtypes": self.dtypes,
                "seconds": round(self.seconds, 3),
                "models": self.models, "random_weights": self.random_weights,
                "thresholds": {"iou": IOU_THRESHOLD, "min_cosine": MIN_COSINE},
                "checks": [c.to_dict() for c in self.checks], "summary": self.summary()}


SEMANTIC_CHECKS = {"caption": "captioner", "clip-rank": "clip", "grounding": "grounder"}


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _judge(ok: bool, random_reason: str | None) -> str:
    return RANDOM if random_reason else PASS if ok else FAIL


# ---------------------------------------------------------------------------------------------
# Pure checks

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _same_word(word: str, target: str) -> bool:
    """``word`` is ``target``, its plural (s, es, y -> ies) or its possessive ("cat's")."""
    word = word.removesuffix("'s")
    plurals = {target, target + "s", target + "es"}
    if target.endswith("y"):
        plurals.add(target[:-1] + "ies")
    return word in plurals


def named_object(caption: str, expected: Sequence[str]) -> str | None:
    """The first expected word (or words, "space suit") the caption uses, plurals and "'s" allowed;
    ``None`` when it uses none."""
    words = _words(caption)
    for entry in expected:
        target = _words(entry)
        n = len(target)
        for i in range(len(words) - n + 1):
            if n and all(_same_word(w, t) for w, t in zip(words[i:i + n], target)):
                return entry
    return None


def check_caption(subject: str, caption: str, expected: Sequence[str], random_reason: str | None = None
                  ) -> CheckResult:
    """Pass when ``caption`` names one of ``expected``."""
    found = named_object(caption, expected)
    measured = f"{_short(caption, 48)!r}: " + (f"names {found!r}" if found else "names none of them")
    shown = ", ".join(expected[:4]) + (", ..." if len(expected) > 4 else "")
    return CheckResult("caption", subject, _judge(found is not None, random_reason), measured,
                       f"names one of: {shown}",
                       {"caption": caption, "matched": found, "expected": list(expected)})


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def cosine_matrix(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """(n_images, n_texts) cosine similarities."""
    return l2_normalize(images) @ l2_normalize(texts).T


def caption_rank(similarities: Sequence[float], true_index: int) -> tuple[int, float]:
    """The true caption's rank among all candidates (1 = most similar; ties count against it) and
    its margin: its similarity minus the best distractor's."""
    sims = np.asarray(similarities, dtype=np.float64)
    true = sims[true_index]
    others = np.delete(sims, true_index)
    rank = 1 + int(np.sum(others >= true))
    margin = float(true - others.max()) if len(others) else float("inf")
    return rank, margin


def check_clip_rank(subject: str, similarities: Sequence[float], true_index: int, texts: Sequence[str],
                    random_reason: str | None = None) -> CheckResult:
    """Pass when the true caption (``texts[true_index]``) is the most similar of ``texts``."""
    rank, margin = caption_rank(similarities, true_index)
    sims = np.asarray(similarities, dtype=np.float64)
    best_other = max((i for i in range(len(texts)) if i != true_index), key=lambda i: sims[i])
    measured = f"rank {rank} of {len(texts)}, margin {margin:+.3f}"
    if rank > 1:
        measured += f" (first: {_short(texts[best_other], 32)!r})"
    return CheckResult("clip-rank", subject, _judge(rank == 1, random_reason), measured,
                       "true caption ranked 1",
                       {"rank": rank, "candidates": len(texts), "margin": round(margin, 6),
                        "true_similarity": round(float(sims[true_index]), 6),
                        "best_distractor": texts[best_other]})


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 for empty ones)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def check_grounding(subject: str, phrase: str, box: Sequence[float] | None, annotated: Sequence[float],
                    threshold: float = IOU_THRESHOLD, random_reason: str | None = None,
                    score: float | None = None) -> CheckResult:
    """Pass when the grounder found ``phrase`` (``box`` not ``None``) with IoU >= ``threshold``."""
    if box is None:
        return CheckResult("grounding", subject, _judge(False, random_reason),
                           f"{phrase!r}: no box above the grounder's threshold", f"IoU >= {threshold:g}",
                           {"phrase": phrase, "box": None, "iou": 0.0, "annotated": list(annotated)})
    iou = box_iou(box, annotated)
    rounded = [round(float(v), 1) for v in box]
    return CheckResult("grounding", subject, _judge(iou >= threshold, random_reason),
                       f"{phrase!r}: IoU {iou:.2f}", f"IoU >= {threshold:g}",
                       {"phrase": phrase, "box": rounded, "score": None if score is None else round(float(score), 4),
                        "iou": round(iou, 4), "annotated": list(annotated)})


def embedding_agreement(full: np.ndarray, half: np.ndarray) -> tuple[float, float]:
    """Row-wise agreement of two runs of the same embeddings: the lowest cosine and the largest
    absolute difference of the L2-normalised rows (the scale the head sees by default).
    NaN or inf anywhere gives ``(nan, inf)``."""
    full = np.asarray(full, dtype=np.float64)
    half = np.asarray(half, dtype=np.float64)
    if full.shape != half.shape:
        raise ValueError(f"embeddings to compare must have the same shape, got {full.shape} and {half.shape}")
    if full.size == 0:
        raise ValueError("no embeddings to compare")
    if not (np.isfinite(full).all() and np.isfinite(half).all()):
        return float("nan"), float("inf")
    a, b = l2_normalize(full), l2_normalize(half)
    cosines = np.sum(a * b, axis=-1)
    return float(cosines.min()), float(np.abs(a - b).max())


def check_precision(full: Mapping[str, np.ndarray], half: Mapping[str, np.ndarray], half_dtype: str,
                    min_cosine: float = MIN_COSINE) -> CheckResult:
    """Pass when every kind of embedding (``"image"``, ``"text"``, ...) agrees between float32 and
    ``half_dtype`` with cosine >= ``min_cosine`` (NaN fails). Random weights do not matter here:
    agreement is a property of the code path, not of what the weights learned."""
    measured_kinds = {kind: embedding_agreement(full[kind], half[kind]) for kind in full}
    cosines = [cos for cos, _ in measured_kinds.values()]
    worst_cos = float("nan") if any(np.isnan(cosines)) else min(cosines)
    worst_diff = max(diff for _, diff in measured_kinds.values())
    ok = all(cos >= min_cosine for cos in cosines)  # False for NaN

    def number(value: float) -> float | None:  # JSON has no NaN or inf
        return round(value, 6) if np.isfinite(value) else None

    per_kind = {kind: {"min_cosine": number(cos), "max_abs_diff": number(diff), "n": int(len(full[kind]))}
                for kind, (cos, diff) in measured_kinds.items()}
    measured = f"{half_dtype} vs float32: min cos {worst_cos:.5f}, max |diff| {worst_diff:.4f}"
    return CheckResult("precision", "clip", PASS if ok else FAIL, measured, f"cos >= {min_cosine:g}",
                       {"half_dtype": half_dtype, "min_cosine": number(worst_cos), "max_abs_diff": number(worst_diff),
                        "by_kind": per_kind})


def check_run(role: str, problems: Sequence[str], detail: str) -> CheckResult:
    """Pass when a model's outputs had none of ``problems`` (wrong count, empty, NaN, off the image)."""
    if problems:
        return CheckResult("run", role, FAIL, "; ".join(problems), "outputs of the expected shape",
                           {"problems": list(problems)})
    return CheckResult("run", role, PASS, detail, "outputs of the expected shape", {"problems": []})


def embedding_problems(what: str, emb: np.ndarray, rows: int, dim: int) -> list[str]:
    emb = np.asarray(emb)
    if emb.shape != (rows, dim):
        return [f"{what}: shape {tuple(emb.shape)}, expected {(rows, dim)}"]
    if not np.isfinite(emb).all():
        return [f"{what}: {int((~np.isfinite(emb)).sum())} values are NaN or inf"]
    if np.any(np.linalg.norm(emb, axis=-1) == 0):
        return [f"{what}: some embeddings are all zeros"]
    return []


# ---------------------------------------------------------------------------------------------
# Random weights

def _widest(config: Any) -> int | None:
    """The largest width (hidden size, d_model, embed_dim) anywhere in a transformers config."""
    data = config.to_dict() if hasattr(config, "to_dict") else config
    found: list[int] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key in _WIDTH_KEYS and isinstance(item, int) and not isinstance(item, bool):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(data)
    return max(found) if found else None


def random_weights_reason(source: str | None, config: Any = None) -> str | None:
    """Why a model's weights look random (untrained), or ``None`` when nothing says so.

    The first sign is the mark the model itself carries, the same one the adapters' ``describe()``
    report as ``random_weights`` (:func:`tidy_detect.models.tiny.has_random_weights`): the
    ``tidy_detect_random_weights`` attribute that ``tidy-detect models make-tiny`` writes into every
    config, or a ``random:<arch>`` source (the benchmark's in-memory models). Unmarked configs (a
    bundle built before the mark existed) fall back to the architecture: a config whose widest layer
    is under ``TINY_WIDTH`` is a test model, which no released checkpoint is (the tiny bundle's are at
    most 64 wide). The folder's place in a make-tiny bundle (its ``tiny.toml`` beside it) is named
    in the reason, and decides only when there is no config to read. An unmarked real-size
    architecture is never excused, even in a bundle's folder (it fails, as it should).
    """
    marked = _marked_reason(source, config)
    if marked:
        return marked
    width = _widest(config) if config is not None else None
    if width is not None and width >= TINY_WIDTH:
        return None
    bundle = _tiny_bundle_marker(source)
    built = f"built by `tidy-detect models make-tiny` ({bundle})" if bundle else None
    if width is None:
        return built
    tiny = f"a tiny test architecture (widest layer {width} < {TINY_WIDTH}; no released model is this small)"
    return f"{built}: {tiny}" if built else tiny


def _marked_reason(source: str | None, config: Any) -> str | None:
    """The reason for a model marked as random-weight by its config or its ``random:`` source."""
    from tidy_detect.models.tiny import RANDOM_SOURCE_PREFIX, RANDOM_WEIGHTS_KEY

    if isinstance(source, str) and source.startswith(RANDOM_SOURCE_PREFIX):
        return f"an in-memory random-weight model ({source})"
    value = config.get(RANDOM_WEIGHTS_KEY) if isinstance(config, Mapping) else getattr(config, RANDOM_WEIGHTS_KEY, None)
    if value is not True:
        return None
    bundle = _tiny_bundle_marker(source)
    where = f", {bundle}" if bundle else ""
    return f"built by `tidy-detect models make-tiny` (its config says {RANDOM_WEIGHTS_KEY}: true{where})"


def _tiny_bundle_marker(source: str | None) -> Path | None:
    """The ``tiny.toml`` of the make-tiny bundle that holds the folder ``source``, if any."""
    from tidy_detect.models.tiny import FOLDERS, TOML_NAME, TOML_TEXT

    if not source:
        return None
    path = Path(source).expanduser()
    marker = path.parent / TOML_NAME
    if path.name not in FOLDERS or not path.is_dir() or not marker.is_file():
        return None
    try:
        first = marker.read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        return None
    return marker if first == TOML_TEXT.splitlines()[:1] else None


def _model_of(adapter: Any) -> Any:
    return getattr(adapter, "model", None)


def random_roles(models: Any) -> dict[str, str]:
    """Role ("clip", "captioner", "grounder") -> why its weights look random, for loaded adapters."""
    reasons = {}
    for role in ("clip", "captioner", "grounder"):
        adapter = getattr(models, role, None)
        model = _model_of(adapter)
        if model is None:
            continue  # no weights at all ("provided", "none"): nothing to excuse
        reason = random_weights_reason(getattr(adapter, "source", None), getattr(model, "config", None))
        if reason:
            reasons[role] = reason
    return reasons


# ---------------------------------------------------------------------------------------------
# The runner

def half_dtype_for(device: str) -> str:
    """The half precision to compare with float32 on ``device``: bfloat16 on the CPU and on GPUs
    that support it, float16 on other GPUs and on MPS."""
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device.startswith("mps") else "bfloat16"


def _error(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(adapter: Any) -> dict[str, Any]:
    try:
        return dict(adapter.describe())
    except Exception as exc:  # a stand-in or a broken adapter still gets a report
        return {"error": _error(exc)}


def verify_models(models: Any, photo_set: PhotoSet | None = None, *,
                  other_clip: Callable[[str], Any] | None = None, random_weights: Mapping[str, str] | None = None,
                  iou_threshold: float = IOU_THRESHOLD, min_cosine: float = MIN_COSINE,
                  say: Callable[[str], None] | None = None) -> VerifyReport:
    """Run every check on loaded adapters.

    Args:
        models: anything with ``clip``, ``captioner``, ``grounder`` adapters (a loaded
            :class:`~tidy_detect.features.extractor.Extractor`), and ``device`` / ``dtype``.
        photo_set: the photos (default: the ones shipped with the package).
        other_clip: ``dtype -> CLIP encoder`` of the same checkpoint in another precision, for the
            precision check (float32 when ``models.clip`` runs in half precision, else half);
            ``None`` skips that check (reported "not applicable").
        random_weights: role -> reason, for models whose weights are random (default: detected
            by :func:`random_roles`).
        say: progress messages.

    A model that raises while running fails its ``run`` check and the checks that need its output;
    the others still run.
    """
    started = time.perf_counter()
    photo_set = photo_set or load_photos()
    say = say or (lambda message: None)
    random_weights = dict(random_roles(models) if random_weights is None else random_weights)
    photos = photo_set.photos
    from tidy_detect.images import load_image

    images = [load_image(p.path).image for p in photos]
    bad = [p.name for p, im in zip(photos, images) if im.size != (p.width, p.height)]
    if bad:
        raise InputError(f"verification photos {', '.join(bad)} do not have the size their annotations give")
    checks: list[CheckResult] = []
    clip, captioner, grounder = models.clip, models.captioner, models.grounder
    described = {role: _describe(getattr(models, role)) for role in ("clip", "captioner", "grounder")}
    checks.append(CheckResult(
        "load", "models", PASS,
        f"clip, captioner {described['captioner'].get('name')}, grounder {described['grounder'].get('name')}",
        "all load", {role: d.get("source") for role, d in described.items()}))

    # -- captioner
    if _model_of(captioner) is None:
        for p in photos:
            checks.append(CheckResult("caption", p.name, NOT_APPLICABLE,
                                      f"captioner {described['captioner'].get('name')!r} runs no model", "-", {}))
    else:
        say(f"captioning {len(photos)} photos")
        try:
            captions = list(captioner.caption(images, [None] * len(images)))
            problems = [] if len(captions) == len(photos) else [f"{len(captions)} captions for {len(photos)} photos"]
            problems += [f"empty caption for {p.name}" for p, c in zip(photos, captions) if not str(c).strip()]
            checks.append(check_run("captioner", problems, f"{len(captions)} captions"))
            for p, caption in zip(photos, captions):
                checks.append(check_caption(p.name, caption, p.expected_words, random_weights.get("captioner")))
        except Exception as exc:
            checks.append(check_run("captioner", [_error(exc)], ""))
            checks += [CheckResult("caption", p.name, FAIL, "not measured: the captioner raised", "-", {})
                       for p in photos]

    # -- CLIP ranking (full images through CLIP's own resize + crop: the check is about the
    # weights, and the benchmark's native 224 px centre crop of a 512 px photo shows only its
    # middle, which may miss what the caption names)
    texts = [p.caption for p in photos] + list(photo_set.unrelated_captions)
    say("embedding photos and captions with CLIP")
    try:
        image_emb = np.asarray(clip.encode_crops(images))
        text_emb = np.asarray(clip.encode_texts(texts))
        global_emb = np.asarray(clip.encode_global(images))
        dim = int(getattr(clip, "dim", image_emb.shape[-1]))
        problems = (embedding_problems("image embeddings", image_emb, len(images), dim)
                    + embedding_problems("global-view embeddings", global_emb, len(images), dim)
                    + embedding_problems("text embeddings", text_emb, len(texts), dim))
        checks.append(check_run("clip", problems, f"{len(images)} images, {len(texts)} texts, dim {dim}"))
        if not problems:
            sims = cosine_matrix(image_emb, text_emb)
            for i, p in enumerate(photos):
                checks.append(check_clip_rank(p.name, sims[i], i, texts, random_weights.get("clip")))
        else:
            checks += [CheckResult("clip-rank", p.name, FAIL, "not measured: bad CLIP outputs", "-", {})
                       for p in photos]
    except Exception as exc:
        checks.append(check_run("clip", [_error(exc)], ""))
        checks += [CheckResult("clip-rank", p.name, FAIL, "not measured: CLIP raised", "-", {}) for p in photos]

    # -- grounder: the annotated phrase, so that this check does not depend on the captioner
    if _model_of(grounder) is None:
        for p in photos:
            checks.append(CheckResult("grounding", p.name, NOT_APPLICABLE,
                                      f"grounder {described['grounder'].get('name')!r} runs no model", "-", {}))
    else:
        say(f"grounding {len(photos)} phrases")
        try:
            found = list(grounder.ground(images, [[p.phrase] for p in photos]))
            problems = [] if len(found) == len(photos) else [f"{len(found)} results for {len(photos)} photos"]
            for p, detections in zip(photos, found):
                for d in detections:
                    x0, y0, x1, y1 = d.box
                    inside = -1 <= x0 <= x1 <= p.width + 1 and -1 <= y0 <= y1 <= p.height + 1
                    if not (np.isfinite(d.box).all() and inside):
                        problems.append(f"{p.name}: box {list(d.box)} is not inside the {p.width}x{p.height} image")
            boxes = sum(len(d) for d in found)
            checks.append(check_run("grounder", problems, f"{boxes} boxes for {len(photos)} phrases"))
            for p, detections in zip(photos, found):
                match = next((d for d in detections if d.phrase == p.phrase), None)
                checks.append(check_grounding(p.name, p.phrase, None if match is None else match.box, p.box,
                                              iou_threshold, random_weights.get("grounder"),
                                              None if match is None else match.score))
        except Exception as exc:
            checks.append(check_run("grounder", [_error(exc)], ""))
            checks += [CheckResult("grounding", p.name, FAIL, "not measured: the grounder raised", "-", {})
                       for p in photos]

    # -- precision
    checks.append(_precision(clip, images, texts + [p.phrase for p in photos], models.device, other_clip,
                             min_cosine, say))
    return VerifyReport(checks=checks, models=described, random_weights=random_weights, device=models.device,
                        dtype=models.dtype, dtypes=dict(getattr(models, "dtypes", None) or {}),
                        seconds=time.perf_counter() - started)


def _precision(clip: Any, images: Sequence[Any], texts: Sequence[str], device: str,
               other_clip: Callable[[str], Any] | None, min_cosine: float,
               say: Callable[[str], None]) -> CheckResult:
    rule = f"cos >= {min_cosine:g}"
    if other_clip is None:
        return CheckResult("precision", "clip", NOT_APPLICABLE, "no second precision to compare with", rule, {})
    running = str(getattr(clip, "dtype", "float32"))
    half = running if running != "float32" else half_dtype_for(device)
    other_dtype = "float32" if running != "float32" else half
    say(f"loading CLIP again in {other_dtype} to compare precisions")
    try:
        other = other_clip(other_dtype)
        full_clip, half_clip = (other, clip) if running != "float32" else (clip, other)

        def embed(encoder: Any) -> dict[str, np.ndarray]:
            return {"image": np.asarray(encoder.encode_global(images)),
                    "crop": np.asarray(encoder.encode_crops(images)),
                    "text": np.asarray(encoder.encode_texts(list(texts)))}

        return check_precision(embed(full_clip), embed(half_clip), half, min_cosine)
    except ModelLoadError:
        raise  # CLIP cannot be loaded a second time: the same error as any failed load
    except Exception as exc:
        return CheckResult("precision", "clip", FAIL, f"not measured: {_error(exc)}", rule, {})


def run_verification(config: Any, *, photo_set: PhotoSet | None = None,
                     say: Callable[[str], None] | None = None) -> VerifyReport:
    """Load the models of ``config`` (an :class:`~tidy_detect.config.ExtractionConfig`) as
    extraction does and run every check.

    Raises:
        ModelLoadError: a model cannot be loaded (the message names it and where it looked).
        ConfigError: an invalid device or dtype.
    """
    from tidy_detect.features.extractor import Extractor

    say = say or (lambda message: None)
    say("loading the models")
    extractor = Extractor(config).load()
    clip = extractor.clip

    def other_clip(dtype: str) -> Any:
        from tidy_detect.models.clip import ClipEncoder

        return ClipEncoder(clip.source, device=extractor.device, dtype=dtype, global_view=clip.global_view,
                           view_size=clip.view_size, optimize=getattr(extractor, "speedups", True))

    return verify_models(extractor, photo_set, other_clip=other_clip, say=say)
