"""Inference speed-ups that keep the models' results: dtype choice, QuickGELU folding, compile.

CLIP-family MLPs apply QuickGELU, ``x * sigmoid(1.702 x)``: three element-wise passes over the
largest activation of the model, which on a CPU cost as much as the matmul next to them. Since
``x * sigmoid(1.702 x) = silu(1.702 x) / 1.702``, the constant folds into the weights around it
(fc1 scaled by 1.702, fc2 by 1 / 1.702) and the activation becomes one in-place SiLU. The
function is the same; float rounding differs at the level of the dtype's precision.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUICK_GELU_ALPHA = 1.702


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        flags = ""
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return True
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512" in flags
    except (AttributeError, RuntimeError):
        return False


def _silu_inplace_module() -> Any:
    import torch
    import torch.nn.functional as F

    class InplaceSiLU(torch.nn.Module):
        """SiLU written into its input: the fc1 output is a fresh tensor nobody else reads."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(x, inplace=True)

    return InplaceSiLU()


def fold_quick_gelu(model: Any) -> int:
    """Fold QuickGELU's 1.702 into the fc1/fc2 weights of every CLIP-style MLP; returns how many.

    Only modules with ``fc1``, ``fc2`` and a QuickGELU ``activation_fn`` are changed. Call it
    once, on a model used for inference only.
    """
    import torch
    from transformers.activations import QuickGELUActivation

    folded = 0
    with torch.no_grad():
        for module in model.modules():
            act = getattr(module, "activation_fn", None)
            fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
            if isinstance(act, QuickGELUActivation) and isinstance(fc1, torch.nn.Linear) and isinstance(fc2, torch.nn.Linear):
                fc1.weight.mul_(QUICK_GELU_ALPHA)
                if fc1.bias is not None:
                    fc1.bias.mul_(QUICK_GELU_ALPHA)
                fc2.weight.div_(QUICK_GELU_ALPHA)
                module.activation_fn = _silu_inplace_module()
                folded += 1
    if folded:
        log.debug("folded QuickGELU into %d MLPs of %s", folded, type(model).__name__)
    return folded


def _deformable_attention(self: Any, value: Any, value_spatial_shapes: Any, value_spatial_shapes_list: list,
                          level_start_index: Any, sampling_locations: Any, attention_weights: Any,
                          im2col_step: int) -> Any:
    """Multi-scale deformable attention computed as the CUDA kernel does it, but with CPU ops:
    every sample's four bilinear corners become rows of the value table, weighted by the
    bilinear weight times the attention weight (zero outside the map, like ``grid_sample``'s zero
    padding), and one ``embedding_bag`` sums each query's rows. Index math runs in float32 (exact
    for the indices of any image the processor makes), one image at a time to bound memory.
    About 3x faster than transformers' ``grid_sample`` version on CPU, same result to float32
    rounding."""
    import torch
    import torch.nn.functional as F

    batch_size, total, num_heads, hidden_dim = value.shape
    _, num_queries, _, num_levels, _, _ = sampling_locations.shape
    shape = (1, 1, num_levels, 1)  # broadcasts over (queries, heads, levels, points)
    sizes = value_spatial_shapes.to(device=value.device, dtype=torch.float32)
    heights, widths = sizes[:, 0].view(shape), sizes[:, 1].view(shape)
    starts = level_start_index.to(device=value.device, dtype=torch.float32).view(shape)
    heads = torch.arange(num_heads, device=value.device, dtype=torch.float32).view(1, num_heads, 1, 1)
    row_base = starts * num_heads + heads  # table row of (level start, head)
    output = value.new_empty(batch_size, num_queries, num_heads * hidden_dim)
    for b in range(batch_size):
        table = value[b].reshape(total * num_heads, hidden_dim).float()
        locations = sampling_locations[b].float()
        attention = attention_weights[b].float()
        # align_corners=False: pixel centres sit at (i + 0.5) / size.
        x = locations[..., 0] * widths - 0.5
        y = locations[..., 1] * heights - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x.sub_(x0), y.sub_(y0)
        wx0 = (1 - fx).mul_((x0 >= 0) & (x0 <= widths - 1))
        wx1 = fx.mul_((x0 >= -1) & (x0 <= widths - 2))
        wy0 = (1 - fy).mul_((y0 >= 0) & (y0 <= heights - 1)).mul_(attention)
        wy1 = fy.mul_((y0 >= -1) & (y0 <= heights - 2)).mul_(attention)
        col1 = (x0 + 1).clamp_(min=0).minimum(widths - 1).mul_(num_heads)
        col0 = x0.clamp_(min=0).minimum(widths - 1).mul_(num_heads)
        row1 = (y0 + 1).clamp_(min=0).minimum(heights - 1).mul_(widths * num_heads).add_(row_base)
        row0 = y0.clamp_(min=0).minimum(heights - 1).mul_(widths * num_heads).add_(row_base)
        index = torch.stack([row0 + col0, row0 + col1, row1 + col0, row1 + col1], -1).to(torch.int32)
        weight = torch.stack([wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1], -1)
        sampled = F.embedding_bag(index.view(num_queries * num_heads, -1), table,
                                  per_sample_weights=weight.view(num_queries * num_heads, -1), mode="sum")
        output[b] = sampled.view(num_queries, num_heads * hidden_dim)
    return output


