"""fp8 (e4m3) weight storage for linear layers (the DiT's blocks, the UMT5 and planner decoders).

Weights are stored as ``float8_e4m3fn`` with one float32 scale per tensor (the layout of the
"fp8_scaled" files ComfyUI users download: ``<layer>.weight`` + ``<layer>.scale_weight``) and
upcast to the activation dtype on the fly, halving the weight memory of bf16.

``set_fp8_matmul(model, "scaled_mm")`` (loader format ``fp8_fast``) multiplies in fp8 instead on GPUs
with fp8 tensor cores (compute capability >= 8.9) and ``torch._scaled_mm`` applies both per-tensor
scales (float32) to the float32 accumulator. How activations become fp8 is a choice:
``activation_scale="dynamic"`` (default: per tensor, amax / 448, one extra reduction per layer) or
``"static"`` (scale 1 and a clamp to +-448, as ComfyUI's fp8 matmul does: no reduction, but values
beyond 448 saturate and small ones lose precision). ``fast_accum=True`` lets the tensor cores keep
a lower-precision accumulator (Hopper; faster, less exact). Elsewhere the layers upcast as before,
and say so once. This changes the numbers (activations lose precision to e4m3): an explicit speed
option, never the default.

Scales are float32 everywhere: the upcast path dequantises ``weight.float() * scale`` before
rounding to the compute dtype, and activations are divided by their scale in float32 (in row
chunks, so no full float32 copy of a large activation is made).

Quantising high-precision weights while loading (:func:`quantize_weight`) streams each tensor
through one reused float32 scratch buffer: one min/max pass, then one pass that divides and
converts (``benchmarks/load_memory.py`` compares it with the row-chunked version it
replaced).
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
FP8_ACTIVATION_SCALES = ("dynamic", "static")
# elements per quantisation step: a reused 16 MiB float32 scratch (no fresh pages per step, and few
# enough steps that the thread pool's per-op cost stays small on a busy machine)
_QUANT_CHUNK = 1 << 22
_ACT_CHUNK_ELEMENTS = 1 << 24  # activation rows are quantised in float32 chunks of about this size
SCALED_MM_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have fp8 tensor cores


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose weight is fp8 storage plus a per-tensor scale (dequantised in forward,
    or multiplied in fp8 with ``matmul = "scaled_mm"`` where the GPU supports it)."""

    matmul = "upcast"
    activation_scale = "dynamic"
    fast_accum = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight.requires_grad_(False)
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``weight * scale`` computed in float32, then rounded once to ``dtype``."""
        return (self.weight.float() * self.scale_weight.float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.matmul == "scaled_mm" and scaled_mm_unavailable_reason(x.device, x.dtype) is None:
            return scaled_mm_linear(x, self.weight, self.scale_weight, bias, activation_scale=self.activation_scale,
                                    fast_accum=self.fast_accum)
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


def tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """``max |weight|`` as a float32 scalar, in one pass and without a ``|weight|`` copy."""
    low, high = torch.aminmax(weight)
    return torch.maximum(low.abs(), high.abs()).float()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled e4m3 quantisation: returns ``(fp8 weight, float32 scale)`` with
    ``fp8 = e4m3(weight_fp32 / scale)``, ``scale = max|weight| / 448``.

    The division runs in float32 through a reused scratch buffer, so no full float32 copy of a
    large weight is ever made.
    """
    scale = (tensor_amax(weight) / FP8_MAX).clamp(min=1e-12)
    flat = weight.reshape(-1)
    out = torch.empty(flat.shape, dtype=FP8_DTYPE, device=weight.device)
    chunk = min(_QUANT_CHUNK, flat.numel()) if weight.device.type == "cpu" else min(1 << 26, flat.numel())
    scratch = torch.empty(chunk, dtype=torch.float32, device=weight.device)
    for start in range(0, flat.numel(), max(chunk, 1)):
        n = min(chunk, flat.numel() - start)
        buf = scratch[:n]
        buf.copy_(flat[start: start + n])
        buf.div_(scale)  # |w| / (amax / 448) can land 1 ulp past 448: e4m3fn rounds that to 448, no clamp needed
        out[start: start + n].copy_(buf)
    return out.view(weight.shape), scale.reshape(())


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


def quantize_activation(x: torch.Tensor, activation_scale: str = "dynamic") -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 quantisation of a 2-D activation: ``(fp8 x, float32 scale)``, ``x ~ fp8 * scale``.

    ``dynamic``: scale = amax / 448 per tensor, the division in float32 (row chunks: a float32 copy of
    a whole 720p FFN activation would be ~5 GB); ``static``: scale 1, values clamped to +-448.
    """
    if activation_scale == "static":
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), torch.ones((), dtype=torch.float32, device=x.device)
    if activation_scale != "dynamic":
        raise ValueError(f"activation_scale must be one of {FP8_ACTIVATION_SCALES}, got {activation_scale!r}")
    scale = (tensor_amax(x) / FP8_MAX).clamp(min=1e-12)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    rows = max(1, _ACT_CHUNK_ELEMENTS // max(x.shape[-1], 1))
    for dst, src in zip(q.split(rows), x.split(rows)):
        dst.copy_((src.float() / scale).clamp_(-FP8_MAX, FP8_MAX))
    return q, scale


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, *, activation_scale: str = "dynamic",
                     fast_accum: bool = False) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with both operands in fp8 (``torch._scaled_mm``)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    xq, x_scale = quantize_activation(x2d, activation_scale)
    # _scaled_mm wants the second operand column-major: the [out, in] weight transposed is exactly that
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().reshape(()),
                           bias=bias, out_dtype=x.dtype, use_fast_accum=fast_accum)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def set_fp8_matmul(model: nn.Module, mode: str, *, activation_scale: str = "dynamic",
                   fast_accum: bool = False) -> int:
    """``upcast`` (default) or ``scaled_mm`` for every ``FP8Linear`` of ``model``; returns how many.

    ``activation_scale`` (``dynamic`` / ``static``) and ``fast_accum``: see the module docstring.
    Layers whose widths are not multiples of 16 (a ``_scaled_mm`` requirement) keep upcasting.
    """
    if mode not in FP8_MATMUL_MODES:
        raise ValueError(f"fp8 matmul mode must be one of {FP8_MATMUL_MODES}, got {mode!r}")
    if activation_scale not in FP8_ACTIVATION_SCALES:
        raise ValueError(f"fp8 activation scale must be one of {FP8_ACTIVATION_SCALES}, got {activation_scale!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            fits = module.in_features % 16 == 0 and module.out_features % 16 == 0
            module.matmul = mode if fits else "upcast"
            module.activation_scale = activation_scale
            module.fast_accum = fast_accum
            count += module.matmul == mode
    if mode == "scaled_mm":
        log.info("fp8 matmul (scaled_mm, %s activation scale%s) set on %d fp8 linear layers", activation_scale,
                 ", fast accumulation" if fast_accum else "", count)
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
