"""Speed-ups keep the models' results: each patched forward against transformers' module, and
every speed-up together on the tiny bundle's models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tidy_detect.models import optimize
from tidy_detect.models.loading import resolve_dtype
from tidy_detect.models.optimize import _bilinear_sum, cpu_has_fast_bf16, fold_quick_gelu

from tests.conftest import random_image


@pytest.fixture(params=["on", "off"])
def speedups(request, monkeypatch) -> bool:
    """The equivalence tests run with the one switch on and off (TIDY_DETECT_SPEEDUPS)."""
    if request.param == "off":
        monkeypatch.setenv("TIDY_DETECT_SPEEDUPS", "off")
    else:
        monkeypatch.delenv("TIDY_DETECT_SPEEDUPS", raising=False)
    return request.param == "on"


def test_quick_gelu_folding_keeps_the_embeddings(tiny_bundle):
    from transformers import CLIPModel

    from tidy_detect.models.clip import ClipEncoder

    plain = ClipEncoder(str(tiny_bundle / "clip"), optimize=False)
    folded = ClipEncoder(str(tiny_bundle / "clip"), optimize=True)
    assert plain.fingerprint == folded.fingerprint  # the fingerprint is of the checkpoint, not the folded copy
    images = [random_image(np.random.default_rng(k), 40, 30) for k in range(3)]
    np.testing.assert_allclose(folded.encode_global(images), plain.encode_global(images), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(folded.encode_texts(["a red car"]), plain.encode_texts(["a red car"]), rtol=1e-4,
                               atol=1e-5)
    model = CLIPModel.from_pretrained(tiny_bundle / "clip")
    assert fold_quick_gelu(model) == 4 and fold_quick_gelu(model) == 0  # 2 vision + 2 text layers, once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deformable_sampling_matches_transformers_kernel(dtype):
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    torch.manual_seed(0)
    shapes = [(12, 10), (6, 5), (3, 3), (2, 2)]
    batch, heads, dim, queries, points = 2, 4, 8, 30, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim).to(dtype)
    # Some samples fall outside the map (zero padding) or straddle its border.
    locations = (torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.4 - 0.2).to(dtype)
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])
    weights = torch.softmax(torch.randn(batch, queries, heads, len(shapes) * points), -1).view(
        batch, queries, heads, len(shapes), points).to(dtype)
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    expected = MultiScaleDeformableAttention()(value.float(), spatial, shapes, start, locations.float(),
                                                weights.float(), 64)
    # The kernel's locations are in [0, 1] with pixel centres at (i + 0.5) / size.
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(len(shapes), 1, 2)
    got = _bilinear_sum(value, shapes, locations.float() * sizes - 0.5, weights)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_auto_dtype():
    assert isinstance(cpu_has_fast_bf16(), bool)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    assert resolve_dtype("float32", "cpu") == "float32"
    from tidy_detect.errors import ConfigError

    with pytest.raises(ConfigError, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusion_attention_matches_transformers(dtype, speedups):
    import copy

    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoBiMultiHeadAttention

    from tidy_detect.models.optimize import speed_up_grounding_dino

    torch.manual_seed(0)
    config = GroundingDinoConfig(d_model=32, encoder_ffn_dim=64, encoder_attention_heads=4)
    reference = GroundingDinoBiMultiHeadAttention(config).eval().to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_grounding_dino(fast) == speedups
    assert speed_up_grounding_dino(fast) == 0  # a second call changes nothing
    for name, value in reference.state_dict().items():  # no weight is changed
        assert torch.equal(fast.state_dict()[name], value)
    batch, num_vision, num_text = 2, 50, 7
    vision = torch.randn(batch, num_vision, 32).to(dtype)
    text = torch.randn(batch, num_text, 32).to(dtype)
    vision_mask = torch.zeros(batch, num_vision, dtype=torch.bool)
    vision_mask[1, 40:] = True  # padding of the second image
    text_mask = torch.zeros(batch, num_text, dtype=torch.bool)
    text_mask[0, 5:] = True  # the first prompt is shorter
    with torch.inference_mode():
        (want_v, want_vw), (want_t, want_tw) = reference(vision, text, vision_mask, text_mask)
        (got_v, got_vw), (got_t, got_tw) = fast(vision, text, vision_mask, text_mask)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in ((got_v, want_v), (got_vw, want_vw), (got_t, want_t), (got_tw, want_tw)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blip_attention_matches_transformers(dtype, speedups):
    import copy

    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipAttention

    from tidy_detect.models.optimize import speed_up_attention

    torch.manual_seed(0)
    reference = BlipAttention(BlipVisionConfig(hidden_size=64, num_attention_heads=4)).eval().to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_attention(fast) == speedups
    hidden = torch.randn(3, 17, 64).to(dtype)
    with torch.inference_mode():
        want, _ = reference(hidden)
        got, _ = fast(hidden)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(8, 8), (10, 7), (13, 9)])
def test_swin_layer_matches_transformers(dtype, shift, size, speedups):
    import copy

    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinLayer

    from tidy_detect.models.optimize import speed_up_swin

    torch.manual_seed(0)
    config = SwinConfig(embed_dim=32, window_size=4)
    config._attn_implementation = "sdpa"
    height, width = size  # (10, 7) and (13, 9) are padded to whole windows
    reference = SwinLayer(config, dim=32, input_resolution=size, num_heads=4, shift_size=shift).eval()
    with torch.no_grad():
        reference.attention.relative_position_bias.relative_position_bias_table.normal_()
    reference = reference.to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_swin(fast) == speedups and speed_up_swin(fast) == 0
    hidden = torch.randn(2, height * width, 32).to(dtype)
    with torch.inference_mode():
        want, got = reference(hidden, size)[0], fast(hidden, size)[0]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_swin_backbone_feature_maps_match_transformers(speedups):
    import copy

    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinBackbone

    from tidy_detect.models.optimize import speed_up_swin

    torch.manual_seed(0)
    config = SwinConfig(image_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4,
                        out_features=["stage2", "stage3"])
    reference = SwinBackbone(config).eval()
    fast = copy.deepcopy(reference)
    assert speed_up_swin(fast) == 6 * speedups
    pixels = torch.randn(2, 3, 70, 52)  # not a multiple of the patch or window size
    with torch.inference_mode():
        want, got = reference(pixels), fast(pixels)
        asked = fast(pixels, output_hidden_states=True)  # anything beyond the maps: transformers' forward
    assert len(got.feature_maps) == len(want.feature_maps) == 2
    for g, w in zip(got.feature_maps, want.feature_maps):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert asked.hidden_states is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("coordinates", [2, 4])
def test_multiscale_deformable_attention_matches_transformers(dtype, coordinates, speedups):
    import copy

    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoMultiscaleDeformableAttention,
    )

    from tidy_detect.models.optimize import speed_up_grounding_dino

    torch.manual_seed(0)
    shapes = [(12, 10), (6, 5), (3, 3)]
    reference = GroundingDinoMultiscaleDeformableAttention(GroundingDinoConfig(d_model=64, num_feature_levels=3),
                                                           num_heads=4, n_points=3).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.3)  # offsets large enough to leave the map and straddle borders
    reference = reference.to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_grounding_dino(fast) == speedups
    batch, queries, total = 2, 20, sum(h * w for h, w in shapes)
    spatial = torch.tensor(shapes)
    mask = torch.ones(batch, total, dtype=torch.bool)
    mask[1, -5:] = False  # the second image's padding
    inputs = dict(attention_mask=mask, encoder_hidden_states=torch.randn(batch, total, 64).to(dtype),
                  position_embeddings=torch.randn(batch, queries, 64).to(dtype),
                  reference_points=(torch.rand(batch, queries, len(shapes), coordinates) * 1.2 - 0.1).to(dtype),
                  spatial_shapes=spatial, spatial_shapes_list=shapes,
                  level_start_index=torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]]))
    hidden = torch.randn(batch, queries, 64).to(dtype)
    with torch.inference_mode():
        want, got = reference(hidden, **inputs)[0], fast(hidden, **inputs)[0]
        as_float = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        exact = copy.deepcopy(fast).float()(hidden.float(), **as_float)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.float32 or not speedups:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        # transformers rounds the sample positions to bfloat16; these are kept in float32, so
        # compare both with the float32 computation.
        error = (got.float() - exact).abs().max()
        assert error <= max((want.float() - exact).abs().max(), 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multihead_attention_matches_transformers(dtype, speedups):
    import copy

    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMultiheadAttention

    from tidy_detect.models.optimize import speed_up_grounding_dino

    torch.manual_seed(0)
    reference = GroundingDinoMultiheadAttention(GroundingDinoConfig(d_model=32), num_attention_heads=4).eval().to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_grounding_dino(fast) == speedups
    queries, keys = torch.randn(2, 9, 32).to(dtype), torch.randn(2, 6, 32).to(dtype)
    keep = torch.ones(2, 1, 1, 6)
    keep[1, ..., 4:] = 0  # the second prompt is shorter
    mask = ((1.0 - keep) * torch.finfo(dtype).min).to(dtype)  # additive, as transformers builds it
    with torch.inference_mode():
        want, want_weights = reference(queries, keys, keys, attention_mask=mask, output_attentions=True)
        got, = fast(queries, keys, keys, attention_mask=mask)
        # Weights asked for (on its own, the argument asks): transformers' forward gives them.
        asked, weights = fast(queries, keys, keys, attention_mask=mask, output_attentions=True)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(asked, want, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swish"])
def test_fused_linear_activation_matches(dtype, activation):
    from tidy_detect.models.optimize import _linear_activation_module, fused_linear_available

    if not fused_linear_available():
        pytest.skip("this PyTorch build has no oneDNN fused linear")
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40).to(dtype)
    fused = _linear_activation_module(linear, activation)
    assert set(dict(fused.named_parameters())) == {"weight", "bias"}  # the state dict keeps its names
    reference = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "swish": torch.nn.functional.silu}[activation]
    x = torch.randn(3, 5, 24).to(dtype)
    with torch.inference_mode():
        got, want = fused(x), reference(linear(x))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("folder,model_class,expected", [
    ("clip", "CLIPModel", 4), ("blip", "BlipForConditionalGeneration", None),
    ("grounding-dino", "GroundingDinoForObjectDetection", None), ("owlv2", "Owlv2ForObjectDetection", None)])
def test_prepared_models_give_the_same_outputs(tiny_bundle, folder, model_class, expected, speedups):
    """Every speed-up together, on the tiny bundle's models: the same outputs as transformers'
    (and, switched off, transformers' own modules)."""
    import transformers

    from tidy_detect.models.loading import prepare_model

    source = str(tiny_bundle / folder)
    plain, processor, _ = prepare_model(model_class, source, what="m", option="--m", device="cpu", dtype="float32",
                                        optimize=False)
    fast, _, _ = prepare_model(model_class, source, what="m", option="--m", device="cpu", dtype="float32")
    fused = sum(type(m).__name__ == "LinearActivation" for m in fast.modules())
    if not speedups:
        assert fused == 0 and not any(getattr(m, "_tidy_fast", False) or getattr(m, "_tidy_folded", False)
                                      for m in fast.modules())
    elif optimize.fused_linear_available():
        assert fused == expected if expected is not None else fused > 0
    images = [random_image(np.random.default_rng(k), 90, 70) for k in range(2)]
    if folder == "clip":
        inputs = processor(images=images, text=["a dog", "a red car"], return_tensors="pt", padding=True)
    elif folder == "blip":
        inputs = processor(images=images, text=["a dog", "a table"], return_tensors="pt", padding=True)
    elif folder == "grounding-dino":
        inputs = processor(images=images, text=["dog. table."] * 2, return_tensors="pt")
    else:
        inputs = processor(images=images, text=[["a dog", "a table"]] * 2, return_tensors="pt")
    with torch.inference_mode():
        want, got = plain(**inputs), fast(**inputs)
    names = {"clip": ("logits_per_image",), "blip": ("logits",), "grounding-dino": ("logits", "pred_boxes"),
             "owlv2": ("logits", "pred_boxes")}[folder]
    for name in names:
        w, g = getattr(want, name), getattr(got, name)
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(g))
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-4, atol=1e-4)
    assert transformers  # the classes come from transformers by name


