"""Fill a module built on the meta device with tensors read lazily from safetensors files.

Shared by every loader (DiT, VAE, UMT5, CLIP vision, Qwen2.5-VL): the loader maps stored keys to
module keys; this module separates fp8 scales and marker tensors, converts each tensor on its way
in (cast, fp8 dequantisation or fp8 quantisation) and assigns it in place, so a model is never
held twice in memory.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..dit.fp8 import FP8_DTYPE, quantize_weight
from ..errors import CheckpointError
from .safetensors_io import TensorInfo, iter_tensors

log = logging.getLogger("BindWeave")

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # per-tensor fp8 scales ("fp8_scaled" files)
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, quant tags
IGNORED_KEYS = ("scaled_fp8",)  # ComfyUI's marker tensor
FP8_STORED = (torch.float8_e4m3fn, torch.float8_e5m2)
# Tensors kept in their stored dtype stay views of the memory-mapped file, unless more than this
# fraction of the file gets converted (a view keeps the converted tensors' source pages resident).
ZERO_COPY_MAX_CONVERTED = 0.10


def split_scales(mapping: dict[str, str], infos: dict[str, TensorInfo]):
    """Split ``{module key: stored key}`` into ``(tensors, scales, ignored)``.

    ``scales`` maps a module *weight* key to its stored fp8 scale; ``ignored`` lists stored keys
    that carry no weight (markers, activation scales).
    """
    tensors: dict[str, TensorInfo] = {}
    scales: dict[str, TensorInfo] = {}
    ignored: list[str] = []
    for new, old in mapping.items():
        if new.rpartition(".")[2] in IGNORED_KEYS or new in IGNORED_KEYS or new.endswith(IGNORED_SUFFIXES):
            ignored.append(old)
            continue
        suffix = next((s for s in SCALE_SUFFIXES if new.endswith(s)), None)
        if suffix:
            scales[new[: -len(suffix)] + ".weight"] = infos[old]
        else:
            tensors[new] = infos[old]
    return tensors, scales, sorted(ignored)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def target_dtype(key: str, stored: torch.dtype, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> torch.dtype:
    """Floating tensors get ``dtype``, except modules named in ``keep_fp32`` (kept float32)."""
    if not stored.is_floating_point:
        return stored
    if keep_fp32 and dtype != torch.float32 and any(part in keep_fp32 for part in key.split(".")):
        return torch.float32
    return dtype


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is not None or stored.dtype in FP8_STORED:
        return stored.float() * (scale if scale is not None else 1.0)
    return stored


def materialize(model: nn.Module, tensors: dict[str, TensorInfo], *, scales: dict[str, TensorInfo] | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                fp8_modules: set[str] | None = None, keep_fp32: tuple[str, ...] = (), strict: bool = True,
                source: str | Path = "checkpoint") -> nn.Module:
    """Assign ``tensors`` (module key -> stored tensor) into ``model`` (built on the meta device).

    ``fp8_modules`` names ``FP8Linear`` modules whose weights are kept (or quantised) as fp8 storage.
    Only keys present in the model are read; meta tensors left afterwards are an error when
    ``strict``, else zero-filled with a warning.
    """
    scales = scales or {}
    fp8_modules = fp8_modules or set()
    device = torch.device(device)
    model_keys = set(model.state_dict())
    # stored tensor (or part of one) -> module keys; tied weights share one tensor
    wanted: dict[TensorInfo, list[str]] = {}
    for key, info in tensors.items():
        if key in model_keys:
            wanted.setdefault(info, []).append(key)

    converted = sum(info.nbytes for key, info in tensors.items()
                    if key in scales or key.rpartition(".")[0] in fp8_modules
                    or target_dtype(key, info.dtype, dtype, keep_fp32) != info.dtype)
    total = sum(info.nbytes for info in tensors.values()) or 1
    zero_copy = device.type == "cpu" and converted <= ZERO_COPY_MAX_CONVERTED * total

    def own(value: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return value.clone() if not zero_copy and value.data_ptr() == stored.data_ptr() else value

    scale_values = {info.key: t.float().reshape(()).clone() for info, t in iter_tensors(list(scales.values()))}
    for info, stored in iter_tensors(list(wanted)):
        for key in wanted[info]:
            _load_one(model, key, stored, scale_values, scales, fp8_modules, dtype, device, keep_fp32, own)

    leftover = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta}
    if leftover and strict:
        raise CheckpointError(f"{source}: these tensors were not in the file: {', '.join(list(leftover)[:8])}"
                              + (" ..." if len(leftover) > 8 else ""))
    for name, ref in leftover.items():
        log.warning("tensor %s is not in %s; set to zeros", name, source)
        _assign(model, name, torch.zeros(ref.shape, dtype=dtype, device=device))
    return model


def _load_one(model, key, stored, scale_values, scales, fp8_modules, dtype, device, keep_fp32, own) -> None:
    scale = scale_values[scales[key].key] if key in scales else None
    module_name = key.rpartition(".")[0]
    if module_name in fp8_modules and key.endswith(".weight"):
        if stored.dtype == FP8_DTYPE:
            weight, scale = stored.to(device), (scale if scale is not None else torch.ones(()))
        elif scale is None and stored.dtype not in FP8_STORED:
            weight, scale = quantize_weight(stored.to(device))
        else:
            weight, scale = quantize_weight(dequantize(stored, scale).to(device))
        _assign(model, key, own(weight, stored))
        _assign(model, module_name + ".scale_weight", scale.to(device))
    else:
        value = dequantize(stored, scale)
        value = value.to(device=device, dtype=target_dtype(key, value.dtype, dtype, keep_fp32))
        _assign(model, key, own(value, stored))



def format_key_problems(missing: list[str], unexpected: list[str], limit: int = 8,
                        mismatched: list[str] = ()) -> list[str]:
    out = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            out.append(f"{label} {len(keys)} keys: {', '.join(keys[:limit])}" + (" ..." if len(keys) > limit else ""))
    if mismatched:
        out.append(f"shape mismatch in {len(mismatched)} tensors: " + "; ".join(mismatched[:limit])
                   + (" ..." if len(mismatched) > limit else ""))
    return out


class ScannedCheckpoint:
    """What every loader's header scan (``DiTCheckpoint``, ``VAECheckpoint``, ...) reports the same way.

    For dataclasses with ``tensors`` (model key -> :class:`TensorInfo`), ``missing`` and ``unexpected``,
    and optionally ``scales`` (fp8 scale tensors) and ``mismatched`` (wrong shapes).
    """

    @property
    def fp8_scaled(self) -> bool:
        return bool(getattr(self, "scales", None))

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(i.shape) for i in self.tensors.values())

    @property
    def dtypes(self) -> Counter:
        return Counter(str(i.dtype).replace("torch.", "") for i in self.tensors.values())

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self.tensors.values()})

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def problems(self) -> list[str]:
        return format_key_problems(self.missing, self.unexpected, mismatched=getattr(self, "mismatched", ()))

    def require_matching_keys(self, model: str, component: str, hint: str = "") -> None:
        """Raise :class:`CheckpointError` naming the key problems and where the right file comes from."""
        problems = self.problems()
        if not problems:
            return
        from ..model_files import where_to_get

        raise CheckpointError(f"{self.path}: keys do not match {model} ({self.layout} layout): " + "; ".join(problems)
                              + "." + (" " + hint if hint else "") + " The file is incomplete or made for another "
                              "model. " + where_to_get(component))
