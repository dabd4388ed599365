"""Speed-ups keep the models' results: QuickGELU folding and the deformable-attention forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidy_detect.models.loading import resolve_dtype
from tidy_detect.models.optimize import _deformable_attention, cpu_has_fast_bf16, fold_quick_gelu

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
def test_deformable_attention_matches_transformers(dtype):
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
    module = MultiScaleDeformableAttention()
    expected = module(value.float(), spatial, shapes, start, locations.float(), weights.float(), 64)
    got = _deformable_attention(module, value, spatial, shapes, start, locations, weights, 64)
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
