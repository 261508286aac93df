"""Load a BindWeave / Wan DiT from the files users have, whatever their key layout.

The key layouts (diffusers, original Wan, GGUF, SAT) are read by ``checkpoints/dit_layout.py``; this
module reads the architecture off the tensor shapes, checks the keys against the model and loads it:
the model is built on the meta device and every tensor is read from the memory-mapped file, cast (or
dequantised, or quantised to fp8) on its way in, and assigned in place. GGUF linear weights stay
quantised and are dequantised layer by layer as the model runs (``dit.gguf_linear``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import constants as C
from ..checkpoints.dit_layout import map_dit_keys
from ..checkpoints.materialize import ScannedCheckpoint, materialize, target_dtype
from ..checkpoints.safetensors_io import TensorInfo, read_header
from ..config import PRESETS, DiTConfig
from ..errors import CheckpointError, InputError
from ..families import checkpoint_family
from ..fp8 import fp8_candidate_modules, set_fp8_matmul, swap_in_fp8_linears
from .transformer import BindWeaveTransformer

log = logging.getLogger("BindWeave")

WEIGHT_FORMATS = C.DIT_WEIGHT_FORMATS
# fp8_fast: fp8 storage + fp8 matmul (torch._scaled_mm) where the GPU has fp8 tensor cores (bindweave_core.fp8)
WEIGHT_FORMAT_ALIASES = {"fp8_scaled_mm": "fp8_fast"}
CONFIG_METADATA_KEY = "bindweave_config"  # our own files carry their DiTConfig as JSON metadata
# Modules kept in float32 when loading at lower precision (as diffusers does for Wan).
_KEEP_FP32 = tuple(BindWeaveTransformer._keep_in_fp32_modules)


@dataclass
class DiTCheckpoint(ScannedCheckpoint):
    """What a DiT checkpoint holds, from its headers only (nothing is loaded)."""

    path: Path
    layout: str
    config: DiTConfig
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def gguf_types(self) -> dict[str, int]:
        """``{GGUF type: tensor count}`` for GGUF files (float tensors under their dtype), else empty."""
        if self.metadata.get("format") != "gguf":
            return {}
        return dict(Counter(i.quant or str(i.dtype).replace("torch.", "") for i in self.tensors.values()))


# ---------------------------------------------------------------------------------------- config
def _shape(tensors: dict[str, TensorInfo], key: str) -> tuple[int, ...] | None:
    info = tensors.get(key)
    return info.shape if info is not None else None


def _shape_fields(tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """The DiTConfig fields that the tensor shapes fix (everything but the head split, eps and family)."""
    patch = _shape(tensors, "patch_embedding.weight")
    if patch is None:
        raise CheckpointError("the checkpoint has no patch_embedding.weight: not a complete DiT")
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    ffn = _shape(tensors, "blocks.0.ffn.net.0.proj.weight")
    text = _shape(tensors, "condition_embedder.text_embedder.linear_1.weight")
    freq = _shape(tensors, "condition_embedder.time_embedder.linear_1.weight")
    image = _shape(tensors, "condition_embedder.image_embedder.norm1.weight")
    planner = _shape(tensors, "condition_embedder.text_projector.linear_1.weight")
    out = _shape(tensors, "proj_out.weight")
    if None in (ffn, text, freq, out) or not blocks:
        raise CheckpointError("the checkpoint lacks core DiT tensors (blocks, embedders or proj_out): "
                              "it is incomplete or not a Wan DiT")
    patch_size = tuple(patch[2:])
    return dict(num_layers=max(blocks) + 1, ffn_dim=ffn[0], in_channels=patch[1],
                out_channels=out[0] // math.prod(patch_size), patch_size=patch_size, text_dim=text[1],
                freq_dim=freq[1], image_dim=image[0] if image is not None else None,
                planner_dim=planner[1] if planner is not None else None,
                cross_attn_norm="blocks.0.norm2.weight" in tensors, dim=patch[0])


def _config_json(directory: Path | None) -> tuple[dict[str, Any], str]:
    """The fields a diffusers ``config.json`` next to the weights gives (our names), and its path."""
    path = directory / "config.json" if directory is not None else None
    if path is None or not path.is_file():
        return {}, ""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}). Fix or remove the file.") from None
    try:
        given = DiTConfig.fields_from_dict(raw)
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "added_kv_proj_dim" in raw:  # derived, not stored: kept to be checked against the weights
        given["added_kv_proj_dim"] = raw["added_kv_proj_dim"]
    return given, str(path)


def _head_dim(dim: int, given: dict[str, Any], source: str) -> int:
    """The head size: from the config (``attention_head_dim`` or the head count), else from the one known
    model of this width; a width no known model has is refused (a guess would give a wrong model)."""
    if "head_dim" in given:
        head_dim = int(given["head_dim"])
    elif "num_heads" in given:
        head_dim = dim // int(given["num_heads"]) if int(given["num_heads"]) > 0 else 0
    else:
        known = {p.head_dim for p in PRESETS.values() if p.dim == dim}
        if len(known) != 1:
            widths = sorted({p.dim for p in PRESETS.values()})
            raise CheckpointError(
                f"cannot tell the head size of a DiT {dim} wide: the file records no config and "
                + ("no known model is that wide" if not known else f"known models of that width differ ({sorted(known)})")
                + f" (known widths: {widths}). Put the diffusers config.json (with attention_head_dim) next to the "
                "weights, or pass config=DiTConfig(...) to load_dit.")
        head_dim = known.pop()
    if head_dim <= 0 or dim % head_dim or ("num_heads" in given and int(given["num_heads"]) * head_dim != dim):
        raise CheckpointError(f"{source}: heads {given.get('num_heads')} x head size {head_dim} do not make the "
                              f"width {dim} of the weights. Fix the config.")
    return head_dim


def infer_config(tensors: dict[str, TensorInfo], metadata: dict[str, str], directory: Path | None = None,
                 layout: str = "diffusers") -> DiTConfig:
    """The architecture: the config recorded in the file, else the tensor shapes plus a diffusers
    ``config.json`` in ``directory`` (every field it gives is used, and must agree with the shapes)."""
    if CONFIG_METADATA_KEY in metadata:
        return DiTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    fields = _shape_fields(tensors)
    dim = fields.pop("dim")
    given, source = _config_json(directory)
    if "added_kv_proj_dim" in given:
        added, expected = given.pop("added_kv_proj_dim"), dim if fields["image_dim"] is not None else None
        if added != expected:
            raise CheckpointError(f"{source} says added_kv_proj_dim={added!r} but the weights' image key/value "
                                  f"projections are {expected!r}: the config belongs to another model.")
    for name, value in given.items():
        stored = tuple(value) if name == "patch_size" else value
        if name in fields and fields[name] != stored:
            raise CheckpointError(f"{source} says {name}={value!r} but the weights have {name}={fields[name]!r}: "
                                  "the config belongs to another model. Use the config.json of these weights.")
    head_dim = _head_dim(dim, given, source or "the DiT")
    family = metadata.get("bindweave_family") or given.get("family") or checkpoint_family(
        planner=fields["planner_dim"] is not None, image_embedder=fields["image_dim"] is not None, layout=layout)
    return DiTConfig(**{**given, **fields, "family": family, "head_dim": head_dim, "num_heads": dim // head_dim})


# ---------------------------------------------------------------------------------------- scan
def scan_dit(path: str | os.PathLike, config: DiTConfig | None = None) -> DiTCheckpoint:
    """Read a DiT checkpoint's headers: layout, family, config, dtypes and key problems."""
    path = Path(path)
    infos, metadata = read_header(path)
    layout, tensors, scales, ignored, foreign = map_dit_keys(infos, path)
    cfg = config or infer_config(tensors, metadata, path if path.is_dir() else None, layout)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BindWeaveTransformer(cfg).state_dict().items()}
    ckpt = DiTCheckpoint(path=path, layout=layout, config=cfg, tensors=tensors, scales=scales,
                         ignored=sorted(ignored), metadata=metadata)
    ckpt.compare_keys(expected, foreign)
    return ckpt


