"""The one attention function of the DiT, with selectable backends.

Backends (``q, k, v`` are ``[B, S, H, D]``):

* ``sdpa``: PyTorch ``scaled_dot_product_attention`` (default; picks flash/cuDNN/efficient kernels
  on CUDA by itself);
* ``sage``: SageAttention (8-bit QK) from the ``sageattention`` package, CUDA + fp16/bf16 only;
* ``flash``: FlashAttention 2 from the ``flash-attn`` package, CUDA + fp16/bf16 only;
* ``auto``: sage, else flash, else sdpa, by what is installed and where the tensors live.

The kernels are called through diffusers' attention dispatcher. A backend that cannot run on the
given tensors falls back to ``sdpa``, logging the reason once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

log = logging.getLogger("BindWeave")

BACKENDS = ("auto", "sdpa", "sage", "flash")
_DISPATCH_NAMES = {"sdpa": "native", "sage": "sage", "flash": "flash"}
_PACKAGES = {"sage": "sageattention", "flash": "flash_attn"}
_SAGE_HEAD_DIMS = (64, 96, 128)


@functools.lru_cache(maxsize=None)
def is_installed(backend: str) -> bool:
    package = _PACKAGES.get(backend)
    return package is None or importlib.util.find_spec(package) is not None


def unavailable_reason(backend: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``backend`` cannot run on these tensors, or None if it can."""
    if backend == "sdpa":
        return None
    if backend not in _PACKAGES:
        return f"unknown attention backend {backend!r} (choose one of {BACKENDS})"
    if not is_installed(backend):
        return f"package {_PACKAGES[backend]!r} is not installed (pip install {_PACKAGES[backend].replace('_', '-')})"
    if device_type != "cuda":
        return f"it needs CUDA tensors, got {device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs fp16/bf16 tensors, got {dtype}"
    if backend == "sage" and head_dim not in _SAGE_HEAD_DIMS:
        return f"head dim {head_dim} is not one of {_SAGE_HEAD_DIMS}"
    return None


@functools.lru_cache(maxsize=None)
def resolve_backend(requested: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The backend that will actually run; logs each fallback once."""
    if requested == "auto":
        for candidate in ("sage", "flash"):
            if unavailable_reason(candidate, device_type, dtype, head_dim) is None:
                log.info("attention backend auto -> %s", candidate)
                return candidate
        log.info("attention backend auto -> sdpa")
        return "sdpa"
    reason = unavailable_reason(requested, device_type, dtype, head_dim)
    if reason is None:
        return requested
    log.warning("attention backend %r unavailable: %s; falling back to sdpa", requested, reason)
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              parallel_config: Any | None = None) -> torch.Tensor:
    """Softmax attention over ``[B, S, H, D]`` tensors, returning ``[B, S_q, H, D]``."""
    name = resolve_backend(backend, q.device.type, q.dtype, q.shape[-1])
    return dispatch_attention_fn(q, k, v, backend=_DISPATCH_NAMES[name], parallel_config=parallel_config)