def test_reuse_freed_memory_can_be_turned_off():
    import subprocess
    import sys

    code = "from tidy_detect.models.optimize import reuse_freed_memory as r; print(r(), r())"
    off = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TIDY_DETECT_MALLOC": "default"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"]
    on = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items()
                                                          if k != "TIDY_DETECT_MALLOC"},
                        capture_output=True, text=True, check=True)
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert on.stdout.split() == ([str(glibc)] * 2)


def test_fused_linear_activation_keeps_gradients():
    from tidy_detect.models.optimize import _linear_activation_module

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    fused = _linear_activation_module(linear, "gelu")
    x = torch.randn(3, 6)
    fused(x).sum().backward()  # trainable weights: the plain path, so gradients flow
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


# -- guarded and reversible: one test per fault of the speed-ups' review ---------------------------

def _prepare(tiny_bundle, folder, model_class, dtype="float32", optimize=True):
    from tidy_detect.models.loading import prepare_model

    return prepare_model(model_class, str(tiny_bundle / folder), what="m", option="--m", device="cpu", dtype=dtype,
                         optimize=optimize)[:2]


def _grounding_inputs(processor):
    images = [random_image(np.random.default_rng(k), 90, 70) for k in range(2)]
    return processor(images=images, text=["dog. table."] * 2, return_tensors="pt")


