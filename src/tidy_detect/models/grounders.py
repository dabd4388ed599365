"""Grounders: for each phrase of an image, the best box above a threshold, in image pixels.

``ground(images, phrases)`` takes a batch of RGB PIL images and a list of phrases per image and
returns, per image, one :class:`Detection` for every phrase that was found (in phrase order);
phrases without a box above the threshold are left out.

How a phrase is scored against a box is a named rule (``FeatureConfig.grounding_rule``), recorded
in ``describe()``:

``span-mean`` (default)
    The phrase's score is the mean of its tokens' probabilities: the box's token probabilities
    dotted with the span-normalised positive map, as Grounding DINO's phrase-grounding mode
    (``create_positive_map_from_span``, ``positive_maps @ logits.T`` in
    ``demo/inference_on_a_image.py``) and GLIP (``create_positive_map`` and the ``MEAN`` score
    aggregation of ``convert_grounding_to_od_logits``) score the phrases of a caption. A box is kept
    when that score is above ``box_threshold``; there is no text threshold.
``token-max``
    The rule of transformers' ``post_process_grounded_object_detection`` (open-set detection, not
    phrase grounding), and the rule of every store that records none: a box qualifies when its best token
    probability over the whole prompt is above ``box_threshold``, and the phrase's score is its
    best token probability, which must be above ``text_threshold``. One confident token ("man"
    in "man's hat") is enough, so it grounds more phrases, more loosely.

Every comparison is strict (``>``), as in the original code and transformers. Boxes whose shorter
side is under ``FeatureConfig.min_box_size`` pixels of the original image are not candidates
(also recorded), so a phrase takes its best box among the others.

The paper uses GLIP-L, whose released code needs custom CUDA operators built against an old
PyTorch; tidy-detect uses Grounding DINO (same task: open-vocabulary grounding of caption phrases)
through transformers by default, and OWLv2 as an alternative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from tidy_detect.config import GROUNDING_RULES, FeatureConfig
from tidy_detect.errors import ConfigError
from tidy_detect.models.device import floating_to, run_guarded
from tidy_detect.models.loading import prepare_model, revision_of, torch_dtype
from tidy_detect.models.memory import StageMemory, grounding_dino, owlv2
from tidy_detect.models.tiny import has_random_weights
from tidy_detect.models.components import GROUNDERS


@dataclass(frozen=True)
class Detection:
    phrase: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original image pixels
    score: float


def cxcywh_to_xyxy(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Normalised (cx, cy, w, h) to pixel (x0, y0, x1, y1), clipped to [0, width] x [0, height]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy, w, h = boxes.T
    xyxy = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
    return xyxy


def positive_map(token_sets: Sequence[Sequence[int]], num_tokens: int) -> np.ndarray:
    """(num_phrases, num_tokens): each phrase's tokens, the row normalised to sum 1.

    The ``+ 1e-6`` is the original's (GroundingDINO ``create_positive_map_from_span``, GLIP
    ``create_positive_map``), kept so scores match it exactly; a phrase with no token (cut off by
    the text length) has an all-zero row, so a score of 0.
    """
    pmap = np.zeros((len(token_sets), num_tokens), dtype=np.float64)
    for j, tokens in enumerate(token_sets):
        pmap[j, [t for t in tokens if t < num_tokens]] = 1.0
    return pmap / (pmap.sum(axis=1, keepdims=True) + 1e-6)


def phrase_scores(probs: np.ndarray, token_sets: Sequence[Sequence[int]], rule: str, box_threshold: float,
                  text_threshold: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Score every phrase against every box under a grounding rule (see the module docstring).

    Args:
        probs: (num_boxes, num_tokens) token probabilities (sigmoid of the logits).
        token_sets: the prompt tokens of each phrase.

    Returns:
        ``(scores, eligible, threshold)``: (num_boxes, num_phrases) scores, the (num_boxes,) mask
        of boxes the rule allows at all, and the threshold a phrase's score must exceed.

    Raises:
        ConfigError: an unknown rule.
    """
    if rule not in _RULES:
        raise ConfigError(f"grounding rule must be one of {', '.join(_RULES)}, got {rule!r}")
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    return _RULES[rule](probs, token_sets, box_threshold, text_threshold)


