"""fp8 (e4m3) weight storage for the DiT's linear layers.

Weights are stored as ``float8_e4m3fn`` with one float32 scale per tensor (the layout of the
"fp8_scaled" files ComfyUI users download: ``<layer>.weight`` + ``<layer>.scale_weight``) and
upcast to the activation dtype on the fly, halving the weight memory of bf16.

``set_fp8_matmul(model, "scaled_mm")`` (loader format ``fp8_fast``) multiplies in fp8 instead on GPUs
with fp8 tensor cores (compute capability >= 8.9): each activation is quantised per tensor on the
fly (amax / 448) and ``torch._scaled_mm`` applies both per-tensor scales. Elsewhere the layers
upcast as before, and say so once. This changes the numbers (activations lose precision to e4m3):
an explicit speed option, never the default.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("BindWeave")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# The linear layers worth storing in fp8: everything inside the transformer blocks.
# Embeddings, norms, modulation tables and the output head stay in the compute dtype.
FP8_MODULE_PREFIX = "blocks."
FP8_MATMUL_MODES = ("upcast", "scaled_mm")
SCALED_MM_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have fp8 tensor cores


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose weight is fp8 storage plus a per-tensor scale (dequantised in forward,
    or multiplied in fp8 with ``matmul = "scaled_mm"`` where the GPU supports it)."""

    matmul = "upcast"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight.requires_grad_(False)
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.matmul == "scaled_mm" and scaled_mm_unavailable_reason(x.device, x.dtype) is None:
            return scaled_mm_linear(x, self.weight, self.scale_weight, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    # Weight-patching protocol of ComfyUI's ModelPatcher (``convert_<param>`` / ``set_<param>`` on the
    # module): LoRA deltas are added to the real (scaled) values, then stored back with our scale.
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        scale = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False) -> torch.Tensor | None:
        scale = self.scale_weight.to(device=weight.device, dtype=torch.float32)
        stored = (weight.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        if return_weight:
            return stored
        if inplace_update:
            self.weight.data.copy_(stored)
        else:
            self.weight = nn.Parameter(stored, requires_grad=False)
        return None


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


# ---------------------------------------------------------------------------------- fp8 matmul
@functools.lru_cache(maxsize=None)
def _scaled_mm_reason(device_type: str, index: int | None, dtype: torch.dtype) -> str | None:
    if not hasattr(torch, "_scaled_mm"):
        reason = f"torch {torch.__version__} has no torch._scaled_mm"
    elif device_type != "cuda":
        reason = f"it needs a CUDA GPU with compute capability >= 8.9, the activations are on {device_type}"
    elif dtype not in (torch.float16, torch.bfloat16):
        reason = f"it needs fp16/bf16 activations, got {dtype}"
    else:
        capability = torch.cuda.get_device_capability(index)
        reason = None if capability >= SCALED_MM_MIN_CAPABILITY else (
            f"{torch.cuda.get_device_name(index)} has compute capability {capability[0]}.{capability[1]} "
            f"(fp8 tensor cores need >= 8.9)")
    if reason is not None:
        log.warning("fp8 matmul (torch._scaled_mm) unavailable: %s; fp8 weights are upcast instead", reason)
    return reason


@torch.compiler.assume_constant_result  # compiled blocks: decided (and logged) once while tracing
def scaled_mm_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fp8 matmul cannot run for activations on ``device`` of ``dtype`` (logged once), or None."""
    return _scaled_mm_reason(device.type, device.index, dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantisation of a 2-D activation: ``(fp8 x, float32 scale)``, ``x ~ fp8 * scale``."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    # divide in x's dtype: a float32 copy of a 720p FFN activation would be ~5 GB
    q = (x / scale.to(x.dtype)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with both operands in fp8 (``torch._scaled_mm``)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    xq, x_scale = quantize_activation(x2d)
    # _scaled_mm wants the second operand column-major: the [out, in] weight transposed is exactly that
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().reshape(()),
                           bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def set_fp8_matmul(model: nn.Module, mode: str) -> int:
    """``upcast`` (default) or ``scaled_mm`` for every ``FP8Linear`` of ``model``; returns how many.

    Layers whose widths are not multiples of 16 (a ``_scaled_mm`` requirement) keep upcasting.
    """
    if mode not in FP8_MATMUL_MODES:
        raise ValueError(f"fp8 matmul mode must be one of {FP8_MATMUL_MODES}, got {mode!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            fits = module.in_features % 16 == 0 and module.out_features % 16 == 0
            module.matmul = mode if fits else "upcast"
            count += module.matmul == mode
    if mode == "scaled_mm":
        log.info("fp8 matmul (scaled_mm) set on %d fp8 linear layers", count)
    return count


def convert_to_fp8(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Quantise the named ``nn.Linear`` layers (default: :func:`fp8_candidate_modules`) in place to
    ``FP8Linear`` storage, one layer at a time (benchmarks, tests; the loader does it on load)."""
    names = fp8_candidate_modules(model) if names is None else names
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        new = FP8Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        weight, scale = quantize_weight(old.weight.detach())
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.scale_weight = scale.to(weight.device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        setattr(parent, leaf, new)
    return names