def _assert_same_detections(got, want, tolerance=1e-4):
    for name in ("logits", "pred_boxes"):
        w, g = getattr(want, name).float(), getattr(got, name).float()
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(g))
        torch.testing.assert_close(g[finite], w[finite], rtol=tolerance, atol=tolerance)


def _tensors(value):
    """Every tensor of a (nested) model output, in order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_mixed_precision_blip2_in_bfloat16(tiny_bundle):
    """BLIP-2 in bfloat16 keeps its Q-Former and query tokens in float32: every speed-up is
    decided per module (fused matmuls in both dtypes), and the model runs as the plain one."""
    plain, processor = _prepare(tiny_bundle, "blip2", "Blip2ForConditionalGeneration", "bfloat16", optimize=False)
    fast, _ = _prepare(tiny_bundle, "blip2", "Blip2ForConditionalGeneration", "bfloat16")
    assert fast.query_tokens.dtype == torch.float32
    assert {p.dtype for p in fast.qformer.parameters()} == {torch.float32}
    if optimize.fused_linear_available():
        fused = {m.weight.dtype for m in fast.modules() if type(m).__name__ == "LinearActivation"}
        assert fused == {torch.float32, torch.bfloat16}  # Q-Former's and the vision tower's
    images = [random_image(np.random.default_rng(k), 60, 50) for k in range(2)]
    inputs = processor(images=images, text=["a photo of", "a photo of"], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        want, got = plain(**inputs).logits, fast(**inputs).logits
        generated = fast.generate(**inputs, max_new_tokens=3)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    assert generated.shape[0] == 2


def test_cast_after_prepare_equals_cast_then_prepare(tiny_bundle):
    """Swin's fused q/k/v is rebuilt from q/k/v when they change: prepared in float32 and cast
    to bfloat16 gives what a model cast then prepared gives."""
    prepared_then_cast, processor = _prepare(tiny_bundle, "grounding-dino", "GroundingDinoForObjectDetection")
    inputs = _grounding_inputs(processor)
    with torch.inference_mode():
        prepared_then_cast(**inputs)  # builds the float32 fused q/k/v
    prepared_then_cast.to(torch.bfloat16)
    cast_then_prepared, _ = _prepare(tiny_bundle, "grounding-dino", "GroundingDinoForObjectDetection", "bfloat16")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        got, want = prepared_then_cast(**inputs), cast_then_prepared(**inputs)
    _assert_same_detections(got, want, tolerance=1e-3)
    assert not any("_tidy_qkv" in name for name in prepared_then_cast.state_dict())


def test_moved_through_meta_and_to_empty():
    """A prepared model moved to the meta device, materialised with ``to_empty`` and loaded
    computes with the loaded weights; a model built on the meta device is left to transformers."""
    import copy

    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinBackbone

    from tidy_detect.models.optimize import speed_up_swin

    torch.manual_seed(0)
    config = SwinConfig(image_size=64, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                        out_features=["stage1", "stage2"])
    reference = SwinBackbone(config).eval()
    fast = copy.deepcopy(reference)
    assert speed_up_swin(fast) == 4
    pixels = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        fast(pixels)  # the fused q/k/v of the first weights
    fast.to("meta").to_empty(device="cpu")
    fast.load_state_dict(reference.state_dict())
    for name, buffer in reference.named_buffers():  # non-persistent buffers are not in a state dict
        fast.get_buffer(name).copy_(buffer)
    with torch.inference_mode():
        want, got = reference(pixels), fast(pixels)
    for g, w in zip(got.feature_maps, want.feature_maps):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.device("meta"):
        on_meta = SwinBackbone(config)
    assert speed_up_swin(on_meta) == 0


@pytest.mark.parametrize("kind", ["deformable", "fusion", "multihead", "blip", "swin"])
def test_gradients_fall_back_to_transformers(kind):
    """With parameters that need gradients every replaced forward runs transformers' own:
    backward works and gives the plain module's gradients."""
    import copy

    from transformers import BlipVisionConfig, GroundingDinoConfig, SwinConfig
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.grounding_dino import modeling_grounding_dino as gd
    from transformers.models.swin.modeling_swin import SwinLayer

    torch.manual_seed(0)
    if kind == "deformable":
        shapes = [(6, 5), (3, 3)]
        reference = gd.GroundingDinoMultiscaleDeformableAttention(
            GroundingDinoConfig(d_model=32, num_feature_levels=2), num_heads=4, n_points=2)
        spatial = torch.tensor(shapes)
        total = sum(h * w for h, w in shapes)
        args = (torch.randn(2, 7, 32, requires_grad=True),)
        kwargs = dict(attention_mask=torch.ones(2, total, dtype=torch.bool),
                      encoder_hidden_states=torch.randn(2, total, 32), position_embeddings=torch.randn(2, 7, 32),
                      reference_points=torch.rand(2, 7, 2, 2), spatial_shapes=spatial, spatial_shapes_list=shapes,
                      level_start_index=torch.tensor([0, 30]))
    elif kind == "fusion":
        reference = gd.GroundingDinoBiMultiHeadAttention(GroundingDinoConfig(d_model=32, encoder_ffn_dim=64,
                                                                             encoder_attention_heads=4))
        args, kwargs = (torch.randn(2, 10, 32, requires_grad=True), torch.randn(2, 5, 32)), {}
    elif kind == "multihead":
        reference = gd.GroundingDinoMultiheadAttention(GroundingDinoConfig(d_model=32), num_attention_heads=4)
        x = torch.randn(2, 9, 32, requires_grad=True)
        args, kwargs = (x, x, x), {}
    elif kind == "blip":
        reference = BlipAttention(BlipVisionConfig(hidden_size=32, num_attention_heads=4))
        args, kwargs = (torch.randn(2, 9, 32, requires_grad=True),), {}
    else:
        config = SwinConfig(embed_dim=32, window_size=4)
        reference = SwinLayer(config, dim=32, input_resolution=(8, 8), num_heads=4, shift_size=2)
        args, kwargs = (torch.randn(2, 64, 32, requires_grad=True), (8, 8)), {}
    reference.eval()
    fast = copy.deepcopy(reference)
    patch = optimize.speed_up_swin if kind == "swin" else optimize.speed_up_attention if kind == "blip" \
        else optimize.speed_up_grounding_dino
    assert patch(fast) == 1

    def run(module):
        inputs = [a.detach().clone().requires_grad_(True) if torch.is_tensor(a) and a.requires_grad else a
                  for a in args]
        output = _tensors(module(*inputs, **kwargs))
        sum(o.float().sum() for o in output if o.is_floating_point()).backward()
        return output, [i.grad for i in inputs if torch.is_tensor(i) and i.requires_grad], \
            {n: p.grad for n, p in module.named_parameters()}

    want, want_input_grads, want_grads = run(reference)
    got, got_input_grads, got_grads = run(fast)
    for g, w in zip(got + got_input_grads, want + want_input_grads):
        torch.testing.assert_close(g, w)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)