def _span_mean(probs: np.ndarray, token_sets: Sequence[Sequence[int]], box_threshold: float,
               text_threshold: float) -> tuple[np.ndarray, np.ndarray, float]:
    scores = probs @ positive_map(token_sets, probs.shape[1]).T
    return scores, np.ones(probs.shape[0], dtype=bool), box_threshold


def _token_max(probs: np.ndarray, token_sets: Sequence[Sequence[int]], box_threshold: float,
               text_threshold: float) -> tuple[np.ndarray, np.ndarray, float]:
    columns = [probs[:, [t for t in tokens if t < probs.shape[1]]].max(axis=1, initial=0.0)
               for tokens in token_sets]
    scores = np.stack(columns, axis=1) if columns else np.zeros((probs.shape[0], 0))
    return scores, probs.max(axis=1, initial=0.0) > box_threshold, text_threshold


_RULES = {"span-mean": _span_mean, "token-max": _token_max}
assert tuple(_RULES) == GROUNDING_RULES, "config.GROUNDING_RULES names the rules FeatureConfig accepts"


def large_enough(boxes_xyxy: np.ndarray, min_size: float) -> np.ndarray:
    """(num_boxes,) mask of boxes whose shorter side is at least ``min_size`` pixels."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return sides >= min_size


def best_boxes(scores: np.ndarray, boxes_xyxy: np.ndarray, phrases: Sequence[str], threshold: float,
               eligible: np.ndarray | None = None) -> list[Detection]:
    """For each phrase (column of ``scores``), the highest-scoring eligible box if its score is
    strictly above ``threshold`` (``>``, as transformers' post-processing and the original code).

    Args:
        scores: (num_boxes, num_phrases) phrase scores in [0, 1].
        boxes_xyxy: (num_boxes, 4) pixel boxes.
        eligible: optional (num_boxes,) mask of boxes allowed at all.
    """
    found = []
    scores = np.asarray(scores, dtype=np.float64)
    if eligible is not None:
        scores = np.where(np.asarray(eligible)[:, None], scores, -np.inf)
    for j, phrase in enumerate(phrases):
        if scores.shape[0] == 0:
            break
        q = int(np.argmax(scores[:, j]))
        if scores[q, j] > threshold:
            found.append(Detection(phrase, tuple(float(v) for v in boxes_xyxy[q]), float(scores[q, j])))
    return found


class _HFGrounder:
    model_class = ""
    default_box_threshold = 0.35
    default_text_threshold = 0.25
    # Whether the grounder has a text threshold at all (OWLv2 has one score per phrase query).
    uses_text_threshold = True

    def __init__(self, name: str, source: str, *, features: FeatureConfig, device: str, dtype: str,
                 optimize: bool = True, components: tuple[Any, Any] | None = None) -> None:
        self.name = name
        self.source = source
        self.device = device
        self.dtype = dtype
        self.box_threshold = (features.box_threshold if features.box_threshold is not None
                              else self.default_box_threshold)
        self.text_threshold = (features.text_threshold if features.text_threshold is not None
                               else self.default_text_threshold)
        self.grounding_rule = features.grounding_rule
        self.min_box_size = features.min_box_size
        self.max_objects = features.max_objects
        self.max_batch: int | None = None  # images per forward (None: all); the extractor sets it on GPUs
        self.model, self.processor, self.fingerprint = prepare_model(
            self.model_class, source, what="grounder model", option="--grounder-model", device=device, dtype=dtype,
            optimize=optimize, components=components)

    def describe(self) -> dict[str, Any]:
        described = {"name": self.name, "source": self.source, "model_type": self.model.config.model_type,
                     "revision": revision_of(self.model), "weights": self.fingerprint,
                     "random_weights": has_random_weights(self.model, self.source),
                     "grounding_rule": self.grounding_rule, "box_threshold": self.box_threshold,
                     "min_box_size": self.min_box_size}
        # A threshold that changes nothing is not recorded: it would make stores that hold the
        # same features look incompatible.
        if self.uses_text_threshold and self.grounding_rule == "token-max":
            described["text_threshold"] = self.text_threshold
        return described

    def _to_device(self, inputs: Any) -> dict[str, Any]:
        dtype = torch_dtype(self.dtype)
        return {k: floating_to(v, self.device, dtype) for k, v in inputs.items() if hasattr(v, "to")}

    def _forward(self, inputs: dict[str, Any], batch: int) -> Any:
        """One forward of the detector, out-of-memory errors named (see models.device)."""
        import torch

        def forward() -> Any:
            with torch.inference_mode():
                return self.model(**self._to_device(inputs))

        return run_guarded(forward, stage="ground", device=self.device, batch=batch, what=f"{self.name}, {self.dtype}",
                           lower="--batch-size")

    def ground(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]],
               prepared: Any = None) -> list[list[Detection]]:
        """For each image, a detection per phrase found (phrase order); ``prepared``: what
        :meth:`prepare` made of these images ahead of time, if the grounder has one.

        Raises:
            DeviceMemoryError: a forward ran out of device memory.
        """
        results: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, p in enumerate(phrases) if p]
        if todo:
            found = self._ground([images[i] for i in todo], [list(phrases[i]) for i in todo],
                                 prepared=prepared, positions=todo)
            for i, detections in zip(todo, found):
                results[i] = detections
        return results

    def _ground(self, images: list[Image.Image], phrases: list[list[str]], prepared: Any = None,
                positions: list[int] | None = None) -> list[list[Detection]]:
        raise NotImplementedError


@GROUNDERS.register("grounding-dino", default_model="IDEA-Research/grounding-dino-base",
                    model_types=("grounding-dino",), description="Grounding DINO (default; GLIP's role in the paper)")
class GroundingDinoGrounder(_HFGrounder):
    """All phrases of an image in one prompt "p1. p2. p3."; each phrase is scored against each box
    by the grounding rule over the tokens of its span (see the module docstring), and boxes whose
    shorter side is under ``min_box_size`` pixels are not candidates."""

    model_class = "GroundingDinoForObjectDetection"

    def memory(self) -> StageMemory:
        """Device memory per image of one forward at the processor's largest input size."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        shortest, longest = get("shortest_edge") or 800, get("longest_edge") or 1333
        # A prompt of max_objects phrases of a few tokens each, separated by dots.
        return grounding_dino(self.model.config, self.dtype, height=int(shortest), width=int(longest),
                              text_tokens=min(256, 2 + 5 * max(self.max_objects, 1)))

    def _pixels(self, image: Image.Image) -> dict[str, Any]:
        return self.processor.image_processor(images=[self._pad_to_ratio(image)], return_tensors="pt")

    def prepare(self, images: Sequence[Image.Image], map_fn: Any = None) -> tuple[dict[str, Any], list[list[int]]]:
        """Preprocess ahead of time (worker threads; ``map_fn`` a thread pool's ``map``): each
        image resized and normalised by the processor exactly as :meth:`ground` would, stacked per
        input size. Returns the tensors (``"<group>.pixel_values"``, ``"<group>.pixel_mask"``)
        and each group's image positions, for :meth:`ground`'s ``prepared``."""
        import torch

        pixels = list((map_fn or map)(self._pixels, list(images)))
        groups = _size_groups(pixels)
        tensors = {}
        for g, members in enumerate(groups):
            for key in ("pixel_values", "pixel_mask"):
                tensors[f"{g}.{key}"] = torch.cat([pixels[k][key] for k in members])
        return tensors, groups

    def _ground(self, images: list[Image.Image], phrases: list[list[str]], prepared: Any = None,
                positions: list[int] | None = None) -> list[list[Detection]]:
        prompts, spans = zip(*(self.prompt(p) for p in phrases))
        padded_sizes = [self._padded_size(im) for im in images]
        # Images of different sizes would be zero-padded to a common size, and the backbone sees
        # that padding: an image's boxes would depend on its batch-mates. So only images that the
        # processor brings to the same size share a forward pass.
        passes = self._prepared_passes(prepared, positions) if prepared is not None else None
        if passes is None:
            pixels = [self._pixels(im) for im in images]
            passes = [(members, {key: _cat([pixels[k][key] for k in members]) for key in ("pixel_values", "pixel_mask")})
                      for members in _size_groups(pixels)]
        results: list[list[Detection]] = [[] for _ in images]
        step = self.max_batch or len(images)
        for group, arrays in passes:
            for start in range(0, len(group), step):
                members = group[start:start + step]
                texts = [prompts[k] for k in members]
                tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt", return_offsets_mapping=True)
                offsets = tokens.pop("offset_mapping").numpy()
                inputs = {**tokens, **{key: value[start:start + step] for key, value in arrays.items()}}
                out = self._forward(inputs, len(members))
                probs = out.logits.float().sigmoid().cpu().numpy()
                boxes = out.pred_boxes.float().cpu().numpy()
                for j, k in enumerate(members):
                    image = images[k]
                    token_of = _span_tokens(offsets[j], spans[k], probs.shape[-1])
                    scores, eligible, threshold = phrase_scores(probs[j], token_of, self.grounding_rule,
                                                                self.box_threshold, self.text_threshold)
                    xyxy = cxcywh_to_xyxy(boxes[j], *padded_sizes[k])
                    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, image.width)
                    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, image.height)
                    eligible &= large_enough(xyxy, self.min_box_size)
                    results[k] = best_boxes(scores, xyxy, phrases[k], threshold, eligible)
        return results

    @staticmethod
    def _prepared_passes(prepared: Any, positions: list[int] | None) -> list[tuple[list[int], dict[str, Any]]] | None:
        """The forward passes of :meth:`prepare`'s groups, restricted to the images grounded now
        (``positions``: each one's place in the prepared batch); None if one was not prepared."""
        import torch

        tensors, groups = prepared
        where = {position: k for k, position in enumerate(positions or [])}
        passes = []
        found = 0
        for g, group in enumerate(groups):
            rows = [row for row, position in enumerate(group) if position in where]
            if not rows:
                continue
            found += len(rows)
            arrays = {key: tensors[f"{g}.{key}"] for key in ("pixel_values", "pixel_mask")}
            if len(rows) < len(group):
                index = torch.tensor(rows, device=arrays["pixel_values"].device)
                arrays = {key: value.index_select(0, index) for key, value in arrays.items()}
            passes.append(([where[group[row]] for row in rows], arrays))
        return passes if found == len(where) else None

    def _padded_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) of the image :meth:`_pad_to_ratio` gives."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
        width, height = image.size
        if not longest:
            return width, height
        max_ratio = max(float(longest) / 128.0, 1.0)
        return max(width, int(np.ceil(height / max_ratio))), max(height, int(np.ceil(width / max_ratio)))

    def _pad_to_ratio(self, image: Image.Image) -> Image.Image:
        """Pad (bottom/right, black) a very long or tall image so its short side, once the
        processor has resized it, stays >= 128 px: the deepest feature map (stride 64) must be at
        least 2x2 or the model's GroupNorm fails. Boxes keep their origin, so no shift is needed."""
        new_w, new_h = self._padded_size(image)
        if (new_w, new_h) == image.size:
            return image
        canvas = Image.new("RGB", (new_w, new_h), (0, 0, 0))
        canvas.paste(image, (0, 0))
        return canvas

    @staticmethod
    def prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """The lower-case, dot-separated prompt Grounding DINO expects, and each phrase's span."""
        text, spans = "", []
        for phrase in phrases:
            start = len(text)
            text += phrase.lower()
            spans.append((start, len(text)))
            text += ". "
        return text.strip(), spans


