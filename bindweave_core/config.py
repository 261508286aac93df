"""DiT configurations: a dataclass and the named presets.

``family`` says how a checkpoint is conditioned:

* ``bindweave``: Wan2.1-I2V + the Qwen connector, 4 temporal reference slots (spec sections 1-9);
* ``wan-i2v``: plain Wan2.1-I2V (no connector); runs the base image-to-video path;
* ``wan-t2v``: plain Wan2.1-T2V (16 input channels, no image cross-attention);
* ``kaleido``: Wan2.1-T2V trained for R-RoPE sequence references (Kaleido-14B-S2V).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from . import constants as C
from .errors import InputError

FAMILIES = ("bindweave", "wan-i2v", "wan-t2v", "kaleido")  # what each one does: bindweave_core.families


@dataclass(frozen=True)
class DiTConfig:
    family: str = "bindweave"
    num_layers: int = 40
    num_heads: int = 40
    head_dim: int = 128
    ffn_dim: int = 13824
    in_channels: int = 36
    out_channels: int = 16
    patch_size: tuple[int, int, int] = C.PATCH_SIZE
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int | None = 1280  # CLIP width; None for text-to-video families
    planner_dim: int | None = C.PLANNER_DIM  # Qwen width; None when there is no connector
    cross_attn_norm: bool = True
    eps: float = 1e-6  # every LayerNorm / RMSNorm of the blocks
    clip_token_len: int = C.CLIP_TOKENS_PER_REF  # the image key/value stream sees this many CLIP tokens

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Arguments for diffusers' ``WanTransformer3DModel`` with the same architecture."""
        ours = {name: getattr(self, name) for name in _DIFFUSERS_SAME_NAMES}
        theirs = {diffusers: getattr(self, name) for diffusers, name in _DIFFUSERS_NAMES.items()}
        return {**ours, **theirs, **_FIXED_DIFFUSERS, "patch_size": tuple(self.patch_size),
                "added_kv_proj_dim": self.dim if self.image_dim is not None else None}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """A config from our own names (``to_dict``) or diffusers' ``WanTransformer3DModel`` config names.

        diffusers' ``num_attention_heads``/``attention_head_dim`` become ``num_heads``/``head_dim``;
        ``added_kv_proj_dim`` must be the width (or None without image input); bookkeeping keys
        (``_class_name``, ``_diffusers_version``, ...) are ignored. Anything else unknown is an error,
        so a misspelt or foreign key never falls back to 14B sizes silently.
        """
        kwargs = cls.fields_from_dict(d)
        config = cls(**kwargs)
        added = d.get("added_kv_proj_dim")
        expected = config.dim if config.image_dim is not None else None
        if "added_kv_proj_dim" in d and added != expected:
            raise InputError(f"DiT config has added_kv_proj_dim={added!r} but image_dim={config.image_dim!r} and width "
                             f"{config.dim}: the image key/value projections must be {expected!r} wide.")
        return config

    @classmethod
    def fields_from_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The fields a config dict gives, under our names (only those it gives: no defaults added).

        Keys the model has one value for (``qk_norm``, ``rope_max_seq_len``, ``text_len``,
        ``num_ref_slots``, ``pos_embed_seq_len``) are accepted at that value and refused otherwise.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in d.items():
            if key.startswith("_") or key in _DIFFUSERS_CHECKED:
                continue
            if key in _FIXED:
                if value != _FIXED[key]:
                    raise InputError(f"DiT config sets {key}={value!r}; this DiT implements only {key}="
                                     f"{_FIXED[key]!r} ({_FIXED_WHY[key]}). Use a Wan2.1 / BindWeave config.")
                continue
            name = _DIFFUSERS_NAMES.get(key, key)
            if name not in names:
                unknown.append(key)
            elif name in kwargs and kwargs[name] != value:
                raise InputError(f"DiT config gives {name} twice with different values ({kwargs[name]!r} and "
                                 f"{key}={value!r}); keep one.")
            else:
                kwargs[name] = value
        if unknown:
            known = sorted(names) + sorted(_DIFFUSERS_NAMES) + sorted(_DIFFUSERS_CHECKED) + sorted(_FIXED)
            raise InputError(f"unknown DiT config key(s) {sorted(unknown)}; known keys: {', '.join(known)} "
                             "(diffusers' WanTransformer3DModel names are accepted too).")
        if d.get("pos_embed_seq_len") is not None:
            raise InputError(f"DiT config sets pos_embed_seq_len={d['pos_embed_seq_len']!r} (Wan first-last-frame "
                             "image position embedding), which BindWeave/Wan2.1-I2V checkpoints do not have.")
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return kwargs

    def replace(self, **changes: Any) -> "DiTConfig":
        return dataclasses.replace(self, **changes)


# diffusers' WanTransformer3DModel.__init__ names that are the same words as ours, and those that differ.
_DIFFUSERS_SAME_NAMES = ("in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers",
                         "cross_attn_norm", "eps", "image_dim")
_DIFFUSERS_NAMES = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim"}
# diffusers names we derive rather than store: checked against the config in from_dict.
_DIFFUSERS_CHECKED = ("added_kv_proj_dim", "pos_embed_seq_len")
# Names the model has exactly one value for (diffusers' config keys and the keys older configs of ours
# wrote): accepted at that value, refused at any other (nothing would change the model to follow them).
_FIXED_DIFFUSERS = {"qk_norm": C.QK_NORM, "rope_max_seq_len": C.ROPE_POSITIONS}
_FIXED = {**_FIXED_DIFFUSERS, "text_len": C.TEXT_LEN, "num_ref_slots": C.NUM_REF_SLOTS}  # ours: older configs
_FIXED_WHY = {"qk_norm": "diffusers' Wan attention normalises queries and keys across all heads",
              "rope_max_seq_len": "the official rotary tables; inputs are checked against them",
              "text_len": "UMT5 states are always 512 positions", "num_ref_slots": "BindWeave has 4 reference slots"}

_WAN_14B = dict(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256)

PRESETS: dict[str, DiTConfig] = {
    # spec section 1: Wan2.1-I2V-14B + connector 3584 -> 4096 -> 4096
    "bindweave-14b": DiTConfig(family="bindweave", in_channels=36, image_dim=1280,
                               planner_dim=C.PLANNER_DIM, **_WAN_14B),
    "wan-i2v-14b": DiTConfig(family="wan-i2v", in_channels=36, image_dim=1280, planner_dim=None, **_WAN_14B),
    "kaleido-14b": DiTConfig(family="kaleido", in_channels=16, image_dim=None, planner_dim=None,
                             cross_attn_norm=True, **_WAN_14B),
    # Tiny CPU preset for tests and the smoke model: same architecture, toy widths.
    # planner_dim/text_dim/image_dim match the tiny encoders built by ``bindweave_core.smoke``.
    "tiny": DiTConfig(family="bindweave", num_layers=2, num_heads=2, head_dim=32, ffn_dim=128,
                      in_channels=36, text_dim=32, freq_dim=32, image_dim=32, planner_dim=64),
    "tiny-kaleido": DiTConfig(family="kaleido", num_layers=2, num_heads=2, head_dim=32, ffn_dim=128,
                              in_channels=16, text_dim=32, freq_dim=32, image_dim=None, planner_dim=None),
}


def get_preset(name: str) -> DiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