@pytest.mark.parametrize("folder,model_class", [("clip", "CLIPModel"), ("owlv2", "Owlv2ForObjectDetection")])
def test_save_pretrained_of_a_prepared_model_saves_the_checkpoint(tiny_bundle, tmp_path, folder, model_class):
    """QuickGELU folding rescales weights in place, but a prepared model's state dict (what
    save_pretrained writes) holds the checkpoint's weights: reloading gives the original model,
    preparing that again folds once, and loading a checkpoint into a prepared model folds it."""
    import transformers

    plain, processor = _prepare(tiny_bundle, folder, model_class, optimize=False)
    fast, _ = _prepare(tiny_bundle, folder, model_class)
    assert fold_quick_gelu(fast) == 0  # folded once, marked
    fast.save_pretrained(tmp_path / "saved")
    reloaded = getattr(transformers, model_class).from_pretrained(tmp_path / "saved").eval()
    original = plain.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=1e-6, atol=1e-7, msg=name)
    again, _ = _prepare(tiny_bundle, folder, model_class)
    again.load_state_dict(original)  # a checkpoint loaded into a prepared model is folded on the way in
    images = [random_image(np.random.default_rng(k), 90, 70) for k in range(2)]
    if folder == "clip":
        inputs = processor(images=images, text=["a dog", "a red car"], return_tensors="pt", padding=True)
        names = ("logits_per_image",)
    else:
        inputs = processor(images=images, text=[["a dog", "a table"]] * 2, return_tensors="pt")
        names = ("logits", "pred_boxes")
    with torch.inference_mode():
        want, outputs = plain(**inputs), [reloaded(**inputs), fast(**inputs), again(**inputs)]
    for got in outputs:
        for name in names:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)


