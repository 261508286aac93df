"""Reading safetensors checkpoints lazily: headers without data, tensors one at a time.

A checkpoint is one ``.safetensors`` file or a directory of shards (with or without an
``*.safetensors.index.json``). Tensors come from safetensors' memory map: a tensor kept in its
stored dtype on the CPU stays a view of the file (no copy), and a converted one is released from
the map as soon as it has been converted, so loading never holds two copies of a model.

Pickled ``.pt`` / ``.pth`` state dicts (and SAT checkpoint folders, see ``sat_layout``) go through
the same functions: they are memory-mapped with the restricted unpickler of ``pickle_io``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import in_memory, pickle_io
from .file_type import GGUF, PICKLE, SAFETENSORS, sniff, what_it_is
from .in_memory import is_in_memory
from .tensor_info import SAFETENSORS_DTYPES, TensorInfo
from .tensor_reader import is_gguf, iter_tensors, open_safetensors

__all__ = ["TensorInfo", "checkpoint_files", "component_dir", "is_gguf", "iter_tensors", "read_header"]

def component_dir(path: Path, subfolder: str) -> Path:
    """Accept a whole diffusers repository folder as well as its component subfolder (``vae``, ...)."""
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / subfolder).is_dir():
        return path / subfolder
    return path


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files making up ``path`` (a file, or a directory of shards)."""
    p = Path(path)
    if is_in_memory(p):
        return [p]
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory. Check the path, or download the model first.")
    if p.is_dir():
        from .sat_layout import find_sat_checkpoint

        sat = find_sat_checkpoint(p)
        if sat is not None:
            return [sat]
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{indexes[0]}: unreadable shard index ({e}); re-download it.") from e
            files = sorted({p / name for name in weight_map.values()})
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise CheckpointError(
                    f"{p}: the index lists shards that are missing: {', '.join(absent)}. "
                    "Download every shard of the model into this directory.")
            return files
        files = sorted(p.glob("*.safetensors"))
        pickles = sorted(f for f in p.iterdir() if pickle_io.is_pickle(f))
        if not files and len(pickles) == 1:
            return pickles  # e.g. Kaleido's umt5-xxl/ folder: one .pth beside its tokenizer
        if not files:
            raise CheckpointError(f"{p}: directory holds no .safetensors files. Point at the model's weight "
                                  "file or at the directory with its diffusion_pytorch_model-*.safetensors shards.")
        return files
    kind = sniff(p)  # by content: a file's name says little (random bytes named .bin are not a pickle)
    if kind in (SAFETENSORS, GGUF) or (kind == PICKLE and pickle_io.is_pickle(p)):
        return [p]
    if kind == PICKLE:
        raise CheckpointError(f"{p}: this is a pickled PyTorch checkpoint, not safetensors. "
                              "Use the .safetensors release of the model (or save it as a .pt/.pth state dict).")
    raise CheckpointError(
        f"{p}: not recognised: not a readable safetensors file, GGUF file or PyTorch checkpoint ({what_it_is(p)}). "
        "It is probably truncated or not a model file: download it again.")


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``{key: TensorInfo}`` and the merged ``__metadata__`` of every file of a checkpoint."""
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in checkpoint_files(path):
        if is_in_memory(file):
            infos.update(in_memory.header(file))
            continue
        if is_gguf(file):
            from .gguf_io import read_gguf_header

            gguf_infos, gguf_metadata = read_gguf_header(file)
            infos.update(gguf_infos)
            metadata.update(gguf_metadata)
            continue
        if pickle_io.is_pickle(file):
            for key, t in pickle_io.read_state_dict(file).items():
                infos[key] = TensorInfo(file, key, t.dtype, tuple(t.shape))
            continue
        with open_safetensors(file) as f:
            metadata.update(f.metadata() or {})
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.uint8)
                infos[key] = TensorInfo(file, key, dtype, tuple(sl.get_shape()))
    _check_sizes(infos)
    from .quant_formats import check_quantisation

    check_quantisation(path, infos, metadata)
    return infos, metadata


def _check_sizes(infos: dict[str, TensorInfo]) -> None:
    """A truncated file can still have a whole header: compare the data it promises with its size."""
    ends: dict[Path, int] = {}
    for info in infos.values():
        if is_in_memory(info.file) or pickle_io.is_pickle(info.file):
            continue  # tensors in memory; or torch.load already checked the archive
        ends[info.file] = ends.get(info.file, 0) + info.nbytes
    for file, data_bytes in ends.items():
        if is_gguf(file):
            continue  # GGUFReader maps every tensor and fails on a short file
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        if file.stat().st_size < 8 + header_len + data_bytes:
            raise CheckpointError(
                f"{file}: truncated ({file.stat().st_size:,} bytes, its header promises "
                f"{8 + header_len + data_bytes:,}). Download it again.")


