"""DiTConfig.from_dict: our names, diffusers' WanTransformer3DModel names, and unknown keys."""

from __future__ import annotations

import inspect

import pytest
from diffusers import WanTransformer3DModel

from bindweave_core.config import PRESETS, DiTConfig
from bindweave_core.errors import InputError

# The architecture of Wan2.1-I2V-14B written with diffusers' config names, as in a diffusers
# transformer/config.json, plus the bookkeeping keys diffusers adds (their values are placeholders here).
WAN_I2V_14B_CONFIG = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.0.0",
    "added_kv_proj_dim": 5120,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "image_dim": 1280,
    "in_channels": 36,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}


def test_our_own_dict_round_trips():
    for config in PRESETS.values():
        assert DiTConfig.from_dict(config.to_dict()) == config


def test_diffusers_names_are_read_not_replaced_by_14b_defaults():
    tiny = PRESETS["tiny"]
    config = DiTConfig.from_dict({**tiny.diffusers_kwargs(), "planner_dim": tiny.planner_dim,
                                  "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1"})
    assert config == tiny
    assert (config.num_heads, config.head_dim, config.ffn_dim) == (2, 32, 128)  # not 40 / 128 / 13824


def test_the_released_wan_i2v_config_reads_as_the_14b_preset():
    config = DiTConfig.from_dict({**WAN_I2V_14B_CONFIG, "family": "wan-i2v", "planner_dim": None})
    assert config == PRESETS["wan-i2v-14b"]


def test_every_diffusers_init_argument_is_understood():
    """A key of WanTransformer3DModel.__init__ (installed diffusers) is never 'unknown'."""
    params = [p for p in inspect.signature(WanTransformer3DModel.__init__).parameters if p != "self"]
    kwargs = PRESETS["tiny"].diffusers_kwargs()
    for name in params:
        try:
            DiTConfig.from_dict({name: kwargs[name]} if name in kwargs else {name: None})
        except InputError as e:
            assert "unknown" not in str(e), name


@pytest.mark.parametrize("bad,match", [
    ({"num_head": 8}, r"unknown DiT config key\(s\) \['num_head'\]"),
    ({"num_heads": 8, "num_attention_heads": 4}, "num_heads twice"),
    ({"added_kv_proj_dim": 1234}, "added_kv_proj_dim=1234"),
    ({"image_dim": None, "added_kv_proj_dim": 5120}, "added_kv_proj_dim=5120"),
    ({"pos_embed_seq_len": 514}, "pos_embed_seq_len=514"),
])
def test_bad_keys_are_refused_with_a_message(bad, match):
    with pytest.raises(InputError, match=match):
        DiTConfig.from_dict(bad)
