"""How a phrase is scored against a box: the grounding rules on hand-made probabilities, the
minimum box size, strict thresholds, and both rules end to end on the tiny grounders."""

from __future__ import annotations

import numpy as np
import pytest

from tidy_detect.config import FeatureConfig
from tidy_detect.detect import config_from_extraction
from tidy_detect.errors import ConfigError
from tidy_detect.models.grounders import best_boxes, build_grounder, large_enough, phrase_scores, positive_map

from tests.conftest import random_image

# Three boxes, five prompt tokens; phrase A is tokens 1-2, phrase B is token 4.
PROBS = np.array([
    [0.05, 0.90, 0.10, 0.02, 0.20],  # box 0: one confident token of A
    [0.05, 0.45, 0.45, 0.02, 0.30],  # box 1: A as a whole
    [0.05, 0.10, 0.10, 0.02, 0.40],  # box 2: B
])
TOKENS = [[1, 2], [4]]
BOXES = np.array([[0, 0, 50, 50], [10, 10, 60, 60], [0, 0, 40, 40]], dtype=float)


def test_span_mean_is_the_dot_with_the_span_normalised_positive_map():
    scores, eligible, threshold = phrase_scores(PROBS, TOKENS, "span-mean", 0.35, 0.25)
    np.testing.assert_allclose(scores[:, 0], [0.5, 0.45, 0.1], rtol=1e-5)  # [0.9, 0.1] -> 0.5
    np.testing.assert_allclose(scores[:, 1], [0.2, 0.3, 0.4], rtol=1e-5)
    assert eligible.all() and threshold == 0.35  # the box threshold, no text threshold
    pmap = positive_map(TOKENS, 5)
    np.testing.assert_allclose(pmap.sum(axis=1), [2 / (2 + 1e-6), 1 / (1 + 1e-6)])  # the original's + 1e-6


def test_token_max_is_the_best_token_with_both_thresholds():
    scores, eligible, threshold = phrase_scores(PROBS, TOKENS, "token-max", 0.35, 0.25)
    np.testing.assert_allclose(scores, [[0.9, 0.2], [0.45, 0.3], [0.1, 0.4]])
    assert eligible.tolist() == [True, True, True] and threshold == 0.25


def test_the_rules_choose_different_boxes_and_phrases():
    mean = _ground("span-mean", 0.35, 0.25)
    top = _ground("token-max", 0.35, 0.25)
    assert [(d.phrase, d.box) for d in mean] == [("man's hat", (0, 0, 50, 50)), ("dog", (0, 0, 40, 40))]
    assert [d.score for d in mean] == pytest.approx([0.5, 0.4], rel=1e-5)
    assert [(d.phrase, d.score) for d in top] == [("man's hat", 0.9), ("dog", 0.4)]
    # One confident token is not the phrase: at box threshold 0.6 the mean rejects "man's hat"
    # (0.5), the best token keeps it (0.9 on a box whose best token passes 0.6).
    assert [d.phrase for d in _ground("span-mean", 0.6, 0.25)] == []
    assert [d.phrase for d in _ground("token-max", 0.6, 0.25)] == ["man's hat"]


def _ground(rule, box_threshold, text_threshold):
    scores, eligible, threshold = phrase_scores(PROBS, TOKENS, rule, box_threshold, text_threshold)
    return best_boxes(scores, BOXES, ["man's hat", "dog"], threshold, eligible)


def test_thresholds_are_strict():
    # transformers and the original keep scores > threshold: a score equal to it is out
    assert best_boxes(np.array([[0.35]]), BOXES[:1], ["dog"], 0.35) == []
    assert len(best_boxes(np.array([[0.3501]]), BOXES[:1], ["dog"], 0.35)) == 1
    scores, eligible, _ = phrase_scores(np.array([[0.35, 0.35]]), [[0], [1]], "token-max", 0.35, 0.0)
    assert not eligible.any()


def test_a_phrase_without_tokens_scores_zero_and_is_never_kept():
    for rule in ("span-mean", "token-max"):
        scores, eligible, threshold = phrase_scores(PROBS, [[], [4]], rule, 0.0, 0.0)
        assert (scores[:, 0] == 0).all()
        assert [d.phrase for d in best_boxes(scores, BOXES, ["cut", "dog"], threshold, eligible)] == ["dog"]


def test_unknown_rule_names_the_known_ones():
    with pytest.raises(ConfigError, match="grounding rule must be one of span-mean, token-max, got 'max'"):
        phrase_scores(PROBS, TOKENS, "max", 0.35, 0.25)
    with pytest.raises(ConfigError, match="features.grounding_rule must be one of span-mean, token-max, got 'mean'"):
        FeatureConfig(grounding_rule="mean")
    with pytest.raises(ConfigError, match=r"features.min_box_size must be a number of pixels in \[0, 4096\], got -1"):
        FeatureConfig(min_box_size=-1)


