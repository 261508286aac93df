"""Catching NaN/inf where it appears, so a numeric failure is an error naming its stage, never a video.

Large models overflow in fp16 (a 7B language model's activations pass 65504 easily); the NaN/inf
then travels through every later stage and the run ends with a black or noise video and exit 0.
:func:`check_finite` reads a stage's output once (one reduction, nothing is changed, so the numbers
of a good run stay bit-identical) and raises :class:`NonFiniteError` naming the stage, the model and
its precision, with the fix. It is called on the planner states, the UMT5 states, the CLIP vision
tokens, the first step's velocity and the final latents (``bindweave_core.pipeline``; the ComfyUI
nodes go through the same pipeline methods), and on every tensor of a LoRA file before it is merged
(``bindweave_core.lora``).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import BindWeaveError

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _name.replace("float8_", "fp8 ")


class NonFiniteError(BindWeaveError, FloatingPointError):
    """A stage produced NaN or infinite values (the message names the stage, model and precision)."""


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``"fp16"`` (the names the CLI and the loader nodes use); other values as text."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")) if dtype is not None else "unknown precision"


def model_dtype(component: Any) -> torch.dtype | None:
    """The precision a model computes in: its ``dtype`` attribute, else its first floating parameter's."""
    dtype = getattr(component, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    module = component if isinstance(component, torch.nn.Module) else getattr(component, "model", None)
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _fix(dtype: torch.dtype | None) -> str:
    if dtype == torch.float16:
        return ("fp16 has a small range and large models overflow in it: run this model in bf16 (fp32 on a CPU or "
                "a GPU without bf16): CLI --dtype bf16, Python from_files(dtype=torch.bfloat16), ComfyUI: the "
                "loader node's dtype bf16")
    return ("run it in bf16 or fp32 (CLI --dtype, the loader node's dtype), and check the model file (a damaged "
            "or wrongly converted checkpoint also gives this)")


def check_finite(tensor: torch.Tensor, *, stage: str, model: str, dtype: Any = None) -> torch.Tensor:
    """``tensor`` unchanged when every value is finite; else :class:`NonFiniteError` naming ``stage`` (what the
    tensor is), ``model`` (what made it) and ``dtype`` (its precision), with the fix. One reduction on the
    tensor's own device; integer tensors pass without a look."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    if bool(torch.isfinite(tensor).all()):
        return tensor
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise NonFiniteError(
        f"the {stage} hold non-finite values ({nan} NaN, {inf} inf of {tensor.numel()}): {model} ran in "
        f"{dtype_name(dtype)}. The run was stopped here instead of making a broken video. Fix: {_fix(dtype)}.")


def check_all_finite(tensors: dict[str, torch.Tensor], *, stage: str, model: str, dtype: Any = None) -> None:
    """:func:`check_finite` on each tensor of a dict (the stage names the key)."""
    for key, t in tensors.items():
        check_finite(t, stage=f"{stage} ({key})", model=model, dtype=dtype)
