"""Inference speed-ups that keep the models' results.

Each is the same function as the transformers module it replaces (tested against it, float32
and bfloat16); float rounding differs at the level of the dtype's precision:

- dtype choice (bfloat16 where the CPU has native bf16 matmuls);
- QuickGELU folded into CLIP-family MLP weights: ``x * sigmoid(1.702 x) = silu(1.702 x) / 1.702``,
  so fc1 is scaled by 1.702, fc2 by 1 / 1.702, and the activation becomes a SiLU;
- each MLP's first matmul fused with its activation (oneDNN, on CPUs);
- attention through ``scaled_dot_product_attention`` where transformers runs it eagerly (BLIP's
  vision tower, Grounding DINO's multi-head attention);
- Swin (Grounding DINO's backbone): window partition, shift and padding as one gather each way,
  q/k/v in one matmul, the shift mask built per layer rather than per window of every image,
  and only the used stages' feature maps laid out;
- Grounding DINO's deformable attention as one ``embedding_bag`` over bilinear corners, with
  sample positions in pixel units, and its image-text fusion attention with re-associated
  matmuls (the 1024-wide image projections disappear);
- glibc's malloc keeping freed memory for reuse (process-wide, see :func:`reuse_freed_memory`);
- an optional ``torch.compile``.

Where each runs is decided per device (:func:`runs_on`): every one of them was measured on CPUs
only, so on a GPU they are off, except BLIP's vision attention through
``scaled_dot_product_attention`` (PyTorch's own kernel, the SDPA attention that CUDA runs use for
every model that has it, see :mod:`tidy_detect.models.device`); a CUDA run uses transformers'
modules otherwise, with the GPU switches of docs/gpu.md.

Every speed-up is guarded and reversible (docs/performance.md, "Turning the speed-ups off"):

- one switch turns them all off: ``TIDY_DETECT_SPEEDUPS=off``, ``runtime.speedups = false`` or
  ``--no-speedups`` (see :func:`speedups_enabled`);
- each checks that the module it replaces is the one it was written for (the transformers
  versions it was tested on, the replaced forward's parameters, the attributes it reads); any
  other module keeps transformers' code, and one warning per speed-up says so;
- decisions are made per module (a model may hold float32 modules beside bfloat16 ones) and per
  call: a replaced forward runs transformers' own forward for anything it was not written for
  (training, gradients, another device or dtype, requested attention weights or hidden states);
- no state is hidden: derived tensors (Swin's fused q/k/v) are rebuilt when the parameters they
  come from change (``.to()``, ``load_state_dict``, ``to_empty``), and weights rescaled in place
  (QuickGELU folding) are saved and loaded in their original form.
"""
from __future__ import annotations

import contextvars
import ctypes
import functools
import inspect
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUICK_GELU_ALPHA = 1.702

SPEEDUPS_ENV = "TIDY_DETECT_SPEEDUPS"
_OFF_VALUES = ("off", "0", "false", "no", "none")

# The transformers releases these speed-ups were tested against (their modeling tests were run
# with every speed-up applied): [low, high). Outside it every speed-up keeps transformers' code.
TESTED_TRANSFORMERS = ((5, 24), (5, 25))


# The speed-ups that run on a device other than the CPU (see the module docstring).
ANY_DEVICE_SPEEDUPS = ("blip-attention",)
SPEEDUP_NAMES = ("quick-gelu-folding", "fused-linear-activation", "swin-layer", "swin-backbone",
                 "grounding-dino-deformable-attention", "grounding-dino-fusion-attention",
                 "grounding-dino-multihead-attention", "grounding-dino-inplace-relu", "blip-attention", "malloc")


def runs_on(speedup: str, device: str) -> bool:
    """Whether the speed-up named ``speedup`` is applied to models on ``device`` ("cpu",
    "cuda:0", ...): all of them on the CPU, where they were measured; elsewhere only those of
    :data:`ANY_DEVICE_SPEEDUPS`.

    Raises:
        ValueError: an unknown speed-up name.
    """
    if speedup not in SPEEDUP_NAMES:
        raise ValueError(f"unknown speed-up {speedup!r}; known: {', '.join(SPEEDUP_NAMES)}")
    return str(device).split(":", 1)[0] == "cpu" or speedup in ANY_DEVICE_SPEEDUPS


def speedups_enabled(requested: bool = True) -> bool:
    """Whether the speed-ups of this module may be applied: ``requested`` (``runtime.speedups``,
    the CLI's ``--no-speedups``, an adapter's ``optimize=``) and the environment variable
    ``TIDY_DETECT_SPEEDUPS`` not set to ``off`` (or 0/false/no/none)."""
    return bool(requested) and os.environ.get(SPEEDUPS_ENV, "").strip().lower() not in _OFF_VALUES


@dataclass(frozen=True)
class _Target:
    """What one speed-up was written for: the class it patches, that class's forward parameters
    (``**name`` for a keyword catch-all) and the attributes (dotted paths) its code reads. An
    empty ``parameters`` checks the version only (speed-ups that replace no forward)."""

    speedup: str
    class_name: str
    parameters: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()


