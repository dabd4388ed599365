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


def test_deformable_attention_matches_transformers():
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    torch.manual_seed(0)
    shapes = [(12, 10), (6, 5), (3, 3), (2, 2)]
    batch, heads, dim, queries, points = 2, 4, 8, 30, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2)
    weights = torch.softmax(torch.randn(batch, queries, heads, len(shapes) * points), -1).view(
        batch, queries, heads, len(shapes), points)
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    module = MultiScaleDeformableAttention()
    expected = module(value, spatial, shapes, start, locations, weights, 64)
    got = _deformable_attention(module, value, spatial, shapes, start, locations, weights, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_dtype():
    assert isinstance(cpu_has_fast_bf16(), bool)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    assert resolve_dtype("float32", "cpu") == "float32"
    from tidy_detect.errors import ConfigError

    with pytest.raises(ConfigError, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", "cpu")
