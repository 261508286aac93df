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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..fp8 import FP8_DTYPE, quantize_weight
from .safetensors_io import TensorInfo, iter_tensors

log = logging.getLogger("BindWeave")

# fp8 weight scales: per tensor (ComfyUI's "fp8_scaled" files: ``scale_weight``; its mixed files:
# ``weight_scale``), per output channel, or per block (``weight_scale_inv``, 128 x 128 blocks); see
# ``dequantize``.
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_inv")
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, quant tags
IGNORED_KEYS = ("scaled_fp8",)  # ComfyUI's marker tensor
# Stored keys that real files carry and no loader needs: skipped silently by every key check
# (anything else left over is listed in one warning). Matched against the last dotted parts.
HARMLESS_SUFFIXES = (
    "scaled_fp8", ".scale_input", ".input_scale", ".comfy_quant",  # ComfyUI fp8 markers / activation scales
    "position_ids", "num_batches_tracked", "_extra_state",  # persisted buffers, framework state
    "logit_scale", "logit_bias",  # full CLIP models: the contrastive head
)
HARMLESS_PREFIXES = ("lm_head.", "text_model.", "visual_projection.", "text_projection")
BLOCK_SIZE = 128  # the usual fp8 block size when a block scale's grid does not divide the weight
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


def is_harmless_extra(key: str, prefix: str = "") -> bool:
    """Keys real files carry that no loader needs (fp8 markers, activation scales, buffers, heads)."""
    short = key[len(prefix):] if prefix and key.startswith(prefix) else key
    return short.endswith(HARMLESS_SUFFIXES) or short.startswith(HARMLESS_PREFIXES)


def _block_size(n: int, blocks: int, key: str) -> int:
    if math.ceil(n / BLOCK_SIZE) == blocks:  # the usual 128 (the last block may be partial)
        return BLOCK_SIZE
    if n % blocks == 0:
        return n // blocks
    raise CheckpointError(f"{key}: cannot tell the fp8 block size ({blocks} scale blocks for {n} rows/columns)")


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], key: str = "weight") -> torch.Tensor:
    """An fp8 scale broadcastable to a weight of ``shape``: per tensor (one value), per output channel
    (``[out]`` or ``[out, 1]``) or per block (``[out / bo, in / bi]``, expanded to every element)."""
    if scale.numel() == 1:
        return scale.reshape(())
    out = shape[0]
    if scale.numel() == out and (scale.ndim == 1 or scale.shape[1:].numel() == 1):
        return scale.reshape(out, *([1] * (len(shape) - 1)))
    if scale.ndim == 2 and len(shape) == 2:
        bo, bi = _block_size(shape[0], scale.shape[0], key), _block_size(shape[1], scale.shape[1], key)
        return scale.repeat_interleave(bo, 0)[: shape[0]].repeat_interleave(bi, 1)[:, : shape[1]]
    raise CheckpointError(f"{key}: fp8 scale of shape {list(scale.shape)} does not fit a weight of shape "
                          f"{list(shape)} (per-tensor, per-output-channel and 2-D block scales are read)")


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, key: str = "weight") -> torch.Tensor:
    if scale is not None or stored.dtype in FP8_STORED:
        return stored.float() * (expand_scale(scale, tuple(stored.shape), key) if scale is not None else 1.0)
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

    scale_values = {info.key: t.float().clone() for info, t in iter_tensors(list(scales.values()))}
    for info, stored in iter_tensors(list(wanted)):
        for key in wanted[info]:
            if info.quant is not None and not key.endswith(".qweight"):  # GGUF tensor outside a GGUFLinear
                from .gguf_io import dequantize as gguf_dequantize

                stored = gguf_dequantize(stored, info.quant, info.shape)
            elif key in scales and stored.dtype == torch.uint8:
                stored = stored.view(FP8_DTYPE)  # ComfyUI's mixed files may store e4m3fn weights as raw bytes
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
        # fp8 storage keeps one scale per tensor: finer scales are applied here and requantised
        if stored.dtype == FP8_DTYPE and (scale is None or scale.numel() == 1):
            weight, scale = stored.to(device), (scale.reshape(()) if scale is not None else torch.ones(()))
        elif scale is None and stored.dtype not in FP8_STORED:
            weight, scale = quantize_weight(stored.to(device))
        else:
            weight, scale = quantize_weight(dequantize(stored, scale, key).to(device))
        _assign(model, key, own(weight, stored))
        _assign(model, module_name + ".scale_weight", scale.to(device))
    else:
        value = dequantize(stored, scale, key)
        value = value.to(device=device, dtype=target_dtype(key, value.dtype, dtype, keep_fp32))
        _assign(model, key, own(value, stored))