_TARGETS = {t.class_name: t for t in (
    _Target("swin-layer", "SwinLayer", ("self", "hidden_states", "input_dimensions", "always_partition", "**kwargs"),
            ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
             "attention.relative_position_bias", "attention.num_attention_heads", "attention.head_dim",
             "attention.scaling", "layernorm_before", "layernorm_after", "mlp", "window_size", "shift_size",
             "set_shift_and_window_size", "get_attn_mask")),
    _Target("swin-backbone", "SwinBackbone", ("self", "pixel_values", "**kwargs"),
            ("config", "swin.embeddings.patch_embeddings.maybe_pad", "swin.embeddings.patch_embeddings.projection",
             "swin.embeddings.norm", "swin.embeddings.position_embeddings", "swin.encoder.layers",
             "hidden_states_norms", "stage_names", "out_features")),
    _Target("grounding-dino-deformable-attention", "GroundingDinoMultiscaleDeformableAttention",
            ("self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
             "position_embeddings", "reference_points", "spatial_shapes", "spatial_shapes_list", "level_start_index",
             "output_attentions"),
            ("value_proj", "sampling_offsets", "attention_weights", "output_proj", "n_heads", "n_levels", "n_points",
             "d_model")),
    _Target("grounding-dino-fusion-attention", "GroundingDinoBiMultiHeadAttention",
            ("self", "vision_features", "text_features", "vision_attention_mask", "text_attention_mask"),
            ("vision_proj", "text_proj", "values_vision_proj", "values_text_proj", "out_vision_proj", "out_text_proj",
             "scale", "num_heads", "head_dim", "embed_dim")),
    _Target("grounding-dino-multihead-attention", "GroundingDinoMultiheadAttention",
            ("self", "queries", "keys", "values", "attention_mask", "output_attentions"),
            ("query", "key", "value", "out_proj", "num_attention_heads", "attention_head_size", "all_head_size")),
    _Target("blip-attention", "BlipAttention", ("self", "hidden_states", "**kwargs"),
            ("config", "qkv", "projection", "num_heads", "head_dim", "scale")),
)}
# Speed-ups that change weights or submodules, not a forward: checked against the version only.
_QUICK_GELU = _Target("quick-gelu-folding", "")
_FUSED_LINEAR = _Target("fused-linear-activation", "")
_INPLACE_RELU = _Target("grounding-dino-inplace-relu", "")

_warned: set[str] = set()
_warn_lock = threading.Lock()


