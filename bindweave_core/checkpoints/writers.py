"""Writing safetensors checkpoints safely (temp name, then rename), whole or sharded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to a temporary name in the same folder, then rename (user's file mode)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def save_sharded(tensors: dict[str, torch.Tensor], directory: str | os.PathLike, *,
                 prefix: str = "diffusion_pytorch_model", max_shard_bytes: int = 5 << 30,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``prefix-0000i-of-0000n.safetensors`` shards plus ``prefix.safetensors.index.json``."""
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_file(shard, directory / name, metadata)
        weight_map.update({k: name for k in shard})
    index = directory / f"{prefix}.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(index) as tmp:
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return directory