def test_requested_outputs_come_from_transformers(tiny_bundle):
    """Attention weights, hidden states and tuples asked for (by the call or by the config) are
    what the plain model gives, not None."""
    import copy

    from transformers import BlipVisionConfig, SwinConfig
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.swin.modeling_swin import SwinBackbone

    plain, processor = _prepare(tiny_bundle, "grounding-dino", "GroundingDinoForObjectDetection", optimize=False)
    fast, _ = _prepare(tiny_bundle, "grounding-dino", "GroundingDinoForObjectDetection")
    inputs = _grounding_inputs(processor)
    with torch.inference_mode():
        want, got = plain(**inputs, output_attentions=True), fast(**inputs, output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions"):
        w, g = _tensors(getattr(want, name)), _tensors(getattr(got, name))
        assert len(g) == len(w) > 0
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    torch.manual_seed(0)
    config = SwinConfig(image_size=64, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                        out_features=["stage1", "stage2"])
    reference = SwinBackbone(config).eval()
    backbone = copy.deepcopy(reference)
    optimize.speed_up_swin(backbone)
    pixels = torch.randn(1, 3, 40, 36)

    def outcome(model, **kwargs):
        # What a call gives: its type and tensors, or the error (transformers 5.24's own
        # SwinBackbone fails on a config-level return_dict=False; the patched one must too).
        try:
            with torch.inference_mode():
                output = model(pixels, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compared, not handled
            return type(exc), []
        return type(output), _tensors(output)

    attentions = {"_attn_implementation": "eager", "output_attentions": True}  # transformers' rule for weights
    for setting, call in (({"output_hidden_states": True}, {}), ({"return_dict": False}, {}), (attentions, {}),
                          ({}, {"return_dict": False}), ({}, {"output_hidden_states": True})):
        for model in (reference, backbone):
            before = {key: getattr(model.config, key) for key in setting}
            for key, value in setting.items():
                setattr(model.config, key, value)
        (want_type, w), (got_type, g) = outcome(reference, **call), outcome(backbone, **call)
        assert got_type is want_type and len(g) == len(w)
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for model in (reference, backbone):
            for key in reversed(list(setting)):
                setattr(model.config, key, before[key])

    attention = BlipAttention(BlipVisionConfig(hidden_size=32, num_attention_heads=4)).eval()
    fast_attention = copy.deepcopy(attention)
    optimize.speed_up_attention(fast_attention)
    hidden = torch.randn(2, 9, 32)
    with torch.inference_mode():
        _, want_weights = attention(hidden, output_attentions=True)
        _, got_weights = fast_attention(hidden, output_attentions=True)
    torch.testing.assert_close(got_weights, want_weights)


def test_fused_linear_probe_ignores_the_default_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(optimize, "_fused_linear_probe", None)
    expected = optimize.fused_linear_available()
    monkeypatch.setattr(optimize, "_fused_linear_probe", None)
    with torch.device("meta"):
        assert optimize.fused_linear_available() is expected  # probed on CPU tensors
    monkeypatch.setattr(optimize, "_fused_linear_probe", None)
    with FakeTensorMode():
        optimize.fused_linear_available()  # no real answer here...
    assert optimize._fused_linear_probe is None  # ...so none is remembered
    assert optimize.fused_linear_available() is expected


def test_version_guard_keeps_transformers_code_and_warns_once(monkeypatch, caplog):
    import copy
    import dataclasses
    import logging

    import transformers
    from transformers import BlipVisionConfig, SwinConfig
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.swin.modeling_swin import SwinLayer

    config = SwinConfig(embed_dim=32, window_size=4)
    layer = SwinLayer(config, dim=32, input_resolution=(8, 8), num_heads=4).eval()
    monkeypatch.setattr(optimize, "_warned", set())
    monkeypatch.setattr(transformers, "__version__", "9.0.0")
    with caplog.at_level(logging.WARNING, logger=optimize.log.name):
        assert optimize.speed_up_swin(copy.deepcopy(layer)) == 0
        assert optimize.speed_up_swin(copy.deepcopy(layer)) == 0
    warnings = [r for r in caplog.records if "swin-layer" in r.getMessage()]
    assert len(warnings) == 1 and "9.0.0" in warnings[0].getMessage()
    monkeypatch.undo()

    # A forward with another signature than the one the speed-up was written for.
    monkeypatch.setattr(optimize, "_warned", set())
    target = optimize._TARGETS["BlipAttention"]
    monkeypatch.setitem(optimize._TARGETS, "BlipAttention",
                        dataclasses.replace(target, parameters=("self", "hidden_states", "attention_mask")))
    attention = BlipAttention(BlipVisionConfig(hidden_size=32, num_attention_heads=4)).eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=optimize.log.name):
        assert optimize.speed_up_attention(attention) == 0
        assert optimize.speed_up_attention(attention) == 0
    assert "forward" not in attention.__dict__  # transformers' forward
    assert len([r for r in caplog.records if "blip-attention" in r.getMessage()]) == 1


def test_one_switch_turns_every_speedup_off(tiny_bundle, monkeypatch):
    from tidy_detect.config import ExtractionConfig, RuntimeConfig
    from tidy_detect.errors import ConfigError
    from tidy_detect.models.optimize import speedups_enabled

    monkeypatch.delenv("TIDY_DETECT_SPEEDUPS", raising=False)
    assert speedups_enabled() and not speedups_enabled(False)
    monkeypatch.setenv("TIDY_DETECT_SPEEDUPS", "off")
    assert not speedups_enabled()
    assert not optimize.reuse_freed_memory.__wrapped__()  # the allocator is left alone too
    monkeypatch.delenv("TIDY_DETECT_SPEEDUPS")
    assert ExtractionConfig.from_dict({"runtime": {"speedups": False}}).runtime.speedups is False
    with pytest.raises(ConfigError, match="runtime.speedups must be true or false, got 'no'"):
        RuntimeConfig(speedups="no")


@pytest.mark.parametrize("config_on,env", [(True, None), (False, None), (True, "off")])
def test_extractor_passes_the_switch_to_every_model_and_records_it(monkeypatch, config_on, env):
    import tidy_detect.models.captioners as captioners
    import tidy_detect.models.clip as clip
    import tidy_detect.models.grounders as grounders
    import tidy_detect.models.phrases as phrases
    from tidy_detect.config import ExtractionConfig
    from tidy_detect.features.extractor import Extractor

    if env:
        monkeypatch.setenv("TIDY_DETECT_SPEEDUPS", env)
    else:
        monkeypatch.delenv("TIDY_DETECT_SPEEDUPS", raising=False)
    asked = {}

    def fake(kind):
        def build(*args, optimize=True, **kwargs):
            asked[kind] = optimize
            return type("Fake", (), {"nlp": None, "dim": 4})()
        return build

    monkeypatch.setattr(captioners, "build_captioner", fake("captioner"))
    monkeypatch.setattr(grounders, "build_grounder", fake("grounder"))
    monkeypatch.setattr(clip, "ClipEncoder", fake("clip"))
    monkeypatch.setattr(phrases, "PhraseExtractor", lambda *a, **k: type("P", (), {"nlp": None})())
    import tidy_detect.models.registry as registry

    monkeypatch.setattr(registry, "check_models", lambda models: None)  # the stand-ins need no checkpoints
    config = ExtractionConfig().updated(runtime={"device": "cpu", "speedups": config_on})
    extractor = Extractor(config).load()
    expected = config_on and env is None
    assert asked == {"captioner": expected, "grounder": expected, "clip": expected}
    assert extractor.runtime_info()["speedups"] is expected


def test_cli_commands_that_load_models_offer_no_speedups():
    from typer.testing import CliRunner

    from tidy_detect.cli import app

    runner = CliRunner()
    for command in (["extract"], ["detect"], ["models", "verify"], ["robustness"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--no-speedups" in result.output, command
