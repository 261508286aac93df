"""Tell what kind of model a checkpoint holds from its key names alone.

Used to pick a key layout and, when a user hands one loader another model's file, to say what
the file looks like instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Prefixes some tools put in front of a whole model's keys.
WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


@dataclass(frozen=True)
class Signature:
    kind: str  # dit | vae | umt5 | clip_vision | qwen2.5-vl | lora | other
    layout: str
    description: str
    required: tuple[str, ...]  # substrings that must each occur in some key
    forbidden: tuple[str, ...] = ()


# Order matters: the first match wins.
SIGNATURES: tuple[Signature, ...] = (
    Signature("lora", "lora", "a LoRA (adapter weights, not a full model)", ("lora_",)),
    Signature("lora", "lora", "a LoRA (adapter weights, not a full model)", (".lora.",)),
    Signature("dit", "diffusers", "a Wan DiT in diffusers layout", ("blocks.0.attn1.to_q.", "patch_embedding.")),
    Signature("dit", "wan-original", "a Wan DiT in the original layout", ("blocks.0.self_attn.q.", "patch_embedding.")),
    # SAT training checkpoints (Kaleido-14B-S2V): fused qkv, modules renamed (checkpoints/sat_layout.py).
    Signature("dit", "sat", "a Wan DiT in the SAT layout (Kaleido-14B-S2V)",
              ("transformer.layers.0.attention.query_key_value.", "mixins.patch_embed.proj.")),
    # Wan 2.2's VAE (48 channels) nests its blocks; it must be tested before the Wan 2.1 lines.
    Signature("vae", "wan2.2-diffusers", "the Wan 2.2 VAE (48 latent channels) in diffusers layout",
              ("encoder.down_blocks.0.resnets.", "encoder.mid_block.attentions.0.to_qkv.")),
    Signature("vae", "wan2.2-original", "the Wan 2.2 VAE (48 latent channels) in the original layout",
              ("encoder.conv1.", "decoder.upsamples.0.upsamples.")),
    # to_qkv (one fused 1x1 conv) tells a Wan VAE from SD/SDXL-style AutoencoderKLs (to_q/to_k/to_v).
    Signature("vae", "diffusers", "a Wan VAE in diffusers layout (AutoencoderKLWan)",
              ("encoder.conv_in.", "decoder.conv_in.", "quant_conv.", "encoder.mid_block.attentions.0.to_qkv.")),
    Signature("vae", "wan-original", "a Wan 2.1 VAE in the original layout (wan_2.1_vae.safetensors)",
              ("encoder.conv1.", "decoder.conv1.", "encoder.downsamples.")),
    Signature("other", "image-vae", "the VAE of another model family (e.g. Stable Diffusion/SDXL/Flux), "
              "not the Wan 2.1 VAE", ("encoder.conv_in.", "decoder.conv_in.")),
    Signature("umt5", "hf", "a UMT5/T5 text encoder", ("encoder.block.0.layer.0.SelfAttention.",)),
    Signature("umt5", "wan-original", "a UMT5 text encoder in the original Wan layout",
              ("blocks.0.attn.q.", "token_embedding."), ("patch_embedding.",)),
    Signature("clip_vision", "hf", "a CLIP vision encoder", ("vision_model.encoder.layers.0.",)),
    Signature("clip_vision", "open-clip", "a CLIP model in the open_clip layout", ("visual.transformer.resblocks.0.",)),
    Signature("qwen2.5-vl", "hf", "a Qwen2.5-VL model", ("layers.0.self_attn.q_proj.", "visual.blocks.0.")),
    Signature("other", "sd-unet", "a Stable Diffusion UNet", ("input_blocks.0.",)),
    Signature("other", "flux", "a Flux transformer", ("double_blocks.0.",)),
    Signature("other", "llm", "a language model without a vision tower", ("layers.0.self_attn.q_proj.",)),
)


def identify(keys: Iterable[str]) -> Signature | None:
    keys = list(keys)
    for sig in SIGNATURES:
        if all(any(r in k for k in keys) for r in sig.required) and not any(
                f in k for f in sig.forbidden for k in keys):
            return sig
    return None


def describe(keys: Iterable[str]) -> str:
    keys = list(keys)
    sig = identify(keys)
    if sig is not None:
        return sig.description
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised model ({len(keys)} tensors, e.g. {sample})"


def strip_wrapper_prefix(keys: Iterable[str], marker: str) -> str:
    """The common wrapper prefix in front of ``marker`` (``""`` if none)."""
    for k in keys:
        i = k.find(marker)
        if i > 0 and k[:i] in WRAPPER_PREFIXES:
            return k[:i]
    return ""
