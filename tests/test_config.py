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
    ({"qk_norm": "rms_norm"}, "implements only qk_norm='rms_norm_across_heads'"),
    ({"rope_max_seq_len": 2048}, "implements only rope_max_seq_len=1024"),
    ({"text_len": 256}, "implements only text_len=512"),  # keys older configs of ours wrote
    ({"num_ref_slots": 2}, "implements only num_ref_slots=4"),
])
def test_bad_keys_are_refused_with_a_message(bad, match):
    with pytest.raises(InputError, match=match):
        DiTConfig.from_dict(bad)


def test_values_the_model_has_one_of_are_accepted_at_that_value():
    older = {**PRESETS["tiny"].to_dict(), "text_len": 512, "num_ref_slots": 4, "rope_max_seq_len": 1024,
             "qk_norm": "rms_norm_across_heads"}
    assert DiTConfig.from_dict(older) == PRESETS["tiny"]


def _model_signature(config: DiTConfig) -> tuple:
    """What a built DiT is: its tensors' names and shapes, every norm's eps and flags, the image K/V token count."""
    from bindweave_core.dit import build_dit

    model = build_dit(config, device="meta")
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    norms = tuple((n, getattr(m, "eps", None), getattr(m, "elementwise_affine", None))
                  for n, m in model.named_modules() if n)  # the root is the diffusers model: its config, not a norm
    return shapes, norms, model.attention_state.image_kv_tokens


@pytest.mark.parametrize("field, value", [
    ("num_layers", 3), ("num_heads", 4), ("head_dim", 16), ("ffn_dim", 96), ("in_channels", 16), ("out_channels", 8),
    ("patch_size", (1, 1, 1)), ("text_dim", 24), ("freq_dim", 16), ("image_dim", None), ("planner_dim", None),
    ("cross_attn_norm", False), ("eps", 1e-3), ("clip_token_len", 514),
])
def test_every_config_field_changes_the_model(field, value):
    """A DiTConfig field is a model field: changing it changes what is built (the family is the one
    field that names behaviour instead; tests/test_family_structure.py covers it)."""
    tiny = PRESETS["tiny"]
    assert _model_signature(tiny.replace(**{field: value})) != _model_signature(tiny)


def test_the_field_list_is_covered():
    import dataclasses

    covered = {"family", "num_layers", "num_heads", "head_dim", "ffn_dim", "in_channels", "out_channels",
               "patch_size", "text_dim", "freq_dim", "image_dim", "planner_dim", "cross_attn_norm", "eps",
               "clip_token_len"}
    assert {f.name for f in dataclasses.fields(DiTConfig)} == covered
