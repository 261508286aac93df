"""CLIP ViT-H/14 vision tower (spec section 6): transformers' ``CLIPVisionModel``.

Files it loads: the ``image_encoder/`` folder of ``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers`` (``config.json`` +
``model.safetensors``) and ComfyUI's ``clip_vision_h.safetensors``. Both use the Hugging Face names
(``vision_model.embeddings.patch_embedding.weight``, ``vision_model.encoder.layers.N.self_attn.q_proj.weight``,
``vision_model.pre_layrnorm.weight`` ...) and carry ``visual_projection.weight``, which the penultimate
hidden states do not use and which is skipped. Full CLIP files (with ``text_model.*``) load their vision tower.
open_clip files (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight`` ..., as
ComfyUI's ``clip_vision.convert_to_transformers`` also reads) are renamed to those names on load, the
packed ``in_proj`` q/k/v split by rows; their text tower and ``visual.proj`` are skipped.

Each reference canvas is squashed to 224 x 224 (no crop; bilinear, by default without antialiasing as
torchvision 0.16's ``v2.Resize`` did in the official environment, see ``docs/fidelity.md``), normalised with
the CLIP mean/std, and the penultimate layer's states (``hidden_states[-2]``, ``[1, 257, 1280]``) are kept;
the references are then concatenated and zero-padded to 4 x 257 tokens (``conditioning.clip_context``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import constants as C
from ..checkpoints.identify import describe, identify
from ..checkpoints.materialize import ScannedCheckpoint, materialize, split_scales
from ..checkpoints.safetensors_io import TensorInfo, component_dir
from ..conditioning import clip_context
from ..config import PRESETS
from ..errors import CheckpointError, InputError
from ..model_files import where_to_get
from ..setting_bounds import check_reference_count
from .base import Encoder, check_before_load, header, problems_and_sizes, seeded_init_, size_differences

log = logging.getLogger("BindWeave")

# OpenCLIP ViT-H/14 vision tower as transformers describes it (ComfyUI's clip_vision_config_h.json and the
# Wan diffusers repo's image_encoder/config.json): exact GELU, LayerNorm eps 1e-5.
CLIP_VIT_H_CONFIG: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, num_channels=3,
    image_size=C.CLIP_IMAGE_SIZE, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
    attention_dropout=0.0, dropout=0.0)
RELEASED = "CLIP ViT-H/14"
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size")
_HF_MARKER = "vision_model.encoder.layers.0."
_LAYER_INDEX = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
# Parts of a full CLIP model (or persisted buffers) that the vision tower does not use.
_UNUSED = ("visual_projection.", "text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")


@dataclass
class ClipCheckpoint(ScannedCheckpoint):
    """What a CLIP vision checkpoint holds, from its headers only. Keys use the ``vision_model.`` names."""

    path: Path
    layout: str
    config: dict[str, Any]

    def size_differences(self) -> list[str]:
        return size_differences(self.config, CLIP_VIT_H_CONFIG, _SIZE_KEYS, "ViT-H/14")


def _not_clip(path: Path, keys: list[str]) -> CheckpointError:
    return CheckpointError(f"{path}: this is not a CLIP vision encoder; it looks like {describe(keys)}. "
                           + where_to_get("clip_vision"))


# open_clip vision tower names -> Hugging Face names (top level, then per residual block).
_OPEN_CLIP_TOP = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
                  "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
_OPEN_CLIP_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_OPEN_CLIP_MARKER = "visual.transformer.resblocks.0."
_OPEN_CLIP_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_tensors(infos: dict[str, TensorInfo], prefix: str) -> tuple[dict[str, TensorInfo], list[str], list[str]]:
    """``({'vision_model.*' key: stored tensor (or rows of one)}, ignored, foreign)`` for an open_clip file.

    ``prefix`` is what stands before ``visual.``; the text tower and ``visual.proj`` are ignored.
    """
    tensors: dict[str, TensorInfo] = {}
    ignored: list[str] = []
    foreign: list[str] = []
    vis = prefix + "visual."
    for key, info in infos.items():
        if not key.startswith(vis):
            (ignored if key.startswith(prefix) else foreign).append(key)  # text tower, logit_scale
            continue
        short = key[len(vis):]
        if short in _OPEN_CLIP_TOP:
            tensors["vision_model." + _OPEN_CLIP_TOP[short]] = info
            continue
        if short == "proj" or short.rpartition(".")[2] == "scaled_fp8":
            ignored.append(key)  # the projection to the joint embedding: not used by the penultimate states
            continue
        m = _OPEN_CLIP_BLOCK_KEY.fullmatch(short)
        if m is None:
            foreign.append(key)
            continue
        layer, rest = f"vision_model.encoder.layers.{m.group(1)}.", m.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = rest.rpartition("_")[2]
            width = info.shape[0] // 3
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                tensors[f"{layer}self_attn.{name}.{leaf}"] = info.rows(i * width, (i + 1) * width)
            continue
        old = next((o for o in _OPEN_CLIP_BLOCK if rest.startswith(o)), None)
        if old is None:
            foreign.append(key)
        else:
            tensors[layer + _OPEN_CLIP_BLOCK[old] + rest[len(old):]] = info
    return tensors, ignored, foreign


def map_keys(keys: list[str], path: Path) -> tuple[str, dict[str, str], list[str], list[str]]:
    """``(layout, {'vision_model.*' key: stored key}, ignored, foreign)`` for the Hugging Face layout."""
    sig = identify(keys)
    if sig is None or sig.kind != "clip_vision":
        raise _not_clip(path, keys)
    if sig.layout != "hf":
        raise CheckpointError(f"{path}: a CLIP model in the {sig.layout} layout, which this loader does not read. "
                              + where_to_get("clip_vision"))
    prefix = next(k[: k.index(_HF_MARKER)] for k in keys if _HF_MARKER in k)
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    foreign: list[str] = []
    for k in keys:
        short = k[len(prefix):] if k.startswith(prefix) else None
        if short is None:
            foreign.append(k)
        elif short.startswith(_UNUSED):
            ignored.append(k)
        elif short.startswith("vision_model.") or short.rpartition(".")[2] == "scaled_fp8":
            mapping[short] = k
        else:
            foreign.append(k)
    return sig.layout, mapping, ignored, foreign


def _read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else None
    if file is None or not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e}); download it again.") from e
    return data.get("vision_config", data)


def infer_config(tensors: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    """ViT-H/14's config with the sizes read from the shapes; head count and activation from config.json.

    Single files do not record the head count; the large OpenCLIP towers (L, H, g, bigG) all use 16.
    """
    needed = ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
              "vision_model.embeddings.position_embedding.weight", "vision_model.encoder.layers.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in tensors]
    if absent:
        raise CheckpointError(f"{path}: incomplete CLIP vision checkpoint (no {', '.join(absent)}). "
                              "Download the file again. " + where_to_get("clip_vision"))
    layers = {int(m.group(1)) for k in tensors if (m := _LAYER_INDEX.match(k))}
    hidden = tensors["vision_model.embeddings.class_embedding"].shape[0]
    patch = tensors["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise CheckpointError(f"{path}: {positions} position embeddings is not a square grid plus a class token.")
    config = dict(CLIP_VIT_H_CONFIG, hidden_size=hidden, patch_size=patch, image_size=side * patch,
                  num_hidden_layers=max(layers) + 1,
                  intermediate_size=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    on_disk = _read_config_json(path)
    for key in ("num_attention_heads", "hidden_act", "layer_norm_eps"):
        if key in on_disk:
            config[key] = on_disk[key]
    if hidden % config["num_attention_heads"]:
        raise CheckpointError(f"{path}: width {hidden} does not split into {config['num_attention_heads']} heads; "
                              "put the model's config.json beside it.")
    return config


def build_model(config: dict[str, Any], device: str | torch.device = "meta") -> torch.nn.Module:
    """A ``CLIPVisionModel``; its non-persistent ``position_ids`` buffer is real even on the meta device."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device(device):
        model = CLIPVisionModel(CLIPVisionConfig(**config))
    embeddings = _tower(model).embeddings
    if embeddings.position_ids.is_meta:
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    return model


