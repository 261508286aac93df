"""Reading GGUF single files (the DiT repacks ComfyUI-GGUF users run on 12-16 GB cards).

Wan GGUF files store the original Wan key names (``blocks.N.self_attn.q.weight`` ...) with the
large linear weights in a block-quantised type (``Q8_0``, ``Q6_K``, ``Q5_K``, ``Q4_K``; a file called
``Q5_K_M`` or ``Q4_K_M`` mixes ``Q5_K``/``Q4_K`` with ``Q6_K``) and the rest as ``F32``/``F16``/``BF16``.
Tensor shapes are stored innermost-first (ggml order) and are reversed here; a tensor reshaped for
quantisation carries its real shape in ``comfy.gguf.orig_shape.<name>`` metadata.

Headers become :class:`TensorInfo` entries whose ``quant`` names the type; the data stays in the
memory-mapped file. Quantised linear weights are kept as their raw bytes and dequantised layer by
layer as the model runs (``dit.gguf_linear``); everything else is dequantised on load.

Dequantisation runs in torch on the weight's device for ``Q8_0``, ``Q6_K``, ``Q5_K`` and ``Q4_K`` (the
types Wan GGUF files use; written here from ggml's block layouts and checked against the ``gguf``
package's numpy code in the tests), and with the ``gguf`` package's numpy code on the CPU for the rest.
``benchmarks/gguf_dequant.py`` prints what it costs against the matmul it feeds.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .tensor_info import TensorInfo

log = logging.getLogger("BindWeave")

ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
# Quantised types read (what Wan GGUF files use, plus the older 32-element block types).
SUPPORTED_QUANTS = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install gguf "
                              "(or pip install 'comfyui-bindweave[gguf]').") from e
    return gguf


@functools.lru_cache(maxsize=4)
def _reader(file: str, mtime: float):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(file)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{file}: not a readable GGUF file ({e}). It is probably truncated: download it "
                              "again.") from e


def reader(file: Path):
    return _reader(str(file), file.stat().st_mtime)


def _field_str(r, name: str) -> str | None:
    field = r.get_field(name)
    if field is None or not field.data:
        return None
    try:
        return str(field.parts[field.data[-1]], encoding="utf-8")
    except (TypeError, UnicodeDecodeError):
        return str(field.parts[field.data[-1]][0])


def _orig_shape(r, name: str) -> tuple[int, ...] | None:
    field = r.get_field(ORIG_SHAPE_FIELD + name)
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``{name: TensorInfo}`` (torch-order shapes, ``quant`` set for quantised types) and metadata."""
    r = reader(file)
    infos: dict[str, TensorInfo] = {}
    unsupported: dict[str, list[str]] = {}
    for t in r.tensors:
        qtype = t.tensor_type.name
        shape = _orig_shape(r, t.name) or tuple(int(v) for v in reversed(t.shape.tolist()))
        if qtype in _FLOATS:
            infos[t.name] = TensorInfo(file, t.name, _FLOATS[qtype], shape)
        elif qtype in SUPPORTED_QUANTS:
            infos[t.name] = TensorInfo(file, t.name, torch.uint8, shape, quant=qtype, stored_bytes=int(t.n_bytes))
        else:
            unsupported.setdefault(qtype, []).append(t.name)
    if unsupported:
        kinds = ", ".join(f"{q} ({len(v)} tensors, e.g. {v[0]})" for q, v in unsupported.items())
        raise CheckpointError(f"{file}: GGUF quantisation type {kinds} is not supported. Use a GGUF file in "
                              f"one of {', '.join(SUPPORTED_QUANTS)} (e.g. a Q8_0, Q6_K, Q5_K_M or Q4_K_M "
                              "Wan file), or the fp8/bf16 safetensors release.")
    metadata = {"format": "gguf"}
    for name in ("general.architecture", "general.name"):
        value = _field_str(r, name)
        if value is not None:
            metadata[name] = value
    return infos, metadata


