"""Which weight quantisations a safetensors file uses, and refusing the ones we cannot read.

Read: plain float tensors, and fp8 (``float8_e4m3fn`` / ``float8_e5m2``) weights with per-tensor,
per-output-channel or block scales (``materialize.dequantize``), including ComfyUI's mixed files that
describe each quantised layer in a ``<layer>.comfy_quant`` tensor (JSON bytes, e.g.
``{"format": "float8_e4m3fn"}``) or in the ``_quantization_metadata`` header entry.

Refused with the format's name and what to download instead: ComfyUI's other per-layer formats
(``nvfp4``, ``mxfp8``, ``int8_tensorwise``, ``convrot_w4a4``, ``asym_w4a8_int8`` ...), GPTQ/AWQ int4
(``qweight``/``qzeros``), and bitsandbytes 4/8-bit (``absmax``/``quant_map``/``SCB``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .tensor_info import TensorInfo
from .tensor_reader import iter_tensors

READ_FORMATS = ("float8_e4m3fn", "float8_e5m2")
COMFY_QUANT_SUFFIX = ".comfy_quant"
COMFY_QUANT_METADATA = "_quantization_metadata"
# Key endings that betray a format we do not read (format name, what gives it away).
_FOREIGN_KEY_ENDINGS = (
    (".weight_scale_2", "nvfp4 (4-bit float with two-level scales)"),
    (".qweight", "int4 GPTQ/AWQ"), (".qzeros", "int4 GPTQ/AWQ"), (".g_idx", "int4 GPTQ"),
    (".absmax", "bitsandbytes 4-bit"), (".quant_map", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes nf4"), (".quant_state.bitsandbytes__fp4", "bitsandbytes fp4"),
    (".SCB", "bitsandbytes int8"),
)
INSTEAD = ("Use the fp8 (e4m3fn, e.g. '*_fp8_scaled' / '*_fp8_e4m3fn') or bf16/fp16 safetensors release of the "
           "model instead (for the DiT, a GGUF Q8_0/Q6_K/Q5_K_M/Q4_K_M file works too).")


def comfy_quant_formats(infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict[str, str]:
    """``{layer: format}`` from ``*.comfy_quant`` tensors and the ``_quantization_metadata`` entry."""
    layers: dict[str, str] = {}
    if COMFY_QUANT_METADATA in metadata:
        try:
            for layer, conf in json.loads(metadata[COMFY_QUANT_METADATA]).get("layers", {}).items():
                layers[layer] = str(conf.get("format"))
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"unreadable {COMFY_QUANT_METADATA} entry ({e}); download the file again.") from e
    tags = [i for k, i in infos.items() if k.endswith(COMFY_QUANT_SUFFIX)]
    for info, tensor in iter_tensors(tags):
        try:
            conf = json.loads(bytes(tensor.flatten().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{info.file}: unreadable {info.key} ({e}); download the file again.") from e
        layers[info.key[: -len(COMFY_QUANT_SUFFIX)]] = str(conf.get("format"))
    return layers


def check_quantisation(path: Path | str, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict[str, str]:
    """Raise :class:`CheckpointError` for a quantisation we cannot read; return ``{layer: format}``."""
    layers = comfy_quant_formats(infos, metadata)
    foreign: dict[str, list[str]] = {}
    for layer, fmt in layers.items():
        if fmt not in READ_FORMATS:
            foreign.setdefault(fmt, []).append(layer)
    for key in infos:
        for ending, fmt in _FOREIGN_KEY_ENDINGS:
            if key.endswith(ending):
                foreign.setdefault(fmt, []).append(key)
    if foreign:
        found = "; ".join(f"{fmt} ({len(names)} layers, e.g. {sorted(names)[0]})" for fmt, names in foreign.items())
        raise CheckpointError(f"{path}: quantised as {found}, which BindWeave does not read (it reads fp8 "
                              f"e4m3fn/e5m2 with per-tensor, per-channel or block scales). {INSTEAD}")
    return layers