def _tower(model: torch.nn.Module) -> torch.nn.Module:
    # transformers 4.x wraps the tower as `.vision_model`; 5.x puts it at the top level.
    return getattr(model, "vision_model", model)


def _module_key(model: torch.nn.Module, key: str) -> str:
    """File key ``vision_model.X`` -> the key of ``model`` (depends on the transformers version)."""
    return key if hasattr(model, "vision_model") else key[len("vision_model."):]


def scan_clip(path: str | os.PathLike, infos: dict[str, TensorInfo] | None = None) -> ClipCheckpoint:
    """Read a CLIP vision checkpoint's headers: layout, config and key problems."""
    path, infos = header(path, infos)
    sig = identify(infos)
    if sig is not None and sig.kind == "clip_vision" and sig.layout == "open-clip":
        prefix = next(k[: k.index(_OPEN_CLIP_MARKER)] for k in infos if _OPEN_CLIP_MARKER in k)
        layout, scales, markers = sig.layout, {}, []
        tensors, ignored, foreign = open_clip_tensors(infos, prefix)
    else:
        layout, mapping, ignored, foreign = map_keys(list(infos), path)
        tensors, scales, markers = split_scales(mapping, infos)
    config = infer_config(tensors, path)
    model = build_model(config)
    expected = {(k if hasattr(model, "vision_model") else "vision_model." + k): tuple(v.shape)
                for k, v in model.state_dict().items()}
    ckpt = ClipCheckpoint(path=path, layout=layout, config=config, tensors=tensors, scales=scales,
                          ignored=sorted(ignored + markers))
    ckpt.compare_keys(expected, foreign)
    return ckpt


def _tiny_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if p.ndim >= 2 and "position_embedding" not in name:
        return noise * math.prod(p.shape[1:]) ** -0.5
    return 0.5 * noise