def format_key_problems(missing: list[str], unexpected: list[str] = (), limit: int = 8,
                        mismatched: list[str] = ()) -> list[str]:
    out = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            out.append(f"{label} {len(keys)} keys: {', '.join(keys[:limit])}" + (" ..." if len(keys) > limit else ""))
    if mismatched:
        out.append(f"shape mismatch in {len(mismatched)} tensors: " + "; ".join(mismatched[:limit])
                   + (" ..." if len(mismatched) > limit else ""))
    return out


@dataclass(kw_only=True)
class ScannedCheckpoint:
    """What every loader's header scan (``DiTCheckpoint``, ``VAECheckpoint``, ...) reports the same way.

    Subclasses (dataclasses) add their own fields (path, layout, config, ...) in front of these.
    A missing or wrongly shaped tensor stops a load; unknown extra tensors are listed in one warning.
    """

    tensors: dict[str, TensorInfo]  # model key -> stored tensor
    scales: dict[str, TensorInfo] = field(default_factory=dict)  # model weight key -> its stored fp8 scale
    ignored: list[str] = field(default_factory=list)  # known harmless extras (markers, lm_head, buffers)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file [..], model [..]"

    def compare_keys(self, expected: dict[str, tuple[int, ...]], foreign: list[str] = (),
                     optional: tuple[str, ...] = ()) -> None:
        """Fill ``missing``, ``mismatched`` and ``unexpected`` from the model's ``{key: shape}``.

        ``foreign``: stored keys the loader could not place. Known harmless extras (see
        :func:`is_harmless_extra`) go to ``ignored`` instead of ``unexpected``.
        """
        tensors = self.tensors
        self.missing = sorted(set(expected) - set(tensors) - set(optional))
        self.mismatched = sorted(f"{tensors[k].key}: file {list(tensors[k].shape)}, model {list(s)}"
                                 for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(s))
        extras = set(foreign) | {tensors[k].key for k in set(tensors) - set(expected)}
        harmless = {k for k in extras if is_harmless_extra(k, getattr(self, "prefix", ""))}
        self.ignored = sorted(set(self.ignored) | harmless)
        self.unexpected = sorted(extras - harmless)

    @property
    def fp8_scaled(self) -> bool:
        return bool(self.scales)

    @property
    def fp8_scale_kinds(self) -> list[str]:
        """``per-tensor`` / ``per-channel`` / ``block``: how the fp8 scales of the file are laid out."""
        kinds = set()
        for key, info in self.scales.items():
            n = math.prod(info.shape)
            weight = self.tensors.get(key)
            if n == 1:
                kinds.add("per-tensor")
            elif weight is not None and n == weight.shape[0] and math.prod(info.shape[1:]) == 1:
                kinds.add("per-channel")
            else:
                kinds.add("block")
        return sorted(kinds)

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
        """What stops a load: missing and wrongly shaped tensors."""
        return format_key_problems(self.missing, mismatched=self.mismatched)

    def extras(self) -> list[str]:
        """Unknown extra tensors (a warning: the load goes on)."""
        return format_key_problems([], self.unexpected)

    def require_matching_keys(self, model: str, component: str, hint: str = "") -> None:
        """Raise :class:`CheckpointError` naming the missing / misshapen tensors and where the right file
        comes from; warn once about unknown extras."""
        if self.unexpected:
            log.warning("%s: %s; they are not part of %s and are skipped", self.path,
                        "; ".join(self.extras()), model)
        problems = self.problems()
        if not problems:
            return
        from ..model_files import where_to_get

        raise CheckpointError(f"{self.path}: keys do not match {model} ({self.layout} layout): " + "; ".join(problems)
                              + "." + (" " + hint if hint else "") + " The file is incomplete or made for another "
                              "model. " + where_to_get(component))
