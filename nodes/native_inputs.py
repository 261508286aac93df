"""ComfyUI's own loaded models as inputs of our encode nodes, with our numbers.

A native ``VAE`` (ComfyUI's ``VAELoader``) holding a Wan 2.1 VAE is turned into our ``WanVAE`` over the
very same tensors (renamed to diffusers' layout by diffusers' own converter, assigned without a copy),
so Reference Encode and Decode run our code on ComfyUI's weights and their numbers are those of Load
BindWeave VAE on the same file. ComfyUI's CLIP vision (``CLIP_VISION``), UMT5-XXL and Qwen2.5-VL-7B
(``CLIP``) become our encoders the same way (below).
"""

from __future__ import annotations

from typing import Any

import torch

from bindweave_core.checkpoints.in_memory import in_memory_checkpoint
from bindweave_core.errors import InputError


def is_native_vae(vae: Any) -> bool:
    return hasattr(vae, "first_stage_model") and hasattr(vae, "decode_tiled")


def wan_vae_from_native(vae: Any):
    """Our ``WanVAE`` sharing the weights of ComfyUI's loaded Wan 2.1 VAE (Wan 2.1 latent statistics,
    as ComfyUI's Wan21 latent format)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from bindweave_core.encoders.vae import WAN21_VAE_CONFIG, WanVAE

    state = vae.first_stage_model.state_dict()
    if "encoder.conv1.weight" not in state or "decoder.head.0.gamma" not in state \
            or getattr(vae, "latent_channels", 16) != 16 or state["encoder.conv1.weight"].shape[1] != 3:
        raise InputError("the VAE connected to Reference Encode is not the Wan 2.1 VAE (16 latent channels, RGB): "
                         "load wan_2.1_vae.safetensors with Load VAE or use Load BindWeave VAE.")
    config = {**WAN21_VAE_CONFIG, "base_dim": int(state["encoder.conv1.weight"].shape[0])}
    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    model.load_state_dict(convert_wan_vae_to_diffusers(state), strict=True, assign=True)
    return WanVAE(model, source="ComfyUI VAE")


# ------------------------------------------------------------------------------------------ ComfyUI's encoders
# ComfyUI's CLIPVisionLoader (CLIP_VISION) and CLIPLoader (CLIP, types wan and qwen_image) hold the tensors of the
# files they loaded, under the files' own names (a CLIP adds a prefix per text model). Our encoders' loaders read
# that state dict as the file itself (bindweave_core.checkpoints.in_memory): the same key mapping, checks and
# conversions, tensors in the stored dtype shared with ComfyUI's model. We compute in our precision, not
# ComfyUI's: the dtype is the caller's (the node's ``auto``).
UMT5_CLIP_NAME = "umt5xxl"  # ComfyUI's text-model name of the UMT5-XXL CLIP (CLIPLoader type wan)
QWEN_CLIP_NAME = "qwen25_7b"  # ... of the Qwen2.5-VL-7B CLIP (CLIPLoader type qwen_image)
ENCODER_KINDS = {"text_encoder": UMT5_CLIP_NAME, "planner": QWEN_CLIP_NAME}


def is_native_clip_vision(obj: Any) -> bool:
    return hasattr(obj, "encode_image") and hasattr(obj, "get_sd") and hasattr(obj, "model")


def is_native_clip(obj: Any) -> bool:
    return hasattr(obj, "cond_stage_model") and hasattr(obj, "tokenize") and hasattr(obj, "get_sd")


def _plain_tensors(sd: dict, what: str, loader: str) -> dict:
    """The state dict, refusing tensors ComfyUI holds in its own quantised formats (QuantizedTensor ...), which
    our code cannot read exactly."""
    odd = sorted({type(t).__name__ for t in sd.values() if isinstance(t, torch.Tensor)
                  and type(t) not in (torch.Tensor, torch.nn.Parameter)})
    if odd:
        raise InputError(f"ComfyUI holds this {what} in its own quantised format ({', '.join(odd)}), which this pack "
                         f"does not read exactly: load the file with {loader} instead.")
    return {k: (t.data if isinstance(t, torch.nn.Parameter) else t) for k, t in sd.items()}


def clip_vision_from_native(clip_vision: Any, dtype: torch.dtype):
    """Our ``ClipVisionEncoder`` over ComfyUI's loaded CLIP vision tower (our preprocessing: the official squash
    to 224 without antialiasing, not ComfyUI's centre crop)."""
    from bindweave_core.encoders.clip_vision import ClipVisionEncoder

    loader = "Load BindWeave CLIP Vision"
    refuse_patched(clip_vision, "CLIP vision model", loader)
    config = dict(getattr(clip_vision, "config", {}) or {})
    kind = getattr(clip_vision, "model_type", config.get("model_type", "clip_vision_model"))
    if kind != "clip_vision_model":
        raise InputError(f"the CLIP vision model connected is a {kind}, not the CLIP ViT-H/14 BindWeave uses: load "
                         f"clip_vision_h.safetensors with Load CLIP Vision or use {loader}.")
    sd = _plain_tensors(clip_vision.get_sd(), "CLIP vision model", loader)
    with in_memory_checkpoint(sd, "ComfyUI CLIP vision") as path:
        encoder = ClipVisionEncoder.load(path, dtype=dtype)
    mine = encoder.model.config
    for key in ("num_attention_heads", "hidden_act"):  # what a file does not record: ComfyUI's config says it
        if key in config and config[key] != getattr(mine, key):
            raise InputError(f"the CLIP vision model connected has {key} {config[key]!r}, which this pack's loader "
                             f"would read as {getattr(mine, key)!r}: use {loader} with its config.json beside it.")
    encoder.source = "ComfyUI CLIP vision"
    return encoder


