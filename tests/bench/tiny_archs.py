"""Tiny versions of the bench architectures, under the real names, for running every bench section
in seconds (``TIDY_DETECT_BENCH_ARCHS`` points the bench at them; child processes inherit it)."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 2048  # above every tiny tokenizer's size (1,030 to 1,292 ids)

TINY_ARCHS = {
    "clip-vit-l-14": {
        "class": "CLIPModel",
        # CLIP's own vocabulary size: its config's bos/eos ids (49406, 49407) must be inside it.
        "config": {"text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
                   "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                   "projection_dim": 16},
        "processor": {"image_size": 32},
    },
    "blip2-opt-2.7b": {
        "class": "Blip2ForConditionalGeneration",
        "config": {"num_query_tokens": 4,
                   "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                     "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
                   "qformer_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                      "num_hidden_layers": 2, "cross_attention_frequency": 1,
                                      "encoder_hidden_size": 32, "vocab_size": VOCAB},
                   "text_config": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_attention_heads": 2,
                                   "num_hidden_layers": 2, "vocab_size": VOCAB, "word_embed_proj_dim": 32,
                                   "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 1,
                                   "pad_token_id": 0}},
        "processor": {"image_size": 32},
    },
    "blip-large": {
        "class": "BlipForConditionalGeneration",
        "config": {"text_config": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                                   "max_position_embeddings": 128},
                   "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                   "projection_dim": 32, "image_text_hidden_size": 32},
        "processor": {"image_size": 32},
    },
    "grounding-dino-base": {
        "class": "GroundingDinoForObjectDetection",
        "config": {"backbone_config": {"model_type": "swin", "image_size": 128, "patch_size": 4, "embed_dim": 8,
                                       "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "mlp_ratio": 2.0,
                                       "window_size": 4, "out_indices": [2, 3, 4]},
                   "text_config": {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "max_position_embeddings": 256},
                   "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64,
                   "decoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                   "encoder_n_points": 2, "decoder_n_points": 2, "num_feature_levels": 4, "num_queries": 20,
                   "max_text_len": 64, "disable_custom_kernels": True},
        "processor": {"shortest_edge": 128, "longest_edge": 192},
    },
}


def write_tiny_archs(folder: Path) -> Path:
    """The specs of :data:`TINY_ARCHS` as ``folder/NAME.json``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in TINY_ARCHS.items():
        (folder / f"{name}.json").write_text(json.dumps({"description": f"tiny {name}", **spec}), encoding="utf-8")
    return folder
