"""Device memory per extraction stage, computed from the model architectures, and the batch
sizes that fit.

These are estimates computed from each model's config (layer widths, token counts, cache
lengths), not measurements: ``tidy-detect bench --device cuda`` measures each stage's peak
memory per image next to them. The model counts the activations alive at the widest point of
one pass in inference (layers run one after the other, so one layer's tensors at a time), the
KV cache of caption generation, and the attention matrices of eager attention (SDPA kernels
never form them). Weights are not counted: the batch size is chosen after the models are
loaded, from the memory then free.

- a ViT layer (CLIP, BLIP and BLIP-2 vision, OWLv2): ``tokens x (6 x width + MLP width)`` values
  (residual, normalised input, q, k, v, attention output, MLP hidden), plus
  ``heads x tokens^2`` twice (scores, probabilities) for eager attention;
- caption generation: the vision tower, then the language model's KV cache
  (``2 x layers x (image tokens + prompt + new tokens) x width`` per beam), its widest layer over
  the prefill, and the last position's logits in float32;
- Grounding DINO: the Swin backbone's first stage at the largest input the processor makes
  (window attention is eager: ``heads x tokens x window^2`` twice), the encoder over the
  multi-scale tokens (FFN width, deformable sampling of ``heads x levels x points`` per token,
  image-text fusion scores), and the decoder's queries.

:func:`plan_batches` turns these into batch sizes: a share of the free memory (60%: the
caching allocator's fragmentation and the kernels' workspaces take the rest) divided by each
stage's bytes per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Share of the free device memory the planned batches may fill.
MEMORY_FRACTION = 0.6
# Largest automatic batch: beyond it the decoded images of a batch weigh on host memory while the
# device is already busy (128 images of 800 x 800 px are 250 MB of pixels, their grounder inputs 1 GB).
MAX_AUTO_BATCH = 128
# Largest automatic CLIP pass (global views and crops of a batch go through CLIP together).
MAX_AUTO_CLIP_BATCH = 1024
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class StageMemory:
    """Bytes of device memory one pass of a stage needs per item (image, crop or text)."""

    stage: str
    per_item: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "per_item_bytes": self.per_item, "per_item_mib": round(self.per_item / 2 ** 20, 2),
                "detail": self.detail, "kind": "computed from the architecture (not measured)"}


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def vit_layer_bytes(tokens: int, width: int, mlp_width: int, heads: int, dtype_bytes: int, sdpa: bool) -> int:
    """Bytes alive at the widest point of one transformer layer over ``tokens`` tokens."""
    values = tokens * (6 * width + mlp_width)
    if not sdpa:
        values += 2 * heads * tokens * tokens
    return values * dtype_bytes


def _vision_tokens(vision: Any, image_size: int | None = None) -> int:
    size = int(image_size or _get(vision, "image_size", default=224))
    patch = int(_get(vision, "patch_size", default=14))
    return (size // patch) ** 2 + 1


def _vit_bytes(vision: Any, dtype_bytes: int, sdpa: bool, image_size: int | None = None) -> int:
    width = int(_get(vision, "hidden_size", default=768))
    return vit_layer_bytes(_vision_tokens(vision, image_size), width,
                           int(_get(vision, "intermediate_size", default=4 * width)),
                           int(_get(vision, "num_attention_heads", default=12)), dtype_bytes, sdpa)


def clip_image(config: Any, dtype: str, sdpa: bool = True, view_size: int | None = None) -> StageMemory:
    """One CLIP image pass (a global view or a crop)."""
    vision = config.vision_config
    per = _vit_bytes(vision, BYTES[dtype], sdpa, view_size)
    return StageMemory("clip image", per, f"{_vision_tokens(vision, view_size)} tokens x width "
                                          f"{_get(vision, 'hidden_size')}, {dtype}, {'SDPA' if sdpa else 'eager'}")


def clip_text(config: Any, dtype: str, sdpa: bool = True) -> StageMemory:
    """One CLIP text pass (a caption or a phrase, at most the text length of the model)."""
    text = config.text_config
    tokens = int(_get(text, "max_position_embeddings", default=77))
    width = int(_get(text, "hidden_size", default=512))
    per = vit_layer_bytes(tokens, width, int(_get(text, "intermediate_size", default=4 * width)),
                          int(_get(text, "num_attention_heads", default=8)), BYTES[dtype], sdpa)
    return StageMemory("clip text", per, f"{tokens} tokens x width {width}, {dtype}")


def _decoder_bytes(text: Any, sequence: int, beams: int, dtype_bytes: int, cross_tokens: int = 0) -> tuple[int, str]:
    layers = int(_get(text, "num_hidden_layers", default=12))
    width = int(_get(text, "hidden_size", "d_model", default=768))
    ffn = int(_get(text, "intermediate_size", "ffn_dim", default=4 * width))
    vocab = int(_get(text, "vocab_size", default=32000))
    cache = 2 * layers * (sequence + cross_tokens) * width * dtype_bytes * beams
    prefill = sequence * (6 * width + ffn) * dtype_bytes * beams
    logits = 2 * vocab * 4 * beams  # the last position's logits, in float32, and their processed copy
    return cache + prefill + logits, (f"KV cache {layers} layers x {sequence + cross_tokens} positions x width {width}"
                                      f" x {beams} beam(s)")


def captioner(config: Any, model_type: str, dtype: str, *, new_tokens: int, prompt_tokens: int = 0,
              beams: int = 1, sdpa: bool = True) -> StageMemory:
    """Captioning one image: the vision tower's pass, then generation (prefill and KV cache).

    Raises:
        ValueError: a model type without a memory model (the extractor then keeps its batch).
    """
    b = BYTES[dtype]
    vision = config.vision_config
    vision_bytes = _vit_bytes(vision, b, sdpa if model_type != "blip" else True)
    if model_type == "blip-2":
        queries = int(_get(config, "num_query_tokens", default=32))
        qformer = config.qformer_config
        q_width = int(_get(qformer, "hidden_size", default=768))
        qformer_bytes = vit_layer_bytes(queries, q_width, int(_get(qformer, "intermediate_size", default=4 * q_width)),
                                        int(_get(qformer, "num_attention_heads", default=12)), 4, False)
        decoder, detail = _decoder_bytes(config.text_config, queries + prompt_tokens + new_tokens, beams, b)
        per = vision_bytes + qformer_bytes + decoder
    elif model_type == "blip":
        decoder, detail = _decoder_bytes(config.text_config, prompt_tokens + new_tokens + 2, beams, b,
                                         cross_tokens=_vision_tokens(vision))
        per = vision_bytes + decoder
    elif model_type == "llava":
        image_tokens = _vision_tokens(vision) - 1
        decoder, detail = _decoder_bytes(config.text_config, image_tokens + prompt_tokens + new_tokens, beams, b)
        per = vision_bytes + decoder
    else:
        raise ValueError(f"no memory model for captioner model type {model_type!r}")
    return StageMemory("caption", per, f"{detail}, {dtype}")


def grounding_dino(config: Any, dtype: str, *, height: int, width: int, text_tokens: int) -> StageMemory:
    """Grounding one image of the processor's largest size (``height`` x ``width``)."""
    b = BYTES[dtype]
    backbone = config.backbone_config
    embed = int(_get(backbone, "embed_dim", default=128))
    window = int(_get(backbone, "window_size", default=7))
    heads = list(_get(backbone, "num_heads", default=[4]))[0]
    tokens = -(-height // 4) * -(-width // 4)
    swin = (tokens * (6 * embed + 4 * embed) + 2 * heads * tokens * window * window) * b
    d_model = int(_get(config, "d_model", default=256))
    levels = int(_get(config, "num_feature_levels", default=4))
    points = int(_get(config, "encoder_n_points", default=4))
    enc_heads = int(_get(config, "encoder_attention_heads", default=8))
    ffn = int(_get(config, "encoder_ffn_dim", default=2048))
    multi_scale = sum(-(-height // s) * -(-width // s) for s in (8, 16, 32, 64, 128)[:levels])
    deformable = multi_scale * enc_heads * levels * points * (d_model // enc_heads + 3)
    fusion = 3 * multi_scale * text_tokens * enc_heads
    encoder = (multi_scale * (6 * d_model + ffn) + deformable + fusion) * b
    queries = int(_get(config, "num_queries", default=900))
    decoder = queries * (6 * d_model + int(_get(config, "decoder_ffn_dim", default=2048)) + 3 * queries) * b
    per = max(swin, encoder + decoder) + multi_scale * d_model * b * 2  # the encoder's input and output stay
    return StageMemory("ground", per, f"{height}x{width} px: Swin stage 1 {tokens} tokens, encoder {multi_scale} "
                                      f"tokens x {d_model}, {dtype}")


def owlv2(config: Any, dtype: str, *, queries: int) -> StageMemory:
    """Grounding one image with OWLv2 (its vision tower at the model's input size, ``queries`` phrases)."""
    b = BYTES[dtype]
    vision = config.vision_config
    tokens = _vision_tokens(vision)
    per = _vit_bytes(vision, b, True) + tokens * queries * 4 * 2  # box scores per query, float32
    return StageMemory("ground", per, f"{tokens} vision tokens, {queries} queries, {dtype}")


def plan_batches(stages: dict[str, StageMemory], free_bytes: int, *, items_per_image: dict[str, int] | None = None,
                 fraction: float = MEMORY_FRACTION, max_batch: int = MAX_AUTO_BATCH,
                 max_clip_batch: int = MAX_AUTO_CLIP_BATCH) -> dict[str, int]:
    """Batch sizes that fit in ``fraction`` of ``free_bytes``.

    Returns ``{"batch": images per extraction batch, stage: items per pass, ...}``. Each stage's
    pass gets the free share to itself (stages run one after the other and free what they made);
    the extraction batch is the smallest image count any stage can take whole, so every stage
    runs a batch in one pass (``items_per_image`` says how many items an image brings to a stage:
    1 + objects for CLIP's image pass), capped at ``max_batch``. Every size is at least 1.
    """
    items_per_image = items_per_image or {}
    budget = max(int(free_bytes * fraction), 0)
    plan: dict[str, int] = {}
    images = max_batch
    for name, memory in stages.items():
        cap = max_clip_batch if name.startswith("clip") else max_batch * max(items_per_image.get(name, 1), 1)
        items = max(1, min(cap, budget // max(memory.per_item, 1)))
        plan[name] = int(items)
        images = min(images, max(1, items // max(items_per_image.get(name, 1), 1)))
    plan["batch"] = int(max(1, images))
    return plan
