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
    """Multi-scale deformable attention, as transformers' pure-PyTorch version computes it, but with
    the sampling in float32 (CPU ``grid_sample`` is several times slower in bfloat16) and each level's
    weighted sum accumulated as it is sampled, instead of stacking every level's samples first."""
    import torch.nn.functional as F

    batch_size, _, num_heads, hidden_dim = value.shape
    _, num_queries, _, _, num_points, _ = sampling_locations.shape
    out_dtype = value.dtype
    grids = (2 * sampling_locations - 1).float()
    weights = attention_weights.float()
    output = None
    start = 0
    for level, (height, width) in enumerate(value_spatial_shapes_list):
        level_value = value[:, start:start + height * width].float()
        start += height * width
        level_value = level_value.flatten(2).transpose(1, 2).reshape(batch_size * num_heads, hidden_dim, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        level_weights = weights[:, :, :, level].transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_points)
        part = (sampled * level_weights).sum(-1)
        output = part if output is None else output.add_(part)
    output = output.view(batch_size, num_heads * hidden_dim, num_queries)
    return output.transpose(1, 2).contiguous().to(out_dtype)


def speed_up_deformable_attention(model: Any) -> int:
    """Give every pure-PyTorch multi-scale deformable attention of ``model`` (Grounding DINO) the
    faster forward above, on CPU models only (GPUs run transformers' own kernels); returns how many."""
    import types

    if next(model.parameters()).device.type != "cpu":
        return 0
    patched = 0
    for module in model.modules():
        if type(module).__name__ == "MultiScaleDeformableAttention" and not list(module.parameters(recurse=False)):
            module.forward = types.MethodType(_deformable_attention, module)
            patched += 1
    return patched


def maybe_compile(module: Any, enabled: bool) -> Any:
    """``torch.compile(module)`` when asked (it pays off on long runs; the first call compiles)."""
    if not enabled:
        return module
    import torch

    return torch.compile(module, dynamic=True)
