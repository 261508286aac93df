"""Linear layers whose weight stays GGUF-quantised in memory and is dequantised in each forward.

A GGUF DiT keeps its quantised bytes (a Q4_K 14B model is ~9 GB instead of 28 GB at bf16): only one
layer's weight exists in float at a time, for the length of its matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.gguf_io import dequantize


class GGUFLinear(nn.Module):
    """``nn.Linear`` with a GGUF-quantised weight (raw bytes in the ``qweight`` buffer)."""

    def __init__(self, in_features: int, out_features: int, quant: str, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight, self.quant, (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype).to(x.device), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}"


def swap_in_gguf_linears(model: nn.Module, quants: dict[str, str]) -> list[str]:
    """Replace the ``nn.Linear`` modules named in ``quants`` (name -> GGUF type) by empty (meta)
    :class:`GGUFLinear` modules; returns the names swapped."""
    swapped = []
    for name, quant in sorted(quants.items()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf, None)
        if type(old) is not nn.Linear:
            continue
        setattr(parent, leaf, GGUFLinear(old.in_features, old.out_features, quant, bias=old.bias is not None,
                                         device="meta"))
        swapped.append(name)
    return swapped