# ---------------------------------------------------------------------------------------- load
def load_dit(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             weight_format: str = "default", config: DiTConfig | None = None, attention_backend: str = "sdpa",
             strict: bool = True) -> BindWeaveTransformer:
    """Load a DiT checkpoint (file or sharded directory) without ever holding two copies.

    Args:
        dtype: compute dtype; floating tensors are cast to it (norm/time-embedding tensors stay fp32).
        weight_format: ``default`` (fp8 files are dequantised to ``dtype``) or ``fp8`` (block linear
            weights kept as fp8 e4m3 storage with per-tensor scales; high-precision files quantised),
            or ``fp8_fast`` (alias ``fp8_scaled_mm``): fp8 storage multiplied in fp8 with per-tensor
            activation scales on GPUs of compute capability >= 8.9, upcast elsewhere (logged once).
        strict: raise on missing or wrongly shaped tensors (listed by name); otherwise warn and zero-fill
            the missing ones. Unknown extra tensors are listed in a warning and skipped either way.
    """
    weight_format = WEIGHT_FORMAT_ALIASES.get(weight_format, weight_format)
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    ckpt = scan_dit(path, config)
    if strict:
        ckpt.require_matching_keys(f"a {ckpt.family} DiT", "dit")
    with torch.device("meta"):
        model = BindWeaveTransformer(ckpt.config)
    tensors = ckpt.tensors
    gguf_linears = {k[: -len(".weight")]: i.quant for k, i in tensors.items() if i.quant and k.endswith(".weight")}
    if gguf_linears:
        from .gguf_linear import swap_in_gguf_linears

        if weight_format != "default":
            log.warning("%s is a GGUF file: its weights stay GGUF-quantised; weight_format=%s does not apply",
                        ckpt.path, weight_format)
            weight_format = "default"
        kept = set(swap_in_gguf_linears(model, gguf_linears))
        tensors = {(k[: -len(".weight")] + ".qweight" if k[: -len(".weight")] in kept and k.endswith(".weight")
                    else k): i for k, i in tensors.items()}
    fp8_modules = set(fp8_candidate_modules(model)) if weight_format in ("fp8", "fp8_fast") else set()
    swap_in_fp8_linears(model, sorted(fp8_modules))
    materialize(model, tensors, scales=ckpt.scales, dtype=dtype, device=device, fp8_modules=fp8_modules,
                keep_fp32=_KEEP_FP32, strict=strict, source=ckpt.path)
    if weight_format == "fp8_fast":
        set_fp8_matmul(model, "scaled_mm")
    model.set_attention_backend(attention_backend)
    model.checkpoint_info = ckpt
    log.info("loaded %s DiT (%s layout, %s) from %s", ckpt.family, ckpt.layout,
             "fp8 storage" if fp8_modules else "GGUF " + ", ".join(sorted(set(gguf_linears.values())))
             if gguf_linears else str(dtype).replace("torch.", ""), ckpt.path)
    return model.eval().requires_grad_(False)