def iter_gguf(file: Path, items: list[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield ``(info, tensor)``: float types as torch views of the memory map (torch-order shape),
    quantised types as their raw bytes (a flat ``uint8`` view)."""
    by_name = {t.name: t for t in reader(file).tensors}
    for info in items:
        data = by_name[info.key].data
        with warnings.catch_warnings():  # the memory map is read-only; nothing writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            if info.quant is not None:
                yield info, torch.from_numpy(data.reshape(-1).view(np.uint8))
            elif info.dtype == torch.bfloat16:
                yield info, torch.from_numpy(data.reshape(-1).view(np.int16)).view(torch.bfloat16).reshape(info.shape)
            else:
                yield info, torch.from_numpy(data).reshape(info.shape)


def _q8_0(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q8_0: blocks of 34 bytes, one float16 scale then 32 int8 values (value = scale * int8)."""
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    values = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (values * scale).reshape(shape)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32 ``[n, 1]``."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _q6_k(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q6_K: 256 values per 210-byte block: low 4 bits (128 B), high 2 bits (64 B), 16 int8 scales, float16 d.

    Each half of 128 values reads 64 low-nibble bytes (low nibbles = values 0-63, high nibbles = 64-127)
    and 32 high-bit bytes (bit pairs 0-1, 2-3, 4-5, 6-7 = the four runs of 32); 16 values share a scale.
    """
    blocks = raw.reshape(-1, 210)
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64).int()
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32).int()
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 2, 4, 2, 1)
    low = torch.cat([ql & 0xF, ql >> 4], dim=-1).reshape(n, 2, 4, 32)
    shifts = torch.arange(0, 8, 2, device=raw.device, dtype=torch.int32).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)) - 32).float().reshape(n, 2, 4, 2, 16)
    d = _f16(blocks, 208).reshape(n, 1, 1, 1, 1)
    return (d * scales * q).reshape(shape)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in bytes 4-15 of a Q4_K / Q5_K block: ``[n, 8]`` each."""
    s = blocks[:, 4:16].int()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _q4_k_q5_k(raw: torch.Tensor, shape: tuple[int, ...], five: bool) -> torch.Tensor:
    """Q4_K (144-byte blocks) / Q5_K (176): float16 d and dmin, 8 six-bit scale/min pairs, for Q5_K 32 bytes
    of fifth bits, then 128 bytes of nibbles. Each run of 64 values is 32 low nibbles then 32 high ones,
    32 values per scale/min pair: value = d * scale * q - dmin * min."""
    size = 176 if five else 144
    blocks = raw.reshape(-1, size)
    n = blocks.shape[0]
    qs = blocks[:, size - 128:].reshape(n, 4, 1, 32).int()
    shifts = torch.tensor([0, 4], device=raw.device, dtype=torch.int32).reshape(1, 1, 2, 1)
    q = (qs >> shifts) & 0xF  # [n, run, low/high nibble, 32]
    if five:
        qh = blocks[:, 16:48].reshape(n, 1, 1, 32).int()
        bits = torch.arange(8, device=raw.device, dtype=torch.int32).reshape(1, 4, 2, 1)
        q = q | (((qh >> bits) & 1) << 4)
    sc, mn = _k_scales(blocks)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scale = (d * sc).reshape(n, 4, 2, 1)
    offset = (dmin * mn).reshape(n, 4, 2, 1)
    return (scale * q.float() - offset).reshape(shape)


_TORCH_DEQUANT = {
    "Q8_0": _q8_0, "Q6_K": _q6_k,
    "Q5_K": lambda raw, shape: _q4_k_q5_k(raw, shape, five=True),
    "Q4_K": lambda raw, shape: _q4_k_q5_k(raw, shape, five=False),
}
_NUMPY_NOTED: set[str] = set()


def dequantize(raw: torch.Tensor, quant: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values of a quantised GGUF tensor (raw bytes -> ``shape``), on ``raw``'s device."""
    if quant in _TORCH_DEQUANT:
        return _TORCH_DEQUANT[quant](raw, shape)
    return dequantize_numpy(raw, quant, shape)


def dequantize_numpy(raw: torch.Tensor, quant: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The same with the ``gguf`` package's numpy code (every type it knows; CPU only)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[quant]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if quant not in _NUMPY_NOTED:
        _NUMPY_NOTED.add(quant)
        log.info("GGUF %s weights are dequantised with gguf's numpy code on the CPU", quant)
    rows = raw.detach().cpu().numpy().reshape(-1, type_size)
    values = gguf.quants.dequantize(rows, qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape).to(raw.device)