def _transformers_version() -> tuple[int, int]:
    import transformers

    match = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _parameters(cls: type) -> tuple[str, ...]:
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return ()
    return tuple(("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + p.name
                 for p in signature.parameters.values())


def _has_path(obj: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _supported(target: _Target, module: Any = None) -> bool:
    """Whether ``module`` (or, without one, the installed transformers) is what ``target`` was
    written for; if not, warn once per speed-up per process and return False."""
    import transformers

    low, high = TESTED_TRANSFORMERS
    reason = None
    if not low <= _transformers_version() < high:
        reason = (f"transformers {transformers.__version__} is outside the versions it was tested on "
                  f"(>={low[0]}.{low[1]},<{high[0]}.{high[1]})")
    elif module is not None and target.parameters:
        found = _parameters(type(module))
        missing = [a for a in target.attributes if not _has_path(module, a)]
        if found != target.parameters:
            reason = (f"{target.class_name}.forward takes ({', '.join(found[1:])}), it was written for "
                      f"({', '.join(target.parameters[1:])})")
        elif missing:
            reason = f"{target.class_name} has no {', '.join(missing)}"
    if reason is None:
        return True
    with _warn_lock:
        first = target.speedup not in _warned
        _warned.add(target.speedup)
    if first:
        log.warning("speed-up %s is off: %s; transformers' own code runs instead (same results, slower)",
                    target.speedup, reason)
    return False


def _all_on_cpu(module: Any) -> bool:
    parameters = list(module.parameters())
    return bool(parameters) and all(p.device.type == "cpu" for p in parameters)


def _run_plain(module: Any, inputs: tuple[Any, ...], others: tuple[Any, ...] = (), cpu_only: bool = True) -> bool:
    """Whether a call needs transformers' own forward: the fast forwards are written for
    inference on the CPU (``cpu_only``; else any device) in float32 or bfloat16 (float16 too off
    the CPU), with every parameter of the module and every floating input in ``inputs`` in one
    dtype. Training mode, anything that may need gradients (``others`` are checked for that and
    for their device only), another device or dtype take the plain path."""
    import torch

    if module.training:
        return True
    grad = torch.is_grad_enabled()
    dtype = device = None
    for parameter in module.parameters():
        dtype = parameter.dtype if dtype is None else dtype
        device = parameter.device if device is None else device
        if parameter.dtype != dtype or parameter.device != device or grad and parameter.requires_grad:
            return True
    if device is None or cpu_only and device.type != "cpu":
        return True
    if dtype not in ((torch.float32, torch.bfloat16) if device.type == "cpu"
                     else (torch.float32, torch.bfloat16, torch.float16)):
        return True
    for tensor in (*inputs, *others):
        if torch.is_tensor(tensor) and (tensor.device != device or grad and tensor.requires_grad):
            return True
    return any(torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype for t in inputs)


def _recording_attentions(config: Any = None, kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the caller asked for attention weights: by keyword, in the module's config, or
    through transformers' output recorder (transformers 5 collects them with hooks)."""
    if kwargs and kwargs.get("output_attentions"):
        return True
    if config is not None and getattr(config, "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def _plain_forward(module: Any, *args: Any, **kwargs: Any) -> Any:
    """The module's own class forward (what transformers runs)."""
    return type(module).forward(module, *args, **kwargs)


def _patch_forward(module: Any, forward: Any) -> None:
    import types

    module.forward = types.MethodType(forward, module)
    module._tidy_fast = True


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


MALLOC_ENV = "TIDY_DETECT_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


@functools.lru_cache(maxsize=1)
def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, once per process; returns whether it did.

    By default glibc serves every large allocation with a fresh ``mmap`` and unmaps it on free.
    Model inference allocates and frees activations of tens to hundreds of MB per layer, so every
    layer pays the kernel to map and zero those pages again: on this project's 2-core machine,
    a fifth of Grounding DINO's CPU time went to page faults, and the same batch ran 29% faster
    with freed memory kept. This sets ``M_MMAP_MAX`` to 0 (large blocks come from the heap, and
    are reused) and a 2 GB ``M_TRIM_THRESHOLD`` (freed memory stays with the process). The cost:
    the process keeps its peak working set instead of giving memory back between batches.
    Called when tidy-detect loads a model for inference; set ``TIDY_DETECT_MALLOC=default`` (or
    turn every speed-up off, ``TIDY_DETECT_SPEEDUPS=off``) to leave the allocator alone. A no-op
    outside Linux/glibc.
    """
    if os.environ.get(MALLOC_ENV, "").strip().lower() in ("default", "off", "0", "false") or not speedups_enabled():
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if done:
        log.debug("malloc set to keep freed memory for reuse (%s=default to turn off)", MALLOC_ENV)
    return done


def _silu_inplace_module() -> Any:
    import torch
    import torch.nn.functional as F

    class InplaceSiLU(torch.nn.Module):
        """SiLU written into its input: the fc1 output is a fresh tensor nobody else reads (out of
        place when autograd needs that input)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))

    return InplaceSiLU()


# The folded parameters, and whether folding multiplies them by 1.702 (else divides).
_FOLDED = (("fc1.weight", True), ("fc1.bias", True), ("fc2.weight", False))


def _save_unfolded(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook of a folded MLP: its state dict (what ``save_pretrained`` writes) holds
    the checkpoint's weights, not the folded ones, so a saved model loads into a plain one."""
    if not getattr(module, "_tidy_folded", False):
        return
    for name, multiplied in _FOLDED:
        value = state_dict.get(prefix + name)
        if value is not None:
            value = value.detach()
            state_dict[prefix + name] = value / QUICK_GELU_ALPHA if multiplied else value * QUICK_GELU_ALPHA


def _load_folded(module: Any, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of a folded MLP: it receives checkpoint weights (as saved by
    :func:`_save_unfolded` or by any plain model) and folds them on the way in."""
    if not getattr(module, "_tidy_folded", False):
        return
    for name, multiplied in _FOLDED:
        value = state_dict.get(prefix + name)
        if value is not None:
            state_dict[prefix + name] = value * QUICK_GELU_ALPHA if multiplied else value / QUICK_GELU_ALPHA


def fold_quick_gelu(model: Any) -> int:
    """Fold QuickGELU's 1.702 into the fc1/fc2 weights of every CLIP-style MLP; returns how many.

    Only modules with ``fc1``, ``fc2`` and a QuickGELU ``activation_fn`` are changed; a folded
    module is marked and never folded again. The weights are rescaled in place, but the module's
    state dict (so ``save_pretrained``) gives the original weights back and ``load_state_dict``
    folds what it loads, so a prepared model saves and loads checkpoints like a plain one (to
    the float rounding of one multiplication and its inverse).
    """
    import torch
    from transformers.activations import QuickGELUActivation

    if not (speedups_enabled() and _supported(_QUICK_GELU)):
        return 0
    folded = 0
    with torch.no_grad():
        for module in model.modules():
            act = getattr(module, "activation_fn", None)
            fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
            linears = isinstance(fc1, torch.nn.Linear) and isinstance(fc2, torch.nn.Linear)
            if isinstance(act, QuickGELUActivation) and linears and not getattr(module, "_tidy_folded", False):
                fc1.weight.mul_(QUICK_GELU_ALPHA)
                if fc1.bias is not None:
                    fc1.bias.mul_(QUICK_GELU_ALPHA)
                fc2.weight.div_(QUICK_GELU_ALPHA)
                module.activation_fn = _silu_inplace_module()
                module._tidy_folded = True
                module.register_state_dict_post_hook(_save_unfolded)
                module.register_load_state_dict_pre_hook(_load_folded)
                folded += 1
    if folded:
        log.debug("folded QuickGELU into %d MLPs of %s", folded, type(model).__name__)
    return folded


def _bilinear_sum(value: Any, shapes: list, pixels: Any, attention: Any) -> Any:
    """Multi-scale deformable sampling as the CUDA kernel does it, with CPU ops.

    ``value`` (B, S, heads, d): the levels' maps flattened one after the other; ``shapes`` their
    (height, width); ``pixels`` (B, Q, heads, levels, points, 2) float32 sample positions (x, y) in
    each level's pixel units, pixel centres at integers; ``attention`` (B, Q, heads, levels,
    points) the samples' weights. Returns (B, Q, heads * d) in ``value``'s dtype: per query and
    head, the attention-weighted sum of the bilinearly interpolated samples, zero outside the map
    (``grid_sample``'s zero padding).

    Every level's map is copied, in float32, into a table with one zero row/column before it and
    two after; positions clamped to [-1, size] then need no bounds checks: a sample outside the map
    reads only zeros. Each sample's four corners become (row, weight) pairs and one
    ``embedding_bag`` sums each (query, head)'s 4 x levels x points rows. One image at a time, to
    bound memory. pixels is overwritten.
    """
    import torch
    import torch.nn.functional as F

    batch_size, _, num_heads, hidden_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = pixels.shape
    device = value.device
    padded_widths = [w + 3 for _, w in shapes]
    padded_sizes = [(h + 3) * (w + 3) for h, w in shapes]
    padded_starts = np.cumsum([0] + padded_sizes[:-1]).tolist()
    level = (1, 1, num_levels, 1)  # broadcasts over (queries, heads, levels, points)
    row_stride = torch.tensor(padded_widths, dtype=torch.float32, device=device).view(level) * num_heads
    heads = torch.arange(num_heads, dtype=torch.float32, device=device).view(1, num_heads, 1, 1)
    # Table row of corner (x0, y0) = (start + (y0 + 1) * padded width + x0 + 1) * heads + head.
    offset = (torch.tensor(padded_starts, dtype=torch.float32, device=device).view(level)
              + torch.tensor(padded_widths, dtype=torch.float32, device=device).view(level) + 1) * num_heads + heads
    # Corners (x0, y0), (x1, y0), (x0, y1), (x1, y1) as steps from the first one's row.
    steps = torch.tensor([[0, num_heads, (w + 3) * num_heads, (w + 4) * num_heads] for _, w in shapes],
                         dtype=torch.int32, device=device).t().reshape(1, 1, 4, num_levels, 1)
    output = value.new_empty(batch_size, num_queries, num_heads * hidden_dim)
    for b in range(batch_size):
        table = value.new_zeros(sum(padded_sizes), num_heads, hidden_dim, dtype=torch.float32)
        start = 0
        for (h, w), padded_start in zip(shapes, padded_starts):
            target = table[padded_start:padded_start + (h + 3) * (w + 3)].view(h + 3, w + 3, num_heads, hidden_dim)
            target[1:h + 1, 1:w + 1] = value[b, start:start + h * w].view(h, w, num_heads, hidden_dim)
            start += h * w
        xy = pixels[b].clamp_(min=-1.0)
        for k, (h, w) in enumerate(shapes):  # scalar bounds per level run faster than a broadcast clamp
            xy[:, :, k, :, 0].clamp_(max=float(w))
            xy[:, :, k, :, 1].clamp_(max=float(h))
        corner = xy.floor()
        fraction = xy.sub_(corner)
        base = torch.addcmul(offset, corner[..., 1], row_stride).add_(corner[..., 0], alpha=num_heads)
        index = torch.empty(num_queries, num_heads, 4, num_levels, num_points, dtype=torch.int32, device=device)
        torch.add(base.to(torch.int32).unsqueeze(2), steps, out=index)  # a bag's 4 x levels x points rows
        fx, fy = fraction[..., 0], fraction[..., 1]
        a = attention[b].float()
        top, bottom = (1 - fy).mul_(a), fy.mul(a)
        left = 1 - fx
        weight = torch.empty(num_queries, num_heads, 4, num_levels, num_points, dtype=torch.float32, device=device)
        torch.mul(left, top, out=weight[:, :, 0])
        torch.mul(fx, top, out=weight[:, :, 1])
        torch.mul(left, bottom, out=weight[:, :, 2])
        torch.mul(fx, bottom, out=weight[:, :, 3])
        sampled = F.embedding_bag(index.view(num_queries * num_heads, -1), table.view(-1, hidden_dim),
                                  per_sample_weights=weight.view(num_queries * num_heads, -1), mode="sum")
        output[b] = sampled.view(num_queries, num_heads * hidden_dim)
    return output


def _multiscale_deformable_attention(self: Any, hidden_states: Any, attention_mask: Any = None,
                                     encoder_hidden_states: Any = None, encoder_attention_mask: Any = None,
                                     position_embeddings: Any = None, reference_points: Any = None,
                                     spatial_shapes: Any = None, spatial_shapes_list: Any = None,
                                     level_start_index: Any = None, output_attentions: bool = False) -> Any:
    """Grounding DINO's ``GroundingDinoMultiscaleDeformableAttention.forward`` in eval mode,
    sampling through :func:`_bilinear_sum`. Sample positions go straight to pixel units in
    float32 (for the encoder's point references, ``ref * size + offset``), where transformers
    normalises the offsets by the map sizes in the model's dtype and the kernel multiplies them
    back: the same function, with fewer passes, and in bfloat16 more exact (a bfloat16 position
    in [0, 1] is off by up to a fifth of a pixel on the largest map)."""
    import torch
    import torch.nn.functional as F

    if (_run_plain(self, (hidden_states, encoder_hidden_states, position_embeddings), (reference_points,))
            or spatial_shapes_list is None or reference_points is None):
        # Training, gradients (the sampling writes into preallocated outputs, which autograd
        # cannot follow), another device or dtype: transformers' forward.
        return _plain_forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                              position_embeddings, reference_points, spatial_shapes, spatial_shapes_list,
                              level_start_index, output_attentions)
    if position_embeddings is not None:
        hidden_states = hidden_states + position_embeddings
    batch_size, num_queries, _ = hidden_states.shape
    sequence_length = encoder_hidden_states.shape[1]
    shapes = [tuple(int(v) for v in s) for s in spatial_shapes_list]
    if sum(h * w for h, w in shapes) != sequence_length:
        raise ValueError("Make sure to align the spatial shapes with the sequence length of the encoder hidden states")
    value = self.value_proj(encoder_hidden_states)
    if attention_mask is not None and not bool(attention_mask.all()):
        value = value.masked_fill(~attention_mask[..., None], 0.0)
    value = value.view(batch_size, sequence_length, self.n_heads, self.d_model // self.n_heads)
    offsets = self.sampling_offsets(hidden_states).view(batch_size, num_queries, self.n_heads, self.n_levels,
                                                        self.n_points, 2)
    attention = F.softmax(self.attention_weights(hidden_states).view(
        batch_size, num_queries, self.n_heads, self.n_levels * self.n_points), -1).view(
        batch_size, num_queries, self.n_heads, self.n_levels, self.n_points)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=value.device)
    if reference_points.shape[-1] == 2:
        # (ref + offset / size) * size - 1/2 = ref * size - 1/2 + offset
        anchors = reference_points.float() * sizes - 0.5  # (B, Q, levels, 2)
        # Repeated over the points first (small), so the add broadcasts over heads only.
        anchors = anchors[:, :, None, :, None, :].expand(-1, -1, 1, -1, self.n_points, -1).contiguous()
        pixels = torch.add(offsets, anchors)
    elif reference_points.shape[-1] == 4:
        reference = reference_points.float()[:, :, None, :, None, :]
        pixels = offsets.float().mul_(reference[..., 2:] * (0.5 / self.n_points)).add_(reference[..., :2])
        pixels.mul_(sizes.view(self.n_levels, 1, 2)).sub_(0.5)
    else:
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")
    output = _bilinear_sum(value, shapes, pixels, attention)
    return self.output_proj(output), attention


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
    ``GroundingDinoBiMultiHeadAttention.forward`` in eval mode, with its matmuls re-associated.

    transformers projects the (B, 13k, 256) image features to 1024-wide queries and values, and
    projects a 1024-wide attention output back to 256: three matmuls and three 13k x 1024
    tensors. But there are only a few text tokens T per head. With the text keys and values laid
    out block-diagonally per head (heads x T rows), every product with the image side goes
    through heads x T columns instead:

    - scores = (X Wq + bq) K^T = X (Wq K^T) + bq K^T;
    - image output = (P_v V_t) Wo + bo = P_v (V_t Wo) + bo;
    - text output = P_t (X Wv + bv) = (P_t X) Wv + bv, since each row of P_t sums to 1.

    The query scale multiplies the text keys (a few rows) instead of the queries; float rounding
    differs from transformers' order at the level of the dtype's precision."""
    import torch
    import torch.nn.functional as F

    if _run_plain(self, (vision_features, text_features), (vision_attention_mask, text_attention_mask)):
        return _plain_forward(self, vision_features, text_features, vision_attention_mask, text_attention_mask)
    batch, num_vision, _ = vision_features.shape
    num_text = text_features.shape[1]
    heads = self.num_heads
    # The query scale goes on the (few) text keys, not into the weights: they stay the checkpoint's.
    keys = _block_diagonal(self.text_proj(text_features) * self.scale, heads)  # (B, heads*T, E)
    text_values = _block_diagonal(self.values_text_proj(text_features), heads)
    query_keys = torch.matmul(keys, self.vision_proj.weight)  # (B, heads*T, D): Wq K^T, transposed
    query_bias = torch.matmul(keys, self.vision_proj.bias)  # (B, heads*T)
    scores = torch.baddbmm(query_bias[:, None, :], vision_features, query_keys.transpose(1, 2))
    scores = scores.view(batch, num_vision, heads, num_text)
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
    value_out = F.linear(text_values, self.out_vision_proj.weight)  # (B, heads*T, D): V_t Wo
    vision_output = torch.baddbmm(self.out_vision_proj.bias, vision_probs.view(batch, num_vision, heads * num_text),
                                  value_out)
    # Every head's text tokens against all value heads, keeping each head's own block.
    pooled = torch.bmm(text_probs.reshape(batch, heads * num_text, num_vision), vision_features)
    mixed = self.values_vision_proj(pooled).view(batch, heads, num_text, heads, self.head_dim)
    text_output = torch.diagonal(mixed, dim1=1, dim2=3).permute(0, 1, 3, 2).reshape(batch, num_text, self.embed_dim)
    vision_weights = vision_probs.permute(0, 2, 1, 3).reshape(batch * heads, num_vision, num_text)
    text_weights = text_probs.reshape(batch * heads, num_text, num_vision)
    return (vision_output, vision_weights), (self.out_text_proj(text_output), text_weights)


def _multihead_attention(self: Any, queries: Any, keys: Any, values: Any, attention_mask: Any = None,
                         output_attentions: bool = False) -> tuple[Any, None]:
    """Grounding DINO's ``GroundingDinoMultiheadAttention`` (text self-attention, the decoder's
    self- and text cross-attention) through ``scaled_dot_product_attention``: transformers runs
    it eagerly, and in the decoder's 900 x 900 self-attention the scale, mask and softmax passes
    cost five times the matmuls. The mask is added as transformers adds it. The attention
    weights, which the layers pass on only when the model is asked for attentions, are not
    formed: this forward returns None for them, and transformers' forward runs when the model was
    asked for attentions (transformers' layers always pass ``output_attentions=True`` here, so
    inside a patched model that request is read from the encoder's or decoder's call, see
    :func:`_track_attentions`; called on its own, the argument decides)."""
    import torch.nn.functional as F

    wanted = _gd_attentions.get()
    if (output_attentions if wanted is None else wanted) or _run_plain(self, (queries, keys, values),
                                                                       (attention_mask,)):
        return _plain_forward(self, queries, keys, values, attention_mask, output_attentions)
    batch, length, _ = queries.shape
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    query = self.query(queries).view(batch, -1, heads, head_dim).transpose(1, 2)
    key = self.key(keys).view(batch, -1, heads, head_dim).transpose(1, 2)
    value = self.value(values).view(batch, -1, heads, head_dim).transpose(1, 2)
    mask = attention_mask.to(query.dtype) if attention_mask is not None else None
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=head_dim ** -0.5)
    output = self.out_proj(context.transpose(1, 2).reshape(batch, length, self.all_head_size))
    return (output, None) if output_attentions else (output,)  # transformers' tuple lengths


# Whether the Grounding DINO encoder or decoder now running was asked for attentions (None: no
# patched encoder or decoder is running).
_gd_attentions: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tidy_detect_gd_attentions",
                                                                            default=None)


def _track_attentions(module: Any) -> None:
    """Hooks that record, while ``module`` (a Grounding DINO encoder or decoder) runs, whether its
    call asked for attentions (its ``output_attentions`` argument, else its config's)."""
    if getattr(module, "_tidy_tracks_attentions", False):
        return
    signature = inspect.signature(type(module).forward)
    local = threading.local()

    def before(mod: Any, args: tuple, kwargs: dict) -> None:
        try:
            wanted = signature.bind_partial(mod, *args, **kwargs).arguments.get("output_attentions")
        except TypeError:
            wanted = kwargs.get("output_attentions")
        if wanted is None:
            wanted = getattr(getattr(mod, "config", None), "output_attentions", False)
        if not hasattr(local, "tokens"):
            local.tokens = []
        local.tokens.append(_gd_attentions.set(bool(wanted)))

    def after(mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
        tokens = getattr(local, "tokens", None)
        if tokens:
            _gd_attentions.reset(tokens.pop())

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True, always_call=True)
    module._tidy_tracks_attentions = True


def speed_up_grounding_dino(model: Any) -> int:
    """Give Grounding DINO's multi-scale deformable attention, image-text fusion attention and
    multi-head attention the faster forwards above, and its ReLUs in place, module by module
    where the module's parameters are on the CPU (the forwards are measured and tested there) and
    the module is the one they were written for (:func:`_supported`); returns how many attention
    modules were changed (0 for any other model, and on a second call). No weight is changed."""
    import torch

    forwards = {"GroundingDinoMultiscaleDeformableAttention": _multiscale_deformable_attention,
                "GroundingDinoBiMultiHeadAttention": _bi_attention,
                "GroundingDinoMultiheadAttention": _multihead_attention}
    if not speedups_enabled():
        return 0
    patched = 0
    for module in model.modules():
        kind = type(module).__name__
        if not kind.startswith("GroundingDino") or not _all_on_cpu(module):
            continue  # decided per module: only modules on the CPU, where these were measured
        if kind in ("GroundingDinoEncoder", "GroundingDinoDecoder"):
            _track_attentions(module)
        if kind in forwards and not getattr(module, "_tidy_fast", False):
            if _supported(_TARGETS[kind], module):
                _patch_forward(module, forwards[kind])
                patched += 1
        elif kind.endswith("Layer"):
            # Every layer applies its ReLU to a fresh fc1 output: in place saves a pass over the
            # (B, 13k, 2048) activation, bandwidth-bound on a CPU (where the fc1 is not fused).
            # (In-place ReLU is exact and autograd-safe.)
            for attribute in ("activation", "activation_fn"):
                if type(getattr(module, attribute, None)) is torch.nn.ReLU and _supported(_INPLACE_RELU):
                    setattr(module, attribute, torch.nn.ReLU(inplace=True))
    return patched


@functools.lru_cache(maxsize=64)
def _window_order(height: int, width: int, window: int, shift: int, device: str) -> tuple[Any, Any, Any, int]:
    """Where Swin's shifted-window layout takes its rows from, as index tensors.

    Swin pads the (height, width) map to multiples of ``window`` (zeros, bottom/right), rolls it
    by -``shift`` on both axes and cuts it into windows. Returns ``(gather, pads, scatter,
    windows)``: ``gather[k]`` is the flat map position feeding row k of the window layout (0 for
    padding), ``pads`` the rows that are padding, ``scatter[p]`` the window-layout row whose
    result goes back to map position p (the inverse roll and crop), and the number of windows.
    """
    import torch

    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    rows = (torch.arange(padded_h) + shift) % padded_h  # source row of each rolled row
    cols = (torch.arange(padded_w) + shift) % padded_w
    # Window layout: (window row, window col, row in window, col in window).
    grid_rows = rows.view(padded_h // window, 1, window, 1).expand(-1, padded_w // window, -1, window)
    grid_cols = cols.view(1, padded_w // window, 1, window).expand(padded_h // window, -1, window, -1)
    grid_rows, grid_cols = grid_rows.reshape(-1), grid_cols.reshape(-1)
    valid = (grid_rows < height) & (grid_cols < width)
    gather = torch.where(valid, grid_rows * width + grid_cols, 0)
    scatter = torch.empty(height * width, dtype=torch.long)
    scatter[gather[valid]] = torch.arange(len(gather))[valid]
    pads = torch.nonzero(~valid).view(-1)
    return gather.to(device), pads.to(device), scatter.to(device), (padded_h // window) * (padded_w // window)


def _swin_layer(self: Any, hidden_states: Any, input_dimensions: tuple[int, int], always_partition: bool = False,
                **kwargs: Any) -> tuple[Any, None]:
    """transformers' ``SwinLayer.forward`` in eval mode with fewer passes over the feature map.

    transformers pads, rolls and partitions the map (three copies), adds the shift mask to the
    relative position bias for every window of every image (a (B x windows, heads, N, N) tensor
    rebuilt in each shifted layer), projects q, k and v separately, then reverses, rolls back and
    crops (three more copies). Here one gather puts the map into window order (layer norm after
    it, padding rows zeroed as transformers pads after its layer norm), one matmul gives q, k and
    v, the mask is built once per layer for the windows of one image, and one gather brings the
    result back. Same function; the attention weights, which Swin discards, are not formed (when
    they are asked for, transformers' forward runs)."""
    import torch
    import torch.nn.functional as F

    if _run_plain(self, (hidden_states,)) or _recording_attentions(self.attention.config, kwargs):
        return _plain_forward(self, hidden_states, input_dimensions, always_partition, **kwargs)
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    height, width = input_dimensions
    batch, _, channels = hidden_states.shape
    window, shift = int(self.window_size), int(self.shift_size)
    gather, pads, scatter, num_windows = _window_order(height, width, window, shift, str(hidden_states.device))
    length = window * window
    windows = self.layernorm_before(hidden_states.index_select(1, gather))
    if len(pads):
        windows.index_fill_(1, pads, 0.0)
    attention = self.attention
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    qkv = F.linear(windows, *_fused_qkv(attention)).view(batch * num_windows, length, 3, heads, head_dim).permute(
        2, 0, 3, 1, 4)
    bias = attention.relative_position_bias()  # (1, heads, N, N)
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    shift_mask = self.get_attn_mask(padded_h, padded_w, dtype=hidden_states.dtype, device=hidden_states.device)
    if shift_mask is None:
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias, scale=attention.scaling)
    else:
        # The mask depends on the window, not on the image: one image's windows per call.
        mask = bias + shift_mask[:, None]  # (windows, heads, N, N)
        context = torch.cat([
            F.scaled_dot_product_attention(qkv[0, i:i + num_windows], qkv[1, i:i + num_windows],
                                           qkv[2, i:i + num_windows], attn_mask=mask, scale=attention.scaling)
            for i in range(0, batch * num_windows, num_windows)])
    context = context.transpose(1, 2).reshape(batch, num_windows * length, channels)
    # Back to map order before the output projection: padding rows are dropped, not projected.
    hidden_states = attention.o_proj(context.index_select(1, scatter)).add_(hidden_states)
    return self.mlp(self.layernorm_after(hidden_states)).add_(hidden_states), None


def _swin_backbone(self: Any, pixel_values: Any, **kwargs: Any) -> Any:
    """transformers' ``SwinBackbone.forward`` for the feature maps only (what a detector reads).

    transformers turns every stage's output, used or not, into a (B, C, H, W) copy, then permutes
    each used one back, normalises it and permutes it again: on an 800 px image those transposing
    copies of the large early maps cost more than some stages. Here only the stages in
    ``out_features`` are normalised and laid out once, and the patch embedding runs channels-last
    so its layer norm reads it in place. Anything else asked of the backbone, by the call or by its
    config (hidden states, attentions, a tuple instead of a ``BackboneOutput``, a stem output,
    position embeddings, any other argument), and training, gradients or another device or
    dtype, go to transformers' forward."""
    import torch
    from transformers.modeling_outputs import BackboneOutput

    swin = self.swin
    embeddings = swin.embeddings
    config = self.config
    # What transformers' forward would give beyond the feature maps, from the call or the config.
    hidden_states = kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False))
    return_dict = kwargs.get("return_dict")
    return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
    if (set(kwargs) - {"output_hidden_states", "output_attentions", "return_dict"} or hidden_states
            or not return_dict or _recording_attentions(config, kwargs) or "stem" in self.out_features
            or embeddings.position_embeddings is not None or _run_plain(self, (pixel_values,))):
        return _plain_forward(self, pixel_values, **kwargs)
    patches = embeddings.patch_embeddings
    pixel_values = patches.maybe_pad(pixel_values, *pixel_values.shape[-2:])
    projected = patches.projection(pixel_values.contiguous(memory_format=torch.channels_last))
    dims = tuple(projected.shape[-2:])
    hidden = embeddings.norm(projected.flatten(2).transpose(1, 2))
    maps = []
    for name, stage in zip(self.stage_names[1:], swin.encoder.layers):
        for block in stage.blocks:
            hidden, _ = block(hidden, dims, always_partition=True)
        if name in self.out_features:
            batch, _, channels = hidden.shape
            normed = self.hidden_states_norms[name](hidden)
            maps.append(normed.view(batch, *dims, channels).permute(0, 3, 1, 2).contiguous())
        if stage.downsample is not None:
            hidden = stage.downsample(hidden, dims)
            dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
    return BackboneOutput(feature_maps=tuple(maps), hidden_states=None, attentions=None)


def _fused_qkv(attention: Any) -> tuple[Any, Any]:
    """The q, k and v projections of a ``SwinAttention`` as one (weight, bias).

    A tensor derived from the registered parameters, not state of its own: it is rebuilt whenever
    one of q/k/v's tensors is another one, or was changed in place, or has another dtype or device
    (``.to()``, ``.half()``, ``load_state_dict``, ``to_empty``), so a prepared model can be moved,
    cast or reloaded. It never enters the state dict."""
    import torch

    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    tensors = [t for p in projections for t in (p.weight, p.bias) if t is not None]
    try:
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter: rebuild every call
        key = None
    cached = attention.__dict__.get("_tidy_qkv")
    if key is None or cached is None or cached[0] != key:
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projections])
            bias = torch.cat([p.bias for p in projections]) if projections[0].bias is not None else None
        cached = (key, weight, bias)
        attention.__dict__["_tidy_qkv"] = cached
    return cached[1], cached[2]


def speed_up_swin(model: Any) -> int:
    """Give every ``SwinLayer`` (Grounding DINO's backbone among them) the forward above, with its
    q, k and v projections fused into one matmul, and every ``SwinBackbone`` the feature-map
    forward; returns how many layers were changed. Decided module by module: only modules whose
    parameters are on the CPU (the forwards are written for any device, but only measured and
    tested on CPUs) and that are what the forwards were written for (:func:`_supported`)."""
    if not speedups_enabled():
        return 0
    patched = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind not in ("SwinBackbone", "SwinLayer") or getattr(module, "_tidy_fast", False):
            continue
        if not (_all_on_cpu(module) and _supported(_TARGETS[kind], module)):
            continue
        _patch_forward(module, _swin_backbone if kind == "SwinBackbone" else _swin_layer)
        patched += kind == "SwinLayer"
    return patched


def _linear_activation_module(linear: Any, activation: str) -> Any:
    """``activation(linear(x))`` as one oneDNN matmul with the bias and activation applied to its
    output tile (what inductor emits for CPUs): the (tokens, 4 x width) activation is written once
    instead of three times. Keeps ``linear``'s parameters (and state-dict names)."""
    import torch
    import torch.nn.functional as F

    reference = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}[activation]
    algorithm = "none" if activation == "gelu" else ""

    class LinearActivation(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.activation = activation

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # The oneDNN op has no backward: anything that may need gradients takes the plain path;
            # so does anything it has no kernel for (another device, float16, an input whose dtype
            # is not the weights', as in a model with float32 modules beside half-precision ones).
            weight = self.weight
            if (x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype
                    or weight.dtype not in (torch.float32, torch.bfloat16)
                    or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
                return reference(F.linear(x, weight, self.bias))
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], algorithm)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"

    return LinearActivation()