def dit_from_state_dict(config: DiTConfig, state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", attention_backend: str = "sdpa") -> BindWeaveTransformer:
    """A DiT of ``config`` holding the in-memory ``state_dict`` (diffusers module names), strictly: a missing,
    unexpected or wrongly shaped tensor is an error naming it. ``dtype`` casts floating tensors as
    :func:`load_dit` does (norm and time-embedding tensors stay float32); the tensors are not copied
    when they already have the dtype and device."""
    with torch.device("meta"):
        model = BindWeaveTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})" for k in set(expected) & set(state_dict)
                   if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if v]
        raise CheckpointError(f"the state dict does not fit a {config.family} DiT of this config ({'; '.join(parts)}). "
                              "Give the config the weights were made with.")

    placed = {k: v.to(device=device, dtype=target_dtype(k, v.dtype, dtype, _KEEP_FP32) if dtype is not None else None)
              for k, v in state_dict.items()}
    model.load_state_dict(placed, strict=True, assign=True)
    model.set_attention_backend(attention_backend)
    return model.eval().requires_grad_(False)


def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
    """The DiT part of ``python -m bindweave_core inspect``."""
    ckpt = scan_dit(path)
    return {"family": ckpt.family, "layout": ckpt.layout + (" (GGUF)" if ckpt.gguf_types else ""),
            "gguf_types": ckpt.gguf_types, "fp8_scaled": ckpt.fp8_scaled,
            "fp8_scales": ckpt.fp8_scale_kinds, "parameters": ckpt.parameter_count,
            "config": ckpt.config.to_dict(), "problems": ckpt.problems(), "extras": ckpt.extras()}
