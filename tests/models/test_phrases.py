"""Phrases are slices of the caption's own text, never its tokens joined again."""

from __future__ import annotations

import pytest

from tidy_detect.config import DEFAULT_PHRASE_STOPLIST
from tidy_detect.models.phrases import PhraseExtractor


@pytest.fixture(scope="module")
def extractor():
    return PhraseExtractor(max_objects=8, stoplist=DEFAULT_PHRASE_STOPLIST)


def test_apostrophes_and_hyphens_stay_as_written(extractor):
    # Re-joined tokens gave ["man 's hat", "t shirt"].
    assert extractor.extract(["a man's hat and a t-shirt"]) == [["man's hat", "t-shirt"]]


@pytest.mark.parametrize("caption, expected", [
    ("a man in a t-shirt, jeans and a baseball cap", ["man", "t-shirt", "jeans", "baseball cap"]),
    ("a 3-year-old boy on a merry-go-round", ["3-year-old boy", "merry-go-round"]),
    ("an a-frame house", ["a-frame house"]),
    ("her dog's ball", ["dog's ball"]),
    ("the u.s. flag", ["u.s. flag"]),
    ("a red, white and blue flag on a pole", ["red, white and blue flag", "pole"]),
    ('a "stop" sign', ['"stop" sign']),
    ("...a cat (a tabby) on a mat.", ["cat", "tabby", "mat"]),
])
def test_punctuation_inside_a_chunk_is_kept_around_it_is_not(extractor, caption, expected):
    assert extractor.extract([caption]) == [expected]


def test_runs_of_spaces(extractor):
    assert extractor.extract(["two  dogs   playing with a  red ball."]) == [["dogs", "red ball"]]
    assert extractor.extract(["a woman's  hand  and a man's hat"]) == [["woman's hand", "man's hat"]]
    # the same object written with different spacing or case is one phrase
    assert extractor.extract(["a red  ball, a red ball and a Red ball"]) == [["red ball"]]


def test_stoplist_dedup_and_cap_still_apply():
    extractor = PhraseExtractor(max_objects=2, stoplist=["close", "front"])
    assert extractor.extract(["a close up of a man's hat in front of a t-shirt and a dog"]) == \
        [["man's hat", "t-shirt"]]
    assert extractor.extract(["a t-shirt and a t-shirt"]) == [["t-shirt"]]