def _block_diagonal(states: Any, num_heads: int) -> Any:
    """(B, T, heads * d) -> (B, heads * T, heads * d), head i's (T, d) block on the diagonal."""
    import torch

    batch, length, embed = states.shape
    heads = states.view(batch, length, num_heads, embed // num_heads)
    eye = torch.eye(num_heads, dtype=states.dtype, device=states.device)
    return torch.einsum("bthd,hg->bhtgd", heads, eye).reshape(batch, num_heads * length, embed)


def _bi_attention(self: Any, vision_features: Any, text_features: Any, vision_attention_mask: Any = None,
                  text_attention_mask: Any = None) -> Any:
    """Grounding DINO's image-text fusion attention, the same function as transformers'
    ``GroundingDinoBiMultiHeadAttention.forward`` in eval mode, without its head-major copies of
    the (B, 13k, 1024) vision tensors: with the few text tokens laid out block-diagonally per head,
    every head's scores (and the vision side's output) come from one matmul on the vision tensor
    as it is. The query scale is folded into ``vision_proj`` (see ``speed_up_grounding_dino``)."""
    import torch

    if self.training:
        raise RuntimeError("this fusion attention is patched for inference; load the model without tidy-detect's "
                           "optimisations to train it")
    batch, num_vision, _ = vision_features.shape
    num_text = text_features.shape[1]
    heads = self.num_heads
    queries = self.vision_proj(vision_features)  # already scaled
    vision_values = self.values_vision_proj(vision_features)
    keys = _block_diagonal(self.text_proj(text_features), heads)  # (B, heads*T, E)
    text_values = _block_diagonal(self.values_text_proj(text_features), heads)
    scores = torch.bmm(queries, keys.transpose(1, 2)).view(batch, num_vision, heads, num_text)
    scores = scores - scores.max()
    scores.clamp_(min=-50000, max=50000)
    # Text side: each text token attends over the image positions.
    text_scores = scores.permute(0, 2, 3, 1)  # (B, heads, T, N)
    text_scores = text_scores - text_scores.max(dim=-1, keepdim=True)[0]
    text_scores.clamp_(min=-50000, max=50000)
    if vision_attention_mask is not None:
        text_scores.masked_fill_(vision_attention_mask[:, None, None, :], float("-inf"))
    text_probs = text_scores.softmax(dim=-1)
    # Vision side: each image position attends over the text tokens.
    if text_attention_mask is not None:
        scores.masked_fill_(text_attention_mask[:, None, None, :], float("-inf"))
    vision_probs = scores.softmax(dim=-1)
    vision_output = torch.bmm(vision_probs.view(batch, num_vision, heads * num_text), text_values)
    # Every head's text tokens against all value heads, keeping each head's own block.
    mixed = torch.bmm(text_probs.reshape(batch, heads * num_text, num_vision), vision_values)
    mixed = mixed.view(batch, heads, num_text, heads, self.head_dim)
    text_output = torch.diagonal(mixed, dim1=1, dim2=3).permute(0, 1, 3, 2).reshape(batch, num_text, self.embed_dim)
    vision_weights = vision_probs.permute(0, 2, 1, 3).reshape(batch * heads, num_vision, num_text)
    text_weights = text_probs.reshape(batch * heads, num_text, num_vision)
    return ((self.out_vision_proj(vision_output), vision_weights),
            (self.out_text_proj(text_output), text_weights))


def speed_up_grounding_dino(model: Any) -> int:
    """Give Grounding DINO's pure-PyTorch multi-scale deformable attention and its image-text
    fusion attention the faster forwards above, and its ReLUs in place, on CPU models only;
    returns how many attention modules were changed (0 for any other model)."""
    import types

    import torch

    if next(model.parameters()).device.type != "cpu":
        return 0
    patched = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind == "MultiScaleDeformableAttention" and not list(module.parameters(recurse=False)):
            module.forward = types.MethodType(_deformable_attention, module)
            patched += 1
        elif kind == "GroundingDinoBiMultiHeadAttention" and not getattr(module, "_tidy_scale_folded", False):
            with torch.no_grad():
                module.vision_proj.weight.mul_(module.scale)
                module.vision_proj.bias.mul_(module.scale)
            module._tidy_scale_folded = True
            module.forward = types.MethodType(_bi_attention, module)
            patched += 1
        elif kind.startswith("GroundingDino") and kind.endswith("Layer"):
            # Every layer applies its ReLU to a fresh fc1 output: in place saves a pass over the
            # (B, 13k, 2048) activation, bandwidth-bound on a CPU.
            for attribute in ("activation", "activation_fn"):
                if type(getattr(module, attribute, None)) is torch.nn.ReLU:
                    setattr(module, attribute, torch.nn.ReLU(inplace=True))
    return patched


def _blip_attention(self: Any, hidden_states: Any, **_: Any) -> tuple[Any, None]:
    """BLIP's vision self-attention through ``scaled_dot_product_attention``. transformers runs
    it eagerly (scores, scale, softmax and weighted sum as four passes over a (B, 16, 577, 577)
    tensor), which took over 40% of BLIP-large's vision time on CPU. Same function; the weights,
    which BLIP's encoder layer discards, are not formed."""
    import torch.nn.functional as F

    batch, length, embed = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    dropout = self.dropout.p if self.training else 0.0
    context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=dropout, scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, embed)), None


def speed_up_attention(model: Any) -> int:
    """Give BLIP's eager vision attention the fused forward above; returns how many modules
    were changed (0 for models without it)."""
    import types

    patched = 0
    for module in model.modules():
        if type(module).__name__ == "BlipAttention" and hasattr(module, "qkv"):
            module.forward = types.MethodType(_blip_attention, module)
            patched += 1
    return patched


def maybe_compile(module: Any, enabled: bool) -> Any:
    """``torch.compile(module)`` when asked (it pays off on long runs; the first call compiles)."""
    if not enabled:
        return module
    import torch

    return torch.compile(module, dynamic=True)
