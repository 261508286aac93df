"""ComfyUI's own loaded models as inputs of our encode nodes, with our numbers.

A native ``VAE`` (ComfyUI's ``VAELoader``) holding a Wan 2.1 VAE is turned into our ``WanVAE`` over the
very same tensors (renamed to diffusers' layout by diffusers' own converter, assigned without a copy),
so Reference Encode runs our code on ComfyUI's weights and its numbers are those of Load BindWeave
VAE on the same file.
"""

from __future__ import annotations

from typing import Any

import torch

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
