"""The one attention function of the DiT, with selectable backends.

Backends (``q, k, v`` are ``[B, S, H, D]``):

* ``sdpa``: PyTorch ``scaled_dot_product_attention`` (default; on CUDA PyTorch picks its flash,
  cuDNN or memory-efficient kernel by itself, on the CPU its fused CPU kernel);
* ``sage``: SageAttention (8-bit QK) from the ``sageattention`` package, CUDA + fp16/bf16 only;
* ``flash``: FlashAttention 2 from the ``flash-attn`` package, CUDA + fp16/bf16 only;
* ``auto``: sage, else flash, else sdpa, by what is installed and where the tensors live.

The kernels are called through diffusers' attention dispatcher. A backend that cannot run on the
given tensors falls back to ``sdpa``, logging the reason once (per device type, dtype and head dim).

Context parallelism (``parallel_config``, see :mod:`bindweave_core.dit.parallel`) goes through
diffusers' Ulysses / ring templates. Ring attention needs each chunk's log-sum-exp, which diffusers'
plain ``native`` backend does not return: for ``sdpa`` + ring we pass diffusers' template an
SDPA forward op of ours that does (PyTorch's fused CPU kernel, or its memory-efficient CUDA kernel;
fp16/bf16 CUDA tensors use diffusers' own ``_native_flash`` ring backend).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any

import torch
from diffusers.models.attention_dispatch import _templated_context_parallel_attention, dispatch_attention_fn

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
    """The backend that will actually run; logs the choice of ``auto`` and each fallback once."""
    if requested == "auto":
        for candidate in ("sage", "flash"):
            if unavailable_reason(candidate, device_type, dtype, head_dim) is None:
                log.info("attention backend auto -> %s (%s, %s)", candidate, device_type, dtype)
                return candidate
        log.info("attention backend auto -> sdpa (%s, %s: sage/flash not usable here)", device_type, dtype)
        return "sdpa"
    reason = unavailable_reason(requested, device_type, dtype, head_dim)
    if reason is None:
        log.debug("attention backend %s (%s, %s)", requested, device_type, dtype)
        return requested
    log.warning("attention backend %r unavailable: %s; falling back to sdpa", requested, reason)
    return "sdpa"


@torch.compiler.assume_constant_result  # compiled blocks: a constant of the graph, no logging traced
def _resolved(requested: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    return resolve_backend(requested, device_type, dtype, head_dim)


def _ring_degree(parallel_config: Any) -> int:
    cp = getattr(parallel_config, "context_parallel_config", None)
    return cp.ring_degree if cp is not None else 1


def _sdpa_lse_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """SDPA returning ``(out [B,S,H,D], lse [B,S,H])``, in the forward-op form of diffusers' templates."""
    if attn_mask is not None or enable_gqa:
        raise ValueError("ring attention with sdpa takes no mask and no GQA")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, is_causal, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # the kernel pads the LSE's sequence dim
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, scale=scale)[:2]
    out = out.transpose(1, 2)
    lse = lse.transpose(1, 2)
    return (out, lse) if return_lse else out


def _no_backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("ring attention with the sdpa backend is inference-only; train without "
                              "context parallelism (or with ulysses)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              parallel_config: Any | None = None) -> torch.Tensor:
    """Softmax attention over ``[B, S, H, D]`` tensors, returning ``[B, S_q, H, D]``."""
    name = _resolved(backend, q.device.type, q.dtype, q.shape[-1])
    if name == "sdpa" and parallel_config is not None and _ring_degree(parallel_config) > 1:
        if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
            return dispatch_attention_fn(q, k, v, backend="_native_flash", parallel_config=parallel_config)
        return _templated_context_parallel_attention(
            q, k, v, forward_op=_sdpa_lse_forward_op, backward_op=_no_backward_op,
            _parallel_config=parallel_config)
    return dispatch_attention_fn(q, k, v, backend=_DISPATCH_NAMES[name], parallel_config=parallel_config)