def test_minimum_box_size_drops_a_3x3_box():
    boxes = np.array([[10, 10, 13, 13], [0, 0, 100, 7.9], [0, 0, 8, 8], [5, 5, 45, 30]], dtype=float)
    assert large_enough(boxes, 8).tolist() == [False, False, True, True]
    assert large_enough(boxes, 0).all()
    scores = np.array([[0.9], [0.8], [0.2], [0.5]])
    (found,) = best_boxes(scores, boxes, ["dog"], 0.35, large_enough(boxes, 8))
    assert found.box == (5, 5, 45, 30) and found.score == 0.5  # the best box among the large enough
    assert best_boxes(scores[:1], boxes[:1], ["dog"], 0.35, large_enough(boxes[:1], 8)) == []


def test_defaults_are_the_original_rule_with_a_minimum_box():
    features = FeatureConfig()
    assert features.grounding_rule == "span-mean" and features.min_box_size == 8
    assert features.caption_max_tokens == 60


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2"])
@pytest.mark.parametrize("rule", ["span-mean", "token-max"])
def test_tiny_grounders_run_with_both_rules_and_record_them(tiny_bundle, name, rule):
    rng = np.random.default_rng(7)
    images = [random_image(rng, 90, 70), random_image(rng, 40, 120)]
    features = FeatureConfig(box_threshold=0.0, text_threshold=0.0, grounding_rule=rule, min_box_size=0)
    grounder = build_grounder(name, str(tiny_bundle / name), features=features, device="cpu", dtype="float32")
    found = grounder.ground(images, [["dog", "red car"], ["table"]])
    assert [[d.phrase for d in dets] for dets in found] == [["dog", "red car"], ["table"]]
    described = grounder.describe()
    assert described["grounding_rule"] == rule and described["min_box_size"] == 0
    # a text threshold is recorded only where it is used: Grounding DINO under token-max
    assert ("text_threshold" in described) == (name == "grounding-dino" and rule == "token-max")
    # the recorded grounder reads back as the same settings
    back = config_from_extraction({"clip": {"source": "c"}, "captioner": {"name": "provided"},
                                   "grounder": described, "phrases": {}}).features
    assert (back.grounding_rule, back.min_box_size, back.box_threshold) == (rule, 0, 0.0)
    # the minimum size applies: no tiny random box survives a 1000-px minimum
    big = FeatureConfig(box_threshold=0.0, text_threshold=0.0, grounding_rule=rule, min_box_size=1000)
    strict = build_grounder(name, str(tiny_bundle / name), features=big, device="cpu", dtype="float32")
    assert strict.ground(images, [["dog"], ["table"]]) == [[], []]


def test_grounding_dino_span_mean_matches_the_mean_of_its_token_probabilities(tiny_bundle):
    import torch

    features = FeatureConfig(box_threshold=0.0, min_box_size=0)
    grounder = build_grounder("grounding-dino", str(tiny_bundle / "grounding-dino"), features=features,
                              device="cpu", dtype="float32")
    image = random_image(np.random.default_rng(8), 80, 60)
    (dets,) = grounder.ground([image], [["red car"]])
    text, _ = grounder.prompt(["red car"])
    inputs = grounder.processor(images=[image], text=[text], return_tensors="pt")
    with torch.inference_mode():
        probs = grounder.model(**inputs).logits.sigmoid()[0].numpy()
    ids = inputs["input_ids"][0].tolist()
    span = [i for i, t in enumerate(ids) if t not in (101, 102, 1012)]  # the phrase's tokens
    assert dets[0].score == pytest.approx(probs[:, span].mean(axis=1).max(), rel=1e-4)


def test_stores_recorded_without_a_rule_read_back_as_the_old_rule():
    old = {"clip": {"source": "c"}, "captioner": {"name": "provided"},
           "grounder": {"name": "grounding-dino", "source": "g", "box_threshold": 0.35, "text_threshold": 0.25},
           "phrases": {}}
    features = config_from_extraction(old).features
    assert (features.grounding_rule, features.min_box_size, features.text_threshold) == ("token-max", 0, 0.25)


def test_old_stores_and_heads_stay_compatible_with_the_old_rule_only():
    from tidy_detect.features.store import extraction_mismatches

    base = {"clip": {"source": "c"}, "captioner": {"name": "provided"}, "phrases": {}}
    old_dino = {**base, "grounder": {"name": "grounding-dino", "box_threshold": 0.35, "text_threshold": 0.25}}
    old_owl = {**base, "grounder": {"name": "owlv2", "box_threshold": 0.1, "text_threshold": 0.1}}
    as_before = {"grounding_rule": "token-max", "min_box_size": 0}
    assert extraction_mismatches(old_dino, {**base, "grounder": {**old_dino["grounder"], **as_before}}) == []
    # OWLv2 no longer records the text threshold it never used
    assert extraction_mismatches(old_owl, {**base, "grounder": {"name": "owlv2", "box_threshold": 0.1,
                                                                **as_before}}) == []
    now = {**base, "grounder": {"name": "grounding-dino", "box_threshold": 0.35, "grounding_rule": "span-mean",
                                "min_box_size": 8}}
    diffs = extraction_mismatches(old_dino, now)
    assert any(d.startswith("grounder.grounding_rule") for d in diffs)
    assert any(d.startswith("grounder.min_box_size") for d in diffs)
