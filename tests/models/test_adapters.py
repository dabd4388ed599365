"""Every adapter on the tiny bundle: the real loading code on small random-weight models."""

from __future__ import annotations

import numpy as np
import pytest

from tidy_detect.config import FeatureConfig
from tidy_detect.errors import InputError, ModelLoadError, UnknownNameError
from tidy_detect.models.captioners import build_captioner, clean_caption
from tidy_detect.models.clip import ClipEncoder
from tidy_detect.models.grounders import GroundingDinoGrounder, build_grounder, cxcywh_to_xyxy
from tidy_detect.models.loading import load_pretrained
from tidy_detect.models.phrases import PhraseExtractor
from tidy_detect.models.registry import CAPTIONERS, GROUNDERS, ensure_registered

from tests.conftest import random_image

# The tiny grounders' random boxes are a few pixels wide: no minimum size, so every phrase gets one.
FEATURES = FeatureConfig(caption_max_tokens=8, box_threshold=0.0, text_threshold=0.0, min_box_size=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [random_image(rng, 50, 40), random_image(rng, 23, 91), random_image(rng, 130, 64)]


@pytest.mark.parametrize("folder", ["clip", "clip-b"])
def test_clip_embeddings_have_the_projected_size(tiny_bundle, folder, images):
    clip = ClipEncoder(str(tiny_bundle / folder))
    assert clip.describe()["dim"] == clip.dim
    assert clip.encode_global(images).shape == (3, clip.dim)
    assert clip.encode_crops(images[:2]).shape == (2, clip.dim)
    texts = clip.encode_texts(["a dog", "a cat", "a dog"])
    assert texts.shape == (3, clip.dim)
    np.testing.assert_array_equal(texts[0], texts[2])
    assert clip.cache_hits == 1 and clip.cache_misses == 2  # the repeat is computed once
    np.testing.assert_array_equal(clip.encode_texts(["a cat"])[0], texts[1])
    assert clip.cache_hits == 2


def test_clip_dims_differ_between_models(tiny_bundle):
    assert ClipEncoder(str(tiny_bundle / "clip")).dim != ClipEncoder(str(tiny_bundle / "clip-b")).dim


def test_clip_global_view_is_the_native_center_crop(tiny_bundle, images):
    clip = ClipEncoder(str(tiny_bundle / "clip"))
    pixels = clip.global_pixels(images)
    assert pixels.shape == (3, 3, clip.image_size, clip.image_size)
    # an image smaller than the crop is padded with black: normalised black at the border
    black = (0 - np.array(clip.mean)) / np.array(clip.std)
    np.testing.assert_allclose(pixels[1, :, clip.image_size // 2, 0], black, rtol=1e-5)


@pytest.mark.parametrize("name", ["blip", "blip2", "llava"])
def test_each_captioner_returns_clean_text(tiny_bundle, name, images):
    captioner = build_captioner(name, str(tiny_bundle / name), features=FEATURES, device="cpu", dtype="float32")
    captions = captioner.caption(images)
    assert len(captions) == 3
    for caption in captions:
        assert caption and caption == caption.strip()
        assert "<image>" not in caption and "[DEC]" not in caption and "</s>" not in caption
        assert "ASSISTANT" not in caption and "Please generate" not in caption
    assert captioner.caption(images) == captions  # deterministic decoding
    assert captioner.describe()["name"] == name


def test_captioner_resolved_from_a_folder(tiny_bundle):
    component, source = CAPTIONERS.resolve(str(tiny_bundle / "llava"))
    assert component.name == "llava" and source == str(tiny_bundle / "llava")
    assert CAPTIONERS.resolve("blip2")[1] == "Salesforce/blip2-opt-2.7b"


def test_provided_captioner(tiny_bundle, images):
    captioner = build_captioner("provided", None, features=FEATURES, device="cpu", dtype="float32")
    assert captioner.caption(images[:2], ["A dog on a bed. ", "a cat"]) == ["A dog on a bed.", "a cat"]
    with pytest.raises(InputError, match="needs a caption for every image"):
        captioner.caption(images[:2], ["a dog", None])


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2"])
def test_each_grounder_returns_boxes_inside_the_image(tiny_bundle, name, images):
    grounder = build_grounder(name, str(tiny_bundle / name), features=FEATURES, device="cpu", dtype="float32")
    phrases = [["dog", "red car"], [], ["table"]]
    found = grounder.ground(images, phrases)
    assert len(found) == 3 and found[1] == []
    for image, dets, asked in zip(images, found, phrases):
        assert [d.phrase for d in dets] == asked  # threshold 0: every phrase gets its best box
        for d in dets:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
            assert 0.0 <= d.score <= 1.0


def test_grounder_threshold_drops_phrases(tiny_bundle, images):
    strict = FeatureConfig(box_threshold=1.0, text_threshold=1.0)
    grounder = build_grounder("grounding-dino", str(tiny_bundle / "grounding-dino"), features=strict,
                              device="cpu", dtype="float32")
    assert grounder.ground(images[:1], [["dog"]]) == [[]]


def test_no_grounder(images):
    grounder = build_grounder("none", None, features=FEATURES, device="cpu", dtype="float32")
    assert grounder.ground(images, [["dog"], [], []]) == [[], [], []]


def test_grounding_dino_prompt_spans():
    text, spans = GroundingDinoGrounder.prompt(["Brown dog", "red car"])
    assert text == "brown dog. red car."
    assert [text[a:b] for a, b in spans] == ["brown dog", "red car"]


def test_box_conversion():
    boxes = cxcywh_to_xyxy(np.array([[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.4, 0.4]]), 100, 50)
    np.testing.assert_allclose(boxes, [[25, 12.5, 75, 37.5], [70, 0, 100, 15]])


def test_phrases():
    extractor = PhraseExtractor(max_objects=2, stoplist=["close", "front", "image", "picture"])
    assert extractor.extract(["a close up of a brown dog sitting in front of a red car near a tree"]) == \
        [["brown dog", "red car"]]
    assert extractor.extract(["the image of a picture", ""]) == [[], []]
    assert PhraseExtractor(max_objects=0).extract(["a dog"]) == [[]]


def test_clean_caption():
    assert clean_caption("  arafed man riding a horse \n second line") == "man riding a horse"
    assert clean_caption("Please generate a caption. A dog.", "Please generate a caption.") == "A dog."
    assert clean_caption("ASSISTANT: A cat on a mat.") == "A cat on a mat."


def test_unknown_names_list_the_known_ones():
    ensure_registered()
    with pytest.raises(UnknownNameError, match="Unknown captioner 'blip3'. Known: blip, blip2, llava, provided."):
        CAPTIONERS.get("blip3")
    with pytest.raises(UnknownNameError, match="Unknown grounder 'glip'. Known: grounding-dino, none, owlv2"):
        GROUNDERS.resolve("glip")


def test_folder_of_an_unsupported_model_type(tiny_bundle):
    with pytest.raises(UnknownNameError, match="model_type 'clip', which no captioner handles"):
        CAPTIONERS.resolve(str(tiny_bundle / "clip"))


def test_missing_weights_give_one_clear_error(tmp_path):
    from transformers import CLIPModel

    with pytest.raises(ModelLoadError) as info:
        load_pretrained(CLIPModel, "openai/clip-vit-large-patch14", what="CLIP model", option="--clip")
    message = str(info.value)
    assert "openai/clip-vit-large-patch14" in message and "not in the local Hugging Face cache" in message
    assert "--clip DIR" in message and "hf download" in message
    with pytest.raises(ModelLoadError, match="no such folder, and it is not a hub id"):
        load_pretrained(CLIPModel, str(tmp_path / "nowhere" / "clip"), what="CLIP model", option="--clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="Cannot load CLIP model from folder"):
        load_pretrained(CLIPModel, str(tmp_path / "empty"), what="CLIP model", option="--clip")


def test_hub_id_of_unknown_type_is_a_clear_error_offline():
    with pytest.raises(ModelLoadError, match="Cannot tell which captioner handles 'someone/captioner-x'"):
        CAPTIONERS.resolve("someone/captioner-x")


def test_grounding_dino_handles_tiny_and_extreme_images(tiny_bundle):
    grounder = build_grounder("grounding-dino", str(tiny_bundle / "grounding-dino"), features=FEATURES,
                              device="cpu", dtype="float32")
    rng = np.random.default_rng(4)
    for size in [(8, 8), (12, 600), (900, 10)]:
        image = random_image(rng, *size)
        (dets,) = grounder.ground([image], [["dog"]])
        assert len(dets) == 1
        x0, y0, x1, y1 = dets[0].box
        assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2"])
def test_grounding_does_not_depend_on_batch_mates(tiny_bundle, name, images):
    grounder = build_grounder(name, str(tiny_bundle / name), features=FEATURES, device="cpu", dtype="float32")
    phrases = [["dog", "red car"], ["a very long phrase about a table"], ["table"]]
    together = grounder.ground(images, phrases)
    for k in range(3):
        (alone,) = grounder.ground([images[k]], [phrases[k]])
        assert [d.phrase for d in alone] == [d.phrase for d in together[k]]
        for a, b in zip(alone, together[k]):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            assert a.score == pytest.approx(b.score, abs=1e-5)
