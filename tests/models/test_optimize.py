"""Speed-ups keep the models' results: each patched forward against transformers' module, and
every speed-up together on the tiny bundle's models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tidy_detect.models.loading import resolve_dtype
from tidy_detect.models.optimize import _bilinear_sum, cpu_has_fast_bf16, fold_quick_gelu

from tests.conftest import random_image


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
def test_fusion_attention_matches_transformers(dtype):
    import copy

    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoBiMultiHeadAttention

    from tidy_detect.models.optimize import speed_up_grounding_dino

    torch.manual_seed(0)
    config = GroundingDinoConfig(d_model=32, encoder_ffn_dim=64, encoder_attention_heads=4)
    reference = GroundingDinoBiMultiHeadAttention(config).eval().to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_grounding_dino(fast) == 1
    assert speed_up_grounding_dino(fast) == 0  # a second call changes nothing (the scale folds once)
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
def test_blip_attention_matches_transformers(dtype):
    import copy

    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipAttention

    from tidy_detect.models.optimize import speed_up_attention

    torch.manual_seed(0)
    reference = BlipAttention(BlipVisionConfig(hidden_size=64, num_attention_heads=4)).eval().to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_attention(fast) == 1
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
def test_swin_layer_matches_transformers(dtype, shift, size):
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
    assert speed_up_swin(fast) == 1 and speed_up_swin(fast) == 0
    hidden = torch.randn(2, height * width, 32).to(dtype)
    with torch.inference_mode():
        want, got = reference(hidden, size)[0], fast(hidden, size)[0]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_swin_backbone_feature_maps_match_transformers():
    import copy

    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinBackbone

    from tidy_detect.models.optimize import speed_up_swin

    torch.manual_seed(0)
    config = SwinConfig(image_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4,
                        out_features=["stage2", "stage3"])
    reference = SwinBackbone(config).eval()
    fast = copy.deepcopy(reference)
    assert speed_up_swin(fast) == 6
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
def test_multiscale_deformable_attention_matches_transformers(dtype, coordinates):
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
    assert speed_up_grounding_dino(fast) == 1
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
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        # transformers rounds the sample positions to bfloat16; these are kept in float32, so
        # compare both with the float32 computation.
        error = (got.float() - exact).abs().max()
        assert error <= max((want.float() - exact).abs().max(), 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multihead_attention_matches_transformers(dtype):
    import copy

    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMultiheadAttention

    from tidy_detect.models.optimize import speed_up_grounding_dino

    torch.manual_seed(0)
    reference = GroundingDinoMultiheadAttention(GroundingDinoConfig(d_model=32), num_attention_heads=4).eval().to(dtype)
    fast = copy.deepcopy(reference)
    assert speed_up_grounding_dino(fast) == 1
    queries, keys = torch.randn(2, 9, 32).to(dtype), torch.randn(2, 6, 32).to(dtype)
    keep = torch.ones(2, 1, 1, 6)
    keep[1, ..., 4:] = 0  # the second prompt is shorter
    mask = ((1.0 - keep) * torch.finfo(dtype).min).to(dtype)  # additive, as transformers builds it
    with torch.inference_mode():
        want = reference(queries, keys, keys, attention_mask=mask, output_attentions=True)[0]
        got, weights = fast(queries, keys, keys, attention_mask=mask, output_attentions=True)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert weights is None and got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


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
def test_prepared_models_give_the_same_outputs(tiny_bundle, folder, model_class, expected):
    """Every speed-up together, on the tiny bundle's models: the same outputs as transformers'."""
    import transformers

    from tidy_detect.models.loading import prepare_model

    source = str(tiny_bundle / folder)
    plain, processor, _ = prepare_model(model_class, source, what="m", option="--m", device="cpu", dtype="float32",
                                        optimize=False)
    fast, _, _ = prepare_model(model_class, source, what="m", option="--m", device="cpu", dtype="float32")
    fused = sum(type(m).__name__ == "LinearActivation" for m in fast.modules())
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
