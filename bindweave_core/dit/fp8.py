"""fp8 (e4m3) weight storage for the DiT's linear layers.

Weights are stored as ``float8_e4m3fn`` with one float32 scale per tensor (the layout of the
"fp8_scaled" files ComfyUI users download: ``<layer>.weight`` + ``<layer>.scale_weight``) and
upcast to the activation dtype on the fly, halving the weight memory of bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# The linear layers worth storing in fp8: everything inside the transformer blocks.
# Embeddings, norms, modulation tables and the output head stay in the compute dtype.
FP8_MODULE_PREFIX = "blocks."


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose weight is fp8 storage plus a per-tensor scale (dequantised in forward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight.requires_grad_(False)
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def quantize_weight(weight: torch.Tensor, rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled e4m3 quantisation: returns ``(fp8 weight, float32 scale)``.

    Works through row chunks so that no full float32 copy of a large weight is ever made.
    """
    chunks = weight.split(rows_per_chunk)
    amax = torch.stack([c.abs().amax().float() for c in chunks]).amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    out = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    for dst, src in zip(out.split(rows_per_chunk), chunks):
        dst.copy_(src.float() / scale)
    return out, scale.reshape(())


def fp8_candidate_modules(model: nn.Module) -> list[str]:
    """Names of the linear layers that fp8 storage applies to."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name.startswith(FP8_MODULE_PREFIX)]


def swap_in_fp8_linears(model: nn.Module, names: list[str]) -> None:
    """Replace the named ``nn.Linear`` modules by empty (meta) ``FP8Linear`` modules of the same shape."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        setattr(parent, leaf, FP8Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta"))
