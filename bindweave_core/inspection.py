"""``python -m bindweave_core inspect PATH``: what a model file is, from its headers only."""

from __future__ import annotations

import importlib
import os
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoints.identify import identify
from .checkpoints.safetensors_io import read_header
from .errors import CheckpointError

# Kind -> "module:object" whose ``inspect_report(path, infos, metadata) -> dict`` adds the model's part
# (the encoders' classes, see encoders/base.py; the DiT loader's function). Imported on use.
INSPECTORS: dict[str, str] = {
    "dit": "bindweave_core.dit.loading:inspect_report",
    "vae": "bindweave_core.encoders.vae:WanVAE.inspect_report",
    "umt5": "bindweave_core.encoders.text:TextEncoder.inspect_report",
    "clip_vision": "bindweave_core.encoders.clip_vision:ClipVisionEncoder.inspect_report",
    "qwen2.5-vl": "bindweave_core.encoders.planner:Planner.inspect_report",
}


def inspector(kind: str) -> Callable[[Path, dict, dict], dict]:
    module, _, attribute = INSPECTORS[kind].partition(":")
    found: Any = importlib.import_module(module)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def check_inspectable(path: Path) -> None:
    """A model file or folder, refused at once otherwise: a FIFO, device or socket would block the read (or
    never end), so only regular files and directories (diffusers folders, shards, SAT checkpoints) are read."""
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to a model file is fine
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found. Check the path.") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}).") from None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    raise CheckpointError(f"{path} is {kind}, not a model file: inspect reads a .safetensors/.gguf/.pt file or a "
                          "model folder.")


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able report: kind, layout, family, dtypes, parameter count, key problems."""
    path = Path(path)
    check_inspectable(path)
    infos, metadata = read_header(path)
    sig = identify(infos)
    dtypes = Counter(i.quant or str(i.dtype).replace("torch.", "") for i in infos.values())
    params = 0
    for info in infos.values():
        n = 1
        for s in info.shape:
            n *= s
        params += n
    report: dict[str, Any] = {
        "path": str(path),
        "kind": sig.kind if sig else "unknown",
        "layout": sig.layout if sig else None,
        "description": sig.description if sig else "not recognised: no known key pattern",
        "tensors": len(infos),
        "dtypes": dict(dtypes),
        "parameters": params,
        "bytes": sum(f.stat().st_size for f in {i.file for i in infos.values()}),
        "problems": [],
        "format": "gguf" if metadata.get("format") == "gguf" else
                  "pickle" if any(i.file.suffix.lower() in (".pt", ".pth") for i in infos.values()) else "safetensors",
    }
    if sig is None:
        sample = ", ".join(sorted(infos)[:5])
        report["problems"].append(f"not recognised: {len(infos)} tensors ({sample}{' ...' if len(infos) > 5 else ''})"
                                  " match no model BindWeave loads (DiT, VAE, UMT5, CLIP vision, Qwen2.5-VL)")
    elif sig.kind not in INSPECTORS:
        report["problems"].append(f"not recognised as a BindWeave model file: this is {sig.description}")
    if sig is not None and sig.kind in INSPECTORS:
        try:
            report.update(inspector(sig.kind)(path, infos, metadata))
        except CheckpointError as e:
            report["problems"].append(str(e))
    return report


# Config entries too long or too internal for the one-line summary (still in --json).
_CONFIG_HIDDEN = ("latents_mean", "latents_std", "patch_size")


def format_report(report: dict[str, Any]) -> str:
    lines = [f"path:        {report['path']}",
             f"kind:        {report['kind']} ({report['description']})"]
    for key in ("layout", "family"):
        if report.get(key):
            lines.append(f"{key + ':':<13}{report[key]}")
    lines.append(f"format:      {report.get('format', 'safetensors')}")
    lines.append(f"dtypes:      {', '.join(f'{k} x{v}' for k, v in sorted(report['dtypes'].items()))}")
    lines.append(f"quantised:   {quantisation(report)}")
    lines.append(f"parameters:  {report['parameters']:,}")
    lines.append(f"tensors:     {report['tensors']:,} in {report['bytes']:,} bytes")
    if report.get("config"):
        shown = {k: v for k, v in report["config"].items() if k not in _CONFIG_HIDDEN}
        lines.append("config:      " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for key in ("tokenizer", "lm_head"):
        if key in report:
            lines.append(f"{key + ':':<13}{report[key]}")
    lines += [f"extra:       {e} (skipped on load)" for e in report.get("extras", [])]
    if report["problems"]:
        lines += [f"problem:     {p}" for p in report["problems"]]
    else:
        lines.append("problems:    none")
    return "\n".join(lines)


def quantisation(report: dict[str, Any]) -> str:
    """One line: GGUF types, fp8 scale kinds, or ``no``."""
    if report.get("gguf_types"):
        return "GGUF " + ", ".join(f"{k} x{v}" for k, v in sorted(report["gguf_types"].items()))
    if report.get("fp8_scaled"):
        kinds = "/".join(report.get("fp8_scales") or ["per-tensor"])
        return f"fp8 weights with {kinds} scales (dequantised on load)"
    if any(k.startswith("float8") for k in report["dtypes"]):
        return "fp8 weights without scales"
    return "no"