def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
    """The CLIP vision part of ``python -m bindweave_core inspect``."""
    ckpt = scan_clip(path, infos)
    cfg = ckpt.config
    problems = problems_and_sizes(ckpt, ckpt.size_differences(), RELEASED)
    return {"layout": ckpt.layout, "fp8_scaled": ckpt.fp8_scaled, "fp8_scales": ckpt.fp8_scale_kinds,
            "parameters": ckpt.parameter_count, "extras": ckpt.extras(),
            "config": {"num_layers": cfg["num_hidden_layers"], "num_heads": cfg["num_attention_heads"],
                       "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
                       "ffn_dim": cfg["intermediate_size"], "image_dim": cfg["hidden_size"],
                       "image_size": cfg["image_size"], "patch_size": cfg["patch_size"]},
            "problems": problems}


class ClipVisionEncoder(Encoder):
    """CLIP vision tower: letterboxed reference canvases -> penultimate-layer tokens."""

    inspect_report = staticmethod(inspect_report)

    @property
    def dtype(self) -> torch.dtype:
        return _tower(self.model).embeddings.patch_embedding.weight.dtype

    @property
    def image_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu") -> ClipVisionEncoder:
        """Load ``clip_vision_h.safetensors`` or a diffusers ``image_encoder/`` folder (weights read once)."""
        path = component_dir(Path(path), "image_encoder")
        ckpt = scan_clip(path)
        check_before_load(ckpt, "a CLIP vision tower", "clip_vision", ckpt.size_differences(), RELEASED)
        model = build_model(ckpt.config)
        tensors = {_module_key(model, k): v for k, v in ckpt.tensors.items()}
        scales = {_module_key(model, k): v for k, v in ckpt.scales.items()}
        materialize(model, tensors, scales=scales, dtype=dtype, device=device, strict=True, source=path)
        _tower(model).embeddings.position_ids = _tower(model).embeddings.position_ids.to(device)
        model.eval().requires_grad_(False)
        log.info("loaded CLIP vision tower (%d layers, width %d, %s) from %s", ckpt.config["num_hidden_layers"],
                 ckpt.config["hidden_size"], str(dtype).replace("torch.", ""), path)
        return cls(model, source=str(path)).loaded_from(ckpt)

    @classmethod
    def tiny(cls, seed: int = 0) -> ClipVisionEncoder:
        """A tiny random tower: width ``PRESETS['tiny'].image_dim``, 224 px / patch 14 (so 257 tokens), 3 layers.

        16 heads like ViT-H, because single files do not record the head count and the loader assumes 16.
        """
        config = dict(CLIP_VIT_H_CONFIG, hidden_size=PRESETS["tiny"].image_dim, intermediate_size=64,
                      num_hidden_layers=3)
        model = build_model(config, device="cpu")
        seeded_init_(model, seed, _tiny_value)
        return cls(model.eval().requires_grad_(False), source=f"tiny(seed={seed})")

    # -------------------------------------------------------------------------------- encoding
    def preprocess(self, canvases: torch.Tensor, antialias: bool = C.CLIP_RESIZE_ANTIALIAS) -> torch.Tensor:
        """``[n, H, W, 3]`` in 0..1 (or uint8) -> normalised ``[n, 3, 224, 224]`` float32 (squashed, not cropped).

        The official ``v2.Resize([224, 224])`` of the float canvas is bilinear (half-pixel centres); whether
        it antialiases depends on torchvision (none up to 0.16, the official environment's; antialiased
        from 0.17). ``antialias`` picks one; the default follows the official environment.
        """
        if not isinstance(canvases, torch.Tensor) or canvases.ndim != 4 or canvases.shape[-1] != 3:
            shape = tuple(canvases.shape) if isinstance(canvases, torch.Tensor) else type(canvases).__name__
            raise InputError(f"reference canvases must be a [n, H, W, 3] tensor in 0..1, got {shape}")
        x = canvases.to(device=self.device).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=bool(antialias), align_corners=False)
        mean = torch.tensor(C.CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(C.CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_canvases(self, canvases: torch.Tensor, antialias: bool = C.CLIP_RESIZE_ANTIALIAS) -> torch.Tensor:
        """``[n, 257, D]``: each canvas' penultimate-layer states (``hidden_states[-2]``)."""
        pixels = self.preprocess(canvases, antialias).to(self.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def encode_references(self, canvases: torch.Tensor, antialias: bool = C.CLIP_RESIZE_ANTIALIAS) -> torch.Tensor:
        """``[1, 4*257, D]``: the references' tokens in order, zero-padded to 4 slots (even for one)."""
        if not isinstance(canvases, torch.Tensor) or canvases.ndim != 4:
            raise InputError(f"the reference canvases must be one [n, H, W, 3] tensor, got {type(canvases).__name__}"
                             f"{list(canvases.shape) if isinstance(canvases, torch.Tensor) else ''}.")
        check_reference_count(int(canvases.shape[0]), C.MAX_REFERENCES, "BindWeave")
        tokens = self.encode_canvases(canvases, antialias)
        return clip_context(list(tokens.split(1, dim=0)))