def _clip_state(clip: Any, name: str, what: str, loader: str, clip_type: str) -> dict:
    """``{file key: tensor}`` of the text model ``name`` inside a ComfyUI CLIP (its prefix removed), plus the
    tokenizer's stored data (UMT5's ``spiece_model``)."""
    model = getattr(clip.cond_stage_model, name, None)
    if model is None:
        held = ", ".join(sorted(n for n, _ in clip.cond_stage_model.named_children())) or "unknown"
        raise InputError(f"the CLIP connected holds {held}, not {what}: load it with Load CLIP, type {clip_type}, "
                         f"or use {loader}.")
    refuse_patched(clip, what, loader)
    prefix = f"{name}.transformer."
    sd = _plain_tensors(clip.get_sd(), what, loader)
    tokenizer = {k: v for k, v in sd.items() if "." not in k}  # the tokenizer's own entries (spiece_model)
    return {**{k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, **tokenizer}


def text_encoder_from_native(clip: Any, dtype: torch.dtype):
    """Our UMT5 ``TextEncoder`` over ComfyUI's loaded UMT5-XXL (Load CLIP, type wan), with the sentencepiece
    model ComfyUI read from the same file."""
    from bindweave_core.encoders.text import TextEncoder

    sd = _clip_state(clip, UMT5_CLIP_NAME, "UMT5-XXL", "Load BindWeave UMT5", "wan")
    with in_memory_checkpoint(sd, "ComfyUI CLIP (UMT5-XXL)") as path:
        encoder = TextEncoder.load(path, dtype=dtype)
    encoder.source = "ComfyUI CLIP (UMT5-XXL)"
    return encoder


def planner_from_native(clip: Any, dtype: torch.dtype, tokenizer_dir: str | None, config: dict | None = None):
    """Our Qwen2.5-VL ``Planner`` over ComfyUI's loaded Qwen2.5-VL-7B (Load CLIP, type qwen_image), with the
    Qwen2.5 tokenizer ComfyUI bundles. ComfyUI drops the language-model head: prompt refinement needs Load
    BindWeave Planner with the Qwen2.5-VL-7B-Instruct directory."""
    from bindweave_core.encoders.planner import Planner

    sd = _clip_state(clip, QWEN_CLIP_NAME, "Qwen2.5-VL-7B", "Load BindWeave Planner", "qwen_image")
    with in_memory_checkpoint(sd, "ComfyUI CLIP (Qwen2.5-VL-7B)") as path:
        planner = Planner.load(path, dtype=dtype, tokenizer_dir=tokenizer_dir, config=config)
    planner.source = "ComfyUI CLIP (Qwen2.5-VL-7B)"
    return planner


def refuse_patched(obj: Any, what: str, loader: str) -> None:
    """A model with weight patches (e.g. CLIP after Load LoRA) would lose them in our code: refuse it."""
    patcher = getattr(obj, "patcher", None)
    if patcher is not None and (getattr(patcher, "patches", None) or getattr(patcher, "hook_patches", None)):
        raise InputError(f"the {what} connected carries weight patches (a LoRA or hook), which this pack's code would "
                         f"not apply: connect it before the LoRA node, or use {loader}.")
