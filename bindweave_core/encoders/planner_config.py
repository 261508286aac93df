"""Qwen2.5-VL-7B-Instruct's configuration as released, and the tiny test configuration (spec section 2)."""

from __future__ import annotations

from typing import Any

from .. import constants as C
from ..config import PRESETS

# ------------------------------------------------------------------------------------ the real model
# Qwen/Qwen2.5-VL-7B-Instruct config.json (flat layout, as released), so no download is needed.
QWEN25_VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": C.PLANNER_DIM,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": C.PLANNER_DIM, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}

# A tiny random Qwen2.5-VL for tests and the smoke pipeline: same classes, toy widths. Its hidden
# size is the tiny DiT's planner width. Token ids point into the tiny in-memory tokenizer below.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|image_pad|>", "<|video_pad|>")
TINY_BYTES = 256  # byte-level alphabet first, special tokens after it
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "bos_token_id": TINY_BYTES + 0,
    "eos_token_id": TINY_BYTES + 2,
    "pad_token_id": TINY_BYTES + 0,
    "vision_start_token_id": TINY_BYTES + 3,
    "vision_end_token_id": TINY_BYTES + 4,
    "image_token_id": TINY_BYTES + 5,
    "video_token_id": TINY_BYTES + 6,
    "hidden_act": "silu",
    "hidden_size": PRESETS["tiny"].planner_dim,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "vocab_size": 264,
    "vision_config": {
        "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
        "in_chans": 3, "out_hidden_size": PRESETS["tiny"].planner_dim, "patch_size": 14, "spatial_merge_size": 2,
        "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}