# Module classes whose forward applies ``activation(linear(x))`` with nothing in between (dropout
# aside, which is the identity in eval mode): (class name, linear attribute, activation attribute).
_LINEAR_ACTIVATION_SITES = (
    ("CLIPMLP", "fc1", "activation_fn"), ("Owlv2MLP", "fc1", "activation_fn"), ("BlipMLP", "fc1", "activation_fn"),
    ("Blip2MLP", "fc1", "activation_fn"), ("SwinMLP", "fc1", "activation_fn"),
    ("BertIntermediate", "dense", "intermediate_act_fn"), ("BlipTextIntermediate", "dense", "intermediate_act_fn"),
    ("Blip2QFormerIntermediate", "dense", "intermediate_act_fn"),
    ("GroundingDinoTextEnhancerLayer", "fc1", "activation"), ("GroundingDinoDeformableLayer", "fc1", "activation_fn"),
    ("GroundingDinoDecoderLayer", "fc1", "activation_fn"),
)


def _activation_name(module: Any) -> str | None:
    import torch
    from transformers.activations import GELUActivation

    if isinstance(module, torch.nn.ReLU):
        return "relu"
    if isinstance(module, torch.nn.SiLU) or type(module).__name__ == "InplaceSiLU":
        return "swish"
    if isinstance(module, torch.nn.GELU) and module.approximate == "none":
        return "gelu"
    if type(module) is GELUActivation and getattr(module, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return None


_fused_linear_probe: bool | None = None


def fused_linear_available() -> bool:
    """Whether this PyTorch build runs oneDNN's fused linear + activation on the CPU correctly.

    Probed on CPU tensors whatever the default device (``with torch.device("meta")`` and the
    like); the answer is kept for the process only when the probe really ran: a failure that
    may come from the calling context (a tensor mode, a device context) is asked again next time."""
    global _fused_linear_probe
    if _fused_linear_probe is not None:
        return _fused_linear_probe
    import torch
    import torch.nn.functional as F

    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(4, 8, generator=generator, device="cpu")
        weight = torch.randn(16, 8, generator=generator, device="cpu")
        bias = torch.randn(16, generator=generator, device="cpu")
        got = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
        if got.device.type != "cpu" or type(got) is not torch.Tensor:
            return False  # a mode intercepted the call: no answer about the build
        _fused_linear_probe = bool(torch.allclose(got, F.relu(F.linear(x, weight, bias)), atol=1e-5))
    except AttributeError:  # the op is not in this build
        _fused_linear_probe = False
    except (RuntimeError, NotImplementedError):
        return False  # possibly the context's doing: not remembered
    return _fused_linear_probe


def fuse_linear_activations(model: Any) -> int:
    """Replace ``activation(linear(x))`` by one fused matmul (:func:`_linear_activation_module`)
    wherever a known module does it, on CPU models in float32 or bfloat16; returns how many."""
    import torch

    if not (speedups_enabled() and fused_linear_available() and _supported(_FUSED_LINEAR)):
        return 0
    sites = {name: (linear, act) for name, linear, act in _LINEAR_ACTIVATION_SITES}
    fused = 0
    for module in model.modules():
        site = sites.get(type(module).__name__)
        if site is None:
            continue
        linear, activation = getattr(module, site[0], None), getattr(module, site[1], None)
        name = _activation_name(activation)
        if type(linear) is not torch.nn.Linear or name is None:
            continue
        # Decided per module: a model may hold float32 modules beside half-precision ones.
        if linear.weight.device.type != "cpu" or linear.weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        setattr(module, site[0], _linear_activation_module(linear, name))
        setattr(module, site[1], torch.nn.Identity())
        fused += 1
    if fused:
        log.debug("fused %d linear + activation pairs of %s", fused, type(model).__name__)
    return fused


def _blip_attention(self: Any, hidden_states: Any, **kwargs: Any) -> tuple[Any, None]:
    """BLIP's vision self-attention through ``scaled_dot_product_attention``. transformers runs
    it eagerly (scores, scale, softmax and weighted sum as four passes over a (B, 16, 577, 577)
    tensor), which took over 40% of BLIP-large's vision time on CPU. Same function; the weights,
    which BLIP's encoder layer discards, are not formed (when they are asked for, and in training
    or with gradients, transformers' forward runs)."""
    import torch.nn.functional as F

    if _run_plain(self, (hidden_states,), cpu_only=False) or _recording_attentions(self.config, kwargs):
        return _plain_forward(self, hidden_states, **kwargs)
    batch, length, embed = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, embed)), None


def speed_up_attention(model: Any) -> int:
    """Give BLIP's eager vision attention the fused forward above (on any device: SDPA is
    PyTorch's own kernel), module by module where it is what the forward was written for;
    returns how many modules were changed (0 for models without it, and on a second call)."""
    if not speedups_enabled():
        return 0
    patched = 0
    for module in model.modules():
        if (type(module).__name__ == "BlipAttention" and not getattr(module, "_tidy_fast", False)
                and _supported(_TARGETS["BlipAttention"], module)):
            _patch_forward(module, _blip_attention)
            patched += 1
    return patched


def maybe_compile(module: Any, enabled: bool) -> Any:
    """``torch.compile(module)`` when asked (it pays off on long runs; the first call compiles)."""
    if not enabled:
        return module
    import torch

    return torch.compile(module, dynamic=True)
