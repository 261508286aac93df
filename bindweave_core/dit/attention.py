"""The one attention function of the DiT, with selectable backends.

Backends (``q, k, v`` are ``[B, S, H, D]``):

* ``sdpa``: PyTorch ``scaled_dot_product_attention`` (default; on CUDA PyTorch picks its flash,
  cuDNN or memory-efficient kernel by itself, on the CPU its fused CPU kernel);
* ``sage``: SageAttention (8-bit QK) from the ``sageattention`` package, CUDA + fp16/bf16 only;
* ``flash``: FlashAttention 2 from the ``flash-attn`` package, CUDA + fp16/bf16 only;
* ``auto``: sage, else flash, else sdpa, by what can run here.

The kernels are called through diffusers' attention dispatcher, so whether a kernel *can* run is
decided by what diffusers itself accepts: its own flags ``_CAN_USE_SAGE_ATTN`` /
``_CAN_USE_FLASH_ATTN`` (False when the package is missing, older than diffusers' minimum --
sageattention 2.1.1, flash-attn 2.6.3 in diffusers 0.42 -- or fails to import), then the GPU's compute
capability (SageAttention 2 ships kernels for sm80/86/89/90/120 only; FlashAttention 2 needs sm80+),
then dtype and head dim. A backend that cannot run falls back to ``sdpa`` with one logged reason
(per backend, device, dtype and head dim); a kernel that still raises on its first eager call is
dropped the same way. Nothing here can make ``auto`` (or an explicit choice) crash a run.

Context parallelism (``parallel_config``, see :mod:`bindweave_core.dit.parallel`) goes through
diffusers' Ulysses / ring templates. Ring attention needs each chunk's log-sum-exp, which diffusers'
plain ``native`` backend does not return: for ``sdpa`` + ring we pass diffusers' template an
SDPA forward op of ours that does (PyTorch's fused CPU kernel, or its memory-efficient CUDA kernel;
fp16/bf16 CUDA tensors use diffusers' own ``_native_flash`` ring backend).

``attn_mask`` (``[B, 1, 1, S_kv]`` bool, True = attend) lets items of one batch use different
numbers of context tokens with one kernel call (cond + uncond with different planner lengths),
so the compiled blocks see shapes, not per-item Python lengths: sdpa takes the mask, sage/flash go
through diffusers' varlen kernels.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch
from diffusers.models.attention_dispatch import _templated_context_parallel_attention, dispatch_attention_fn

from .. import constants as C

log = logging.getLogger("BindWeave")

BACKENDS = C.ATTENTION_BACKENDS
_DISPATCH_NAMES = {"sdpa": "native", "sage": "sage", "flash": "flash"}
_VARLEN_NAMES = {"sage": "sage_varlen", "flash": "flash_varlen"}
_PACKAGES = {"sage": "sageattention", "flash": "flash-attn"}
# diffusers' flag, its minimum-version constant and the kernel it imports, per backend
_DIFFUSERS_NAMES = {"sage": ("_CAN_USE_SAGE_ATTN", "_REQUIRED_SAGE_VERSION", "sageattn", "_sageattention_version"),
                    "flash": ("_CAN_USE_FLASH_ATTN", "_REQUIRED_FLASH_VERSION", "flash_attn_func",
                              "_flash_attn_version")}
# SageAttention 2 builds CUDA kernels for these architectures only (its setup.py); others raise.
SAGE_CAPABILITIES = ((8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (12, 0))
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention 2: Ampere and newer
_SAGE_HEAD_DIMS = (64, 96, 128)
_FLASH_MAX_HEAD_DIM = 256
_broken: set[str] = set()  # backends whose kernel raised once in this process


def _dispatch_module():
    return importlib.import_module("diffusers.models.attention_dispatch")


def _installed_version(backend: str) -> str | None:
    """The package version diffusers saw at import (None when it is not installed)."""
    import_utils = importlib.import_module("diffusers.utils.import_utils")
    version = getattr(import_utils, _DIFFUSERS_NAMES[backend][3], None)
    return None if version in (None, "N/A") else str(version)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def diffusers_refusal(backend: str) -> str | None:
    """Why diffusers' dispatcher will not run ``backend`` here (package, version, import), or None."""
    flag_name, required_name, kernel_name, _ = _DIFFUSERS_NAMES[backend]
    dispatch = _dispatch_module()
    package = _PACKAGES[backend]
    names = {m.value for m in getattr(dispatch, "AttentionBackendName", [])}
    flag = getattr(dispatch, flag_name, None)
    if flag is None or _DISPATCH_NAMES[backend] not in names:
        return (f"diffusers {_diffusers_version()} has no {backend!r} attention backend flag; "
                "upgrade diffusers (pip install -U diffusers)")
    required = getattr(dispatch, required_name, "?")
    if flag and getattr(dispatch, kernel_name, None) is not None:
        return None
    installed = _installed_version(backend)
    if installed is None:
        return f"package {package!r} is not installed (pip install '{package}>={required}')"
    try:
        from packaging.version import Version

        too_old = Version(installed) < Version(str(required))
    except Exception:  # an unparsable version: let diffusers' flag speak
        too_old = False
    if too_old:
        return (f"{package} {installed} is installed but diffusers {_diffusers_version()} needs >= {required} "
                f"(pip install -U '{package}>={required}'; see the README's speed section)")
    return f"{package} {installed} is installed but diffusers could not import it (see diffusers' warning above)"


