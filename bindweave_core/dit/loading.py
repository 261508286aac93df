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
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import constants as C
from ..checkpoints.dit_layout import map_dit_keys
from ..checkpoints.materialize import ScannedCheckpoint, materialize
from ..checkpoints.safetensors_io import TensorInfo, read_header
from ..config import PRESETS, DiTConfig
from ..errors import CheckpointError
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


def infer_config(tensors: dict[str, TensorInfo], metadata: dict[str, str], directory: Path | None = None) -> DiTConfig:
    """The architecture, read from tensor shapes (heads from metadata, config.json or the presets)."""
    if CONFIG_METADATA_KEY in metadata:
        return DiTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    patch = _shape(tensors, "patch_embedding.weight")
    if patch is None:
        raise CheckpointError("the checkpoint has no patch_embedding.weight: not a complete DiT")
    dim, in_channels, patch_size = patch[0], patch[1], tuple(patch[2:])
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
    head_dim = None
    if directory is not None and (directory / "config.json").exists():
        try:
            cfg = json.loads((directory / "config.json").read_text())
            head_dim = int(cfg["attention_head_dim"])
        except (ValueError, KeyError):
            head_dim = None
    if head_dim is None:
        head_dim = next((p.head_dim for p in PRESETS.values() if p.dim == dim), 128)
    if dim % head_dim:
        raise CheckpointError(f"cannot tell the head count of a DiT of width {dim}; pass a config explicitly")
    if planner is not None:
        family = "bindweave"
    elif image is not None:
        family = "wan-i2v"
    else:
        family = "wan-t2v"
    prod = patch_size[0] * patch_size[1] * patch_size[2]
    return DiTConfig(
        family=metadata.get("bindweave_family", family), num_layers=max(blocks) + 1, num_heads=dim // head_dim,
        head_dim=head_dim, ffn_dim=ffn[0], in_channels=in_channels, out_channels=out[0] // prod,
        patch_size=patch_size, text_dim=text[1], freq_dim=freq[1],
        image_dim=image[0] if image is not None else None,
        planner_dim=planner[1] if planner is not None else None,
        cross_attn_norm="blocks.0.norm2.weight" in tensors)


# ---------------------------------------------------------------------------------------- scan
def scan_dit(path: str | os.PathLike, config: DiTConfig | None = None) -> DiTCheckpoint:
    """Read a DiT checkpoint's headers: layout, family, config, dtypes and key problems."""
    path = Path(path)
    infos, metadata = read_header(path)
    layout, tensors, scales, ignored, foreign = map_dit_keys(infos, path)
    cfg = config or infer_config(tensors, metadata, path if path.is_dir() else None)
    if config is None and layout == "sat" and cfg.family == "wan-t2v":
        cfg = cfg.replace(family="kaleido")  # the released SAT-layout T2V weights are Kaleido's R-RoPE model
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


def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
    """The DiT part of ``python -m bindweave_core inspect``."""
    ckpt = scan_dit(path)
    return {"family": ckpt.family, "layout": ckpt.layout + (" (GGUF)" if ckpt.gguf_types else ""),
            "gguf_types": ckpt.gguf_types, "fp8_scaled": ckpt.fp8_scaled,
            "fp8_scales": ckpt.fp8_scale_kinds, "parameters": ckpt.parameter_count,
            "config": ckpt.config.to_dict(), "problems": ckpt.problems(), "extras": ckpt.extras()}
