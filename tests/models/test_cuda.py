"""The CUDA path on a GPU: each GPU change against the plain transformers modules on the device,
as tests/models/test_optimize.py does on the CPU. Marked ``cuda`` and skipped without a GPU;
``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``) on the accelerator machine.

``TIDY_DETECT_CUDA_TESTS=cpu`` dry-runs the tests that make sense without a GPU on the CPU (it
checks the tests' own code, not the GPU path); the rest skip then.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.conftest import make_tree, random_image

DRY_RUN = os.environ.get("TIDY_DETECT_CUDA_TESTS", "").strip().lower() == "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() and not DRY_RUN,
                                 reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")]
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, also in a dry run")


def _images(n, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    sizes = sizes or [(int(rng.integers(40, 120)), int(rng.integers(40, 120))) for _ in range(n)]
    return [random_image(rng, w, h) for w, h in sizes]


def _loaded(images):
    from tidy_detect.images import LoadedImage

    return [LoadedImage(im, f"{k:064x}", im.width, im.height, "PNG", 0) for k, im in enumerate(images)]


def _tolerance(dtype: str) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == "float32" else {"rtol": 3e-2, "atol": 3e-2}


# -- CLIP ----------------------------------------------------------------------------------------

def test_the_8_bit_global_view_is_normalised_on_the_device_to_numpys_values(tiny_bundle):
    from tidy_detect.models.clip import ClipEncoder

    clip = ClipEncoder(str(tiny_bundle / "clip"), device=DEVICE, dtype="float32")
    views = _images(5, seed=1)
    on_device = clip._device_pixels(torch.from_numpy(clip.global_view_uint8(views)))
    assert on_device.device.type == DEVICE
    np.testing.assert_array_equal(on_device.cpu().numpy(), clip.global_pixels(views))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_clip_on_the_device_gives_the_embeddings_of_plain_transformers(tiny_bundle, dtype):
    from transformers import CLIPModel

    from tidy_detect.models.clip import ClipEncoder
    from tidy_detect.models.loading import torch_dtype

    source = str(tiny_bundle / "clip")
    clip = ClipEncoder(source, device=DEVICE, dtype=dtype)
    if DEVICE == "cuda":
        assert clip.attention == "sdpa"
        assert not any(getattr(m, "_tidy_folded", False) for m in clip.model.modules())  # CPU-only speed-up
    plain = CLIPModel.from_pretrained(source, dtype=torch_dtype(dtype)).to(DEVICE).eval()
    images, texts = _images(6, seed=2), ["a dog", "a red car on a road", "tree"]
    pixels = torch.from_numpy(clip.global_pixels(images)).to(DEVICE, torch_dtype(dtype))
    tokens = clip.processor.tokenizer(texts, padding=True, return_tensors="pt").to(DEVICE)
    with torch.inference_mode():
        want_images = plain.get_image_features(pixel_values=pixels).pooler_output.float().cpu().numpy()
        want_texts = plain.get_text_features(**tokens).pooler_output.float().cpu().numpy()
    np.testing.assert_allclose(clip.encode_global(images), want_images, **_tolerance(dtype))
    np.testing.assert_allclose(clip.encode_texts(texts), want_texts, **_tolerance(dtype))
    crops = _images(7, seed=3)
    want_crops = plain.get_image_features(
        pixel_values=torch.from_numpy(clip.crop_pixels(crops)).to(DEVICE, torch_dtype(dtype))).pooler_output
    np.testing.assert_allclose(clip.encode_crops(crops), want_crops.detach().float().cpu().numpy(), **_tolerance(dtype))


@gpu_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_clip_replayed_from_cuda_graphs_gives_the_same_embeddings(tiny_bundle, dtype):
    from tidy_detect.models.clip import ClipEncoder

    source = str(tiny_bundle / "clip")
    plain = ClipEncoder(source, device="cuda", dtype=dtype)
    graphed = ClipEncoder(source, device="cuda", dtype=dtype, cuda_graphs=True)
    for n in (3, 5, 8, 1):  # padded to 4, 8, 8 (the same graph again) and 1
        images = _images(n, seed=10 + n)
        np.testing.assert_allclose(graphed.encode_global(images), plain.encode_global(images), **_tolerance(dtype))
    assert {key[0] for key in graphed._graphed.graphs} == {1, 4, 8}


@gpu_only
def test_clip_compiled_gives_the_same_embeddings(tiny_bundle):
    from tidy_detect.models.clip import ClipEncoder

    source = str(tiny_bundle / "clip")
    plain = ClipEncoder(source, device="cuda", dtype="float32")
    compiled = ClipEncoder(source, device="cuda", dtype="float32", compile=True)
    images = _images(4, seed=4)
    np.testing.assert_allclose(compiled.encode_global(images), plain.encode_global(images), rtol=1e-4, atol=1e-4)


# -- captioning and grounding --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captions_on_the_device_are_those_of_plain_generate(tiny_bundle, dtype):
    from transformers import Blip2ForConditionalGeneration

    from tidy_detect.config import FeatureConfig
    from tidy_detect.models.captioners import build_captioner, clean_caption
    from tidy_detect.models.loading import keep_fp32_modules, torch_dtype

    source = str(tiny_bundle / "blip2")
    features = FeatureConfig(caption_max_tokens=10)
    captioner = build_captioner("blip2", source, features=features, device=DEVICE, dtype=dtype)
    plain = Blip2ForConditionalGeneration.from_pretrained(source, dtype=torch_dtype(dtype))
    keep_fp32_modules(plain)
    plain = plain.to(DEVICE).eval()
    images = _images(5, seed=5)
    inputs = captioner.processor(images=images, return_tensors="pt")
    inputs = {k: v.to(DEVICE, torch_dtype(dtype)) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}
    with torch.inference_mode():
        out = plain.generate(**inputs, max_new_tokens=10, num_beams=1, do_sample=False)
    want = [clean_caption(t) for t in captioner.processor.batch_decode(out.cpu(), skip_special_tokens=True)]
    assert captioner.caption(images) == want
    prepared = captioner.prepare(images)
    assert captioner.caption(images, prepared=prepared) == want
    if dtype == "float32":
        captioner.max_batch = 2  # passes of 2, 2 and 1: the same captions
        assert captioner.caption(images) == want


def test_the_static_kv_cache_gives_the_same_captions_on_the_device(tiny_bundle):
    from tidy_detect.config import FeatureConfig
    from tidy_detect.models.captioners import build_captioner

    source, features = str(tiny_bundle / "blip2"), FeatureConfig(caption_max_tokens=10)
    dynamic = build_captioner("blip2", source, features=features, device=DEVICE, dtype="float32")
    static = build_captioner("blip2", source, features=features, device=DEVICE, dtype="float32", static_cache=True)
    assert static.static_cache
    images = _images(4, seed=6)
    assert static.caption(images) == dynamic.caption(images)
    assert static.caption(images[:3]) == dynamic.caption(images[:3])  # another batch size: a new cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grounding_on_the_device_prepared_or_not_is_that_of_plain_transformers(tiny_bundle, dtype):
    from transformers import GroundingDinoForObjectDetection

    from tidy_detect.config import FeatureConfig
    from tidy_detect.models.grounders import build_grounder
    from tidy_detect.models.loading import torch_dtype

    source = str(tiny_bundle / "grounding-dino")
    features = FeatureConfig(box_threshold=0.0, text_threshold=0.0, min_box_size=0)
    grounder = build_grounder("grounding-dino", source, features=features, device=DEVICE, dtype=dtype)
    images = _images(4, seed=7, sizes=[(80, 60), (60, 80), (80, 60), (64, 64)])
    phrases = [["dog", "red car"], ["tree"], ["a table", "cat"], ["man"]]
    inline = grounder.ground(images, phrases)
    tensors, groups = grounder.prepare(images)
    prepared = grounder.ground(images, phrases, prepared=({k: v.to(DEVICE) for k, v in tensors.items()}, groups))
    for a, b in zip(inline, prepared):
        assert [d.phrase for d in a] == [d.phrase for d in b]
        np.testing.assert_allclose([d.box for d in a], [d.box for d in b], rtol=1e-5, atol=1e-3)
    if DEVICE == "cpu" and dtype == "bfloat16":
        return  # a dry run: the CPU's own speed-ups place bfloat16 samples more exactly than transformers does
    # Against transformers' module on the device, image by image (the first image).
    plain = GroundingDinoForObjectDetection.from_pretrained(source, dtype=torch_dtype(dtype)).to(DEVICE).eval()
    text, _ = grounder.prompt(phrases[0])
    inputs = grounder.processor(images=[images[0]], text=[text], return_tensors="pt")
    inputs = {k: v.to(DEVICE, torch_dtype(dtype)) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}
    with torch.inference_mode():
        mine, want = grounder.model(**inputs), plain(**inputs)
    torch.testing.assert_close(mine.pred_boxes.float(), want.pred_boxes.float(), **_tolerance(dtype))
    torch.testing.assert_close(mine.logits.float(), want.logits.float(), **_tolerance(dtype))


def test_blip_attention_through_sdpa_on_the_device_matches_transformers():
    import copy

    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipAttention

    from tidy_detect.models.optimize import speed_up_attention

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        reference = BlipAttention(BlipVisionConfig(hidden_size=64, num_attention_heads=4)).eval().to(DEVICE, dtype)
        fast = copy.deepcopy(reference)
        assert speed_up_attention(fast) == 1  # the one speed-up that runs off the CPU
        hidden = torch.randn(3, 17, 64, device=DEVICE).to(dtype)
        with torch.inference_mode():
            want, _ = reference(hidden)
            got, _ = fast(hidden)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_cpu_only_speedups_stay_off_on_the_device(tiny_bundle):
    from tidy_detect.models.loading import prepare_model

    for folder, cls in (("grounding-dino", "GroundingDinoForObjectDetection"), ("blip2", "Blip2ForConditionalGeneration"),
                        ("clip", "CLIPModel")):
        model, _, _ = prepare_model(cls, str(tiny_bundle / folder), what="m", option="--m", device=DEVICE,
                                    dtype="float32")
        found = {type(m).__name__ for m in model.modules() if getattr(m, "_tidy_fast", False)
                 or getattr(m, "_tidy_folded", False) or type(m).__name__ == "LinearActivation"
                 or getattr(m, "_tidy_tracks_attentions", False)
                 or (isinstance(m, torch.nn.ReLU) and m.inplace)}
        if DEVICE == "cuda":
            assert found == set(), (folder, found)


# -- the extractor -------------------------------------------------------------------------------

def _assembled(tiny_bundle, prepare_ahead: str, device: str = DEVICE):
    """The tiny bundle's models in an extractor without spaCy (fixed phrases): the accelerator
    machine has no spaCy, and phrases are a CPU stage whatever the device."""
    from tidy_detect.bench.run import FixedPhrases
    from tidy_detect.config import ExtractionConfig, FeatureConfig, RuntimeConfig
    from tidy_detect.features.extractor import Extractor
    from tidy_detect.models.captioners import build_captioner
    from tidy_detect.models.clip import ClipEncoder
    from tidy_detect.models.grounders import build_grounder

    features = FeatureConfig(caption_max_tokens=10, box_threshold=0.0, text_threshold=0.0, min_box_size=0)
    extractor = Extractor(ExtractionConfig(features=features, runtime=RuntimeConfig(
        device=device, dtype="float32", prepare_ahead=prepare_ahead)))
    extractor.device, extractor.dtype = device, "float32"
    extractor.dtypes = {kind: "float32" for kind in ("clip", "captioner", "grounder")}
    extractor.clip = ClipEncoder(str(tiny_bundle / "clip"), device=device, dtype="float32")
    extractor.captioner = build_captioner("blip2", str(tiny_bundle / "blip2"), features=features, device=device,
                                          dtype="float32")
    extractor.grounder = build_grounder("grounding-dino", str(tiny_bundle / "grounding-dino"), features=features,
                                        device=device, dtype="float32")
    extractor.phrases = FixedPhrases(["dog", "red car", "tree"])
    extractor.plan_batches()
    return extractor


def test_the_extractor_on_the_device_prepared_ahead_gives_the_rows_made_inline(tiny_bundle):
    from tidy_detect.data.inputs import ImageItem
    from tidy_detect.features.extractor import with_prepared

    fast, inline = _assembled(tiny_bundle, "on"), _assembled(tiny_bundle, "off")
    assert fast.prepares_ahead and not inline.prepares_ahead
    images = _loaded(_images(9, seed=8))
    items = [ImageItem(f"/x/{k}.png") for k in range(9)]
    batches = [[(items[k], images[k], 0.0) for k in range(start, min(start + 4, 9))] for start in (0, 4, 8)]
    rows, want = [], []
    for batch, prepared in with_prepared(fast, iter(batches)):
        assert prepared is not None
        rows.extend(fast.process([b[0] for b in batch], [b[1] for b in batch], prepared=prepared))
        want.extend(inline.process([b[0] for b in batch], [b[1] for b in batch]))
    assert len(rows) == len(want) == 9
    for got, ref in zip(rows, want):
        assert (got["caption"], got["object_phrases"]) == (ref["caption"], ref["object_phrases"])
        np.testing.assert_allclose(got["boxes"], ref["boxes"], rtol=1e-5, atol=1e-3)
        for key in ("global_image", "global_text", "local_images", "local_texts"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6)
    # The global view depends on the pixels alone: the same I0 as the CPU computes.
    cpu = _assembled(tiny_bundle, "off", device="cpu")
    np.testing.assert_allclose(np.stack([r["global_image"] for r in rows]),
                               cpu.clip.encode_global([im.image for im in images]), rtol=1e-4, atol=1e-5)
    fast.close()


@gpu_only
def test_prepared_inputs_travel_in_one_copy_on_a_side_stream():
    from tidy_detect.models.device import to_device

    tensors = {"a": torch.randn(64, 3, 32, 32), "b": torch.arange(100), "c": torch.randint(0, 255, (8, 16, 16, 3),
                                                                                            dtype=torch.uint8)}
    side = torch.cuda.Stream()
    moved = to_device(tensors, "cuda", stream=side)
    ready = moved.ready()
    base = moved.buffer.untyped_storage().data_ptr()
    for name, tensor in tensors.items():
        assert ready[name].device.type == "cuda" and ready[name].untyped_storage().data_ptr() == base
        assert torch.equal(ready[name].cpu(), tensor)
    assert moved.host is None  # released once the copy was waited for


@gpu_only
def test_running_out_of_device_memory_names_the_stage_and_frees_what_it_took(tiny_bundle, monkeypatch):
    from tidy_detect.models.clip import ClipEncoder
    from tidy_detect.models.device import DeviceMemoryError

    clip = ClipEncoder(str(tiny_bundle / "clip"), device="cuda", dtype="float32")
    before = torch.cuda.memory_allocated()
    original = clip._image_features

    def too_large(pixels):
        total = torch.cuda.get_device_properties(0).total_memory
        return torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # a real allocator failure

    monkeypatch.setattr(clip, "_image_features", too_large)
    with pytest.raises(DeviceMemoryError, match=r"clip image stage .* GiB free of .* GiB on cuda"):
        clip.encode_global(_images(2, seed=9))
    monkeypatch.setattr(clip, "_image_features", original)
    assert torch.cuda.memory_allocated() <= before + 2 ** 20
    assert clip.encode_global(_images(2, seed=9)).shape == (2, clip.dim)  # the device is usable again


@gpu_only
def test_batch_sizes_come_from_the_free_memory(tiny_bundle):
    extractor = _assembled(tiny_bundle, "auto")
    plan = extractor.memory_plan
    free, _ = torch.cuda.mem_get_info()
    assert plan is not None and 0 < plan["free_bytes"] <= free * 1.1
    assert 1 <= extractor.batch_size <= 128
    assert extractor.captioner.max_batch >= extractor.batch_size and extractor.grounder.max_batch >= extractor.batch_size
    assert set(plan["stages"]) == {"caption", "ground", "clip image", "clip text"}


@gpu_only
def test_two_processes_one_on_the_gpu_write_one_store(tiny_bundle, tmp_path):
    pytest.importorskip("spacy", reason="the engine's workers load spaCy (not on every GPU machine)")
    from tidy_detect.config import load_preset
    from tidy_detect.distributed.engines import extract_with_engine

    root = tmp_path / "tree"
    make_tree(root, {"a": 2, "b": 2})
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"devices": ("cuda:0", "cpu"), "batch_size": 2})
    summary = extract_with_engine("local", [root], tmp_path / "store", config)
    assert summary.processed == 8 and summary.errors == 0