def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_name(index: int | None) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:
        return "this GPU"


def unavailable_reason(backend: str, device_type: str, dtype: torch.dtype, head_dim: int,
                       device_index: int | None = None) -> str | None:
    """Why ``backend`` cannot run on these tensors, or None if it can."""
    if backend == "sdpa":
        return None
    if backend not in _PACKAGES:
        return f"unknown attention backend {backend!r} (choose one of {BACKENDS})"
    if backend in _broken:
        return "its kernel raised earlier in this run"
    refusal = diffusers_refusal(backend)
    if refusal is not None:
        return refusal
    if device_type != "cuda":
        return f"it needs CUDA tensors, got {device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs fp16/bf16 tensors, got {dtype}"
    capability = _capability(device_index)
    sm = f"sm{capability[0]}{capability[1]}"
    if backend == "sage" and tuple(capability) not in SAGE_CAPABILITIES:
        return (f"SageAttention has no kernels for {_device_name(device_index)} ({sm}; it supports "
                f"{', '.join(f'sm{a}{b}' for a, b in SAGE_CAPABILITIES)})")
    if backend == "flash" and tuple(capability) < FLASH_MIN_CAPABILITY:
        return f"FlashAttention 2 needs sm80 or newer, {_device_name(device_index)} is {sm}"
    if backend == "sage" and head_dim not in _SAGE_HEAD_DIMS:
        return f"head dim {head_dim} is not one of {_SAGE_HEAD_DIMS}"
    if backend == "flash" and (head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8):
        return f"head dim {head_dim} is not a multiple of 8 up to {_FLASH_MAX_HEAD_DIM}"
    return None


@functools.lru_cache(maxsize=None)
def resolve_backend(requested: str, device_type: str, dtype: torch.dtype, head_dim: int,
                    device_index: int | None = None) -> str:
    """The backend that will actually run; logs the choice of ``auto`` and each fallback once."""
    if requested == "auto":
        reasons = []
        for candidate in ("sage", "flash"):
            reason = unavailable_reason(candidate, device_type, dtype, head_dim, device_index)
            if reason is None:
                log.info("attention backend auto -> %s (%s, %s)", candidate, device_type, dtype)
                return candidate
            reasons.append(f"{candidate}: {reason}")
        log.info("attention backend auto -> sdpa (%s, %s; %s)", device_type, dtype, "; ".join(reasons))
        return "sdpa"
    reason = unavailable_reason(requested, device_type, dtype, head_dim, device_index)
    if reason is None:
        log.debug("attention backend %s (%s, %s)", requested, device_type, dtype)
        return requested
    log.warning("attention backend %r unavailable: %s; falling back to sdpa", requested, reason)
    return "sdpa"


@torch.compiler.assume_constant_result  # compiled blocks: a constant of the graph, no logging traced
def _resolved(requested: str, device_type: str, dtype: torch.dtype, head_dim: int, device_index: int | None) -> str:
    return resolve_backend(requested, device_type, dtype, head_dim, device_index)


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


def _kernel_failed(name: str, error: Exception) -> None:
    _broken.add(name)
    resolve_backend.cache_clear()
    log.warning("attention backend %r raised %s: %s; falling back to sdpa for the rest of this run", name,
                type(error).__name__, error)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              parallel_config: Any | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over ``[B, S, H, D]`` tensors, returning ``[B, S_q, H, D]``.

    ``attn_mask``: optional ``[B, 1, 1, S_kv]`` bool (True = attend), for a batch whose items use
    different numbers of key tokens (no context parallelism with a mask).
    """
    name = _resolved(backend, q.device.type, q.dtype, q.shape[-1], q.device.index)
    if name == "sdpa" and parallel_config is not None and _ring_degree(parallel_config) > 1:
        if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
            return dispatch_attention_fn(q, k, v, backend="_native_flash", parallel_config=parallel_config)
        return _templated_context_parallel_attention(
            q, k, v, forward_op=_sdpa_lse_forward_op, backward_op=_no_backward_op,
            _parallel_config=parallel_config)
    if name == "sdpa":
        return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend="native", parallel_config=parallel_config)
    dispatch_name = _VARLEN_NAMES[name] if attn_mask is not None else _DISPATCH_NAMES[name]
    mask = attn_mask.flatten(1) if attn_mask is not None else None  # the varlen kernels take [B, S_kv]
    if torch.compiler.is_compiling():  # no try/except in a traced graph: it runs what was resolved
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=dispatch_name, parallel_config=parallel_config)
    try:
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=dispatch_name, parallel_config=parallel_config)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # e.g. a kernel built for another GPU
        _kernel_failed(name, e)
        return attention(q, k, v, "sdpa", parallel_config, attn_mask)