def _size_groups(pixels: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Positions of the processed images, grouped by input size (first-seen order)."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, encoded in enumerate(pixels):
        by_size.setdefault(tuple(encoded["pixel_values"].shape[-2:]), []).append(k)
    return list(by_size.values())


def _cat(tensors: list[Any]) -> Any:
    import torch

    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _span_tokens(offsets: np.ndarray, spans: Sequence[tuple[int, int]], limit: int) -> list[list[int]]:
    """Token indices whose character offsets fall inside each span (special tokens have (0, 0))."""
    tokens = []
    for start, end in spans:
        tokens.append([t for t, (a, b) in enumerate(offsets[:limit]) if b > a and a >= start and b <= end])
    return tokens


@GROUNDERS.register("owlv2", default_model="google/owlv2-base-patch16-ensemble", model_types=("owlv2",),
                    description="OWLv2 open-vocabulary detector")
class Owlv2Grounder(_HFGrounder):
    """Each phrase is a text query; OWLv2 pads every image to a square (bottom/right), so its
    normalised boxes are relative to the padded side max(width, height).

    A query has one score per box, so both grounding rules give that score and keep a box above
    ``box_threshold`` (transformers' ``post_process_object_detection`` has this one threshold);
    the rule is still recorded, as asked for. There is no text threshold: it is not recorded,
    and ``--text-threshold`` changes nothing for OWLv2."""

    model_class = "Owlv2ForObjectDetection"
    default_box_threshold = 0.1
    uses_text_threshold = False

    def memory(self) -> StageMemory:
        """Device memory per image of one forward."""
        return owlv2(self.model.config, self.dtype, queries=max(self.max_objects, 1))

    def _ground(self, images: list[Image.Image], phrases: list[list[str]], prepared: Any = None,
                positions: list[int] | None = None) -> list[list[Detection]]:
        results: list[list[Detection]] = []
        step = self.max_batch or len(images)
        for start in range(0, len(images), step):
            results.extend(self._ground_pass(images[start:start + step], phrases[start:start + step]))
        return results

    def _ground_pass(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list[Detection]]:
        # Padding to the model's fixed text length: the processor pads each image's queries
        # separately, so only a common length lets a batch of images stack.
        inputs = self.processor(images=images, text=phrases, padding="max_length", truncation=True,
                                return_tensors="pt")
        out = self._forward(inputs, len(images))
        probs = out.logits.float().sigmoid().cpu().numpy()  # (B, boxes, max_queries)
        boxes = out.pred_boxes.float().cpu().numpy()
        results = []
        for k, image in enumerate(images):
            side = max(image.width, image.height)
            xyxy = cxcywh_to_xyxy(boxes[k], side, side)
            xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, image.width)
            xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, image.height)
            scores = probs[k][:, :len(phrases[k])]
            results.append(best_boxes(scores, xyxy, phrases[k], self.box_threshold,
                                      large_enough(xyxy, self.min_box_size)))
        return results


@GROUNDERS.register("none", default_model=None, description="no grounding: global discrepancy only (fast)")
class NoGrounder:
    """Finds nothing, so D_l falls back to D_g: the global-only fast path."""

    def __init__(self, name: str, source: str | None, *, features: FeatureConfig, device: str, dtype: str,
                 **_: Any) -> None:
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": None, "model_type": None, "weights": None, "random_weights": False}

    def ground(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]],
               prepared: Any = None) -> list[list[Detection]]:
        return [[] for _ in images]


def build_grounder(value: str, model: str | None, *, features: FeatureConfig, device: str, dtype: str,
                   optimize: bool = True) -> Any:
    """The grounder for ``--grounder value [--grounder-model model]``.

    Raises:
        UnknownNameError: an unknown grounder. ModelLoadError: its checkpoint cannot be loaded.
    """
    component, source = GROUNDERS.resolve(value, model)
    return component.factory(component.name, source, features=features, device=device, dtype=dtype, optimize=optimize)
